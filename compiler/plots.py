"""Pictures drawn by dsvc (never by the trainer): the loss curve of a run."""

from __future__ import annotations

import json


def read_metrics(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue  # a line cut short by a killed run
    return rows


def draw_loss(metrics_path: str, out_path: str, title: str = "") -> str:
    """Loss (and learning rate) against step, from a metrics.jsonl file."""
    rows = [r for r in read_metrics(metrics_path) if "loss" in r and "step" in r]
    if not rows:
        raise ValueError("no steps recorded")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, [r["loss"] for r in rows], color="#1f5fa8", lw=1.6, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if "lr" in rows[0]:
        ax2 = ax.twinx()
        ax2.plot(steps, [r["lr"] for r in rows], color="#d9822b", lw=1.0, alpha=0.7, label="lr")
        ax2.set_ylabel("learning rate")
    ax.set_title(title or "training loss")
    fig.tight_layout()
    fig.savefig(out_path, metadata={"Software": None})
    plt.close(fig)
    return out_path
