"""The training console on rank 0: a progress line, `metrics.jsonl`, a summary.

Each step appends one JSON object to `RUN_DIR/metrics.jsonl` with at least
`step`, `loss`, `lr`, `grad_norm`, `tokens_per_s` and `max_expert_load_ratio`
(the busiest expert's load over the mean; 1.0 is perfectly balanced). The
progress bar uses tqdm when it is installed and a plain line otherwise.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time


class Console:
    def __init__(self, run_dir: str, total_steps: int, first_step: int = 0, enabled: bool = True,
                 stream=None):
        self.enabled = enabled
        self.run_dir = run_dir
        self.total = total_steps
        self.first = first_step
        self.stream = stream or sys.stderr
        self.records: list[dict] = []
        self.start = time.perf_counter()
        self._bar = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            self.path = os.path.join(run_dir, "metrics.jsonl")
            if first_step == 0 and os.path.exists(self.path):
                os.replace(self.path, self.path + ".prev")  # a fresh run: keep, don't mix
            elif first_step > 0 and os.path.exists(self.path):
                self._truncate_after(first_step)
            try:
                if stream is None and self.stream.isatty():
                    from tqdm import tqdm

                    self._bar = tqdm(total=total_steps, initial=first_step, file=self.stream,
                                     dynamic_ncols=True, unit="step")
            except Exception:  # noqa: BLE001 - tqdm is optional
                self._bar = None

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint."""
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
                except (ValueError, KeyError):
                    continue
        with open(self.path, "w") as f:
            f.writelines(kept)

    def header(self, text: str) -> None:
        """One line saying what is about to run (rank 0 only)."""
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, "a") as f:  # strict JSON: a diverged step's NaN loss is null
            f.write(json.dumps(_strict(record), sort_keys=True, allow_nan=False) + "\n")
        text = (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  gnorm {record['grad_norm']:.3f}"
                f"  {record['tokens_per_s']:.0f} tok/s  load {record['max_expert_load_ratio']:.2f}")
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(1)
        else:
            print(f"step {record['step']:>5}/{self.total}  {text}", file=self.stream, flush=True)

    def summary(self) -> str:
        if not self.enabled:
            return ""
        if self._bar is not None:
            self._bar.close()
        if not self.records:
            return "no steps run"
        losses = [r["loss"] for r in self.records]
        k = max(1, min(5, len(losses) // 2))  # first and last k steps do not overlap
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        elapsed = time.perf_counter() - self.start
        tps = [r["tokens_per_s"] for r in self.records if math.isfinite(r["tokens_per_s"])]
        text = (f"done: {len(self.records)} steps in {elapsed:.1f} s; loss {first:.4f} -> "
                f"{last:.4f} (mean of first/last {k}); "
                f"{(sum(tps) / len(tps)) if tps else 0:.0f} tokens/s; metrics in {self.path}")
        print(text, file=self.stream, flush=True)
        return text


def _strict(value):
    """`value` with non-finite floats as None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value
