"""`dsvc plan`'s search: candidates evaluated per second, and its plan beside hand-found ones.

    python bench/plan_speed.py [--quick]

For DeepSeek-V3 on 1,024 H800 (`--set cluster.nodes=128`) and DeepSeek-V2-Lite on
64 H800 (examples/clusters/h800_64.dsv): the search's wall time against the issue's
60 s, candidates estimated, checked for memory and simulated per second, and the
ratio against the reference measured in the same run: one candidate simulated in
full (the whole pass list), i.e. how much faster the search looks at a candidate
than simulating every one would. Then the chosen plan beside the hand-found plans
(the spec as written, and the issue's V3 plans on 1,024 GPUs), each scored by the
same simulator: step time, peak memory, whether it fits. `--quick` skips V3.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
import source_tree  # noqa: E402,F401  (dsvc from this tree, installed or not)

TARGET_S = 60.0
V3 = str(ROOT / "examples" / "deepseek_v3.dsv")
V2_LITE = str(ROOT / "examples" / "deepseek_v2_lite.dsv")
H800_64 = str(ROOT / "examples" / "clusters" / "h800_64.dsv")

CASES = {
    "DeepSeek-V3 on 1,024 H800": (V3, ["cluster.nodes=128"], [], {
        "as written (PP 16 DualPipe, EP 64, selective)": [],
        "PP 16 DualPipeV, EP 64": ["parallel.schedule=dualpipev"],
        "PP 32 DualPipe, EP 32": ["parallel.pipeline=32", "parallel.expert=32"],
        "PP 32 1F1B, EP 32, micro-batch 2": [
            "parallel.schedule=1f1b", "parallel.pipeline=32", "parallel.expert=32",
            "parallel.overlap=none", "train.micro_batch=2"],
        "PP 16 DualPipe, EP 64, full recompute": ["train.recompute=full",
                                                  "parallel.overlap=none"],
        "PP 16 DualPipeV, EP 64, full recompute": [
            "parallel.schedule=dualpipev", "train.recompute=full", "parallel.overlap=none"],
    }),
    "DeepSeek-V2-Lite on 64 H800": (V2_LITE, [], [H800_64], {
        "as written (PP 1 1F1B, EP 8)": [],
        "PP 1 1F1B, EP 64": ["parallel.expert=64"],
        "PP 2 DualPipe, EP 32, overlap": ["parallel.pipeline=2", "parallel.schedule=dualpipe",
                                          "parallel.expert=32",
                                          "parallel.overlap=dual_microbatch"],
    }),
}


def score(path, overrides, replace_from):
    """(step s, peak GB, fits) of a plan by the full pass list, or the spec's refusal."""
    from dsvc import dsl
    from dsvc.compiler.driver import build_report

    try:
        r = build_report(dsl.load(path, overrides, replace_from))
    except dsl.SpecError as err:
        return f"refused: {err.errors[0].message}"
    return (r.value("step.time_s"), r.value("memory.max_gpu_bytes") / 1e9,
            bool(r.value("memory.fits")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="V2-Lite only")
    args = parser.parse_args()
    from dsvc.compiler.plan_search.search import search

    ok = True
    for name, (path, overrides, replace_from, hand) in CASES.items():
        if args.quick and path == V3:
            continue
        result = search(path, overrides, replace_from)
        world = result.spec.cluster.world_size
        ph = result.phases
        checked = sum(o.est_peak_bytes is not None or bool(o.rejected and not o.simulated)
                      for o in result.outcomes)
        sims = len(result.simulated)
        t0 = time.perf_counter()
        reference = (result.chosen or result.outcomes[0]).candidate
        score(path, overrides + reference.overrides(), replace_from)
        one_sim = time.perf_counter() - t0
        print(f"== {name}")
        print(f"search {result.seconds:.1f} s (target < {TARGET_S:.0f} s: "
              f"{'met' if result.seconds < TARGET_S else 'MISSED'}); "
              f"{len(result.outcomes):,} candidates")
        print(f"  estimated      {len(result.outcomes):6,} in {ph['estimate']:6.2f} s = "
              f"{len(result.outcomes) / max(ph['estimate'], 1e-9):8.0f} /s")
        print(f"  memory checked {checked:6,} in {ph['memory']:6.2f} s = "
              f"{checked / max(ph['memory'], 1e-9):8.1f} /s")
        print(f"  simulated      {sims:6,} in {ph['simulate']:6.2f} s = "
              f"{sims / max(ph['simulate'], 1e-9):8.2f} /s")
        per_s = len(result.outcomes) / result.seconds
        print(f"  overall {per_s:.1f} candidates/s against {1 / one_sim:.2f}/s simulating "
              f"each in full (reference, same run: {one_sim:.2f} s for one): "
              f"{per_s * one_sim:.0f}x")
        chosen = result.chosen
        if chosen is None:
            print("  no plan fits")
            ok = False
            continue
        print(f"  chosen: {chosen.candidate.label(world)}: {chosen.step_s:.3f} s, "
              f"{chosen.peak_bytes / 1e9:.1f} GB")
        best_hand = None
        for label, extra in hand.items():
            s = score(path, overrides + extra, replace_from)
            if isinstance(s, str):
                print(f"  hand-found {label}: {s}")
                continue
            step, peak, fits = s
            print(f"  hand-found {label}: {step:.3f} s, {peak:.1f} GB, "
                  f"{'fits' if fits else 'does not fit'}")
            if fits and (best_hand is None or step < best_hand):
                best_hand = step
        if best_hand is not None:
            print(f"  chosen / best hand-found that fits: {chosen.step_s / best_hand:.3f}")
            ok = ok and chosen.step_s <= best_hand
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
