"""Text to token ids and back: a byte-level tokenizer or a Hugging Face `tokenizer.json`.

`dsvc tokenize` turns text files into the flat token file `train { data = tokens(...) }`
reads and writes a record beside it (`<file>.json`) naming the tokenizer, so that
`dsvc generate` decodes a model trained on that file with the same tokenizer.

- `bytes`: id = the UTF-8 byte (0-255), `BYTE_EOS` (256) ends a document; the model's
  vocabulary must hold 257 ids. Needs nothing installed.
- an HF checkpoint or tokenizer directory: its `tokenizer.json` through the `tokenizers`
  package (installed with transformers); end of document = the `eos_token` of its
  `tokenizer_config.json` (or `eos_token_id` of `config.json`).

Every file is read through `dsvc.runtime.inputs` (regular files only, size checked
before reading). Errors are `TokenizerError`, one line.
"""

from __future__ import annotations

import os

from dsvc.runtime.inputs import JSON_BYTES, InputError, load_json, read_bytes

BYTE_EOS = 256
BYTE_VOCAB = 257
RECORD_FORMAT = "dsvc-tokens"
RECORD_VERSION = 1
TOKENIZER_JSON = "tokenizer.json"


class TokenizerError(Exception):
    """A tokenizer that cannot be found or read, or text it cannot encode; one line."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, end of document 256."""

    kind = "bytes"
    eos = BYTE_EOS
    vocab_size = BYTE_VOCAB

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"kind": "bytes", "eos": BYTE_EOS}


class HFTokenizer:
    """A Hugging Face fast tokenizer (`tokenizer.json`) from a checkpoint directory."""

    kind = "hf"

    def __init__(self, directory: str):
        path = os.path.join(directory, TOKENIZER_JSON)
        if not os.path.exists(path):
            raise TokenizerError(f"{directory} has no {TOKENIZER_JSON}")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TokenizerError(f"reading {path} needs the `tokenizers` package (pip install "
                                 "tokenizers; it comes with transformers)") from None
        try:
            text = read_bytes(path, JSON_BYTES).decode("utf-8")
            self._tok = Tokenizer.from_str(text)
        except InputError as err:
            raise TokenizerError(str(err)) from None
        except Exception as err:  # noqa: BLE001 - the Rust library's own exception type
            raise TokenizerError(f"{path} is not a tokenizer the `tokenizers` package reads "
                                 f"({str(err).splitlines()[0] if str(err) else type(err).__name__})"
                                 ) from None
        self.directory = os.path.abspath(directory)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos = _eos_id(directory, self._tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def describe(self) -> dict:
        return {"kind": "hf", "dir": self.directory, "eos": self.eos}


def _eos_id(directory: str, tok) -> int | None:
    """The end-of-sequence id: `eos_token` of tokenizer_config.json, else `eos_token_id` of
    config.json (the first one where it is a list), else None."""
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(cfg_path):
        cfg = _json(cfg_path)
        eos = cfg.get("eos_token") if isinstance(cfg, dict) else None
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and tok.token_to_id(eos) is not None:
            return int(tok.token_to_id(eos))
    model_cfg = os.path.join(directory, "config.json")
    if os.path.exists(model_cfg):
        cfg = _json(model_cfg)
        eos = cfg.get("eos_token_id") if isinstance(cfg, dict) else None
        if isinstance(eos, list) and eos:
            eos = eos[0]
        if isinstance(eos, int) and not isinstance(eos, bool) and eos >= 0:
            return eos
    return None


def _json(path: str):
    try:
        return load_json(path)
    except InputError as err:
        raise TokenizerError(str(err)) from None


def load_tokenizer(name: str):
    """`bytes`, or a directory holding `tokenizer.json`."""
    if name == "bytes":
        return ByteTokenizer()
    if not os.path.isdir(name):
        raise TokenizerError(f"tokenizer {name!r}: not `bytes` and not a directory")
    return HFTokenizer(name)


def tokenizer_from_record(record: dict, source: str):
    """The tokenizer a token file's record (`<file>.json`) names."""
    tok = record.get("tokenizer") if isinstance(record, dict) else None
    if not isinstance(tok, dict) or tok.get("kind") not in ("bytes", "hf"):
        raise TokenizerError(f"{source} does not name a tokenizer (`bytes` or an HF directory)")
    if tok["kind"] == "bytes":
        return ByteTokenizer()
    where = tok.get("dir")
    if not isinstance(where, str) or not os.path.isdir(where):
        raise TokenizerError(f"{source} names the tokenizer in {where!r}, which is gone; pass "
                             "--tokenizer DIR")
    return HFTokenizer(where)


def record_path(token_file: str) -> str:
    """Where the record of a token file lives: beside it, `<file>.json`."""
    return token_file + ".json"


def read_record(token_file: str) -> dict | None:
    """The record `dsvc tokenize` wrote beside `token_file`, or None if there is none."""
    path = record_path(token_file)
    if not os.path.exists(path):
        return None
    record = _json(path)
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise TokenizerError(f"{path} is not a dsvc token-file record")
    return record
