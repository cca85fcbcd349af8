"""Kernel times on a GPU, from what the project's own microbenchmarks measured there.

`calibration.json` (next to this file) records bench/kernels_gpu.py's figures per
card with their run (date, commit, versions); `KernelModel.for_gpu(gpu)` fits these
rate models to them when it loads, so the simulator predicts *this* trainer's kernels
and improves when a new run is recorded:

* generated FP8 GEMM: the grid of 128 x 128 output tiles runs in waves over the SMs,
  each tile a fixed cost (prologue, epilogue) plus a cost per K; two constants fitted
  to the six measured shapes (least squares on relative error; within 5% of each).
  Wave quantisation is why N = 2112 runs slower than N = 4096 at the same K, the
  fixed cost why K = 512 does; fewer SMs (some given to communication kernels) means
  more waves;
* cuBLAS BF16 GEMM: a cost per output element plus one per multiply-add (cuBLAS picks
  tiles that avoid wave tails); two constants fitted the same way;
* grouped FP8 GEMM: each expert's rows in whole 128-row tiles (uneven routing pads
  more), the dense model's waves, times one factor fitted to the measured grouped runs;
* memory-bound kernels: bytes over the measured device copy rate, times each FP8
  quantiser's measured fraction of it (torch's element-wise kernels: the copy rate),
  and each of the generated program's fused kernels' once a profiled trainer step has
  measured it (`fused_fraction_of_copy`);
* fused attention: causal FLOPs at a cited fraction of the BF16 peak (not measured
  by the project yet).

Cards without measurements borrow a measured one's efficiencies (`like`), scaled to
the spec's peaks and HBM; cards the file does not know (`None` from `for_gpu`) fall
back to the spec's efficiency factors (`simulate_costs.Rates`).
"""

from __future__ import annotations

import functools
import json
import math
import os

TILE = 128  # the compiler's FP8 GEMM tiles (compiler/codegen/kernels.py pick_tile_config)


@functools.cache
def calibration() -> dict:
    """The parsed calibration file (package data)."""
    path = os.path.join(os.path.dirname(__file__), "calibration.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _fit2(rows, targets) -> tuple[float, float]:
    """(a, b) minimising the relative error of a x0 + b x1 against targets (2 x 2 normal
    equations of the rows scaled by 1 / target)."""
    s00 = s01 = s11 = r0 = r1 = 0.0
    for (x0, x1), t in zip(rows, targets):
        x0, x1 = x0 / t, x1 / t
        s00, s01, s11 = s00 + x0 * x0, s01 + x0 * x1, s11 + x1 * x1
        r0, r1 = r0 + x0, r1 + x1
    det = s00 * s11 - s01 * s01
    return (r0 * s11 - r1 * s01) / det, (s00 * r1 - s01 * r0) / det


def _waves(m: int, n: int, sms: int) -> int:
    return math.ceil(math.ceil(m / TILE) * math.ceil(n / TILE) / sms)


def expected_tiles(rows: float, experts: int, dirichlet: bool) -> float:
    """Expected 128-row tiles over `experts` groups of `rows` in total: even groups, or a
    Dirichlet(1) split (each share Beta(1, E - 1): P(m > x) = (1 - x / rows)^(E - 1))."""
    if experts <= 0 or rows <= 0:
        return 0.0
    if not dirichlet or experts == 1:
        return experts * math.ceil(rows / experts / TILE)
    per, j = 0.0, 0
    while TILE * j < rows:
        per += (1 - TILE * j / rows) ** (experts - 1)
        j += 1
    return experts * per


class KernelModel:
    """Seconds of one GPU's kernels: fitted from a card's measurements, scaled to the spec's
    peaks (`fp8_flops`, `bf16_flops`) and HBM bandwidth."""

    def __init__(self, card: str, data: dict, constants: dict, gpu, borrowed_from: str = ""):
        self.card, self.borrowed_from = card, borrowed_from
        self.sms = data["sms"]
        peak8, peak16 = 1979e12, 989e12  # the measured card's dense peaks (H200)
        self.scale8, self.scale16 = gpu.fp8_flops / peak8, gpu.bf16_flops / peak16
        self.copy_rate = data["copy_bytes_per_s"] / data["hbm_bytes_per_s"] * gpu.hbm
        self.quant = dict(data["quantizers_fraction_of_copy"])
        # the generated program's fused kernels, measured in a profiled trainer step
        # (bench/simulate_vs_measured.py --calibrate); until then they borrow a quantiser's
        self.quant.update(data.get("fused_fraction_of_copy", {}))
        self.bf16_peak = gpu.bf16_flops
        self.comm_sms = constants["comm_sms"]["value"]
        self.attn_fwd = constants["attention_forward_fraction"]["value"]
        self.attn_bwd = constants["attention_backward_fraction"]["value"]
        self.host_s_per_op = constants["host_s_per_op"]["value"]
        self.program_host_s_per_launch = constants["program_host_s_per_launch"]["value"]
        self.runs = tuple(data.get("runs", ()))
        g = data["fp8_gemm"]
        m = g["m"]
        rows = [(_waves(m, n, self.sms), _waves(m, n, self.sms) * k)
                for n, k, _ in g["points_n_k_tflops"]]
        secs = [2 * m * n * k / (r * 1e12) for n, k, r in g["points_n_k_tflops"]]
        self.fp8_tile_s, self.fp8_k_s = _fit2(rows, secs)
        b = data["bf16_gemm"]
        m = b["m"]
        rows = [(m * n, m * n * k) for n, k, _ in b["points_n_k_tflops"]]
        secs = [2 * m * n * k / (r * 1e12) for n, k, r in b["points_n_k_tflops"]]
        self.bf16_out_s, self.bf16_mac_s = _fit2(rows, secs)
        gg = data["fp8_grouped_gemm"]
        ratios = []
        for experts, n, k, r in gg["points_experts_n_k_tflops"]:
            t = gg["tokens"]
            model = self._grouped(t, experts, n, k, self.sms, dirichlet=True, factor=1.0)
            ratios.append(model / (2 * t * n * k / (r * 1e12)))
        self.grouped_factor = sum(ratios) / len(ratios)  # measured rate / padded-wave model

    @classmethod
    def for_gpu(cls, gpu) -> KernelModel | None:
        """The model of `gpu` (a spec's cluster.gpu) when the calibration knows its card."""
        cal = calibration()
        name = gpu.name.lower()
        entry = cal["cards"].get(name)
        if entry is None:
            return None
        source = entry if entry.get("measured") else cal["cards"][entry["like"]]
        return cls(name, source, cal["constants"], gpu,
                   "" if entry.get("measured") else entry["like"])

    @classmethod
    def for_gpu_or_measured(cls, gpu) -> KernelModel:
        """`for_gpu`, or for a card the calibration does not know a measured card's rates
        scaled to `gpu`'s peaks (for what no card changes: host time, launches)."""
        model = cls.for_gpu(gpu)
        if model is not None:
            return model
        cal = calibration()
        measured = next(n for n, c in cal["cards"].items() if c.get("measured"))
        return cls(measured, cal["cards"][measured], cal["constants"], gpu, measured)

    # -- GEMMs -------------------------------------------------------------------------
    def fp8_gemm(self, m, n, k, sms: int | None = None) -> float:
        """The generated FP8 GEMM (m x k) . (k x n)."""
        if m <= 0 or n <= 0 or k <= 0:
            return 0.0
        waves = _waves(m, n, sms or self.sms)
        return waves * (self.fp8_tile_s + self.fp8_k_s * k) / self.scale8

    def bf16_gemm(self, m, n, k, sms: int | None = None) -> float:
        """cuBLAS BF16 (m x k) . (k x n); fewer SMs slow it in proportion."""
        if m <= 0 or n <= 0 or k <= 0:
            return 0.0
        share = self.sms / (sms or self.sms)
        return m * n * (self.bf16_out_s + self.bf16_mac_s * k) / self.scale16 * share

    def _grouped(self, rows, experts, n, k, sms, dirichlet: bool, factor: float) -> float:
        tiles = expected_tiles(rows, experts, dirichlet) * math.ceil(n / TILE)
        waves = math.ceil(tiles / sms)
        return waves * (self.fp8_tile_s + self.fp8_k_s * k) / factor

    def fp8_grouped(self, rows, experts, n, k, sms: int | None = None) -> float:
        """The generated grouped FP8 GEMM over `experts` of `rows` in total, split evenly
        (the simulator's routing is uniform, or scaled for the busiest rank)."""
        if rows <= 0 or experts <= 0:
            return 0.0
        return self._grouped(rows, experts, n, k, sms or self.sms, False,
                             self.grouped_factor) / self.scale8

    # -- memory-bound and fused kernels ------------------------------------------------
    def copy(self, nbytes, quantizer: str | None = None) -> float:
        """A memory-bound kernel moving `nbytes`: at the copy rate, or a quantiser's
        measured fraction of it."""
        frac = self.quant[quantizer] if quantizer else 1.0
        return nbytes / (self.copy_rate * frac)

    def attention(self, flops, backward: bool = False, sms: int | None = None) -> float:
        frac = self.attn_bwd if backward else self.attn_fwd
        share = self.sms / (sms or self.sms)
        return flops / (self.bf16_peak * frac) * share

    def summary(self) -> dict:
        """The fitted constants and how far each fit is from its measurements (docs/simulate.md's
        calibration table quotes these)."""
        cal = calibration()["cards"][self.borrowed_from or self.card]
        fp8, bf16 = cal["fp8_gemm"], cal["bf16_gemm"]
        err8 = [self.fp8_gemm(fp8["m"], n, k) * self.scale8 * r * 1e12 / (2 * fp8["m"] * n * k) - 1
                for n, k, r in fp8["points_n_k_tflops"]]
        err16 = [self.bf16_gemm(bf16["m"], n, k) * self.scale16 * r * 1e12
                 / (2 * bf16["m"] * n * k) - 1 for n, k, r in bf16["points_n_k_tflops"]]
        return {"card": self.card, "measured_card": self.borrowed_from or self.card,
                "sms": self.sms, "copy_tb_s": self.copy_rate / 1e12,
                "fp8_tile_us": self.fp8_tile_s * 1e6, "fp8_k_ns": self.fp8_k_s * 1e9,
                "fp8_fit_max_error": max(abs(e) for e in err8),
                "bf16_out_ps": self.bf16_out_s * 1e12, "bf16_mac_fs": self.bf16_mac_s * 1e15,
                "bf16_peak_tflops": 2 / self.bf16_mac_s / 1e12,
                "bf16_fit_max_error": max(abs(e) for e in err16),
                "grouped_factor": self.grouped_factor, "comm_sms": self.comm_sms,
                "attention_forward": self.attn_fwd, "attention_backward": self.attn_bwd,
                "host_us_per_op": self.host_s_per_op * 1e6,
                "program_host_us_per_launch": self.program_host_s_per_launch * 1e6, **self.quant}

    @property
    def contended_sms(self) -> int:
        """SMs left to compute while communication kernels run."""
        return self.sms - self.comm_sms
