"""Units held on purpose: stopped by an update, or by an operator through Norm. The healer leaves a
held unit alone. Each hold has an owner, so an update releasing its holds does not release an
operator's."""

from __future__ import annotations

import asyncio


class Holds:
    def __init__(self) -> None:
        self._holds: dict[str, set[str]] = {}  # unit -> owners
        self.changed = asyncio.Event()  # set on every change; the consumer clears it

    def hold(self, unit: str, owner: str) -> None:
        owners = self._holds.setdefault(unit, set())
        if owner not in owners:
            owners.add(owner)
            self.changed.set()

    def release(self, unit: str, owner: str) -> None:
        owners = self._holds.get(unit)
        if owners and owner in owners:
            owners.discard(owner)
            if not owners:
                del self._holds[unit]
            self.changed.set()

    def release_all(self, owner: str) -> None:
        for unit in [u for u, owners in self._holds.items() if owner in owners]:
            self.release(unit, owner)

    def held(self) -> frozenset[str]:
        return frozenset(self._holds)

    def owners(self, unit: str) -> frozenset[str]:
        return frozenset(self._holds.get(unit, ()))
