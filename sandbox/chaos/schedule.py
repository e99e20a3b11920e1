"""A run's schedule, generated from its seed alone: operator actions and faults at moments of the run,
some of them held back until the current rollout reaches a given phase.

The schedule is a plain list of `Step`s: what the seed decides. Which host "the leader" is, which
tag is "the last migrated one", is resolved when the step runs (see sandbox.chaos.campaign).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# Operator actions: (kind, weight). `version` is also the first step of every run.
OPERATOR: dict[str, float] = {
    "version": 3.0,  # a new version, never deployed before
    "flip": 2.0,  # two new versions in quick succession
    "back_migrated": 1.0,  # back to a version whose steps already ran (not listed as compatible)
    "back_compatible": 1.0,  # back to the version listed in update.compatible
    "abort": 1.5,  # `norm abort`
    "unknown_tag": 1.0,  # a tag the registry does not have
    "hold": 1.0,  # `norm units stop <unit>` on a host, released (`norm units start`) later
}

# Faults: (kind, weight). Others may be added with register_fault(); the campaign knows how to
# inject and undo each kind.
FAULTS: dict[str, float] = {
    "agent_kill": 3.0,  # kill -9 of an agent (the leader often), started again after `hold`
    "agent_freeze": 2.0,  # SIGSTOP of an agent for `hold` seconds, then SIGCONT
    "docker_crash": 2.0,  # a host's dockerd killed and started again, during a pull or a step
    "etcd_kill": 1.5,  # one etcd member killed, started again after `hold`
    "quorum_loss": 1.0,  # two members killed or frozen for `hold` seconds
    "compact": 1.0,  # etcd compacted up to the latest revision
    "registry_away": 1.0,  # the image registry stopped for `hold` seconds
    "systemd_restart": 1.0,  # a host's systemd manager restarted (its units' processes die)
    "leader_key_delete": 1.0,  # someone deletes the leader key (`etcdctl del /norm/leader`)
    "step_container_gone": 1.0,  # a running step's container removed (`docker rm -f`) on its host,
    # half the time with the agent that runs it killed first (it comes back to no container)
    "etcd_isolate": 1.0,  # etcd0 cut off from its peers for `hold` seconds; its clients still reach it
    "clock_skew": 1.0,  # an agent started again with its wall clock `arg` seconds off (±600), for `hold`
}

PHASES = ("pull", "stop", "migrate", "start")
TARGETS = ("leader", "leader", "leader", "other", "any")  # the leader often


def register_fault(kind: str, weight: float) -> None:
    """Let schedules include a fault kind defined elsewhere (its injector is registered with
    sandbox.chaos.campaign.register_injector)."""
    if weight <= 0:
        raise ValueError("a fault's weight must be more than 0")
    FAULTS[kind] = weight


@dataclass(frozen=True)
class Step:
    at: float  # seconds after the run began
    kind: str
    operator: bool  # an operator action (else a fault)
    target: str = ""  # leader / other / any (hosts); for etcd faults: an etcd member index
    phase: str | None = None  # first wait (a few seconds at most) for the rollout to reach this phase
    hold: float = 0.0  # how long the fault (or the operator's hold) lasts
    arg: float = 0.0  # kind-specific: the gap of a flip, freeze-or-kill for quorum_loss

    def describe(self) -> str:
        bits = [f"{self.at:5.1f}s", self.kind]
        if self.target:
            bits.append(f"target={self.target}")
        if self.phase:
            bits.append(f"phase={self.phase}")
        if self.hold:
            bits.append(f"hold={self.hold:.1f}s")
        if self.arg:
            bits.append(f"arg={self.arg:.2f}")
        return " ".join(bits)


@dataclass(frozen=True)
class Schedule:
    seed: int
    steps: tuple[Step, ...]
    step_seconds: int  # NORM_DEMO_TASK_SECONDS of the run's one-off steps (0: as fast as they go)
    final_version: bool  # the run ends with a new version (else with whatever the last action set)
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def faults(self) -> int:
        return sum(1 for s in self.steps if not s.operator)

    @property
    def operator_actions(self) -> int:
        return sum(1 for s in self.steps if s.operator)

    def describe(self) -> str:
        return "\n".join(s.describe() for s in self.steps)


def _pick(rng: random.Random, table: dict[str, float]) -> str:
    kinds = sorted(table)
    return rng.choices(kinds, weights=[table[k] for k in kinds])[0]


def make_schedule(seed: int, duration: float = 18.0) -> Schedule:
    """The schedule of run `seed`: the same seed always gives the same schedule."""
    rng = random.Random(seed)
    # New versions every few seconds, so that a rollout is under way for most of the run and the
    # faults that wait for a phase find it.
    steps = [Step(at=0.0, kind="version", operator=True)]
    at = 0.0
    while True:
        at = round(at + rng.uniform(4.0, 8.0), 2)
        if at >= duration - 2.0:
            break
        steps.append(Step(at=at, kind="version", operator=True, phase=rng.choice((None, "done"))))
    for _ in range(rng.randint(2, 4)):
        kind = _pick(rng, OPERATOR)
        at = round(rng.uniform(1.0, duration), 2)
        hold = round(rng.uniform(2.0, 8.0), 1) if kind == "hold" else 0.0
        arg = round(rng.uniform(0.05, 1.5), 2) if kind == "flip" else 0.0
        target = rng.choice(("other", "any", "leader")) if kind == "hold" else ""
        when = rng.choice((None, *PHASES)) if kind in ("abort", "version", "flip") else None
        steps.append(Step(at=at, kind=kind, operator=True, target=target, phase=when, hold=hold, arg=arg))
    for _ in range(rng.randint(3, 5)):
        kind = _pick(rng, FAULTS)
        at = round(rng.uniform(0.3, duration), 2)
        phase: str | None = rng.choice((None, *PHASES))
        target = rng.choice(TARGETS)
        hold = 0.0
        arg = 0.0
        if kind == "agent_kill":
            hold = round(rng.uniform(0.2, 6.0), 1)  # until systemd starts it again
        elif kind == "agent_freeze":
            hold = round(rng.uniform(1.0, 9.0), 1)  # beyond the lease (4 s) about half the time
        elif kind == "docker_crash":
            phase = rng.choice(("pull", "migrate"))
            target = "leader" if phase == "migrate" else rng.choice(("other", "any"))
        elif kind == "step_container_gone":
            phase, target = "migrate", "leader"
            arg = float(rng.random() < 0.5)  # 1: the migrator's agent killed first, back after `hold`
            hold = round(rng.uniform(0.5, 3.0), 1)
        elif kind in ("etcd_kill", "quorum_loss"):
            target = str(rng.randrange(3))
            hold = round(rng.uniform(1.0, 6.0), 1)
            arg = float(rng.random() < 0.5)  # quorum_loss: 1 = frozen (SIGSTOP), 0 = killed
        elif kind == "registry_away":
            phase = rng.choice(("pull", None))
            hold = round(rng.uniform(1.0, 6.0), 1)
        elif kind == "etcd_isolate":
            target = "0"  # the member the fleet runs in a network namespace of its own
            hold = round(rng.uniform(1.0, 8.0), 1)
        elif kind == "clock_skew":
            hold = round(rng.uniform(4.0, 15.0), 1)
            arg = rng.choice((-600.0, 600.0))
        elif kind == "leader_key_delete":
            target = "leader"
        elif kind == "compact":
            target = ""
        elif kind == "systemd_restart":
            pass
        elif kind not in FAULTS:
            raise AssertionError(kind)
        else:  # a registered fault kind: its injector reads what it needs from these
            hold = round(rng.uniform(1.0, 6.0), 1)
            arg = rng.random()
        steps.append(Step(at=at, kind=kind, operator=False, target=target, phase=phase, hold=hold, arg=arg))
    final_version = rng.random() < 0.6
    if final_version:
        steps.append(Step(at=duration + 1.0, kind="version", operator=True))
    step_seconds = rng.choice((0, 1, 1, 2))
    steps.sort(key=lambda s: s.at)
    return Schedule(seed=seed, steps=tuple(steps), step_seconds=step_seconds, final_version=final_version)
