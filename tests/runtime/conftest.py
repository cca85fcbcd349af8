"""Runtime tests share a small machine: one intra-op thread per process.

With several test processes (and spawned ranks) on two cores, torch's OpenMP
threads spin-wait for each other and tiny ops take milliseconds each; one
thread is both faster and steadier here. Numerics do not depend on it.
"""

import torch

torch.set_num_threads(1)
