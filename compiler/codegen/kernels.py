"""Renders the FP8 Triton kernel module of a compiled spec.

Input is a plain-Python `KernelConfig` (the precision policy's tile shapes and the
spec's GEMM shapes) so the compiler can fill it from the IR; output is the source of
one module implementing the kernel protocol of runtime/fp8_triton.py. The tile
config of each GEMM is chosen here (`pick_tile_config`): on a CPU (interpreter) the
kernels are launched with it, on a GPU it is the fallback and triton.autotune
searches `gpu_autotune_configs()`.

`python -m dsvc.compiler.codegen.kernels PATH` writes the generic module (no GEMM table,
every fused kernel), which tests and benches render where they have no build.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass

from .render import pyrepr, render_generated

FP8_MAX = 448.0
# the fuse pass's group kinds that have kernels (compiler/passes/fuse.py); gemm_residual
# is the GEMM's own epilogue
FUSED_KINDS = ("gqa_rope", "mla_rope_qkv", "moe_combine", "quant_bhsd", "rmsnorm_quant",
               "router_topk", "swiglu_quant")
AMAX_FLOOR = 1e-30  # must equal runtime/fp8_torch.AMAX_FLOOR (a test checks)
OUT_DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
SCALE_FORMATS = ("fp32", "ue8m0")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")
_TITLE = re.compile(r"[A-Za-z0-9_.\- ]*\Z")


@dataclass(frozen=True)
class GemmShape:
    """One linear of the spec: out features n, in features k (forward X W^T is (M, n))."""

    name: str
    n: int
    k: int


@dataclass(frozen=True)
class TileConfig:
    """A GEMM launch configuration (BLOCK_K is the scale tile: one promotion per K-step)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    persistent: bool = False  # one program per SM walking the tiles (plain GEMMs only)
    # warp-specialised (plain and grouped GEMMs on Hopper, TMA): a producer warpgroup loads,
    # two consumer warpgroups each run half the tile's rows, so one's promotion overlaps
    # the other's MMA
    warp_specialize: bool = False

    def as_call(self) -> str:
        """The config as generated code: a call of the module's `_tile` helper."""
        fields = dataclasses.astuple(self)[:-2]
        text = ", ".join(str(int(v)) for v in fields)
        if self.persistent:
            text += ", persistent=True"
        if self.warp_specialize:
            text += ", ws=True"
        return f"_tile({text})"

    def as_dict(self) -> dict:
        return {
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "BLOCK_K": self.block_k,
            "GROUP_M": self.group_m,
            "PERSISTENT": self.persistent,
            "WS": self.warp_specialize,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
        }


@dataclass(frozen=True)
class KernelConfig:
    """What the kernel module is specialised to; defaults are DeepSeek-V3's recipe."""

    act_tile: int = 128
    weight_block: tuple[int, int] = (128, 128)
    promote_every: int = 128
    scale_format: str = "fp32"
    out_dtype: str = "bf16"
    gemms: tuple[GemmShape, ...] = ()
    title: str = "generic shapes"
    # the fuse pass's group kinds whose kernels the module carries (runtime/fused_torch.py)
    fused: tuple[str, ...] = ()
    spec_file: str | None = None
    span: tuple[int, int] | None = None
    passes: tuple[str, ...] = ()


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def check_kernel_config(config: KernelConfig) -> None:
    """Raise ValueError listing every problem with `config` (all at once)."""
    problems = []
    wn, wk = config.weight_block
    for label, value in (("act_tile", config.act_tile), ("weight block", wn), ("weight block", wk)):
        if not _pow2(value) or value < 16:
            problems.append(f"{label} {value} must be a power of two >= 16")
    if not (config.act_tile == config.promote_every == wk):
        problems.append(
            f"act_tile ({config.act_tile}), promote_every ({config.promote_every}) and the weight "
            f"block's K edge ({wk}) must be equal: each K-step of the GEMM meets one scale tile"
        )
    if config.scale_format not in SCALE_FORMATS:
        problems.append(f"scale_format {config.scale_format!r} is not one of {SCALE_FORMATS}")
    if config.out_dtype not in OUT_DTYPES:
        problems.append(f"out_dtype {config.out_dtype!r} is not one of {tuple(OUT_DTYPES)}")
    unknown = sorted(set(config.fused) - set(FUSED_KINDS))
    if unknown:
        problems.append(f"fused kinds {unknown} are not among {FUSED_KINDS}")
    if not _TITLE.match(config.title):
        problems.append(f"title {config.title!r} may only contain letters, digits, '_.- '")
    seen = set()
    for gemm in config.gemms:
        if not _NAME.match(gemm.name):
            problems.append(f"GEMM name {gemm.name!r} is not a dotted identifier")
        if gemm.name in seen:
            problems.append(f"GEMM name {gemm.name!r} appears twice")
        seen.add(gemm.name)
        if not (isinstance(gemm.n, int) and isinstance(gemm.k, int) and gemm.n > 0 and gemm.k > 0):
            problems.append(
                f"GEMM {gemm.name!r} needs positive integer sizes, got {gemm.n}x{gemm.k}"
            )
    if problems:
        raise ValueError("invalid kernel config:\n  " + "\n  ".join(problems))


def _next_pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def pick_tile_config(
    gemm: GemmShape | None, device: str = "cpu", config: KernelConfig = KernelConfig()
) -> TileConfig:
    """The launch config for one GEMM (None: shapes known only at run time).

    BLOCK_K is the scale tile. BLOCK_N divides the weight block so a tile meets one
    weight-block scale per K-step (measured on an H200, bench/RESULTS.md: BN = 128, scale folded into the row
    scales). On a CPU the interpreter is fastest with few, mid-sized programs.
    """
    wn = config.weight_block[0]
    tile = config.act_tile
    n = gemm.n if gemm is not None else wn
    block_n = max(16, min(wn, _next_pow2(n)))
    if device == "cpu":
        return TileConfig(32, block_n, tile, 8, 4, 1)
    k_steps = -(-gemm.k // tile) if gemm is not None else 8
    stages = 3 if k_steps <= 4 else 4
    return TileConfig(128, block_n, tile, 8, 8, stages)


def gpu_autotune_configs(config: KernelConfig = KernelConfig()) -> list[TileConfig]:
    """triton.autotune's search space on a GPU (kept small: each entry is a compile)."""
    tile, wn = config.act_tile, config.weight_block[0]
    # Several CTAs per SM let one's scale FMAs and epilogue overlap another's MMAs
    # (bench/kernels_sm90.py has the budgets): 64 x wn, 3 stages, ~72 KB of shared memory
    # and ~150 registers x 128 threads: three per SM. (128 x wn with 4 warps, two per SM,
    # spills 80-128 bytes of its accumulator per thread: not in the space.) Small M is
    # served by split K, not by narrower tiles.
    shapes = [(128, wn, 8, 3), (128, wn, 8, 4)]
    shapes += [(64, wn, 4, 3), (64, wn, 4, 4), (64, wn, 4, 5)]
    configs = [TileConfig(bm, bn, tile, 8, warps, stages) for bm, bn, warps, stages in shapes]
    # persistent: the next tile's operands are fetched during this tile's epilogue (few
    # K-steps per tile, e.g. K = 512, make the epilogue a large share of each tile)
    configs += [TileConfig(128, wn, tile, 8, 8, stages, True) for stages in (3, 4)]
    # warp-specialised (triton's Hopper pass; 4 warps per consumer group, 384 threads in
    # all): each K-step's fp32 promotion in one consumer warpgroup runs while the other's
    # wgmma does, which a plain tl.dot loop cannot express (its every wgmma is waited for
    # before the scale FMAs). sm_90 compile: 232 registers per consumer thread, no spills.
    # One stage count only: every candidate is a compile per GEMM shape in the GPU check.
    configs += [TileConfig(128, wn, tile, 8, 4, 3, warp_specialize=True)]
    # persistent and warp-specialised: the tile loop is split, so the producer loads the
    # next tile's operands during the consumers' epilogue (plain GEMM only)
    configs += [TileConfig(128, wn, tile, 8, 4, 3, True, True)]
    return configs


def _quant_config(block_m: int, num_warps: int) -> dict:
    return {"BLOCK_M": block_m, "num_warps": num_warps, "num_stages": 1}


def _summarise(labels: list[str], width: int = 90) -> str:
    """Comma-joined labels, cut to `width` characters with a count of the rest."""
    text = ""
    for i, label in enumerate(labels):
        candidate = f"{text}, {label}" if text else label
        rest = len(labels) - i - 1
        if len(candidate) + (len(f" and {rest} more") if rest else 0) > width and text:
            return f"{text} and {len(labels) - i} more"
        text = candidate
    return text


def gemm_table(config: KernelConfig) -> list[dict]:
    """Rows of GEMM_TABLE: forward (n, k) and dgrad (k, n) of every GEMM, merged and sorted."""
    names: dict[tuple[int, int], list[str]] = {}
    for gemm in config.gemms:
        names.setdefault((gemm.n, gemm.k), []).append(f"{gemm.name} forward")
        names.setdefault((gemm.k, gemm.n), []).append(f"{gemm.name} dgrad")
    rows = []
    for (n, k), labels in sorted(names.items()):
        shape = GemmShape("_", n, k)
        rows.append(
            {
                "n": n,
                "k": k,
                "names": _summarise(sorted(labels)),
                "cpu": pick_tile_config(shape, "cpu", config).as_call(),
                "gpu": pick_tile_config(shape, "cuda", config).as_call(),
            }
        )
    return rows


def render_kernels(config: KernelConfig = KernelConfig()) -> str:
    """The kernel module's source for `config` (deterministic: same config, same bytes)."""
    check_kernel_config(config)
    wn, wk = config.weight_block
    quant_gpu = [_quant_config(bm, w) for bm in (16, 32, 64, 128) for w in (4, 8)]
    # 2 warps: each thread holds more of a row, so fewer threads repeat that row's scale
    # divisions (sm_90 SASS, quantize_act at BLOCK_M 64: 10.1 -> 8.8 instructions per
    # element); at BLOCK_M 128 two warps spill, and the token tiles (BLOCK_M 128) keep 4+
    quant_gpu += [_quant_config(64, 2)]
    context = {
        "title": config.title,
        "act_tile": config.act_tile,
        "wblock_n": wn,
        "wblock_k": wk,
        "promote_every": config.promote_every,
        "fp8_max": repr(FP8_MAX),
        "amax_floor": repr(AMAX_FLOOR),
        "ue8m0": repr(config.scale_format == "ue8m0"),
        "out_dtype": OUT_DTYPES[config.out_dtype],
        "table": gemm_table(config),
        "default_gemm": {
            "cpu": pick_tile_config(None, "cpu", config).as_call(),
            "gpu": pick_tile_config(None, "cuda", config).as_call(),
        },
        "gpu_gemm_configs": [c.as_call() for c in gpu_autotune_configs(config)],
        "quant": {"cpu": pyrepr(_quant_config(32, 4)), "gpu": pyrepr(_quant_config(64, 4))},
        "gpu_quant_configs": [pyrepr(c) for c in quant_gpu],
        "fused": sorted(config.fused),
    }
    tile_summary = {
        "act": f"1x{config.act_tile}",
        "weight": f"{wn}x{wk}",
        "promote_every": config.promote_every,
        "scales": config.scale_format,
        "gemms": len(config.gemms),
    }
    if config.fused:
        tile_summary["fused"] = ",".join(sorted(config.fused))
    return render_generated(
        "fp8_kernels.py.jinja",
        spec_file=config.spec_file,
        span=config.span,
        passes=config.passes,
        tile_config=tile_summary,
        **context,
    )


def generic_config() -> KernelConfig:
    """A kernel module for no particular spec (DeepSeek-V3's recipe, no GEMM table): what
    tests and benches render where they have no build."""
    return dataclasses.replace(KernelConfig(), title="generic shapes", fused=FUSED_KINDS)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m dsvc.compiler.codegen.kernels OUTPUT.py", file=sys.stderr)
        return 2
    with open(argv[0], "w", encoding="utf-8") as f:
        f.write(render_kernels(generic_config()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
