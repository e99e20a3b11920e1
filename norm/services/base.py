"""What every long-running service shares: a name, and a run loop that ends only when told to."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Protocol


class ServiceDied(RuntimeError):
    """A service returned or failed while the agent was not stopping: the agent must stop too."""


class Service(Protocol):
    name: str

    async def run(self, stopping: asyncio.Event) -> None:
        """Work until `stopping` is set, then finish quickly and return."""


async def wait_or_stop(stopping: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds`; True if the agent is stopping. The one way services pause."""
    try:
        async with asyncio.timeout(seconds):
            await stopping.wait()
    except TimeoutError:
        return False
    return True


async def wake_or_deadline(wake: asyncio.Event, at: float | None) -> None:
    """Wait until `wake` is set or the loop's clock reaches `at` (no deadline when None)."""
    timeout = None if at is None else max(0.0, at - asyncio.get_running_loop().time())
    try:
        async with asyncio.timeout(timeout):
            await wake.wait()
    except TimeoutError:
        pass


async def first_of(**named: Coroutine[Any, Any, Any]) -> str:
    """Run the coroutines as named tasks until the first finishes; cancel the others and return the
    name of the one that finished (its exception, if any, is raised)."""
    tasks = {asyncio.create_task(c, name=name): name for name, c in named.items()}
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    first = next(iter(done))
    first.result()
    return tasks[first]
