"""Units held on purpose: stopped by an update, or by an operator through Norm. The healer leaves a
held unit alone. Each hold has an owner, so an update ending its holds (`unhold`) does not end an
operator's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

OPERATOR = "operator"  # the owner of the holds `norm units stop` places (norm.services.control)


class Holds:
    def __init__(self, *, operator_holds: bool = False) -> None:
        """`operator_holds`: a control service will read the operator's holds from etcd (the agent
        with healing on); until it has, `operator_known` stays unset."""
        self._holds: dict[str, set[str]] = {}  # unit -> owners
        self._listeners: list[Callable[[], None]] = []
        # Set once the operator's holds have been read from etcd (by the control service), or at
        # once where there is none: nothing may start a unit before, or it would undo a hold.
        self.operator_known = asyncio.Event()
        if not operator_holds:
            self.operator_known.set()

    def subscribe(self, listener: Callable[[], None]) -> None:
        """`listener()` is called after every change (from the loop, synchronously: keep it short)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def hold(self, unit: str, owner: str) -> None:
        owners = self._holds.setdefault(unit, set())
        if owner not in owners:
            owners.add(owner)
            self._changed()

    def unhold(self, unit: str, owner: str) -> None:
        owners = self._holds.get(unit)
        if owners and owner in owners:
            owners.discard(owner)
            if not owners:
                del self._holds[unit]
            self._changed()

    def unhold_all(self, owner: str) -> None:
        for unit in [u for u, owners in self._holds.items() if owner in owners]:
            self.unhold(unit, owner)

    def held(self) -> frozenset[str]:
        return frozenset(self._holds)

    def owners(self, unit: str) -> frozenset[str]:
        return frozenset(self._holds.get(unit, ()))
