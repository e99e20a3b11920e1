"""The updater's resolving of a tag times its retries on the loop's monotonic clock: a wall clock
stepped forward (NTP, a skewed host) must not fail a resolve whose registry is briefly away."""

from __future__ import annotations

import asyncio
import itertools

from norm.adapters.docker import DockerUnavailable
from norm.core.rollout import Resolved, RolloutPolicy
from norm.services.metrics import Metrics
from norm.services.updater import Updater


async def test_a_wall_clock_stepped_forward_does_not_fail_a_resolve() -> None:
    answers = iter([DockerUnavailable("the registry is restarting", ref="r", action="resolving"),
                    "127.0.0.1:5000/djed/app@sha256:" + "3" * 64])

    async def resolve(ref: str) -> str:
        answer = next(answers)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    stepped = itertools.count(1_000_000.0, 3600.0)  # every read of the wall clock is an hour later
    updater = Updater(None, "/norm", "a" * 32, "test", None,  # type: ignore[arg-type]
                      "127.0.0.1:5000/djed/app", RolloutPolicy(pull_timeout=60.0), None,  # type: ignore[arg-type]
                      None, Metrics(), resolve, clock=lambda: next(stepped))  # type: ignore[arg-type]
    async with asyncio.timeout(30):
        await updater._resolving(7, "v2")
    assert updater._queue.get_nowait() == Resolved("sha256:" + "3" * 64)
