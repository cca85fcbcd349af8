"""`dsvc tokenize PATH... -o OUT.bin --tokenizer bytes|DIR`: text files -> a token file.

The output is what `train { data = tokens("OUT.bin", dtype = ...) }` reads: a flat
array of token ids (uint16 when the tokenizer's ids fit, else uint32), each
document followed by the tokenizer's end-of-document id. Directories are walked in
sorted order for files matching `--glob` (skipping `--exclude` sub-directories);
`--shuffle SEED` permutes the documents
(so that a training run's consecutive steps do not read one package after another).
Files that are not UTF-8 text are skipped and counted. `OUT.bin.json` beside it
records the tokenizer and the counts; `dsvc generate` reads it to decode a model
trained on the file. Both files are replaced atomically.
"""

from __future__ import annotations

import fnmatch
import os
import sys

# One text file to tokenize: far above any source file, small enough to hold in memory.
TEXT_BYTES = 256 * 1024 * 1024


def add_arguments(p) -> None:
    p.add_argument("paths", metavar="PATH", nargs="+", help="text files or directories")
    p.add_argument("-o", "--output", metavar="OUT.bin", required=True, help="the token file")
    p.add_argument("--tokenizer", metavar="bytes|DIR", required=True,
                   help="`bytes` (UTF-8 bytes, end of document 256) or a directory with an HF "
                   "tokenizer.json (a checkpoint directory)")
    p.add_argument("--glob", default="*", metavar="PATTERN",
                   help="in directories, the files to read (default: all), e.g. '*.py'")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="in directories, skip sub-directories whose name matches (repeatable)")
    p.add_argument("--dtype", choices=("uint16", "uint32"),
                   help="token dtype (default: uint16 when every id fits)")
    p.add_argument("--shuffle", type=int, metavar="SEED",
                   help="permute the documents with this seed (default: the order read)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="stop after N tokens")


def _documents(paths: list[str], pattern: str, exclude: list[str]) -> list[str]:
    from dsvc.compiler.cli import UsageError

    out = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not any(fnmatch.fnmatch(d, x) for x in exclude))
                out += [os.path.join(root, f) for f in sorted(files) if fnmatch.fnmatch(f, pattern)]
        elif os.path.exists(path):
            out.append(path)
        else:
            raise UsageError(f"{path}: no such file or directory")
    if not out:
        raise UsageError(f"no file matches {pattern!r} in {', '.join(paths)}")
    return out


def _write_atomic(path: str, data: bytes) -> None:
    from dsvc.compiler.cli import UsageError

    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from None


def run(args) -> int:
    import json
    import random
    from array import array

    from dsvc.compiler.cli import UsageError
    from dsvc.compiler.tokenizer import (
        RECORD_FORMAT,
        RECORD_VERSION,
        TokenizerError,
        load_tokenizer,
        record_path,
    )
    from dsvc.runtime.inputs import InputError, read_text

    if args.max_tokens is not None and args.max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    out = args.output
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out) or not os.path.isdir(parent):
        raise UsageError(f"-o {out}: not a file in an existing directory")
    try:
        tok = load_tokenizer(args.tokenizer)
    except TokenizerError as err:
        print(f"dsvc tokenize: error: {err}", file=sys.stderr)
        return 1
    dtype = args.dtype or ("uint16" if tok.vocab_size <= 1 << 16 else "uint32")
    if dtype == "uint16" and tok.vocab_size > 1 << 16:
        raise UsageError(f"--dtype uint16: the tokenizer has {tok.vocab_size} ids, over 65536")
    files = _documents(args.paths, args.glob, args.exclude)
    if args.shuffle is not None:
        random.Random(args.shuffle).shuffle(files)
    ids = array("H" if dtype == "uint16" else "I")
    docs, skipped = 0, []
    for path in files:
        try:
            text = read_text(path, TEXT_BYTES)
        except InputError as err:
            skipped.append(str(err))
            continue
        ids.extend(tok.encode(text))
        if tok.eos is not None:
            ids.append(tok.eos)
        docs += 1
        if args.max_tokens is not None and len(ids) >= args.max_tokens:
            del ids[args.max_tokens:]
            break
    if not ids:
        print(f"dsvc tokenize: error: no text read from {len(files)} file(s) "
              f"({skipped[0] if skipped else 'all empty'})", file=sys.stderr)
        return 1
    if sys.byteorder != "little":
        ids.byteswap()  # token files are little-endian, as numpy's uint16/uint32 read them
    _write_atomic(out, ids.tobytes())
    record = {"format": RECORD_FORMAT, "version": RECORD_VERSION, "dtype": dtype,
              "tokens": len(ids), "documents": docs, "files_skipped": len(skipped),
              "tokenizer": tok.describe(), "vocab_needed": tok.vocab_size}
    _write_atomic(record_path(out), (json.dumps(record, indent=1) + "\n").encode())
    eos = f", end of document {tok.eos}" if tok.eos is not None else ""
    print(f"wrote {out}: {len(ids):,} {dtype} tokens from {docs} document(s) "
          f"(tokenizer {tok.kind}{eos}; a model needs vocab >= {tok.vocab_size}); "
          f"record {record_path(out)}", file=sys.stderr)
    if skipped:
        print(f"dsvc tokenize: note: skipped {len(skipped)} file(s) that are not UTF-8 text or "
              f"not readable (first: {skipped[0]})", file=sys.stderr)
    return 0
