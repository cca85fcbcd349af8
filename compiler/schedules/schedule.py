"""The `Schedule`: per-device ordered action lists plus the stage layout they run on.

Stages form *chains* (one model copy each): a micro-batch's forward runs along a
chain's stages in order, its backward in reverse. 1F1B, ZB1P and DualPipeV
have one chain; DualPipe has two (copy A: stages 0..PP-1, fed from device 0;
copy B: stages PP..2PP-1, fed from device PP-1). Micro-batch indices count
within a chain; chain c's micro-batch m is the step's micro-batch
`chain.microbatch_offset + m`.

`to_json` / `from_json` give the plan form (versioned, strings in torch's
`_Action` format), loadable without dsvc's heavy dependencies.
"""

from __future__ import annotations

import dataclasses
import functools

from dsvc.runtime.actions import Action, parse_action

SCHEDULE_FORMAT = "dsvc-schedule"
SCHEDULE_FORMAT_VERSION = 1


class ScheduleFormatError(ValueError):
    """A schedule JSON document that cannot be read (wrong format, version, or shape)."""


@dataclasses.dataclass(frozen=True)
class Chain:
    """One model copy: its stages in forward order and the micro-batches fed through it."""

    name: str
    stages: tuple[int, ...]
    num_microbatches: int
    microbatch_offset: int = 0


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Ordered actions per device (`actions[d]`) and the layout they assume.

    `pp` is PP of the published formulas (stages per model copy);
    `stage_device[s]` is the device that holds global stage `s`.
    """

    kind: str
    pp: int
    num_microbatches: int
    chains: tuple[Chain, ...]
    stage_device: tuple[int, ...]
    actions: tuple[tuple[Action, ...], ...]

    @property
    def num_devices(self) -> int:
        return len(self.actions)

    @property
    def num_stages(self) -> int:
        return len(self.stage_device)

    @functools.cached_property
    def _links(self) -> tuple[dict[int, int], dict[int, int], dict[int, int]]:
        prev, nxt, chain_of = {}, {}, {}
        for c, chain in enumerate(self.chains):
            for i, s in enumerate(chain.stages):
                chain_of[s] = c
                if i > 0:
                    prev[s] = chain.stages[i - 1]
                if i + 1 < len(chain.stages):
                    nxt[s] = chain.stages[i + 1]
        return prev, nxt, chain_of

    def prev_stage(self, stage: int) -> int | None:
        """The stage feeding `stage` its activations (None for a chain's first stage)."""
        return self._links[0].get(stage)

    def next_stage(self, stage: int) -> int | None:
        """The stage `stage` feeds (None for a chain's last stage, where the loss is)."""
        return self._links[1].get(stage)

    def chain_of(self, stage: int) -> Chain:
        return self.chains[self._links[2][stage]]

    @functools.cached_property
    def _stages_by_device(self) -> tuple[tuple[int, ...], ...]:
        held: list[list[int]] = [[] for _ in range(self.num_devices)]
        for s, d in enumerate(self.stage_device):
            if 0 <= d < len(held):  # the checker reports a stage on no device
                held[d].append(s)
        return tuple(tuple(stages) for stages in held)

    def device_stages(self, device: int) -> tuple[int, ...]:
        """Global stage ids held by `device`, ascending (one pass over the layout, once)."""
        return self._stages_by_device[device]

    def compute_actions(self, device: int) -> tuple[Action, ...]:
        """`actions[device]` without the sends and receives."""
        return tuple(a for a in self.actions[device] if a.is_compute)

    def with_actions(self, actions) -> Schedule:
        """The same layout with other action lists (used by comm insertion and tests)."""
        return dataclasses.replace(self, actions=tuple(tuple(a) for a in actions))

    def to_json(self) -> dict:
        """The plan form: a JSON-able dict with a format name and version."""
        return {
            "format": SCHEDULE_FORMAT,
            "version": SCHEDULE_FORMAT_VERSION,
            "kind": self.kind,
            "pp": self.pp,
            "num_devices": self.num_devices,
            "num_stages": self.num_stages,
            "num_microbatches": self.num_microbatches,
            "chains": [
                {
                    "name": c.name,
                    "stages": list(c.stages),
                    "num_microbatches": c.num_microbatches,
                    "microbatch_offset": c.microbatch_offset,
                }
                for c in self.chains
            ],
            "stage_device": list(self.stage_device),
            "actions": [[str(a) for a in acts] for acts in self.actions],
        }

    @classmethod
    def from_json(cls, doc: dict) -> Schedule:
        """Read `to_json`'s output back; a wrong format or version is a clear error."""
        if not isinstance(doc, dict) or doc.get("format") != SCHEDULE_FORMAT:
            raise ScheduleFormatError(f"not a {SCHEDULE_FORMAT} document")
        version = doc.get("version")
        if version != SCHEDULE_FORMAT_VERSION:
            raise ScheduleFormatError(
                f"schedule format version {version!r} is not supported "
                f"(this dsvc reads version {SCHEDULE_FORMAT_VERSION}); recompile the plan"
            )
        try:
            chains = tuple(
                Chain(
                    str(c["name"]),
                    tuple(int(s) for s in c["stages"]),
                    int(c["num_microbatches"]),
                    int(c.get("microbatch_offset", 0)),
                )
                for c in doc["chains"]
            )
            return cls(
                kind=str(doc["kind"]),
                pp=int(doc["pp"]),
                num_microbatches=int(doc["num_microbatches"]),
                chains=chains,
                stage_device=tuple(int(d) for d in doc["stage_device"]),
                actions=tuple(tuple(parse_action(a) for a in acts) for acts in doc["actions"]),
            )
        except (KeyError, TypeError) as exc:
            raise ScheduleFormatError(f"malformed schedule document: missing or bad {exc}") from exc
