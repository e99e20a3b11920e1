"""The services' shared idioms: pausing, retrying, and owning helper tasks."""

from __future__ import annotations

import asyncio

from norm.core.backoff import Backoff
from norm.services.base import OwnedTasks, Retry, pause


def test_retry_grows_by_the_backoff_and_starts_over_after_reset() -> None:
    retry = Retry(Backoff(first=1.0, factor=2.0, cap=5.0, jitter=0.0))
    assert [retry.next_delay() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert retry.failures == 5
    retry.reset()
    assert retry.failures == 0
    assert retry.next_delay() == 1.0


def test_retry_jitter_comes_from_its_random_source() -> None:
    retry = Retry(Backoff(first=1.0, factor=2.0, cap=5.0, jitter=0.5), rand=lambda: 0.0)
    assert retry.next_delay() == 0.5


async def test_pause_ends_when_an_event_is_set() -> None:
    a, b = asyncio.Event(), asyncio.Event()
    paused = asyncio.create_task(pause(60.0, a, b), name="pause")
    await asyncio.sleep(0)
    b.set()
    async with asyncio.timeout(10):
        assert await paused is True
    assert await pause(60.0, b) is True  # already set: at once


async def test_pause_ends_at_its_time_when_no_event_is_set() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await pause(0.05, asyncio.Event(), asyncio.Event()) is False
    assert await pause(0.05, asyncio.Event()) is False
    assert await pause(0.05) is False
    assert loop.time() - started >= 0.15


async def test_owned_tasks_are_named_replaced_by_key_and_cancelled_on_exit() -> None:
    gate = asyncio.Event()
    async with OwnedTasks() as tasks:
        first = tasks.start("probe", gate.wait(), name="probe-1")
        second = tasks.start("probe", gate.wait(), name="probe-2")
        other = tasks.start("timer", asyncio.sleep(3600))
        assert (first.get_name(), second.get_name(), other.get_name()) == ("probe-1", "probe-2", "timer")
        await asyncio.sleep(0)
        assert first.cancelled()
        assert tasks.running("probe") and tasks.running("timer")
    assert second.cancelled() and other.cancelled()
    assert not tasks.running("probe") and not tasks.running("timer")


async def test_an_owned_task_error_reaches_the_owner() -> None:
    errors: list[BaseException] = []
    tasks = OwnedTasks(on_error=errors.append)

    async def fail() -> None:
        raise ValueError("broken")

    task = tasks.start("job", fail())
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)
    assert [str(e) for e in errors] == ["broken"]
    assert not tasks.running("job")
    await tasks.cancel_all()


async def test_join_lets_the_tasks_finish() -> None:
    tasks = OwnedTasks()
    done: list[str] = []

    async def work(name: str) -> None:
        await asyncio.sleep(0.01)
        done.append(name)

    tasks.start("a", work("a"))
    tasks.start("b", work("b"))
    async with asyncio.timeout(10):
        await tasks.join()
    assert sorted(done) == ["a", "b"]


async def test_stop_cancels_one_task_and_waits_for_it() -> None:
    tasks = OwnedTasks()
    ended = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            ended.set()

    tasks.start("a", work())
    await asyncio.sleep(0)
    await tasks.stop("a")
    assert ended.is_set() and not tasks.running("a")
    await tasks.stop("a")  # no task under the key: nothing to do


async def test_a_pause_on_an_event_already_set_still_lets_the_others_run() -> None:
    """A loop pausing on an event left set (a stepped-down leader's `deposed`, say) must not starve the
    loop: every pause gives the others their turn."""
    left_set = asyncio.Event()
    left_set.set()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker(), name="ticker")
    try:
        for _ in range(100):
            assert await pause(5.0, left_set) is True
    finally:
        task.cancel()
    assert ticks >= 50
