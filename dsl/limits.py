"""The counts `dsvc check` bounds, all in one place (docs/limits.md gives each one's reason).

A spec `check` accepts is one that `report`, `inspect`, `compile` and `schedule`
finish, in seconds: each count below drives work in one of them (ops of the
lowered graph, collective groups walked per layer, schedule actions simulated
and drawn), so each has a ceiling well above any model or cluster built so far
and low enough that the slowest command stays under ~10 s on a 2-core machine
(`bench/scaling.py` measures the growth). The limits on what dsvc *reads* (file
sizes, JSON nesting and digits) are the runtime's: `dsvc.runtime.inputs`.
"""

from __future__ import annotations

# Decoder layers of a model (MTP modules, at most 16, come on top). The largest published
# models have 61 (DeepSeek-V3) to 126 (Llama 3.1 405B); the report lowers every layer
# (~12 ms each on these machines) and compile renders them all.
MAX_LAYERS = 256
# GPUs in the cluster (nodes x gpus_per_node). The largest training clusters built so far
# hold ~100k-200k GPUs; the simulator walks each collective group's ranks once per layer.
MAX_WORLD_SIZE = 262_144
# Routed experts of one MoE ffn, and redundant expert slots (EPLB replicas) in all:
# DeepSeek-V3 routes over 256, Kimi K2 over 384. Expert placement and its checks are
# per layer x expert, replica placement per layer x replica x EP rank.
MAX_EXPERTS = 1024
MAX_REDUNDANT_EXPERTS = 1024
# Schedule chunks: stages per model copy x micro-batches per step, the forward chunks a
# pipeline schedule holds (each also has a backward, and under ZB1P / DualPipe a weight
# pass). DeepSeek-V3's plan has 16 x 120 = 1,920; every chunk is generated, checked,
# simulated and drawn. `dsvc schedule --stages x --micro-batches` has the same bound.
MAX_SCHEDULE_CHUNKS = 8192
# The magnitude of any integer in a spec, written or computed: the largest any field takes
# (bytes of a cluster's memory) has 20 digits. A longer literal is refused before it is
# converted (Python itself refuses past 4,300 digits). Real numbers must be finite.
MAX_INTEGER = 10**30
