"""Dual micro-batch overlap: one micro-batch's forward and another's backward, interleaved.

DeepSeek-V3 hides the expert all-to-alls of one micro-batch behind the compute
of another. An `OVERLAP_F_B` pair runs here as two cooperating streams of work:

- the backward half (B) runs on the calling thread, the forward half (F) on a
  long-lived helper thread; exactly one of them runs at any time (a baton), so the order
  of everything they issue is deterministic and the same on every EP rank;
- every all-to-all is *started* asynchronously (`ExpertComm.exchange`: gloo or
  NCCL `async_op=True` work handles, or `CopyTransport` on one GPU); right after
  starting one, its stream hands the baton to the other stream, and waits for
  its exchange only when the baton comes back. B starts (its first chunk is,
  in steady state, a combine-backward), then the streams alternate at each
  all-to-all until one finishes; the other then runs alone.

So each compute chunk of one micro-batch (attention, MLP; the autograd
engine's backward of them) is issued while the other micro-batch has a
dispatch or combine in flight: exactly the chunk order of
`compiler.schedules.overlap_order` (the test compares the two). On a GPU the
CPU threads only enqueue: the exchange runs on NCCL's stream (or the copy
transport's stream) and the compute stream waits on it at the wait point, so
the overlap happens on the device. On CPU it is the same order with async
collectives (correct, not faster). Numerics are identical to running F then B
(same ops on the same tensors; the test asserts bit-equality).

The event log (`OverlapSession.log`) records, in issue order, tuples
`(op, action, label)`: op "start" / "wait" of an all-to-all labelled
`"<unit>.dispatch"` or `"<unit>.combine"` (unit `L<layer>` or `mtp<k>`), and
"compute" for the work a stream ran between two of its all-to-all points,
labelled `"<unit>.attention"`, `"<unit>.mlp"`, or `"tail"` (the residual and
the stage output after the last combine; for B, the head and loss gradients
before the first one).
"""

from __future__ import annotations

import contextlib
import queue
import threading

import torch

FORWARD, BACKWARD = "forward", "backward"


class OverlapSession:
    """Runs one F&B pair with the two halves alternating at their all-to-alls.

    With `interleave=False` it runs the forward, then the backward, on the calling
    thread (the plain order, `overlap` off) and records the same kind of event log."""

    def __init__(
        self, forward_action: str, backward_action: str, log: list | None = None,
        interleave: bool = True, two_forwards: bool = False,
    ):  # fmt: skip
        self.actions = {FORWARD: forward_action, BACKWARD: backward_action}
        self.log = log if log is not None else []
        self.interleave = interleave
        # decoding (`forwards`): both halves are forwards, so every exchange reports
        # FORWARD; the half that issued it is the one holding the baton
        self.two_forwards = two_forwards
        self._running: str | None = None
        self._cv = threading.Condition()
        self._turn = BACKWARD
        self._finished: set[str] = set()
        self._segment: dict[str, int | None] = {FORWARD: None, BACKWARD: None}
        self._last: dict[str, tuple[str, str] | None] = {FORWARD: None, BACKWARD: None}

    @classmethod
    def forwards(
        cls, first_action: str, second_action: str, log: list | None = None,
        interleave: bool = True,
    ) -> OverlapSession:  # fmt: skip
        """A session for two micro-batches' forwards (dual micro-batch overlap at inference):
        drive it with `run_forwards`. The first runs on the calling thread and goes first,
        the second on the helper thread; each compute chunk of one is issued while the
        other's dispatch or combine is in flight, and the log names chunks as forwards."""
        return cls(second_action, first_action, log, interleave, two_forwards=True)

    def run_forwards(self, first_fn, second_fn):
        """(first_fn(), second_fn()), interleaved at their all-to-alls."""
        second, first = self.run(second_fn, first_fn)
        return first, second

    # -- driving ---------------------------------------------------------------------
    def run(self, forward_fn, backward_fn):
        """forward_fn() on a helper thread and backward_fn() here, interleaved; returns
        (forward result, backward result). An exception in either is re-raised here."""
        if not self.interleave:
            out = []
            order = ((BACKWARD, backward_fn), (FORWARD, forward_fn)) if self.two_forwards else (
                (FORWARD, forward_fn), (BACKWARD, backward_fn))
            for role, fn in order:
                self._running = role
                self._open_segment(role)
                out.append(fn())
                self._close_segment(role, None)
                self._finished.add(role)
            return (out[1], out[0]) if self.two_forwards else (out[0], out[1])
        results: dict[str, object] = {}
        errors: list[BaseException] = []

        def side(role, fn):
            try:
                self._wait_turn(role)
                self._open_segment(role)
                results[role] = fn()
                self._close_segment(role, None)
            except BaseException as exc:  # noqa: BLE001 -- handed to the caller below
                errors.append(exc)
            finally:
                with self._cv:
                    self._finished.add(role)
                    self._turn = _other(role)
                    self._cv.notify_all()

        # the helper thread computes as the caller would: grad mode and CUDA device/stream
        grad = torch.is_grad_enabled()
        stream = torch.cuda.current_stream() if torch.cuda.is_initialized() else None

        def forward_side():
            with torch.set_grad_enabled(grad), _on_stream(stream):
                side(FORWARD, forward_fn)

        done = _helper().submit(forward_side)
        try:
            side(BACKWARD, backward_fn)
        finally:
            done.wait()
        if errors:
            raise errors[0]
        return results.get(FORWARD), results.get(BACKWARD)

    # -- called by the exchanges (ExpertComm.exchange) -------------------------------
    def started(self, role: str, label: str) -> None:
        """`role` has just started the all-to-all `label`: let the other stream compute."""
        role = self._caller(role)
        self._close_segment(role, _split(label))
        self.log.append(("start", self.actions[role], label))
        if not self.interleave:
            return
        with self._cv:
            other = _other(role)
            if other in self._finished:
                return
            self._turn = other
            self._cv.notify_all()
        self._wait_turn(role)

    def waited(self, role: str, label: str) -> None:
        """`role`'s all-to-all `label` has arrived: it computes again."""
        role = self._caller(role)
        self.log.append(("wait", self.actions[role], label))
        self._open_segment(role)

    # -- internals -------------------------------------------------------------------
    def _caller(self, role: str) -> str:
        """The half that issued an exchange: as reported, or for two forwards the half
        that holds the baton (the running one when not interleaved)."""
        if not self.two_forwards:
            return role
        return self._turn if self.interleave else self._running

    def _wait_turn(self, role: str) -> None:
        with self._cv:
            while self._turn != role and _other(role) not in self._finished:
                self._cv.wait()

    def _open_segment(self, role: str) -> None:
        self._segment[role] = len(self.log)
        self.log.append(("compute", self.actions[role], ""))

    def _close_segment(self, role: str, nxt: tuple[str, str] | None) -> None:
        at = self._segment[role]
        if at is None:
            return
        direction = FORWARD if self.two_forwards else role
        self.log[at] = ("compute", self.actions[role],
                        _segment_label(direction, self._last[role], nxt))
        self._segment[role] = None
        if nxt is not None:
            self._last[role] = nxt


class _Helper:
    """The long-lived thread that runs forward halves. One per process, reused by every
    pair: a new thread per pair would set up CUDA library state (cuBLAS handles and
    workspaces) each time, which costs milliseconds per pair on a GPU."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="dsvc-overlap-forward", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, done = self._jobs.get()
            try:
                fn()  # never raises: OverlapSession.run's side() keeps the exception
            finally:
                done.set()

    def submit(self, fn) -> threading.Event:
        done = threading.Event()
        self._jobs.put((fn, done))
        return done


_HELPER: list[_Helper] = []  # the process's helper thread, made on first use
_HELPER_LOCK = threading.Lock()


def _helper() -> _Helper:
    with _HELPER_LOCK:
        if not _HELPER:
            _HELPER.append(_Helper())
        return _HELPER[0]


@contextlib.contextmanager
def _on_stream(stream):
    if stream is None:
        yield
        return
    with torch.cuda.device(stream.device), torch.cuda.stream(stream):
        yield


def _other(role: str) -> str:
    return FORWARD if role == BACKWARD else BACKWARD


def _split(label: str) -> tuple[str, str]:
    unit, _, kind = label.rpartition(".")
    return unit, kind


def _segment_label(role, last, nxt) -> str:
    """Name the compute between two all-to-all points of one stream.

    Forward: before L.dispatch runs L's attention (and router), before L.combine its
    experts. Backward (last layer first): before L.dispatch-backward runs L's expert
    backward, before L.combine-backward the attention backward of the layer above."""
    if nxt is not None and last == nxt:
        return f"{nxt[0]}.{nxt[1]}"  # between two exchanges of one chunk (two-hop)
    if role == FORWARD:
        if nxt is None:
            return "tail"
        return f"{nxt[0]}.attention" if nxt[1] == "dispatch" else f"{nxt[0]}.mlp"
    if nxt is not None and nxt[1] == "dispatch":
        return f"{nxt[0]}.mlp"
    if last is None:
        return "tail"
    return f"{last[0]}.attention" if last[1] == "dispatch" else f"{last[0]}.mlp"


def forward_chunks_under_comm(log: list, action: str) -> list[tuple[str, str]]:
    """(compute label, the other half's all-to-all in flight) for each compute chunk of
    `action` that was issued between the start and the wait of one of the other half's
    all-to-alls; chunks issued with none in flight are left out. `log`: a session's."""
    in_flight: list[str] = []
    out = []
    for op, who, label in log:
        if who != action and op == "start":
            in_flight.append(label)
        elif who != action and op == "wait" and label in in_flight:
            in_flight.remove(label)
        elif who == action and op == "compute" and in_flight:
            out.append((label, in_flight[0]))
    return out


# -- transports: how an exchange's bytes move -------------------------------------------
class InFlight:
    """An exchange in flight: `wait()` returns its received tensors."""

    def __init__(self, outs, works=(), event=None, inputs=(), device=None):
        self.outs, self.works, self.event, self.device = outs, works, event, device
        self.inputs = inputs  # kept alive until the exchange is waited on

    def wait(self) -> list[torch.Tensor]:
        for w in self.works:
            w.wait()  # NCCL: the current stream waits; gloo: the CPU waits
        if self.event is not None:
            torch.cuda.current_stream(self.device).wait_event(self.event)
        return self.outs


class CollectiveTransport:
    """`all_to_all_single` with uneven splits, asynchronous (`async_op=True`)."""

    def active(self, group, num_dest: int) -> bool:
        return group is not None and num_dest > 1

    def start(self, tensors, out_splits, in_splits, group) -> InFlight:
        import torch.distributed as dist

        ins, outs, works = [t.contiguous() for t in tensors], [], []
        for t in ins:
            out = t.new_empty((sum(out_splits), *t.shape[1:]))
            works.append(
                dist.all_to_all_single(out, t, out_splits, in_splits, group=group, async_op=True)
            )
            outs.append(out)
        return InFlight(outs, works, inputs=ins)


class CopyTransport:
    """One device, no peers: the exchange is a device-to-device copy of the same bytes on
    its own CUDA stream (ordered after the producer, waited on by the consumer through
    an event). Used by bench/overlap_gpu.py to time the overlap on one GPU; on CPU a
    plain copy."""

    def __init__(self, device: torch.device | None = None):
        cuda = device is not None and device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None

    def active(self, group, num_dest: int) -> bool:
        return True

    def start(self, tensors, out_splits, in_splits, group) -> InFlight:
        if list(out_splits) != list(in_splits):
            raise ValueError("CopyTransport moves rows to the same rank only (one device)")
        outs = [torch.empty_like(t) for t in tensors]  # allocated on the consumer's stream
        if self.stream is None:
            for o, t in zip(outs, tensors):
                o.copy_(t)
            return InFlight(outs)
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            for o, t in zip(outs, tensors):
                o.copy_(t, non_blocking=True)
                t.record_stream(self.stream)
                o.record_stream(self.stream)
            event = torch.cuda.Event()
            event.record(self.stream)
        return InFlight(outs, event=event, device=self.stream.device)


class CountingTransport:
    """Another transport with the bytes it is handed counted (`dsvc generate` reports them
    against `dsvc report`'s decode figures): `payload_bytes` of every row exchange, the
    rows this rank keeps for itself included (the report's model, where every expert is
    remote), `remote_bytes` of them to other ranks, `payload_rows` rows sent, and
    `count_bytes` of the per-destination counts exchanged before the rows."""

    def __init__(self, inner=None, rank: int = 0):
        self.inner = inner if inner is not None else CollectiveTransport()
        self.rank = rank
        self.payload_bytes = self.remote_bytes = self.payload_rows = self.count_bytes = 0

    def active(self, group, num_dest: int) -> bool:
        return self.inner.active(group, num_dest)

    def start(self, tensors, out_splits, in_splits, group) -> InFlight:
        # Route sends its counts as one int64 tensor of (destinations, buckets), one row each
        counts = len(tensors) == 1 and tensors[0].dtype == torch.int64 and tensors[0].dim() == 2
        for t in tensors:
            row = t[0].numel() * t.element_size() if t.shape[0] else 0
            sent = sum(in_splits) * row
            if counts:
                self.count_bytes += sent
                continue
            self.payload_bytes += sent
            mine = in_splits[self.rank] if self.rank < len(in_splits) else 0
            self.remote_bytes += sent - mine * row
        if not counts:
            self.payload_rows += sum(in_splits)
        return self.inner.start(tensors, out_splits, in_splits, group)
