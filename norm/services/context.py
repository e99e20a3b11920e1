"""What the services of one agent share about the host they run on, passed as one value instead of a
handful of arguments each: the etcd client and the prefix everything Norm keeps lives under, this
host's machine id, the agent's metrics, the holds on its units, the units it manages, and the wall
clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from norm.adapters.etcd import Etcd
from norm.core.host import control_prefix
from norm.services.holds import Holds
from norm.services.metrics import Metrics


@dataclass(frozen=True)
class HostContext:
    etcd: Etcd
    prefix: str  # keys.prefix: everything Norm keeps in etcd lives under it
    machine_id: str
    metrics: Metrics
    holds: Holds = field(default_factory=Holds)  # the units held on purpose (by an update, an operator)
    units: tuple[str, ...] = ()  # units.patterns: the application units this agent manages
    # The wall clock: only for what is shown to people or other hosts (durations are the loop's clock).
    clock: Callable[[], float] = time.time

    @property
    def control_prefix(self) -> str:
        """Where the operator's requests for this host are written."""
        return control_prefix(self.prefix, self.machine_id)
