"""Operator requests for this host, written to etcd by the `norm` CLI and carried out by the agent:

- `<prefix>/control/<machine-id>/hold/<unit>`: while the key exists the unit is held (stopped on
  purpose, never healed); putting it stops the unit, deleting it starts the unit again.
- `<prefix>/control/<machine-id>/release/<unit>`: release a quarantined unit; the agent deletes the
  key once done, which is the CLI's acknowledgement.

Requests travel through etcd (authenticated, audited, visible) rather than a local socket, and a
request made while the agent was down is carried out when it comes back."""

from __future__ import annotations

import asyncio

import structlog

from norm.adapters.etcd import Etcd, EtcdError, Event, Resync
from norm.adapters.systemd import Systemd, SystemdError
from norm.core.errors import InvalidValue
from norm.core.host import control_prefix
from norm.core.units import matches, parse_unit_name
from norm.services.base import first_of
from norm.services.healer import Healer
from norm.services.holds import OPERATOR, Holds
from norm.services.metrics import Metrics

log = structlog.get_logger("norm.control")

__all__ = ["OPERATOR", "Control", "control_prefix"]


class Control:
    name = "control"

    def __init__(self, etcd: Etcd, prefix: str, machine_id: str, systemd: Systemd, healer: Healer,
                 holds: Holds, metrics: Metrics) -> None:
        self._etcd = etcd
        self.prefix = control_prefix(prefix, machine_id)
        self._systemd = systemd
        self._healer = healer
        self._holds = holds
        self._metrics = metrics

    async def run(self, stopping: asyncio.Event) -> None:
        await first_of(stopping=stopping.wait(), follow=self._follow())

    async def _follow(self) -> None:
        async with self._etcd.watch(self.prefix, prefix=True) as w:
            async for item in w:
                if isinstance(item, Resync):
                    wanted = set()
                    for kv in item.snapshot.kvs:
                        request = self._parse(kv.key)
                        if request and request[0] == "hold":
                            wanted.add(request[1])
                        elif request:
                            await self._release(request[1], kv.key)
                    current = {u for u in self._holds.held() if OPERATOR in self._holds.owners(u)}
                    for unit in sorted(wanted - current):
                        await self._hold(unit)
                    for unit in sorted(current - wanted):
                        await self._unhold(unit)
                elif isinstance(item, Event):
                    request = self._parse(item.kv.key)
                    if request is None:
                        continue
                    kind, unit = request
                    if kind == "hold":
                        await (self._hold(unit) if item.kind == "put" else self._unhold(unit))
                    elif item.kind == "put":
                        await self._release(unit, item.kv.key)

    def _parse(self, key: str) -> tuple[str, str] | None:
        kind, _, unit = key[len(self.prefix):].partition("/")
        try:
            if kind not in ("hold", "release"):
                raise InvalidValue(key, "not a request Norm knows (hold/<unit> or release/<unit>)")
            parse_unit_name(unit, key)
            if not matches(unit, self._healer.patterns):
                raise InvalidValue(key, "not a unit this agent manages (see units.patterns)")
        except InvalidValue as e:
            self._metrics.rejected_values.labels(self.prefix).inc()
            log.error("control.rejected", key=key, reason=e.reason)
            return None
        return kind, unit

    async def _hold(self, unit: str) -> None:
        self._holds.hold(unit, OPERATOR)
        log.info("unit.held", unit=unit, by=OPERATOR)
        try:
            await self._systemd.stop(unit)
        except SystemdError as e:
            log.error("unit.hold_stop_failed", unit=unit, error=str(e))

    async def _unhold(self, unit: str) -> None:
        self._holds.release(unit, OPERATOR)
        log.info("unit.unheld", unit=unit, by=OPERATOR)
        if self._holds.owners(unit):
            return  # still held by someone else (an update): they start it
        try:
            await self._systemd.reset_failed(unit)
            await self._systemd.start(unit)
        except SystemdError as e:
            log.error("unit.unhold_start_failed", unit=unit, error=str(e))

    async def _release(self, unit: str, key: str) -> None:
        was = self._healer.release(unit)
        log.info("heal.release", unit=unit, was_quarantined=was)
        try:
            await self._etcd.delete(key)
        except EtcdError as e:
            log.warning("control.ack_failed", key=key, error=str(e))
