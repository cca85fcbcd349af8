"""Generation loops over a `decode.Decoder`: plain decoding and MTP speculative decoding.

`generate(decoder, prompts, config)` prefills every prompt (rows of different
lengths in one padded chunk), then either decodes one token per row per step, or,
with `config.draft_depth = D > 0`, drafts D tokens with the model's MTP modules and
verifies them with one forward of the main model over D + 1 positions per row:

- round r starts with n tokens of each row in the main cache and t_n chosen;
- MTP module k (depth k) at position j reads depth k-1's output at j (the main
  model's for k = 1) and the embedding of t_{j+k}, as in training; its output at
  position n - 1 predicts t_{n+k}, the k-th draft;
- verification runs [t_n, draft_1..draft_D] at positions n..n+D; greedy accepts
  drafts while they equal the main model's argmax, sampling by the speculative
  sampling rule (sampling.py); the first rejection (or the end) gives one more token
  from the main model, so a round emits accepted + 1 tokens;
- then each depth catches its cache up: depth k recomputes its positions from
  n_old - k + 1 to n_new - 1 (those that used drafts last round and the new ones).
  Entries written past a row's valid length are invisible (kv_cache.py) and
  rewritten before anything could see them, so rejected drafts need no rollback.

Greedy output is therefore the main model's own greedy output, drafted or not (up
to the float rounding of running D + 1 positions in one forward instead of one by
one). Rows stop at a stop token (kept in the output) or at `max_new_tokens`; a
finished row keeps its place in the batch (its results are discarded) so that EP
ranks issue the same collectives: `sync(active)` decides, across ranks, whether
any row anywhere still runs.

Shape legend: B rows, L prompt chunk, K chunk length, D hidden, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from .sampling import Sampling, accept_draft, draw


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    sampling: Sampling = Sampling()
    stop: tuple[int, ...] = ()
    draft_depth: int = 0  # MTP modules drafting (0: plain decoding)
    keep_logits: bool = False  # keep each emitted token's main-model logits (tests)


@dataclasses.dataclass
class GenerationResult:
    """Per row: the new tokens (stop token included) and why it stopped; timings and counts."""

    tokens: list[list[int]]
    finish: list[str]  # "stop" | "length"
    prompt_tokens: int
    prefill_s: float  # prompt forwards (main and MTP) and the first token
    decode_s: float  # everything after
    forwards: int  # main-model forwards after the prefill (decode steps or verifications)
    row_forwards: int  # of those, summed over the rows still running in each
    drafted: list[int]  # per depth: drafts that were verified (all drafts before accepted)
    accepted: list[int]  # per depth: drafts accepted
    logits: list[list[torch.Tensor]] | None = None

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def decode_tokens(self) -> int:
        """Tokens emitted after the prefill's first token of each row."""
        return sum(max(len(t) - 1, 0) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens over the whole generation time (prefill included)."""
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / max(self.decode_s, 1e-9)

    @property
    def tokens_per_forward(self) -> float:
        """Tokens a row gains per main-model forward after the prefill (1 without drafts)."""
        return self.decode_tokens / self.row_forwards if self.row_forwards else 0.0

    @property
    def acceptance(self) -> list[float]:
        """Per depth: accepted / verified drafts."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]


class _Rows:
    """Per-row bookkeeping: emitted tokens, stop rules, logits."""

    def __init__(self, b: int, cfg: GenerationConfig):
        self.cfg = cfg
        self.tokens: list[list[int]] = [[] for _ in range(b)]
        self.finish = ["length"] * b
        self.active = [True] * b
        self.logits: list[list[torch.Tensor]] | None = [[] for _ in range(b)] if (
            cfg.keep_logits) else None

    def emit(self, b: int, new: list[int], logits_KV: torch.Tensor | None = None) -> None:
        for j, t in enumerate(new):
            if not self.active[b]:
                return
            self.tokens[b].append(t)
            if self.logits is not None and logits_KV is not None:
                self.logits[b].append(logits_KV[j].detach().clone())
            if t in self.cfg.stop:
                self.finish[b], self.active[b] = "stop", False
            elif len(self.tokens[b]) >= self.cfg.max_new_tokens:
                self.active[b] = False


def cache_positions(longest_prompt: int, max_new_tokens: int, draft_depth: int = 0) -> int:
    """Cache positions a decode needs: the prompt, the new tokens and, when drafting, room
    for the draft chunks' padding past a row's end (2 x depth + 2)."""
    return longest_prompt + max_new_tokens + (2 * draft_depth + 2 if draft_depth else 0)


def _now(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def generate(decoder, prompts: list[list[int]], config: GenerationConfig,
             rows: list[int] | None = None, sync=None,
             live: list[bool] | None = None) -> GenerationResult:
    """Continue each prompt (token ids); see the module docstring. `rows`: the prompts'
    global indices (they seed each row's sampling generator); `sync(any_active) ->
    bool` says whether any row of any rank still runs (EP ranks), default this rank's;
    `live[i]` False: row i only fills the batch (computed, never emitted or counted)."""
    cfg = config
    b = len(prompts)
    if b == 0 or min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    if cfg.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if cfg.draft_depth > decoder.mtp_depth:
        raise ValueError(f"draft depth {cfg.draft_depth}: the model has "
                         f"{decoder.mtp_depth} MTP module(s)")
    device = decoder.model.embed_tokens.weight.device
    depth = cfg.draft_depth
    lens = torch.tensor([len(p) for p in prompts], device=device)
    longest = int(lens.max())
    context = decoder.model.plan.model.max_seq_len
    if longest + cfg.max_new_tokens > context:
        raise ValueError(f"a prompt of {longest} tokens and {cfg.max_new_tokens} new ones "
                         f"exceed the model's context of {context} positions")
    cap = decoder.cache.max_len
    if cache_positions(longest, cfg.max_new_tokens, depth) > cap:
        raise ValueError(f"a cache of {cap} positions is too short: decoding prompts of "
                         f"{longest} tokens needs {cache_positions(longest, cfg.max_new_tokens, depth)}"
                         " (generate.cache_positions)")
    seq = torch.zeros(b, cap + depth + 2, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        seq[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    gens = cfg.sampling.generators(rows if rows is not None else list(range(b)))
    out = _Rows(b, cfg)
    out.active = list(live) if live is not None else out.active
    sync = sync or (lambda active: active)
    ar = torch.arange(b, device=device)

    t0 = _now(device)
    hn, logits = decoder.main(seq[:, :longest], torch.arange(longest, device=device).expand(b, -1))
    last = logits[ar, lens - 1]
    first, _ = cfg.sampling.choose(last, gens)
    n = lens.clone()
    seq[ar, n] = first
    for i, t in enumerate(first.tolist()):
        out.emit(i, [t], last[i : i + 1])
    state = _Drafts(decoder, cfg, seq, gens) if depth else None
    if state is not None:
        state.draft(hn, torch.zeros_like(n), n)
    t1 = _now(device)
    forwards = row_forwards = 0
    drafted, accepted = [0] * depth, [0] * depth
    while sync(any(out.active)):
        forwards += 1
        row_forwards += sum(out.active)
        active = torch.tensor(out.active, device=device)
        if state is None:
            _, lg = decoder.main(seq[ar, n].unsqueeze(1), n.unsqueeze(1))
            tok, _ = cfg.sampling.choose(lg[:, 0], gens)
            n = n + active  # finished rows stay where they are
            seq[ar, n] = torch.where(active, tok, seq[ar, n])
            for i, t in enumerate(tok.tolist()):
                if out.active[i]:
                    out.emit(i, [t], lg[i])
            continue
        n_old = n.clone()
        pos = n_old.unsqueeze(1) + torch.arange(depth + 1, device=device)
        hn, lg = decoder.main(seq.gather(1, pos), pos)
        took, bonus = state.verify(n_old, lg)
        took = torch.where(active, took, -1)  # a finished row takes nothing
        n = n_old + took + 1
        seq[ar, n] = torch.where(active, bonus, seq[ar, n])
        emitted = seq.gather(1, (pos + 1).clamp(max=seq.shape[1] - 1)).tolist()
        for i, a in enumerate(took.tolist()):
            if a < 0:
                continue
            for k in range(min(a + 1, depth)):
                drafted[k] += 1
            for k in range(a):
                accepted[k] += 1
            out.emit(i, emitted[i][: a + 1], lg[i])
        state.draft(hn, n_old, n)
    t2 = _now(device)
    live = live if live is not None else [True] * b
    prompt_tokens = sum(len(p) for p, keep in zip(prompts, live) if keep)
    return GenerationResult(out.tokens, out.finish, prompt_tokens, t1 - t0, t2 - t1, forwards,
                            row_forwards, drafted, accepted, out.logits)


class _Drafts:
    """The MTP side of speculative decoding: each depth's carried state and drafts."""

    def __init__(self, decoder, cfg: GenerationConfig, seq: torch.Tensor, gens):
        self.dec, self.cfg, self.seq, self.gens = decoder, cfg, seq, gens
        self.depth = cfg.draft_depth
        b = seq.shape[0]
        self.carry: list[torch.Tensor | None] = [None] * (self.depth + 1)  # per depth 1..D
        self.q: list[torch.Tensor | None] = [None] * (self.depth + 1)  # draft distributions
        self.rows = torch.arange(b, device=seq.device)

    def draft(self, h0_BKD: torch.Tensor, n_old: torch.Tensor, n_new: torch.Tensor) -> None:
        """Run every depth over its positions max(0, n_old - k + 1) .. n_new - 1 and write
        its draft for t_{n_new + k} into the token buffer. h0: the main model's final-normed
        output over the chunk it just ran, from position n_old (the verification chunk; the
        prompt, from 0, after the prefill)."""
        seq, rows = self.seq, self.rows
        prev_h, prev_start = h0_BKD, n_old
        carried = list(self.carry)  # last round's: this round replaces them depth by depth
        for k in range(1, self.depth + 1):
            start = (n_old - k + 1).clamp_min(0)
            length = int((n_new - start).max().clamp_min(1))
            pos = start.unsqueeze(1) + torch.arange(length, device=seq.device)
            idx = pos - prev_start.unsqueeze(1)
            h = prev_h.gather(1, idx.clamp(0, prev_h.shape[1] - 1).unsqueeze(-1)
                              .expand(-1, -1, prev_h.shape[-1]))
            if carried[k - 1] is not None:  # the previous depth's last committed output
                h = torch.where((idx < 0).unsqueeze(-1), carried[k - 1].unsqueeze(1), h)
            ahead = (pos + k).clamp(max=seq.shape[1] - 1)
            hk, lg = self.dec.mtp(k, h, seq.gather(1, ahead), pos)
            at = (n_new - 1 - start).clamp(0, length - 1)
            tok, q = self.cfg.sampling.choose(lg[rows, at], self.gens)
            seq[rows, (n_new + k).clamp(max=seq.shape[1] - 1)] = tok
            self.q[k] = q
            # depth k's output at n_new - k: all its inputs were true tokens (committed)
            self.carry[k] = hk[rows, (n_new - k - start).clamp(0, length - 1)]
            prev_h, prev_start = hk, start

    def verify(self, n_B: torch.Tensor, logits_BKV: torch.Tensor):
        """(drafts accepted per row (B,), the token after them (B,)) from the main model's
        logits over each row's chunk [t_n, drafts], which starts at n."""
        s, seq, d = self.cfg.sampling, self.seq, self.depth
        drafts_BD = seq.gather(1, n_B.unsqueeze(1) + 1 + torch.arange(d, device=seq.device))
        if s.greedy:
            best_BK = logits_BKV.argmax(-1)
            took = (best_BK[:, :d] == drafts_BD).long().cumprod(1).sum(1)
            return took, best_BK.gather(1, took.unsqueeze(1)).squeeze(1)
        p_BKV = s.probs(logits_BKV)
        drafts = drafts_BD.tolist()
        took, after = [], []
        for i, gen in enumerate(self.gens):
            a, tok = d, None
            for k in range(d):
                ok, tok = accept_draft(p_BKV[i, k], self.q[k + 1][i], drafts[i][k], gen)
                if not ok:
                    a = k
                    break
            if a == d:
                tok = int(draw(p_BKV[i, d : d + 1], [gen])[0])
            took.append(a)
            after.append(tok)
        return (torch.tensor(took, device=seq.device), torch.tensor(after, device=seq.device))
