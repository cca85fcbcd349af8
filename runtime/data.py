"""Training data: a learnable synthetic stream and memory-mapped token files.

Both are indexed by a global *sample* number, so sharding over data-parallel
ranks and resuming are exact: step `s` of a run with global batch `G` uses
samples `s*G .. s*G + G - 1`; data-parallel rank `r` of `D` takes the
contiguous slice `r*G/D .. (r+1)*G/D - 1` of them, in micro-batches. A
resumed run restarts at the sample position its checkpoint recorded, so it reads the same
samples (even if the global batch changed in between).

Shapes: `tokens_BS1` is (batch, seq_len + 1) int64: inputs are `[:, :-1]`,
labels `[:, 1:]`.
"""

from __future__ import annotations

import os

import numpy as np
import torch


class DataError(Exception):
    """A data problem a user can fix (missing file, wrong dtype): a clear message."""


class SyntheticData:
    """Sequences that follow a rule a model can learn, so the loss must fall.

    Sample `i` is an arithmetic progression modulo `vocab`: a random start and a
    stride drawn from a small set, both determined by (seed, i). After two
    tokens the rest of the sequence is predictable.
    """

    STRIDES = (1, 2, 3, 5, 7)

    def __init__(self, vocab: int, seq_len: int, seed: int = 0):
        self.vocab, self.seq_len, self.seed = vocab, seq_len, seed

    def samples(self, start: int, count: int) -> torch.Tensor:
        idx = np.arange(start, start + count, dtype=np.uint64)
        # a splitmix-style hash of (seed, index): deterministic, order-free
        # the seed's mix in Python ints (numpy warns on a scalar uint64 overflow); array
        # arithmetic wraps modulo 2**64 as the hash wants
        mix = np.uint64(self.seed * 0x9E3779B97F4A7C15 % (1 << 64))
        h = (idx + mix) * np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(31)
        first = (h % np.uint64(self.vocab)).astype(np.int64)
        pick = ((h >> np.uint64(17)) % np.uint64(len(self.STRIDES))).astype(np.int64)
        stride = np.array(self.STRIDES, dtype=np.int64)[pick]
        pos = np.arange(self.seq_len + 1, dtype=np.int64)
        seq = (first[:, None] + stride[:, None] * pos[None, :]) % self.vocab
        return torch.from_numpy(seq)


class TokenFileData:
    """A flat file of token ids (uint16 or uint32), read through a memory map.

    Sample `i` is the window `[i*seq_len, i*seq_len + seq_len + 1)`; samples
    wrap around the file (epochs) when the run outlasts it.
    """

    def __init__(self, path: str, dtype: str, vocab: int, seq_len: int):
        if dtype not in ("uint16", "uint32"):
            raise DataError(f"token dtype must be uint16 or uint32, got {dtype!r}")
        if not os.path.isfile(path):
            raise DataError(f"token file not found: {path!r}")
        itemsize = np.dtype(dtype).itemsize
        size = os.path.getsize(path)
        if size % itemsize:
            raise DataError(f"{path}: {size} bytes is not a whole number of {dtype} tokens; "
                            "is the dtype right?")
        n = size // itemsize
        if n < seq_len + 1:
            raise DataError(f"{path}: {n} tokens, fewer than one sequence of {seq_len + 1}")
        self.tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
        self.seq_len, self.vocab = seq_len, vocab
        self.num_samples = (n - 1) // seq_len
        probe = np.asarray(self.tokens[: min(n, 1 << 20)])
        top = int(probe.max()) if probe.size else 0
        if top >= vocab:
            other = "uint32" if dtype == "uint16" else "uint16"
            raise DataError(f"{path}: token id {top} is outside the vocabulary of {vocab}; "
                            f"the file may hold {other} tokens")
        if dtype == "uint16" and _looks_like_uint32(probe):
            raise DataError(f"{path}: every second uint16 token is 0, the pattern of uint32 "
                            "token ids read as uint16; is the dtype right (uint32)?")

    def samples(self, start: int, count: int) -> torch.Tensor:
        rows = []
        for i in range(start, start + count):
            j = (i % self.num_samples) * self.seq_len
            rows.append(np.asarray(self.tokens[j : j + self.seq_len + 1], dtype=np.int64))
        out = torch.from_numpy(np.stack(rows))
        if int(out.max()) >= self.vocab:
            raise DataError(f"token id {int(out.max())} is outside the vocabulary of {self.vocab}")
        return out


def _looks_like_uint32(probe: np.ndarray) -> bool:
    """Small uint32 ids read as uint16 come out as (id, 0) pairs: all odd positions 0.

    Ids below the vocabulary pass the range check, so this pattern is the only tell;
    real uint16 text never has it over a few dozen tokens."""
    if probe.size < 64:
        return False
    return not probe[1::2].any() and bool(probe[0::2].any())


def make_data(kind: str, *, vocab: int, seq_len: int, seed: int = 0, path: str | None = None,
              dtype: str = "uint32", base_dir: str | None = None):
    """The data source a plan's `train.data` section names."""
    if kind == "synthetic":
        return SyntheticData(vocab, seq_len, seed)
    if kind == "tokens":
        if path is None:
            raise DataError("token data needs a path")
        if base_dir and not os.path.isabs(path):
            path = os.path.join(base_dir, path)
        return TokenFileData(path, dtype, vocab, seq_len)
    raise DataError(f"unknown data kind {kind!r}")


class Sharder:
    """Which samples a data-parallel rank reads at each step, in micro-batches."""

    def __init__(self, global_batch: int, data_parallel: int, dp_rank: int, micro_batch: int):
        if global_batch % (data_parallel * micro_batch):
            raise DataError(f"global batch {global_batch} does not split over {data_parallel} "
                            f"data-parallel ranks in micro-batches of {micro_batch}")
        self.global_batch, self.dp, self.rank, self.micro = global_batch, data_parallel, dp_rank, micro_batch
        self.per_rank = global_batch // data_parallel

    @property
    def num_microbatches(self) -> int:
        return self.per_rank // self.micro

    # A run resumed from a checkpoint continues at the checkpoint's sample position even
    # if the global batch changed since: step `base_step` reads sample `base_sample`.
    base_step = 0
    base_sample = 0

    def resume_at(self, step: int, sample: int) -> None:
        """Read sample `sample` (a checkpoint's `data.samples`) at step `step`."""
        self.base_step, self.base_sample = step, sample

    def samples_before(self, step: int) -> int:
        """The global sample index step `step` starts at (what a checkpoint records)."""
        return self.base_sample + (step - self.base_step) * self.global_batch

    def first_sample(self, step: int) -> int:
        return self.samples_before(step) + self.rank * self.per_rank

    def step_batch(self, data, step: int) -> torch.Tensor:
        """This rank's (per_rank, seq_len + 1) tokens for `step` (0-based)."""
        return data.samples(self.first_sample(step), self.per_rank)

    def microbatches(self, data, step: int) -> list[torch.Tensor]:
        return list(self.step_batch(data, step).split(self.micro))
