"""Readers for the precision, cluster, parallel, train and decode blocks."""

from __future__ import annotations

from dsvc.dsl import ast
from dsvc.dsl import fields as F
from dsvc.dsl import spec as S
from dsvc.dsl.diagnostics import did_you_mean
from dsvc.dsl.fields import Field
from dsvc.dsl.units import BANDWIDTH, BYTES, MONEY, RATE, TIME
from dsvc.dsl.values import Ident
from dsvc.runtime.plan_check import divisors_near

DTYPES = ("fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2")
DTYPE = F.choice(*DTYPES, aliases={"float32": "fp32", "bfloat16": "bf16", "float16": "fp16",
                                   "e4m3": "fp8_e4m3", "e5m2": "fp8_e5m2"})


def _sub_blocks(block, allowed, sink, where):
    plain = [e for e in block.entries if isinstance(e, (ast.Assign, ast.Const))]
    subs = {}
    for e in block.entries:
        if isinstance(e, ast.RangeAssign):
            sink.error(f"index ranges are only allowed in `layers {{ }}`, not in {where}", e.span)
        elif isinstance(e, ast.Block):
            if e.kind not in allowed:
                guess = did_you_mean(e.kind, allowed)
                sink.error(f"unexpected block '{e.kind}' in {where}", e.kind_span,
                           f"did you mean `{guess}`?" if guess else
                           (f"{where} contains: {', '.join(allowed)}" if allowed else None))
            elif e.kind in subs:
                sink.error(f"a second '{e.kind}' block in {where}", e.kind_span)
            else:
                subs[e.kind] = e
    return plain, subs


def _typed(v, sink, key, kinds):
    """A field written `kind { ... }` or as a bare `kind`: (kind, entries, span)."""
    if isinstance(v, ast.TypedBlock):
        if kinds and v.kind not in kinds:
            guess = did_you_mean(v.kind, kinds)
            sink.error(f"unknown {key} kind `{v.kind}`", v.kind_span,
                       f"did you mean `{guess}`?" if guess else f"one of: {', '.join(kinds)}")
            return None
        return v.kind, v.entries, v.kind_span
    return None


# ----------------------------------------------------------------------------- precision

LINEAR_KEYS = {
    "act": Field(F.int_tuple(2), doc="activation scale tile, e.g. tile(1, 128)"),
    "weight": Field(F.int_tuple(2), doc="weight scale block, e.g. block(128, 128)"),
    "accumulate": Field(DTYPE),
    "promote_every": Field(F.integer(1)),
    "scales": Field(F.choice("fp32", "ue8m0")),
    "pad": Field(F.boolean()),
}
PRECISION_KEYS = {
    "default": Field(DTYPE),
    "master_weights": Field(DTYPE),
    "grads": Field(DTYPE),
    "optimizer_states": Field(DTYPE),
    "linear": Field(lambda v, s, sink, k: v, block=True),
    "dispatch": Field(DTYPE),
    "combine": Field(DTYPE),
    "cache_fp8_activations": Field(F.boolean()),
}


def read_precision(block, sink, ev, spans):
    spans["precision"] = block.kind_span
    plain, subs = _sub_blocks(block, ("keep",), sink, "`precision`")
    r = F.read_entries(plain, PRECISION_KEYS, sink, ev, "`precision`", block.kind_span,
                       "precision", spans)
    out = {"name": block.label or "default"}
    for k in ("default", "master_weights", "grads", "optimizer_states", "dispatch", "combine",
              "cache_fp8_activations"):
        if r.get(k) is not None:
            out[k] = r.get(k)
    lin = r.values.get("linear")
    if isinstance(lin, ast.TypedBlock):
        fmt = DTYPE(_ident(lin), lin.kind_span, sink, "linear")
        rr = F.read_entries([e for e in lin.entries], LINEAR_KEYS, sink, ev, "`linear`",
                            lin.kind_span, "precision.linear", spans)
        if fmt is not None:
            kw = {"format": fmt}
            for src, dst in (("act", "act_tile"), ("weight", "weight_block"),
                             ("accumulate", "accumulate"), ("promote_every", "promote_every"),
                             ("scales", "scales"), ("pad", "pad")):
                if rr.get(src) is not None:
                    kw[dst] = rr.get(src)
            out["linear"] = S.LinearPrecision(**kw)
    elif lin is not None:
        fmt = DTYPE(lin, r.spans.get("linear"), sink, "linear")
        if fmt is not None:
            out["linear"] = S.LinearPrecision(format=fmt)
    keep = {}
    if "keep" in subs:
        kb = subs["keep"]
        spans["precision.keep"] = kb.kind_span
        schema = {d: Field(F.name_list(S.COMPONENTS)) for d in DTYPES}
        rr = F.read_entries(kb.entries, schema, sink, ev, "`keep`", kb.kind_span,
                            "precision.keep", spans)
        for dtype, comps in rr.values.items():
            for c in comps or ():
                if c in keep:
                    sink.error(f"component '{c}' is kept in both {keep[c]} and {dtype}",
                               rr.spans[dtype])
                keep[c] = dtype
    out["keep"] = keep
    return S.Precision(**out)


def _ident(tb):
    return Ident(tb.kind, tb.kind_span)


# ----------------------------------------------------------------------------- cluster

GPU_KEYS = {
    "bf16": Field(F.quantity(RATE), True, "dense BF16 peak, e.g. 989 TFLOPS"),
    "fp8": Field(F.quantity(RATE), True, "dense FP8 peak, e.g. 1979 TFLOPS"),
    "memory": Field(F.quantity(BYTES), True, "e.g. 80 GB"),
    "hbm": Field(F.quantity(BANDWIDTH), True, "e.g. 3.35 TB/s"),
    "gemm_efficiency_bf16": Field(F.number(0, 1, lo_open=True)),
    "gemm_efficiency_fp8": Field(F.number(0, 1, lo_open=True)),
    "memory_efficiency": Field(F.number(0, 1, lo_open=True)),
}
NVLINK_KEYS = {
    "domain": Field(F.integer(1), doc="GPUs in one NVLink domain"),
    "bandwidth": Field(F.quantity(BANDWIDTH), True, "per GPU, one direction, e.g. 400 GB/s"),
    "effective": Field(F.quantity(BANDWIDTH)),
    "latency": Field(F.quantity(TIME)),
}
NETWORK_KEYS = {
    "nic": Field(F.quantity(BANDWIDTH, example="400 Gb/s"), True,
                 "per-GPU NIC line rate, e.g. 400 Gb/s"),
    "effective": Field(F.quantity(BANDWIDTH)),
    "latency": Field(F.quantity(TIME)),
    "latency_cross": Field(F.quantity(TIME)),
    "topology": Field(lambda v, s, sink, k: v),
}
FAT_TREE_KEYS = {
    "layers": Field(F.integer(1, 5)),
    "radix": Field(F.integer(2)),
    "planes": Field(F.integer(1)),
    "switch_price": Field(F.quantity(MONEY, positive=False)),
    "link_price": Field(F.quantity(MONEY, positive=False)),
}
CLUSTER_KEYS = {
    "nodes": Field(F.integer(1), True),
    "gpus_per_node": Field(F.integer(1), True),
    "gpu": Field(lambda v, s, sink, k: v, True, block=True),
}


def read_cluster(block, sink, ev, spans):
    name = block.label or "cluster"
    spans["cluster"] = block.kind_span
    plain, subs = _sub_blocks(block, ("nvlink", "network"), sink, "`cluster`")
    r = F.read_entries(plain, CLUSTER_KEYS, sink, ev, "`cluster`", block.kind_span, "cluster",
                       spans)
    gpu = None
    g = r.values.get("gpu")
    if isinstance(g, ast.TypedBlock):
        rr = F.read_entries(g.entries, GPU_KEYS, sink, ev, f"gpu '{g.kind}'", g.kind_span,
                            "cluster.gpu", spans)
        vals = {k: rr.get(k) for k in GPU_KEYS if rr.get(k) is not None}
        if all(k in vals for k in ("bf16", "fp8", "memory", "hbm")):
            gpu = S.GPU(name=g.kind, bf16_flops=vals.pop("bf16"), fp8_flops=vals.pop("fp8"),
                        **vals)
    elif g is not None:
        sink.error("`gpu` needs its rates: `gpu = h800 { bf16 = ..., fp8 = ..., memory = ..., "
                   "hbm = ... }`", r.spans.get("gpu"))
    nodes, gpn = r.get("nodes"), r.get("gpus_per_node")
    nvlink = None
    if "nvlink" in subs:
        nb = subs["nvlink"]
        spans["cluster.nvlink"] = nb.kind_span
        rr = F.read_entries(nb.entries, NVLINK_KEYS, sink, ev, "`nvlink`", nb.kind_span,
                            "cluster.nvlink", spans)
        if rr.get("bandwidth") is not None:
            nvlink = S.NVLink(domain=rr.get("domain", gpn or 1), bandwidth=rr.get("bandwidth"),
                              effective=rr.get("effective", rr.get("bandwidth")),
                              **({"latency": rr.get("latency")} if rr.get("latency") else {}))
    else:
        sink.error("`cluster` has no `nvlink` block", block.kind_span,
                   "add `nvlink { bandwidth = 400 GB/s, effective = 160 GB/s }`")
    network = None
    if "network" in subs:
        nb = subs["network"]
        spans["cluster.network"] = nb.kind_span
        kind = nb.label or "infiniband"
        if kind not in ("infiniband", "roce", "ethernet"):
            guess = did_you_mean(kind, ("infiniband", "roce", "ethernet"))
            sink.error(f"unknown network kind '{kind}'", nb.label_span,
                       f"did you mean `{guess}`?" if guess else "infiniband, roce or ethernet")
        rr = F.read_entries(nb.entries, NETWORK_KEYS, sink, ev, "`network`", nb.kind_span,
                            "cluster.network", spans)
        topo = None
        t = rr.get("topology")
        if t is not None:
            cv = F.as_call(t, nb.span, sink, "topology", ("fat_tree",))
            if cv is not None:
                a = F.call_args(cv, FAT_TREE_KEYS, sink, "cluster.network.topology", spans)
                if a is not None:
                    topo = S.FatTree(**a)
        if rr.get("nic") is not None:
            extra = {k: rr.get(k) for k in ("latency", "latency_cross") if rr.get(k)}
            network = S.Network(kind=kind if kind in ("infiniband", "roce", "ethernet") else
                                "infiniband", nic=rr.get("nic"),
                                effective=rr.get("effective", rr.get("nic")), topology=topo,
                                **extra)
    if None in (nodes, gpn, gpu, nvlink):
        return None
    return S.Cluster(name=name, nodes=nodes, gpus_per_node=gpn, gpu=gpu, nvlink=nvlink,
                     network=network)


# ----------------------------------------------------------------------------- parallel

PARALLEL_KEYS = {
    "pipeline": Field(F.integer(1), doc="pipeline ranks"),
    "data": Field(F.integer(1), doc="derived: world size / pipeline"),
    "expert": Field(F.integer(1)),
    "zero": Field(F.integer(0, 3)),
    "schedule": Field(F.choice("1f1b", "zb1p", "dualpipe", "dualpipev")),
    "overlap": Field(F.choice("none", "dual_microbatch", aliases={"off": "none"})),
    "layers_per_stage": Field(F.int_list(0)),
    "expert_load": Field(F.string()),
    "redundant_experts": Field(F.integer(0)),
    "two_hop": Field(F.boolean()),
    "micro_batches": Field(F.integer(1), doc="derived: global_batch / (data x micro_batch)"),
}


def read_parallel(block, sink, ev, spans, parts):
    spans["parallel"] = block.kind_span
    plain, _ = _sub_blocks(block, (), sink, "`parallel`")
    r = F.read_entries(plain, PARALLEL_KEYS, sink, ev, "`parallel`", block.kind_span, "parallel",
                       spans)
    pipeline = r.get("pipeline", 1)
    cluster = parts.get("cluster")
    data = r.get("data")
    if cluster is not None and pipeline:
        world = cluster.world_size
        if world % pipeline:
            sink.error(f"pipeline {pipeline} does not divide the world size {world} "
                       f"({cluster.nodes} nodes x {cluster.gpus_per_node} GPUs)",
                       r.spans.get("pipeline", block.kind_span),
                       f"pipeline x data must equal {world}; use pipeline = "
                       f"{divisors_near(world, pipeline)}")
            return None
        derived = world // pipeline
        if data is not None and data != derived:
            sink.error(f"data = {data}, but world size {world} / pipeline {pipeline} = {derived}",
                       r.spans["data"],
                       f"world size = nodes x gpus_per_node = pipeline x data; "
                       f"drop `data` (it is derived) or set it to {derived}")
            return None
        data = derived
    if data is None:
        data = 1
        if cluster is None:
            sink.warning("no `cluster` block: data parallelism taken as 1", block.kind_span)
    stated_mb = r.get("micro_batches")
    train = parts.get("train")
    if stated_mb is not None and train is not None:
        denom = data * train.micro_batch
        if train.global_batch % denom == 0 and train.global_batch // denom != stated_mb:
            sink.error(f"micro_batches = {stated_mb}, but global_batch {train.global_batch} / "
                       f"(data {data} x micro_batch {train.micro_batch}) = "
                       f"{train.global_batch // denom}", r.spans["micro_batches"],
                       "drop `micro_batches` (it is derived) or make them agree")
    kw = {k: r.get(k) for k in ("expert", "zero", "schedule", "overlap", "layers_per_stage",
                                "expert_load", "redundant_experts", "two_hop")
          if r.get(k) is not None}
    return S.Parallel(pipeline=pipeline, data=data, **kw)


# ----------------------------------------------------------------------------- train

ADAMW_KEYS = {
    "lr": Field(F.number(0, lo_open=True), True),
    "betas": Field(F.float_tuple(2)),
    "eps": Field(F.number(0, lo_open=True)),
    "weight_decay": Field(F.number(0)),
    "grad_clip": Field(F.number(0)),
}
TRAIN_KEYS = {
    "seq_len": Field(F.integer(1), True),
    "global_batch": Field(F.integer(1), True, "sequences per optimizer step"),
    "micro_batch": Field(F.integer(1)),
    "steps": Field(F.integer(1)),
    "optimizer": Field(lambda v, s, sink, k: v),
    "lr_schedule": Field(lambda v, s, sink, k: v),
    "data": Field(lambda v, s, sink, k: v),
    "checkpoint": Field(lambda v, s, sink, k: v),
    "seed": Field(F.integer(0)),
    "recompute": Field(F.choice("none", "selective", "full"),
                       doc="activations recomputed in backward instead of kept"),
}


def read_train(block, sink, ev, spans):
    spans["train"] = block.kind_span
    plain, _ = _sub_blocks(block, (), sink, "`train`")
    r = F.read_entries(plain, TRAIN_KEYS, sink, ev, "`train`", block.kind_span, "train", spans)
    kw = {k: r.get(k) for k in ("seq_len", "global_batch", "micro_batch", "steps", "seed",
                                "recompute") if r.get(k) is not None}
    ok = True
    if r.get("optimizer") is not None:
        cv = F.as_call(r.get("optimizer"), block.span, sink, "optimizer", ("adamw",))
        a = cv and F.call_args(cv, ADAMW_KEYS, sink, "train.optimizer", spans)
        if a:
            kw["optimizer"] = S.AdamW(**a)
        else:
            ok = False
    if r.get("lr_schedule") is not None:
        cv = F.as_call(r.get("lr_schedule"), block.span, sink, "lr_schedule",
                       ("constant", "warmup_cosine"))
        schema = {"warmup_steps": Field(F.integer(0))}
        if cv is not None and cv.func == "warmup_cosine":
            schema.update(final_lr=Field(F.number(0)), total_steps=Field(F.integer(1)))
        a = cv and F.call_args(cv, schema, sink, "train.lr_schedule", spans)
        if a is not None and cv is not None:
            kw["lr_schedule"] = S.LRSchedule(kind=cv.func, **a)
        else:
            ok = False
    if r.get("data") is not None:
        cv = F.as_call(r.get("data"), block.span, sink, "data", ("synthetic", "tokens"))
        if cv is not None and cv.func == "tokens":
            a = F.call_args(cv, {"path": Field(F.string(), True),
                                 "dtype": Field(F.choice("uint16", "uint32"))},
                            sink, "train.data", spans, positional=("path",))
            if a is not None:
                kw["data"] = S.Data(kind="tokens", **a)
            else:
                ok = False
        elif cv is not None:
            a = F.call_args(cv, {}, sink, "train.data", spans)
            kw["data"] = S.Data(kind="synthetic")
        else:
            ok = False
    if r.get("checkpoint") is not None:
        cv = F.as_call(r.get("checkpoint"), block.span, sink, "checkpoint", ("every", "never"))
        if cv is not None and cv.func == "every":
            a = F.call_args(cv, {"steps": Field(F.integer(1), True), "dir": Field(F.string())},
                            sink, "train.checkpoint", spans, positional=("steps",))
            if a is not None:
                kw["checkpoint"] = S.Checkpoint(every=a["steps"], **({"dir": a["dir"]}
                                                                    if "dir" in a else {}))
            else:
                ok = False
        elif cv is not None:
            kw["checkpoint"] = S.Checkpoint(every=0)
        else:
            ok = False
    if not ok or "seq_len" not in kw or "global_batch" not in kw:
        return None
    return S.Train(**kw)


# ----------------------------------------------------------------------------- decode

DECODE_KEYS = {
    "tokens_per_device": Field(F.integer(1)),
    "experts_per_device": Field(F.integer(1)),
    "link": Field(F.choice("nic", "effective", "nvlink")),
    "hidden": Field(F.integer(1), doc="override the model's hidden size"),
    "dispatch_bytes": Field(F.number(0, lo_open=True)),
    "combine_bytes": Field(F.number(0, lo_open=True)),
}


def read_decode(block, sink, ev, spans):
    spans["decode"] = block.kind_span
    plain, _ = _sub_blocks(block, (), sink, "`decode`")
    r = F.read_entries(plain, DECODE_KEYS, sink, ev, "`decode`", block.kind_span, "decode", spans)
    kw = {k: r.get(k) for k in DECODE_KEYS if r.get(k) is not None}
    return S.Decode(**kw)
