"""Compiling a Triton kernel for sm_90 on a machine without a GPU, and reading the result.

Triton's NVIDIA backend compiles without a driver; the wheel ships ptxas, cuobjdump and
nvdisasm. `compile_sm90` specialises a kernel the way the JIT would and returns its
registers, spilled bytes, shared memory, SASS op counts, PTX and SASS, plus ptxas's
"Potential Performance Loss" notes (C75xx: wgmma serialised), which the PTX alone does
not show. `self_test` compiles a GEMM ptxas is known to serialise and checks the notes
and the SASS say so. Used by bench/kernels_sm90.py.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import re
import subprocess
import tempfile


@dataclasses.dataclass(frozen=True)
class Ptr:
    """A pointer argument: element type in triton's spelling, 16-byte aligned."""

    dtype: str


@dataclasses.dataclass(frozen=True)
class Desc:
    """A host tensor descriptor argument (TMA) with its block shape."""

    dtype: str
    block: tuple


@dataclasses.dataclass
class Compiled:
    name: str
    regs: int
    spill_bytes: int
    shared: int
    ops: collections.Counter
    ptx: str
    sass: str = ""
    ptxas_notes: tuple = ()  # ptxas's "Potential Performance Loss" notes (C75xx)

    @property
    def instructions(self) -> int:
        return sum(self.ops.values())


def _tools():
    import triton

    return pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def available() -> str | None:
    """None when sm_90 compilation can run here, else why not."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as err:
        return f"triton is not importable ({err})"
    missing = [t for t in ("ptxas", "cuobjdump", "nvdisasm") if not (_tools() / t).is_file()]
    return f"triton's NVIDIA tools are missing: {', '.join(missing)}" if missing else None


def compile_sm90(fn, args: dict, num_warps: int, num_stages: int = 1) -> Compiled:
    """Compile one kernel for sm_90 the way the JIT would specialise `args`.

    Integer arguments equal to 1 become constants and multiples of 16 carry the
    divisibility hint, as triton's launcher does for real tensors' strides; floats are
    fp32 scalars.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = args[name]
        if fn.params[i].is_constexpr:
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, Desc):
            signature[name] = f"tensordesc<{value.dtype}[{', '.join(map(str, value.block))}]>"
        elif isinstance(value, Ptr):
            signature[name] = "*" + value.dtype
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, float):  # never specialised (1.0 stays a runtime fp32)
            signature[name] = "fp32"
        elif value == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = triton.compiler.ASTSource(
        fn=fn, signature=signature, constexprs=constants, attrs=attrs
    )
    options = {"num_warps": num_warps, "num_stages": num_stages}
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = pathlib.Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = _run(_tools() / "cuobjdump", "-res-usage", cubin)
        sass = _run(_tools() / "nvdisasm", "-c", cubin)
        notes = _ptxas_notes(kernel.asm["ptx"], pathlib.Path(tmp))
    ops = collections.Counter()
    for line in sass.splitlines():
        match = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if match:
            ops[match.group(1)] += 1
    # spills go to the per-thread stack (STACK); LOCAL counts local arrays; either is
    # local memory (STL/LDL in the SASS)
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    return Compiled(
        fn.__name__,
        int(found.get("REG", 0)),
        int(found.get("STACK", 0)) + int(found.get("LOCAL", 0)),
        int(kernel.metadata.shared),
        ops,
        kernel.asm["ptx"],
        sass,
        notes,
    )


def _ptxas_notes(ptx: str, tmp: pathlib.Path) -> tuple:
    """What ptxas says about performance when it assembles `ptx` for sm_90a (verbose).

    Runs the ptxas triton's own backend picks for sm_90 (the wheel ships two), so the
    notes are those of the cubin compiled above.
    """
    from triton.backends.nvidia.compiler import get_ptxas

    src = tmp / "kernel.ptx"
    src.write_text(ptx)
    out = subprocess.run(
        [get_ptxas(90).path, "-arch=sm_90a", "-v", str(src), "-o", str(tmp / "verbose.cubin")],
        capture_output=True,
        text=True,
    )
    return parse_ptxas_notes(out.stderr)


def parse_ptxas_notes(log: str) -> tuple:
    """(code, what) for each "Potential Performance Loss" note in a ptxas log."""
    found = re.findall(
        r"\((C7\d\d\d)\) Potential Performance Loss: (.*?)(?: in the function|$)", log, re.M
    )
    return tuple(found)


def wgmma_groups(sass: str) -> tuple[int, int]:
    """(MMA instructions, groups) in the SASS: a group ends at an MMA carrying `gsb0`.

    Unserialised, a K-step's MMAs (4 x k32 for a 128-deep K-step per warpgroup) issue back
    to back and one `WARPGROUP.DEPBAR` waits for the group; serialised by ptxas, every
    MMA is its own group.
    """
    mmas = [line for line in sass.splitlines() if re.search(r"\b[HQI]GMMA\.", line)]
    return len(mmas), sum("gsb0" in line for line in mmas)


def _run(*cmd) -> str:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=True).stdout


def _serialised_kernel():
    """A GEMM ptxas is known to serialise: a fresh MMA's result is carried into the next
    trip while the previous one's is still read (register copies touch in-flight MMA
    accumulators, note C7514). --self-test checks the report says so."""
    import triton
    import triton.language as tl

    @triton.jit
    def carried_partial(a, b, c, K, BLOCK: tl.constexpr):
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        prev = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for kt in range(0, tl.cdiv(K, BLOCK), 2):
            even = tl.dot(a.load([0, kt * BLOCK]), tl.trans(b.load([0, kt * BLOCK])))
            acc += prev * 0.5
            prev = tl.dot(
                a.load([0, kt * BLOCK + BLOCK]), tl.trans(b.load([0, kt * BLOCK + BLOCK]))
            )
            acc += even * 0.25
        c.store([0, 0], (acc + prev).to(tl.bfloat16))

    args = dict(a=Desc("fp8e4nv", (128, 128)), b=Desc("fp8e4nv", (128, 128)),
                c=Desc("bf16", (128, 128)), K=16384, BLOCK=128)  # fmt: skip
    return carried_partial, args


def self_test() -> list[str]:
    """Failures of the checks themselves: a serialised GEMM must be reported as one."""
    fn, args = _serialised_kernel()
    out = compile_sm90(fn, args, num_warps=8, num_stages=2)
    mmas, groups = wgmma_groups(out.sass)
    problems = []
    if not out.ptxas_notes:
        problems.append("self-test: ptxas's serialisation note was not captured")
    if not mmas or groups != mmas:
        problems.append(
            f"self-test: SASS of a serialised GEMM read as {mmas} MMAs in {groups} groups"
        )
    return problems


def jit_function(obj):
    """The JIT function inside `obj` (itself, or the kernel an autotuner or heuristics
    wrapper holds as `.fn`), or None when there is none."""
    for _ in range(4):
        if type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
            return obj
        obj = getattr(obj, "fn", None)
        if obj is None:
            return None
    return None
