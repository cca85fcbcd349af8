"""Run under torchrun by test_failure.py: rank 1 raises while rank 0 waits in a collective."""

import torch
import torch.distributed as dist

from dsvc.runtime.launch import init_distributed, run_guarded


def main() -> None:
    init_distributed(timeout_s=60)
    t = torch.ones(1)
    dist.all_reduce(t)
    if dist.get_rank() == 1:
        raise ValueError("injected failure on purpose")
    dist.all_reduce(t)  # rank 0 blocks here until torchrun stops it


if __name__ == "__main__":
    run_guarded(main)
