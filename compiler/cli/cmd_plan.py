"""`dsvc plan SPEC [--gpus N | --cluster FILE] [--max-memory X] [--top K] [-o FILE]`.

Searches the parallel plan of a spec on its cluster (or on `--gpus N` of the same
nodes, or on another cluster file) with the simulator (compiler/plan, docs/plan_search.md),
prints the Pareto front of the plans it simulated (step time, MFU, peak memory,
headroom), the chosen plan and why, and the best rejected candidate with its
reason in one line; `-o FILE` writes the chosen plan as a spec. Exit 1 when no plan
fits. Imports no torch.
"""

from __future__ import annotations

import re
import sys

from dsvc.compiler.cli import UsageError, add_set_argument

_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def add_arguments(p) -> None:
    p.add_argument("spec", metavar="SPEC", help=".dsv spec")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpus", type=int, metavar="N",
                       help="plan for N GPUs of the spec's nodes (N / gpus_per_node nodes)")
    where.add_argument("--cluster", metavar="FILE",
                       help="plan for the cluster of this .dsv file instead of the spec's")
    p.add_argument("--max-memory", metavar="X",
                   help="memory a GPU may use, e.g. 70GB or 64GiB (default: the GPU's usable "
                        "memory, 95%% of it)")
    p.add_argument("--top", type=int, default=5, metavar="K",
                   help="rows of the Pareto front to print (default 5; the front holds "
                        "at most the simulated plans)")
    p.add_argument("--simulate", type=int, default=6, metavar="N",
                   help="candidates simulated in full besides one probe per pipeline degree, best "
                        "scaled estimates first (default 6)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the chosen plan as a spec")
    add_set_argument(p)


def parse_bytes(text: str) -> float:
    """`70GB`, `64 GiB`, `80e9` as bytes; a usage error otherwise."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if m is None or (unit and unit not in _UNITS):
        raise UsageError(f"--max-memory {text!r}: expected a size such as 70GB or 64GiB")
    value = float(m.group(1)) * _UNITS.get(unit, 1)
    if not 0 < value < 1e18:
        raise UsageError(f"--max-memory {text!r}: expected a positive size")
    return value


def run(args) -> int:
    from dsvc import dsl
    from dsvc.compiler.cli import load_spec, write_output
    from dsvc.compiler.plan_search.search import load_base, search
    from dsvc.runtime.inputs import InputError, check_regular_file

    if args.top < 1 or args.simulate < 1:
        raise UsageError("--top and --simulate take a positive count")
    max_memory = parse_bytes(args.max_memory) if args.max_memory is not None else None
    replace_from = []
    if args.cluster is not None:
        try:
            check_regular_file(args.cluster)
        except InputError as err:
            raise UsageError(f"--cluster {args.cluster}: {err.reason}") from None
        replace_from.append(args.cluster)
    overrides = list(args.set)
    try:  # usage errors in --set first; the file's warnings once
        load_spec(args.spec, overrides)
    except dsl.SpecError:
        pass  # its plan may not suit --gpus or --cluster: load_base decides
    if args.gpus is not None:
        per_node = load_base(args.spec, overrides, replace_from).cluster.gpus_per_node
        if args.gpus < 1 or args.gpus % per_node:
            raise UsageError(f"--gpus {args.gpus}: not a whole number of nodes of "
                             f"{per_node} GPUs")
        overrides.append(f"cluster.nodes={args.gpus // per_node}")
    if args.output is not None:
        _check_output(args.output)
    result = search(args.spec, overrides, replace_from, max_memory,
                    simulate=args.simulate)
    sys.stdout.write(render(result, args.top))
    if result.chosen is None:
        return 1
    if args.output is not None:
        from dsvc.compiler.plan_search.write import check_written, spec_text

        text = spec_text(args.spec, [*overrides, *result.chosen.candidate.overrides()],
                         replace_from, args.output, header_lines(result))
        check_written(text, args.output, result.chosen_spec())
        write_output(args.output, text)
        print(f"wrote {args.output}")
    return 0


def _check_output(path: str) -> None:
    """Refuse `-o` before the search when the file cannot be written there: the parent is
    missing or not a directory, or the path is a directory (write_output says the rest)."""
    import os

    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"-o {path}: is a directory; name a .dsv file")
    if not os.path.isdir(parent):
        raise UsageError(f"-o {path}: '{parent}' is not a directory")


def header_lines(result) -> list[str]:
    o, world = result.chosen, result.spec.cluster.world_size
    return [f"Written by `dsvc plan`: {o.candidate.label(world)}.",
            f"Simulated: {o.step_s:.4g} s per step, MFU {100 * o.mfu:.1f}%, peak "
            f"{o.peak_bytes / 1e9:.1f} GB of {result.usable_bytes / 1e9:.1f} GB usable."]


def render(result, top: int) -> str:
    """The Pareto front, the choice and the best rejected candidate, as text."""
    world = result.spec.cluster.world_size
    c = result.spec.cluster
    lines = [f"plan search: {result.spec.model.name} on {world} {c.gpu.name} GPUs "
             f"({c.nodes} x {c.gpus_per_node}), {result.usable_bytes / 1e9:.1f} GB usable "
             "per GPU",
             f"  {len(result.outcomes):,} candidates, {result.pruned:,} pruned by memory "
             f"before simulating, {len(result.simulated)} simulated; {result.seconds:.1f} s",
             ""]
    front = result.pareto()[:top]
    if front:
        rows = [("plan", "micro-batches", "step", "MFU", "peak", "headroom")]
        for o in front:
            data = world // o.candidate.pipeline
            count = result.spec.train.global_batch // (data * o.candidate.micro_batch)
            rows.append((o.candidate.label(world), f"{count} x {o.candidate.micro_batch}",
                         f"{o.step_s:.4g} s", f"{100 * o.mfu:.1f}%",
                         f"{o.peak_bytes / 1e9:.1f} GB",
                         f"{(result.usable_bytes - o.peak_bytes) / 1e9:.1f} GB"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines.append("Pareto front (no other simulated plan is both faster and smaller):")
        for r in rows:
            cells = [r[0].ljust(widths[0])] + [x.rjust(w) for x, w in zip(r[1:], widths[1:])]
            lines.append("  " + "  ".join(cells).rstrip())
        lines.append("")
    if result.chosen is not None:
        o = result.chosen
        lines.append(f"chosen: {o.candidate.label(world)}: the fastest of the "
                     f"{result.fitting_simulated} simulated plans that fit, "
                     f"{o.step_s:.4g} s per step with "
                     f"{(result.usable_bytes - o.peak_bytes) / 1e9:.1f} GB to spare")
    elif not result.outcomes:
        lines.append(f"no plan: no pipeline, schedule and micro-batch split of {world} GPUs "
                     f"runs global_batch {result.spec.train.global_batch} (docs/plan_search.md)")
    else:
        lines.append("no plan fits: every candidate needs more memory than a GPU has; "
                     "try more GPUs (--gpus) or a smaller global batch")
    b = result.best_rejected()
    if b is not None:
        lines.append(f"best rejected: {b.candidate.label(world)}: {b.rejected}")
    return "\n".join(lines) + "\n"
