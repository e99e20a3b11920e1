"""Real `systemd --user` managers for the tests, each with its own bus and cgroups."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox.systemd import SystemdManager


@pytest.fixture
def systemd_manager(tmp_path: Path) -> Iterator[SystemdManager]:
    """One running manager; its bus is `systemd_manager.bus_address`."""
    manager = SystemdManager("sd", tmp_path / "sd")
    manager.start()
    try:
        yield manager
    finally:
        manager.stop()


@pytest.fixture
def systemd_managers(tmp_path: Path) -> Iterator[Callable[[int], list[SystemdManager]]]:
    """A factory: `systemd_managers(n)` starts n more managers; all are stopped after the test."""
    started: list[SystemdManager] = []

    def make(n: int) -> list[SystemdManager]:
        made: list[SystemdManager] = []
        for _ in range(n):
            name = f"sd{len(started)}"
            manager = SystemdManager(name, tmp_path / name)
            started.append(manager)  # before start(): a half-started one is stopped too
            manager.start()
            made.append(manager)
        return made

    try:
        yield make
    finally:
        errors: list[BaseException] = []
        for manager in reversed(started):
            try:
                manager.stop()
            except Exception as e:  # stop the others all the same, then report
                errors.append(e)
        if errors:
            raise errors[0]
