"""Expert-parallel dispatch and combine over `all_to_all_single`, autograd-correct.

A token's (token, expert) slots travel to the EP rank that owns each expert,
are computed there grouped by local expert, and come back to be weighted by the
gate and summed. Splits are uneven and exchanged first (counts per destination
expert), nothing is dropped, and every exchange has an autograd backward that
is the reverse exchange. The dispatch payload can be FP8 (1x128 tiles, fp32
scales travel beside it) while gradients and the combine go in BF16, as the
plan's precision says.

Two paths:
- one hop: every slot straight to its expert's rank (any placement);
- two hop (`ExpertPlacement.two_hop`): a token crosses to each destination
  *node* once, to the rank with its own local index, which forwards copies to
  the owners inside the node and sums their weighted outputs before the single
  reply crosses back (DeepSeek-V3's IB-then-NVLink route).

Every row exchange goes through `ExpertComm.exchange`: started asynchronously
(the transport's work handle), then waited. Between the two, an active
`overlap.OverlapSession` lets the other micro-batch of an overlapped F&B pair
compute: the exchanges are the chunk boundaries of dual micro-batch overlap
(attention | dispatch | MLP | combine). The per-destination counts are a short
synchronous exchange before the rows.

Shape legend: T tokens, K top_k, D hidden, R rows in an exchange, E experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .overlap import BACKWARD, FORWARD, CollectiveTransport
from .plan import ExpertPlacement

ExpertFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x sorted by expert, counts) -> y


def count_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """How many times each of 0..n-1 occurs in `ids` (int64, on ids' device).

    torch.bincount would do, but on a GPU it reads the largest id back to the host
    first; adding ones at the ids keeps the count on the device."""
    flat = ids.reshape(-1)
    return torch.zeros(n, dtype=torch.long, device=ids.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.long)
    )


class _AllToAll(torch.autograd.Function):
    """Rows split by `in_splits` to each peer; backward sends gradients the reverse way."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, grad_dtype, comm, label):
        ctx.splits, ctx.group, ctx.grad_dtype = (out_splits, in_splits), group, grad_dtype
        ctx.comm, ctx.label = comm, label
        return comm.exchange([x], out_splits, in_splits, group, FORWARD, label)[0]

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        dtype = g.dtype
        gt = g.to(ctx.grad_dtype) if ctx.grad_dtype is not None else g
        (back,) = ctx.comm.exchange([gt], in_splits, out_splits, ctx.group, BACKWARD, ctx.label)
        return back.to(dtype), None, None, None, None, None, None


class _FP8AllToAll(torch.autograd.Function):
    """Forward payload quantised to e4m3 in 1 x tile tiles (scales sent beside it); the
    gradient returns in `grad_dtype` as if the quantisation were the identity (the
    expert GEMMs quantise their inputs again; this only changes the wire format)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, grad_dtype, tile, ue8m0, comm, label):
        from .fp8 import dequantize_act, quantize_act

        ctx.splits, ctx.group, ctx.grad_dtype = (out_splits, in_splits), group, grad_dtype
        ctx.comm, ctx.label = comm, label
        q_RD, s_RDt = quantize_act(x.contiguous(), tile, ue8m0)
        q_recv, s_recv = comm.exchange(
            [q_RD.view(torch.uint8), s_RDt], out_splits, in_splits, group, FORWARD, label
        )
        return dequantize_act(q_recv.view(q_RD.dtype), s_recv, tile, out_dtype=x.dtype)

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        gt = g.to(ctx.grad_dtype)
        (back,) = ctx.comm.exchange([gt], in_splits, out_splits, ctx.group, BACKWARD, ctx.label)
        return back.to(g.dtype), None, None, None, None, None, None, None, None


class Route:
    """One exchange: rows with a destination rank and a bucket (local expert) there.

    `send` delivers rows grouped by bucket (`counts[b]` rows each, sources in
    rank order inside a bucket); `back` returns rows computed there to their
    original positions. `comm` moves the bytes (its transport decides whether
    anything needs to move: not without a group in one process).
    """

    def __init__(
        self, dest_R: torch.Tensor, bucket_R: torch.Tensor, num_dest: int, num_buckets: int,
        group, comm: ExpertComm,
    ):  # fmt: skip
        self.group, self.num_dest, self.comm = group, num_dest, comm
        self.moves = comm.transport.active(group, num_dest)
        pos_R = dest_R * num_buckets + bucket_R
        self.order = torch.argsort(pos_R, stable=True)
        self.inv_order = torch.argsort(self.order)
        send_counts = count_ids(pos_R, num_dest * num_buckets).view(num_dest, num_buckets)
        if not self.moves and num_dest == 1:
            # everything stays here in bucket order: no splits, no reordering, and so no
            # host synchronisation (a GPU keeps running ahead of the Python)
            self.send_splits = self.recv_splits = None
            self.counts = send_counts[0]
            self.perm = self.inv_perm = None
            return
        if self.moves:
            # counts first, so every peer can size its receive buffers exactly (a short,
            # synchronous exchange: the rows' exchange below is the one that overlaps)
            ones = [1] * num_dest
            recv_counts = comm.transport.start([send_counts], ones, ones, group).wait()[0]
        else:
            recv_counts = send_counts
        # the one host read of a dispatch: all_to_all_single takes its splits as Python ints
        self.send_splits, self.recv_splits = torch.stack(
            (send_counts.sum(1), recv_counts.sum(1))
        ).tolist()
        self.counts = recv_counts.sum(0)  # rows per bucket after arrival
        # arrival order is (source, bucket); make it (bucket, source) for the grouped GEMM
        lengths = recv_counts.t().reshape(-1)
        src_start = (torch.cumsum(recv_counts.reshape(-1), 0) - recv_counts.reshape(-1)).view_as(
            recv_counts
        )
        new_start = torch.cumsum(lengths, 0) - lengths
        shift = torch.repeat_interleave(src_start.t().reshape(-1) - new_start, lengths)
        rows = sum(self.recv_splits)
        self.perm = torch.arange(rows, dtype=torch.long, device=dest_R.device) + shift
        self.inv_perm = torch.argsort(self.perm)

    def _exchange(self, x, out_splits, in_splits, wire: str, grad_dtype, label, ue8m0=False):
        if not self.moves:
            return x
        if wire == "fp8_e4m3" and x.is_floating_point():
            return _FP8AllToAll.apply(
                x, out_splits, in_splits, self.group, grad_dtype, self.comm.dispatch_tile, ue8m0,
                self.comm, label,
            )
        if not x.is_floating_point():  # routing metadata (two-hop expert ids): no autograd
            return self.comm.exchange([x], out_splits, in_splits, self.group, FORWARD, label)[0]
        return _AllToAll.apply(x, out_splits, in_splits, self.group, grad_dtype, self.comm, label)

    def send(
        self, x_R: torch.Tensor, wire: str = "fp32", grad_dtype=None, ue8m0: bool = False,
        label: str = "dispatch",
    ) -> torch.Tensor:  # fmt: skip
        """Rows to their destinations; `wire` fp8_e4m3 | bf16 | fp32 (float rows only)."""
        xs = x_R.index_select(0, self.order)
        if wire == "bf16" and xs.is_floating_point():
            xs = xs.to(torch.bfloat16)
        xr = self._exchange(xs, self.recv_splits, self.send_splits, wire, grad_dtype, label, ue8m0)
        xr = xr.to(x_R.dtype)
        return xr if self.perm is None else xr.index_select(0, self.perm)

    def back(
        self, y: torch.Tensor, wire_dtype: torch.dtype, label: str = "combine"
    ) -> torch.Tensor:
        """Rows computed at the destination back to where they came from, in `wire_dtype`."""
        yr = (y if self.inv_perm is None else y.index_select(0, self.inv_perm)).to(wire_dtype)
        ys = self._exchange(yr, self.send_splits, self.recv_splits, "", wire_dtype, label)
        return ys.to(y.dtype).index_select(0, self.inv_order)


class ExpertComm:
    """Where each expert lives and how tokens reach it, for one MoE layer on one rank."""

    def __init__(
        self,
        placement: ExpertPlacement,
        ep_rank: int = 0,
        group=None,
        dispatch: str = "fp32",
        combine: str = "fp32",
        ue8m0: bool = False,
        node_size: int = 0,
        inter_group=None,
        intra_group=None,
        transport=None,
        dispatch_tile: int = 128,
    ):
        self.placement, self.group = placement, group
        # how bytes move (CollectiveTransport; overlap.CopyTransport on one GPU), and the
        # OverlapSession of the F&B pair running now, if any (set by the pipeline executor)
        self.transport = transport if transport is not None else CollectiveTransport()
        self.session = None
        self.ep_size = len(placement.per_rank)
        self.ep_rank = ep_rank
        self.local_experts = list(placement.per_rank[ep_rank])
        num_experts = sum(len(r) for r in placement.per_rank)
        owner = torch.empty(num_experts, dtype=torch.long)
        local = torch.empty(num_experts, dtype=torch.long)
        for r, ids in enumerate(placement.per_rank):
            for j, e in enumerate(ids):
                owner[e], local[e] = r, j
        self.owner, self.local_index = owner, local
        self.dispatch_wire = dispatch
        self.combine_dtype = torch.bfloat16 if combine == "bf16" else torch.float32
        self.ue8m0, self.dispatch_tile = ue8m0, dispatch_tile  # an FP8 dispatch's tiles
        self.two_hop = placement.two_hop and group is not None and node_size > 0
        self.node_size, self.inter_group, self.intra_group = node_size, inter_group, intra_group

    def expert_maps(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(owner EP rank, index among the owner's experts) of every expert, on `device`."""
        if self.owner.device != device:
            self.owner, self.local_index = self.owner.to(device), self.local_index.to(device)
        return self.owner, self.local_index

    @property
    def num_local(self) -> int:
        return len(self.local_experts)

    def exchange(self, tensors, out_splits, in_splits, group, role: str, label: str):
        """Start the all-to-all of `tensors`, let the other half of an overlapped pair run
        while it is in flight (when a session is active), then wait for it."""
        handle = self.transport.start(tensors, out_splits, in_splits, group)
        session = self.session
        if session is not None:
            session.started(role, label)
        outs = handle.wait()
        if session is not None:
            session.waited(role, label)
        return outs

    def run(
        self, x_TD: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor, experts: ExpertFn,
        tag: str = "moe", local=None,
    ):  # fmt: skip
        """sum_k w[t, k] * expert_{idx[t, k]}(x[t]), wherever the experts live.

        `tag` names the layer in overlap event logs. `local()` (the shared experts) runs
        after the dispatch arrives, beside the routed experts, so that under overlap it
        computes in the MLP chunk; with it, returns (routed sum, local()'s result)."""
        if self.group is None and self.ep_size > 1:
            raise RuntimeError(
                f"expert placement spans {self.ep_size} EP ranks but this layer has no EP process "
                "group: build it through runtime.trainer.Trainer (or pass the mesh's ep_group)"
            )
        out = [None]

        def in_mlp_chunk(x_local, counts):
            y = experts(x_local, counts)
            if local is not None:
                out[0] = local()
            return y

        if self.two_hop:
            y_TD = self._run_two_hop(x_TD, idx_TK, w_TK, in_mlp_chunk, tag)
        else:
            y_TD = self._run_one_hop(x_TD, idx_TK, w_TK, in_mlp_chunk, tag)
        return (y_TD, out[0]) if local is not None else y_TD

    def route_slots(self, idx_TK: torch.Tensor) -> Route:
        """The one-hop route of slots (token, k) to their experts' ranks, ordered by
        (destination rank, local expert); the counts are exchanged here."""
        slot_e = idx_TK.reshape(-1)
        owner, local = self.expert_maps(idx_TK.device)
        return Route(owner[slot_e], local[slot_e], self.ep_size, self.num_local, self.group, self)

    def _run_one_hop(self, x_TD, idx_TK, w_TK, experts: ExpertFn, tag: str) -> torch.Tensor:
        t, k = idx_TK.shape
        route = self.route_slots(idx_TK)
        x_slots = x_TD.repeat_interleave(k, dim=0)
        x_local = route.send(
            x_slots, self.dispatch_wire, self.combine_dtype, self.ue8m0, f"{tag}.dispatch"
        )
        y_local = experts(x_local, route.counts)
        y_slots_TKD = route.back(y_local, self.combine_dtype, f"{tag}.combine").view(t, k, -1)
        return (y_slots_TKD * w_TK.unsqueeze(-1).to(y_slots_TKD.dtype)).sum(1)

    def node_copies(self, idx_TK: torch.Tensor):
        """Hop 1 of the two-hop route: one copy of a token per node holding one of its
        experts, to the rank with this rank's local index there. Returns (the hop-1 Route of
        the copies, each copy's token, its node, on_node (copies, k): whether slot k's
        expert lives on the copy's node)."""
        t = idx_TK.shape[0]
        g = self.node_size
        num_nodes = self.ep_size // g
        owner, _ = self.expert_maps(idx_TK.device)
        node_TK = owner[idx_TK] // g
        hit_TN = torch.zeros(t, num_nodes, dtype=torch.bool, device=idx_TK.device)
        hit_TN.scatter_(1, node_TK, True)
        copy_tok, copy_node = hit_TN.nonzero(as_tuple=True)
        hop1 = Route(copy_node, torch.zeros_like(copy_node), num_nodes, 1, self.inter_group, self)
        on_node_CK = node_TK.index_select(0, copy_tok) == copy_node.unsqueeze(1)
        return hop1, copy_tok, copy_node, on_node_CK

    def node_slots(self, e_fwd: torch.Tensor):
        """Hop 2: each valid slot (expert id >= 0) of the copies that arrived here by hop 1,
        to its expert's owner inside this node. Returns (the hop-2 Route, each slot's copy,
        its k)."""
        c_idx, k_idx = (e_fwd >= 0).nonzero(as_tuple=True)
        slot_e = e_fwd[c_idx, k_idx]
        owner, local = self.expert_maps(e_fwd.device)
        g = self.node_size
        hop2 = Route(owner[slot_e] % g, local[slot_e], g, self.num_local, self.intra_group, self)
        return hop2, c_idx, k_idx

    def _run_two_hop(self, x_TD, idx_TK, w_TK, experts: ExpertFn, tag: str) -> torch.Tensor:
        t = idx_TK.shape[0]
        # hop 1: one copy of a token per destination node, to the same local index there
        hop1, copy_tok, _, on_node_CK = self.node_copies(idx_TK)
        dispatch, combine = f"{tag}.dispatch", f"{tag}.combine"
        slot_expert_CK = torch.where(
            on_node_CK, idx_TK[copy_tok], torch.full_like(idx_TK[copy_tok], -1)
        )
        slot_w_CK = torch.where(on_node_CK, w_TK[copy_tok], torch.zeros_like(w_TK[copy_tok]))
        x_fwd = hop1.send(
            x_TD.index_select(0, copy_tok), self.dispatch_wire, self.combine_dtype, self.ue8m0,
            dispatch,
        )  # fmt: skip
        # the copies keep FP8-exact values, so hop 2 re-quantises them losslessly
        e_fwd = hop1.send(slot_expert_CK, label=dispatch)
        w_fwd = hop1.send(slot_w_CK, "fp32", torch.float32, label=dispatch)
        # hop 2: inside the node, each valid slot of a received copy to its expert's owner
        hop2, c_idx, k_idx = self.node_slots(e_fwd)
        x_local = hop2.send(
            x_fwd.index_select(0, c_idx), self.dispatch_wire, self.combine_dtype, self.ue8m0,
            dispatch,
        )  # fmt: skip
        y_local = experts(x_local, hop2.counts)
        y_slot = hop2.back(y_local, self.combine_dtype, combine)
        # weighted sum per copy on the forwarding rank: one reply per (token, node)
        weighted = y_slot * w_fwd[c_idx, k_idx].unsqueeze(1).to(y_slot.dtype)
        y_copy = weighted.new_zeros(x_fwd.shape).index_add(0, c_idx, weighted)
        y_back = hop1.back(y_copy, self.combine_dtype, combine)
        return y_back.new_zeros(t, x_TD.shape[1]).index_add(0, copy_tok, y_back)
