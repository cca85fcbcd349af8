"""What the generated FP8 kernels compile to on Hopper, read on a machine without a GPU.

Compiles every kernel of the FP8 kernel module (rendered for no particular spec) for sm_90 with triton's own
NVIDIA backend (the ptxas, cuobjdump and nvdisasm that ship inside the triton wheel; no
CUDA driver is needed) and prints what a GPU run does not show:
  * registers per thread, bytes spilled to local memory and shared memory per program,
    for every GEMM launch config triton.autotune may pick;
  * whether the MMAs are Hopper wgmma, how many are in flight (`wgmma.wait_group N`),
    and whether operands arrive by TMA; in the SASS, how many MMAs share one wait and
    whether ptxas serialised them (its C7514/C7515 notes: every wgmma waited on its
    own, which the PTX does not show);
  * for the memory-bound kernels (quantisers, SwiGLU, dequantisers): SASS instructions a
    thread issues per element, against a plain bf16 copy compiled the same way in the
    same run, once with the fp32 -> e4m3 rounding done by the cast (what a GPU runs) and
    once with the integer rounding the interpreter needs (DSVC_FP8_SOFT_ROUND=1).
    The H200 runs in bench/RESULTS.md put the line between kernels that reach 80% of
    copy bandwidth and those that do not at about 8 instructions per byte moved.

Usage: python bench/kernels_sm90.py [--check] [--quick] [--self-test]
  --check  exit 1 if a kernel fails to compile, a GEMM config spills, an MMA is not a
           wgmma, ptxas serialises the wgmmas, or a quantiser's cast path does not save
           the integer rounding's work
  --quick  one GEMM config instead of the whole autotuning space (used by the tests)
  --self-test  also compile a GEMM that ptxas serialises and fail unless it is reported
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys

from sm90_compile import (  # this script's neighbour in bench/
    Compiled,
    Desc,
    Ptr,
    available,
    compile_sm90,
    self_test,
    wgmma_groups,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
# per element, the integer rounding costs ~12 instructions (two quantisations: ~24); the
# cast path of each quantiser must save at least this many
MIN_CAST_SAVING = 8.0
# spills a fused kernel may have (bytes per thread, here and in bench/program_sm90.py; none
# for the others): the backwards that quantise whole 128 x 128 tiles in both tilings
FUSED_SPILL_BUDGET = {
    # the routed SwiGLU backward (gate-weighted, FP8 inputs): 64 bytes with triton 3.9,
    # 224 with the GPU image's 3.6
    "_swiglu_bwd_quant_kernel": 256,
    # the RMSNorm backward with dx, its residual and both tilings on: 184 bytes at 8 warps
    # with 3.9, 312-368 with 3.6 (L1-resident); at 4 warps, before its column halves,
    # 1.5-2.6 KB (3.9) and 1.5-7.1 KB (3.6)
    "_rmsnorm_bwd_kernel": 384,
    # MLA's RoPE backward in column halves: 56-112 bytes (1.2 / 3.8 KB with 3.9 / 3.6 at 4
    # warps, whole tiles)
    "_mla_rope_qkv_bwd_kernel": 128,
}


def load_module(soft_round: bool):
    """The kernel module for no particular spec as a GPU would load it (or with integer
    rounding), rendered afresh."""
    import tempfile

    from kernels_gpu import import_kernel_module  # this script's neighbour in bench/

    from dsvc.compiler.codegen.kernels import generic_config, render_kernels

    path = pathlib.Path(tempfile.mkdtemp(prefix="dsvc_sm90_")) / "fp8_kernels.py"
    path.write_text(render_kernels(generic_config()), encoding="utf-8")
    return import_kernel_module(path, f"_dsvc_sm90_kernels_{int(soft_round)}", soft_round)


def _copy_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(x, y, stride, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        offs = rm[:, None] * stride + rk[None, :]
        tl.store(y + offs, tl.load(x + offs))

    return copy_kernel


# ---- the memory-bound kernels --------------------------------------------------------

M, K = 16384, 7168  # activations (tokens x hidden) of the GPU bench
WN, WK = 7168, 18432  # a weight of the GPU bench


def _act_args(block_m, rows, cols):
    # token tiles (cols) leave by TMA store, as on Hopper when M is a multiple of 16
    qt = Desc("fp8e4nv", (128, 128)) if cols else Ptr("fp8e4nv")
    return dict(
        x=Ptr("bf16"), q=Ptr("fp8e4nv"), s=Ptr("fp32"), qt=qt, st=Ptr("fp32"),
        M=M, K=K, stride_xm=K, stride_xk=1, stride_qm=K if rows else M, stride_sm=1,
        stride_sk=M if rows else K, stride_qtk=M if cols else K, stride_stk=1, stride_stm=K,
        BLOCK_M=block_m, TILE=128, UE8M0=False, ROWS=rows, COLS=cols, QT_DESC=cols,
    )  # fmt: skip


def memory_bound_rows(module):
    """(label, kernel, args, warps, elements per program, bytes per element) per kernel."""
    quant = module.QUANT_CONFIG["gpu"]
    bm, warps = quant["BLOCK_M"], quant["num_warps"]
    weight = dict(
        w=Ptr("fp32"), q=Ptr("fp8e4nv"), s=Ptr("fp32"), N=WN, K=WK, stride_wb=WN * WK,
        stride_wn=WK, stride_wk=1, stride_qb=WN * WK, stride_qn=WK, stride_sb=56 * 144,
        stride_sn=144, WBLOCK_N=128, WBLOCK_K=128, UE8M0=False,
    )  # fmt: skip
    swiglu = dict(
        g=Ptr("bf16"), u=Ptr("bf16"), q=Ptr("fp8e4nv"), s=Ptr("fp32"), gq=Ptr("fp8e4nv"),
        gsc=Ptr("fp32"), uq=Ptr("fp8e4nv"), usc=Ptr("fp32"), w=Ptr("fp32"), M=M, N=K,
        stride_gm=K, stride_gn=1, stride_um=K, stride_un=1, stride_qm=K, stride_sm=1,
        stride_sn=M, BLOCK_M=bm, TILE=128, UE8M0=False, ROUND=False, KEEP=False,
        WEIGHTED=False,
    )  # fmt: skip
    dequant = dict(
        q=Ptr("fp8e4nv"), s=Ptr("fp32"), out=Ptr("bf16"), M=M, K=K, stride_qm=K,
        stride_qk=1, stride_sm=1, stride_sk=M, stride_om=K, BLOCK_M=bm, TILE=128,
    )  # fmt: skip
    scale = 4 / 128  # one fp32 scale per 128 elements
    return [
        (f"quantize_act 1x128 (BLOCK_M {bm})", module._quant_act_kernel,
         _act_args(bm, True, False), warps, bm * 128, 3 + scale),
        ("quantize_act_both 1x128 + 128x1", module._quant_act_kernel,
         _act_args(128, True, True), warps, 128 * 128, 4 + 2 * scale),
        ("quantize_weight 128x128 (fp32 in)", module._quant_weight_kernel, weight, warps,
         128 * 128, 5 + 4 / 128**2),
        (f"swiglu_quant (BLOCK_M {bm})", module._swiglu_quant_kernel, swiglu, warps,
         bm * 128, 5 + scale),
        (f"swiglu_quant, g and u kept in FP8 (BLOCK_M {bm})", module._swiglu_quant_kernel,
         {**swiglu, "KEEP": True}, warps, bm * 128, 7 + 3 * scale),
        (f"swiglu_quant, FP8 g and u, gate-weighted rows (BLOCK_M {bm})",
         module._swiglu_quant_kernel, {**swiglu, "KEEP": True, "WEIGHTED": True}, warps,
         bm * 128, 7 + 3 * scale + 4 / 128),
        (f"dequantize_act (BLOCK_M {bm})", module._dequant_act_kernel, dequant, warps,
         bm * 128, 3 + scale),
    ]  # fmt: skip


def fused_rows(module):
    """(label, kernel, args, warps) for the generated program's largest fused kernels, as
    their host wrappers launch them on a GPU."""
    import triton.language as tl

    bm, hid, inter = module.FUSED_BLOCK_M, K, 2048  # bench tokens x hidden; expert width
    norm = dict(
        x=Ptr("bf16"), w=Ptr("fp32"), y=Ptr("bf16"), q=Ptr("fp8e4nv"), s=Ptr("fp32"),
        qt=Ptr("fp8e4nv"), st=Ptr("fp32"), rstd=Ptr("fp32"), M=M, K=hid, eps=1e-6,
        stride_xm=hid, stride_xk=1, stride_ym=hid, stride_qm=hid, stride_sm=1, stride_sk=M,
        stride_qtk=M, stride_stk=1, stride_stm=hid, BLOCK_M=bm, TILE=128, UE8M0=False,
        WANT_Y=False, ROWS=True, COLS=False, OUT=tl.bfloat16,
    )  # fmt: skip
    swiglu = dict(
        g=Ptr("bf16"), u=Ptr("bf16"), dh=Ptr("bf16"), gsc=Ptr("fp32"), usc=Ptr("fp32"),
        w=Ptr("fp32"), dwp=Ptr("fp32"), offsets=Ptr("fp32"),
        **{n: Ptr("fp8e4nv") for n in ("dgq", "dgt", "duq", "dut", "ht")},
        **{n: Ptr("fp32") for n in ("dgs", "dgts", "dus", "duts", "hts")},
        M=M, I=inter, stride_gm=inter, stride_gi=1, stride_um=inter, stride_ui=1,
        stride_dm=inter, stride_di=1, stride_qm=inter, stride_sm=1, stride_sk=M,
        stride_qtk=M, stride_stk=1, stride_stm=inter, stride_cm=inter // 128, stride_ck=1,
        NUM_EXPERTS=1, STEPS=0, TILE=128, ALIGN=16, GROUPED=False, ROUND=True, UE8M0=False,
        OUT=tl.bfloat16, PART=module.SWIGLU_BWD_PART, FP8_IN=False, WEIGHTED=False,
    )  # fmt: skip
    fp8_in = {**swiglu, "g": Ptr("fp8e4nv"), "u": Ptr("fp8e4nv"), "FP8_IN": True}
    # the routed experts' launch: fp32 dh from the grouped dgrad, the gates applied
    routed = {**fp8_in, "dh": Ptr("fp32"), "ROUND": False, "WEIGHTED": True}
    return [
        (f"rmsnorm_quant (BLOCK_M {bm}, 1x128)", module._rmsnorm_quant_kernel, norm, 4),
        ("swiglu_bwd_quant (128 x 128, both tilings)", module._swiglu_bwd_quant_kernel,
         swiglu, module.SWIGLU_BWD_WARPS),
        ("swiglu_bwd_quant, FP8 g and u (128 x 128, both tilings)",
         module._swiglu_bwd_quant_kernel, fp8_in, module.SWIGLU_BWD_WARPS),
        ("swiglu_bwd_quant, routed: FP8 g and u, gate-weighted, gate gradient",
         module._swiglu_bwd_quant_kernel, routed, module.SWIGLU_BWD_WARPS),
    ]  # fmt: skip


def per_element(compiled: Compiled, warps: int, elements: int) -> float:
    """SASS instructions one thread issues per element (these kernels have no loops)."""
    return compiled.instructions * 32 * warps / elements


# ---- the GEMMs -----------------------------------------------------------------------


# the GEMM epilogue with its residual add (bf16 (M, N)), as the residual projections
# (o_proj, down_proj) launch it: the larger register footprint
def _epilogue(n):
    return dict(r=Ptr("bf16"), bias=Ptr("bf16"), stride_rm=n, stride_rn=1, HAS_BIAS=False,
                HAS_RES=True)  # fmt: skip


def _gemm_args(m, n, k, cfg, *, split_k=1, rowwise=False):
    # as _launch_gemm does it on Hopper: TMA loads; a TMA store unless K is split (then
    # the output is the fp32 workspace of the shares, written through pointers)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    c_desc = split_k == 1
    return dict(
        a=Desc("fp8e4nv", (bm, bk)), a_s=Ptr("fp32"), b=Desc("fp8e4nv", (bn, bk)),
        b_s=Ptr("fp32"), c=Desc("bf16", (bm, bn)) if c_desc else Ptr("fp32"),
        a_base=Ptr("fp8e4nv"), b_base=Ptr("fp8e4nv"), c_base=Ptr("bf16" if c_desc else "fp32"),
        WS=cfg.get("WS", False), M=m, N=n, K=k,
        stride_am=k, stride_ak=1, stride_asm=1, stride_ask=m, stride_bn=k, stride_bk=1,
        stride_bsn=-(-k // 128), stride_bsk=1, stride_cs=m * n if split_k > 1 else 0,
        stride_cm=n, stride_cn=1, M_BUCKET=m, B_ROWWISE=rowwise, USE_TMA=True, C_DESC=c_desc,
        EVEN_K=k % 128 == 0, WBLOCK_N=128, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=cfg["GROUP_M"], SPLIT_K=split_k, PERSISTENT=cfg["PERSISTENT"],
        **_epilogue(n),
    )  # fmt: skip


def _grouped_args(cfg, experts=32, m=4096, n=4096, k=7168):
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    return dict(
        a=Desc("fp8e4nv", (bm, bk)), a_s=Ptr("fp32"), b=Desc("fp8e4nv", (bn, bk)),
        b_s=Ptr("fp32"), c=Ptr("bf16"), offsets=Ptr("i32"), a_base=Ptr("fp8e4nv"),
        b_base=Ptr("fp8e4nv"), M=m, WS=cfg.get("WS", False), N=n, K=k, stride_am=k,
        stride_ak=1, stride_asm=1, stride_ask=m, stride_be=n * k, stride_bn=k, stride_bk=1,
        stride_bse=32 * 56, stride_bsn=56, stride_bsk=1, stride_cm=n, stride_cn=1,
        M_BUCKET=m, NUM_EXPERTS=experts, STEPS=(experts - 1).bit_length(), USE_TMA=True,
        EVEN_K=True, WBLOCK_N=128, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, r=Ptr("bf16"),
        stride_rm=n, stride_rn=1, HAS_RES=True,
    )  # fmt: skip


def _wgrad_args(cfg, experts=32, m=4096, n=4096, k=7168):
    # as Hopper runs it: both operands' token tiles by TMA (M a multiple of 16)
    cols = experts + m // 128
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    return dict(
        a=Desc("fp8e4nv", (bm, bk)), a_s=Ptr("fp32"), b=Desc("fp8e4nv", (bn, bk)),
        b_s=Ptr("fp32"), c=Ptr("fp32"), offsets=Ptr("i32"), N=n, K=k, stride_an=m,
        stride_at=1, stride_asn=cols, stride_ast=1, stride_bk=m, stride_bt=1,
        stride_bsk=cols, stride_bst=1, stride_ce=n * k, stride_cn=k, stride_ck=1,
        M_BUCKET=m, USE_TMA=True, ALIGN=16, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )  # fmt: skip


def _cfg_label(cfg) -> str:
    label = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}"
    return label + (" persistent" if cfg["PERSISTENT"] else "") + (" ws" if cfg.get("WS") else "")


def gemm_rows(module, quick):
    """(kernel label, config label, kernel, args, warps, stages) per GEMM compilation."""
    configs = module.GPU_GEMM_CONFIGS
    if quick:  # the first config, and the first persistent, warp-specialised and both
        configs = [configs[0], next(c for c in configs if c["PERSISTENT"]),
                   next(c for c in configs if c.get("WS")),
                   next(c for c in configs if c.get("WS") and c["PERSISTENT"])]  # fmt: skip
    rows = []
    for cfg in configs:
        warps, stages = cfg["num_warps"], cfg["num_stages"]
        label = _cfg_label(cfg)
        rows.append(("gemm 4096x32768x512, TMA", label, module._gemm_kernel,
                     _gemm_args(4096, 32768, 512, cfg), warps, stages))  # fmt: skip
        if cfg["PERSISTENT"]:
            continue  # the grouped kernels have no persistent form; same compile otherwise
        rows.append(("gemm wgrad 7168x2048, K = 4096 tokens, row scales", label,
                     module._gemm_kernel, _gemm_args(7168, 2048, 4096, cfg, rowwise=True),
                     warps, stages))  # fmt: skip
        rows.append(("grouped 32 experts 4096x7168, TMA", label, module._grouped_gemm_kernel,
                     _grouped_args(cfg), warps, stages))  # fmt: skip
        if cfg.get("WS"):
            continue  # the grouped wgrad has no warp-specialised form (the host skips it)
        rows.append(("grouped wgrad 32 experts, TMA", label, module._grouped_wgrad_kernel,
                     _wgrad_args(cfg), warps, stages))  # fmt: skip
    cfg = dict(module.DEFAULT_GEMM_CONFIG["gpu"])
    rows.append(("gemm_static 128x2112x7168, split-K 7", _cfg_label(cfg),
                 module._gemm_kernel_static, _gemm_args(128, 2112, 7168, cfg, split_k=7),
                 cfg["num_warps"], cfg["num_stages"]))  # fmt: skip
    return rows


def _wgmma_summary(out: Compiled) -> str:
    waits = sorted(set(re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", out.ptx)))
    tma = "TMA" if "cp.async.bulk.tensor" in out.ptx else "pointer loads"
    count = out.ptx.count("wgmma.mma_async")
    mmas, groups = wgmma_groups(out.sass)
    serial = " (serialised by ptxas)" if out.ptxas_notes else ""
    if "setmaxnreg" in out.ptx:  # warp-specialised: a loading warpgroup, MMA warpgroups
        regs = sorted({int(r) for r in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)",
                                                   out.ptx)})  # fmt: skip
        tma += f", warp-specialised (setmaxnreg {'/'.join(map(str, regs))})"
    return (f"{count} wgmma, waits for {'/'.join(waits) or '-'} in flight, {tma}; SASS: "
            f"{mmas} MMAs in {groups} groups{serial}")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on a failed check")
    parser.add_argument("--quick", action="store_true", help="one GEMM config only")
    parser.add_argument(
        "--self-test", action="store_true", help="check that a serialised GEMM is reported"
    )
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not interpret
    sys.path.insert(0, str(ROOT))
    why = available()
    if why:
        print(f"bench/kernels_sm90.py: {why}; nothing compiled.")
        return 0
    import triton

    print(f"sm_90 compilation with triton {triton.__version__}; no GPU used\n")
    failures = self_test() if args.self_test else []
    hard, soft = load_module(False), load_module(True)
    copy = compile_sm90(_copy_kernel(), dict(x=Ptr("bf16"), y=Ptr("bf16"), stride=K,
                        BLOCK_M=32, BLOCK_K=128), 4)  # fmt: skip
    copy_per = per_element(copy, 4, 32 * 128)
    print("## Memory-bound kernels (SASS instructions per element, per thread)\n")
    print("| kernel | bytes/elem | cast rounding | integer rounding | cast / integer "
          "| instr per byte | vs copy | regs |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print(f"| bf16 copy (reference) | 4.00 | {copy_per:.1f} | - | - | {copy_per / 4:.2f} "
          f"| 1.00x | {copy.regs} |")  # fmt: skip
    for (label, fn, kargs, warps, elems, nbytes), (_, soft_fn, *_rest) in zip(
        memory_bound_rows(hard), memory_bound_rows(soft)
    ):
        try:
            fast = compile_sm90(fn, kargs, warps)
            slow = compile_sm90(soft_fn, kargs, warps)
        except Exception as err:  # noqa: BLE001 - a compile failure is a finding to report
            failures.append(f"{label}: does not compile for sm_90: {type(err).__name__}: {err}")
            continue
        f_per, s_per = per_element(fast, warps, elems), per_element(slow, warps, elems)
        print(f"| {label} | {nbytes:.2f} | {f_per:.1f} | {s_per:.1f} | {f_per / s_per:.2f} "
              f"| {f_per / nbytes:.2f} | {f_per / copy_per:.1f}x | {fast.regs} |")  # fmt: skip
        quantiser = "dequant" not in label
        if quantiser and "cvt.rn.satfinite.e4m3x2.f32" not in fast.ptx:
            failures.append(f"{label}: the cast path does not use cvt.rn.satfinite")
        if quantiser and s_per - f_per < MIN_CAST_SAVING:
            failures.append(f"{label}: cast path {f_per:.1f} vs integer {s_per:.1f} per element")
        if fast.spill_bytes:
            failures.append(f"{label}: spills {fast.spill_bytes} bytes")
    print("\n## Fused kernels of the generated program\n")
    print("| kernel | regs | spilled bytes | shared KB | e4m3 cast |")
    print("|---|---|---|---|---|")
    for label, fn, kargs, warps in fused_rows(hard):
        try:
            out = compile_sm90(fn, kargs, warps)
        except Exception as err:  # noqa: BLE001 - a compile failure is a finding to report
            failures.append(f"{label}: does not compile for sm_90: {type(err).__name__}: {err}")
            continue
        cast = "cvt.rn.satfinite.e4m3x2.f32" in out.ptx
        print(f"| {label} | {out.regs} | {out.spill_bytes} | {out.shared / 1024:.0f} | "
              f"{'yes' if cast else 'no'} |")  # fmt: skip
        if out.spill_bytes > FUSED_SPILL_BUDGET.get(fn.__name__, 0):
            failures.append(f"{label}: spills {out.spill_bytes} bytes")
        if not cast:
            failures.append(f"{label}: the cast path does not use cvt.rn.satfinite")
    print("\n## GEMMs (each config of the autotuning space)\n")
    print("| kernel | config | regs | spilled bytes | shared KB | MMAs |")
    print("|---|---|---|---|---|---|")
    for label, cfg_label, fn, kargs, warps, stages in gemm_rows(hard, args.quick):
        try:
            out = compile_sm90(fn, kargs, warps, stages)
        except Exception as err:  # noqa: BLE001
            failures.append(f"{label} {cfg_label}: does not compile: {type(err).__name__}: {err}")
            continue
        print(f"| {label} | {cfg_label} | {out.regs} | {out.spill_bytes} | "
              f"{out.shared / 1024:.0f} | {_wgmma_summary(out)} |")  # fmt: skip
        if out.spill_bytes:
            failures.append(f"{label} {cfg_label}: spills {out.spill_bytes} bytes")
        if "wgmma.mma_async" not in out.ptx:
            failures.append(f"{label} {cfg_label}: no wgmma in the PTX")
        if kargs.get("WS") and "setmaxnreg" not in out.ptx:
            failures.append(f"{label} {cfg_label}: not warp-specialised (no setmaxnreg)")
        for code, what in out.ptxas_notes:
            failures.append(f"{label} {cfg_label}: ptxas {code}: {what}")
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
    return 1 if failures and args.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
