"""What every long-running service shares: a name, a run loop that ends only when told to, and the one
way each common thing is done: pausing (`pause`), retrying (`Retry`), owning helper tasks
(`OwnedTasks`), and running coroutines until the first ends (`first_of`)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Protocol

import structlog

from norm.core.backoff import Backoff

log = structlog.get_logger("norm.services")


class ServiceDied(RuntimeError):
    """A service returned or failed while the agent was not stopping: the agent must stop too."""


class Service(Protocol):
    name: str

    async def run(self, stopping: asyncio.Event) -> None:
        """Work until `stopping` is set, then finish quickly and return."""


# -- pausing ---------------------------------------------------------------------------------------------

async def pause(seconds: float | None, *until: asyncio.Event) -> bool:
    """The one way services pause: wait `seconds` on the loop's clock (no bound when None), or less if
    one of the events `until` is set first; True if one was (at once if one already is: still giving
    the loop its turn, so that a loop pausing on an event left set never starves the others)."""
    if any(e.is_set() for e in until):
        await asyncio.sleep(0)
        return True
    if not until:
        if seconds is None:
            await asyncio.Event().wait()
        else:
            await asyncio.sleep(seconds)
        return False
    if len(until) == 1:
        try:
            async with asyncio.timeout(seconds):
                await until[0].wait()
        except TimeoutError:
            return False
        return True
    waits = [asyncio.create_task(e.wait(), name=f"pause-until-{i}") for i, e in enumerate(until)]
    try:
        done, _ = await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(waits)
    return bool(done)


async def wait_or_stop(stopping: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds`; True if the agent is stopping."""
    return await pause(seconds, stopping)


async def wake_or_deadline(wake: asyncio.Event, at: float | None) -> None:
    """Wait until `wake` is set or the loop's clock reaches `at` (no deadline when None)."""
    await pause(None if at is None else max(0.0, at - asyncio.get_running_loop().time()), wake)


# -- retrying --------------------------------------------------------------------------------------------

class Retry:
    """The one way services retry: the failures in a row of one thing, and how long to wait before the
    next try. `next_delay()` after each failure (grows by the backoff, to its cap, jittered so that a
    fleet that failed together does not retry in step); `reset()` after a success."""

    def __init__(self, backoff: Backoff, rand: Callable[[], float] = random.random) -> None:
        self.backoff = backoff
        self.failures = 0
        self._rand = rand

    def next_delay(self) -> float:
        delay = self.backoff.delay(self.failures, self._rand())
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


# -- owning tasks ----------------------------------------------------------------------------------------

class OwnedTasks:
    """The one way a service owns helper tasks: each named and kept under a key (at most one task a
    key: starting another cancels the one before); an error a task ends with goes to `on_error` (by
    default, logged), never lost; on exit every task left is cancelled and awaited.

    `async with OwnedTasks() as tasks:` or `await tasks.cancel_all()`; `await tasks.join()` lets the
    tasks left finish instead."""

    def __init__(self, on_error: Callable[[BaseException], None] | None = None) -> None:
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._on_error = on_error

    def start(self, key: str, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        """Run `coro` as the task named `name` (`key` when None), cancelling the task under `key`."""
        old = self._tasks.pop(key, None)
        if old is not None:
            old.cancel()
        task = asyncio.create_task(coro, name=name or key)
        task.add_done_callback(self._done)
        self._tasks[key] = task
        return task

    def running(self, key: str) -> bool:
        task = self._tasks.get(key)
        return task is not None and not task.done()

    async def stop(self, key: str) -> None:
        """Cancel the task under `key`, if any, and wait until it has ended."""
        task = self._tasks.pop(key, None)
        if task is not None:
            await cancel_and_wait([task])

    async def cancel_all(self) -> None:
        tasks, self._tasks = list(self._tasks.values()), {}
        await cancel_and_wait(tasks)

    async def join(self) -> None:
        """Wait until every task left has ended on its own."""
        while tasks := [t for t in self._tasks.values() if not t.done()]:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> OwnedTasks:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cancel_all()

    def _done(self, task: asyncio.Task[Any]) -> None:
        for key, t in list(self._tasks.items()):
            if t is task:
                del self._tasks[key]
        if task.cancelled() or (e := task.exception()) is None:
            return
        if self._on_error is not None:
            self._on_error(e)
        else:
            log.error("task.failed", task=task.get_name(), exc_info=e)


# -- running until the first ends ------------------------------------------------------------------------

async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel the tasks and wait until each has ended (whatever it ended with: its owner has seen it,
    or does not want it)."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def first_of(**named: Coroutine[Any, Any, Any]) -> str:
    """Run the coroutines as named tasks until the first finishes; cancel the others and return the
    name of the one that finished (its exception, if any, is raised)."""
    tasks = {asyncio.create_task(c, name=name): name for name, c in named.items()}
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(tasks)
    first = next(iter(done))
    first.result()
    return tasks[first]
