"""Decoding as a job: weights, prompts and settings in; tokens and measured figures out.

`run_job(job)` is what `dsvc generate` runs: in its own process for one process,
or on every rank under torchrun for expert-parallel decoding
(`python -m dsvc.runtime.serve JOB.json`). Each rank builds the whole model with
its block of routed experts (`trained.serving_plan` on `ep` ranks), loads its
weights (a DCP checkpoint through `trained.load_checkpoint_weights`, or an HF
checkpoint through `hf.load_hf_checkpoint`, each reading only this rank's
experts' share where the format allows), decodes its contiguous slice of the
rows (attention data-parallel, experts expert-parallel), with dual micro-batch
overlap when asked, and rank 0 gathers the rows and the figures.

The job (JSON-able):

    {"model": {...}, "precision": {...},            # plan sections (trained.serving_plan)
     "weights": {"kind": "checkpoint" | "hf", "path": ...},
     "prompts": [[ids], ...], "ep": N, "overlap": bool, "absorb": bool,
     "generation": {"max_new_tokens", "temperature", "top_p", "seed", "stop", "draft_depth"},
     "output": "result.json"}                        # written by rank 0 (torchrun)

The result: `{"rows": [{"tokens", "finish"}], "stats": {...}}` (and, with overlap, rank
0's `overlap_log` of its last forward; with `"keep_logits": true`, each row's
`logits` per emitted token) with the timings of
rank 0, the draft counts of every rank, the measured cache bytes per token
(`kv_cache_bytes_per_token`, `kv_cache_bytes_per_token_mtp`) and, over processes,
the all-to-all payload per token per MoE layer (`a2a_bytes_per_token_layer`).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from .decode import Decoder
from .generate import GenerationConfig, GenerationResult, cache_positions, generate
from .overlap import CountingTransport
from .sampling import Sampling
from .trained import build_serving_model, load_checkpoint_weights, serving_plan


def _load_weights(job: dict, model, plan) -> None:
    w = job["weights"]
    if w["kind"] == "checkpoint":
        from .checkpoint import read_meta

        load_checkpoint_weights(w["path"], model, plan, read_meta(w["path"]))
    else:
        from .hf import load_hf_checkpoint

        load_hf_checkpoint(w["path"], model, plan)


def _layout(rows: int, ep: int, overlap: bool) -> tuple[int, int]:
    """(rows per rank, padded total): every rank gets the same number of rows, at least two
    when its rows are split into two overlapped micro-batches."""
    per = -(-rows // ep)
    if overlap:
        per = max(per, 2)
    return per, per * ep


def run_job(job: dict, rank: int = 0, world: int = 1, group=None, device=None) -> dict | None:
    """Decode the job's prompts on this rank (of `world` EP ranks); the result on rank 0."""
    ep = int(job.get("ep", 1))
    if ep != world:
        raise ValueError(f"the job asks for {ep} processes, {world} run it")
    overlap = bool(job.get("overlap", False)) and ep > 1
    plan = serving_plan(job["model"], job["precision"], ep)
    model = build_serving_model(plan, rank, group)
    counter = CountingTransport(rank=rank)
    for moe in model.moe_layers().values():
        moe.comm.transport = counter
    _load_weights(job, model, plan)
    if device is not None:
        model.to(device)
    model.eval()
    g = job["generation"]
    depth = int(g.get("draft_depth", 0))
    cfg = GenerationConfig(
        max_new_tokens=int(g["max_new_tokens"]),
        sampling=Sampling(float(g.get("temperature", 0.0)), float(g.get("top_p", 1.0)),
                          int(g.get("seed", 0))),
        stop=tuple(int(t) for t in g.get("stop", ())), draft_depth=depth,
        keep_logits=bool(job.get("keep_logits", False)),
    )  # fmt: skip
    prompts = [list(map(int, p)) for p in job["prompts"]]
    per, total = _layout(len(prompts), ep, overlap)
    padded = prompts + [prompts[-1]] * (total - len(prompts))  # copies, discarded
    mine = list(range(rank * per, (rank + 1) * per))
    longest = max(len(p) for p in prompts)
    decoder = Decoder.allocate(model, per, cache_positions(longest, cfg.max_new_tokens, depth),
                               mtp=depth > 0, absorb=bool(job.get("absorb", True)),
                               overlap=overlap)
    sync = None
    if world > 1:

        def sync(active: bool) -> bool:  # does any row of any rank still run?
            flag = torch.tensor([int(active)], device=model.embed_tokens.weight.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            return bool(flag.item())

    live = [r < len(prompts) for r in mine]
    res = generate(decoder, [padded[r] for r in mine], cfg, rows=mine, sync=sync, live=live)
    rows = [{"tokens": t, "finish": f} for t, f in zip(res.tokens, res.finish)]
    if res.logits is not None:  # each emitted token's logits (tests compare them)
        for row, steps in zip(rows, res.logits):
            row["logits"] = [lg.float().cpu().tolist() for lg in steps]
    mine_out = {"rows": rows, "counts": _counts(res, counter, decoder)}
    if world > 1:
        every: list = [None] * world
        dist.all_gather_object(every, mine_out, group=group)
    else:
        every = [mine_out]
    if rank != 0:
        return None
    rows = [row for part in every for row in part["rows"]][: len(prompts)]
    out = {"rows": rows, "stats": _stats(every, plan, res, ep, overlap)}
    if overlap:  # rank 0's last forward, as the training overlap keeps its last step
        out["overlap_log"] = [list(event) for event in decoder.overlap_log]
    return out


def _counts(res: GenerationResult, counter: CountingTransport, decoder: Decoder) -> dict:
    return {"prompt_tokens": res.prompt_tokens, "new_tokens": res.new_tokens,
            "decode_tokens": res.decode_tokens, "forwards": res.forwards,
            "row_forwards": res.row_forwards, "drafted": res.drafted, "accepted": res.accepted,
            "prefill_s": res.prefill_s, "decode_s": res.decode_s,
            "a2a_payload_bytes": counter.payload_bytes, "a2a_remote_bytes": counter.remote_bytes,
            "a2a_rows": counter.payload_rows,
            "kv_main": decoder.cache.bytes_per_token("main"),
            "kv_mtp": decoder.cache.bytes_per_token("mtp")}


def _stats(every: list, plan, res: GenerationResult, ep: int, overlap: bool) -> dict:
    c = [part["counts"] for part in every]

    def total(key):
        return sum(x[key] for x in c)

    drafted = [sum(x["drafted"][k] for x in c) for k in range(len(res.drafted))]
    accepted = [sum(x["accepted"][k] for x in c) for k in range(len(res.accepted))]
    prefill = max(x["prefill_s"] for x in c)
    decode = max(x["decode_s"] for x in c)
    new = total("new_tokens")
    out = {
        "processes": ep, "overlap": overlap, "prompt_tokens": total("prompt_tokens"),
        "new_tokens": new, "prefill_s": prefill, "decode_s": decode,
        "tokens_per_s": new / max(prefill + decode, 1e-9),
        "decode_tokens_per_s": total("decode_tokens") / max(decode, 1e-9),
        "forwards": res.forwards,
        "tokens_per_forward": total("decode_tokens") / max(total("row_forwards"), 1),
        "drafted": drafted, "accepted": accepted,
        "acceptance": [a / d if d else None for a, d in zip(accepted, drafted)],
        "kv_cache_bytes_per_token": c[0]["kv_main"],
        "kv_cache_bytes_per_token_mtp": c[0]["kv_mtp"],
    }  # fmt: skip
    moes = [f for f in plan.model.ffn.values() if f.kind == "moe"]
    if ep > 1 and moes and total("a2a_rows"):
        # every (token, routed expert) slot goes out once (dispatch) and back once (combine)
        k = moes[0].top_k
        visits = total("a2a_rows") / 2 / k
        out["a2a_bytes_per_token_layer"] = total("a2a_payload_bytes") / visits
        out["a2a_remote_bytes_per_token_layer"] = total("a2a_remote_bytes") / visits
    return out


def main(argv=None) -> int:
    """torchrun entry: `python -m dsvc.runtime.serve JOB.json`."""
    from .inputs import load_json
    from .launch import init_distributed, run_guarded

    argv = sys.argv[1:] if argv is None else argv
    job = load_json(argv[0])

    def work() -> int:
        from .checkpoint import CheckpointError
        from .hf import HFCheckpointError, HFFormatError
        from .plan import PlanError

        device = init_distributed()
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        try:
            result = run_job(job, rank, world, dist.group.WORLD if world > 1 else None,
                             device if device.type == "cuda" else None)
        except (CheckpointError, HFCheckpointError, HFFormatError, PlanError) as err:
            # the weights: every rank finds the same problem; one line, and torchrun stops
            if rank == 0:
                print(f"[dsvc] error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
            os._exit(1)
        if rank == 0:
            tmp = job["output"] + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(result, f)
            os.replace(tmp, job["output"])
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        return 0

    return run_guarded(work)


if __name__ == "__main__":
    sys.exit(main())
