"""Steady HTTP load through the sandbox's load balancer, and who serves it, while a rollout runs.

- `OpenLoop`: an open-loop client. Requests are sent on a fixed schedule (`rate` per second), each
  at its own time whatever the ones before it are doing, so that a slow or stalled backend shows as
  failed or slow requests instead of as fewer requests (a closed-loop client, which waits for each
  answer before the next request, would hide it). Every request is counted: a non-2xx answer, a
  connection error or no answer within `timeout` is a failure, kept with its time and reason.
- `ServingSampler`: polls a HAProxy backend through its Runtime API and keeps the fewest servers it
  ever saw ready and up.
- `running(...)`: both in a thread of their own for the length of a `with` block, for synchronous
  tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class LoadResult:
    requests: int = 0
    failed: int = 0
    failures: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, reason), first 100
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class OpenLoop:
    def __init__(self, url: str, rate: float, timeout: float = 5.0) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.url = url
        self.rate = rate
        self.timeout = timeout
        self.result = LoadResult()

    async def run(self, stop: asyncio.Event) -> LoadResult:
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.rate
        started = loop.time()
        pending: set[asyncio.Task[None]] = set()
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(connector=connector, trust_env=False) as http:
            n = 0
            while not stop.is_set():
                due = started + n * interval
                delay = due - loop.time()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await stop.wait()
                    if stop.is_set():
                        break
                task = asyncio.create_task(self._one(http), name=f"load-request-{n}")
                pending.add(task)
                task.add_done_callback(pending.discard)
                n += 1
            if pending:
                await asyncio.gather(*pending)
        self.result.seconds = loop.time() - started
        return self.result

    async def _one(self, http: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        reason: str | None = None
        try:
            async with asyncio.timeout(self.timeout), http.get(self.url) as response:
                await response.read()
                if not 200 <= response.status < 300:
                    reason = f"HTTP {response.status}"
        except TimeoutError:
            reason = f"no answer within {self.timeout:g} s"
        except (aiohttp.ClientError, OSError) as e:
            reason = type(e).__name__
        r = self.result
        r.requests += 1
        r.latencies.append(loop.time() - sent)
        if reason is not None:
            r.failed += 1
            if len(r.failures) < 100:
                r.failures.append((time.monotonic(), reason))


@dataclass
class Serving:
    min_serving: int | None = None
    samples: int = 0
    last: int | None = None
    history: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, serving) on change


class ServingSampler:
    """How many servers of `backend` HAProxy has ready and up, sampled every `interval` seconds."""

    def __init__(self, count: Callable[[], int], interval: float = 0.05) -> None:
        self._count = count
        self.interval = interval
        self.serving = Serving()

    def sample(self) -> None:
        n = self._count()
        s = self.serving
        s.samples += 1
        s.min_serving = n if s.min_serving is None else min(s.min_serving, n)
        if n != s.last:
            s.history.append((time.monotonic(), n))
        s.last = n


@contextlib.contextmanager
def running(url: str, rate: float, serving: Callable[[], int] | None = None,
            timeout: float = 5.0) -> Iterator[tuple[LoadResult, Serving]]:
    """Steady load on `url` (and, with `serving`, the count of servers serving sampled) while the
    block runs; the results are complete once it has left."""
    client = OpenLoop(url, rate, timeout)
    sampler = ServingSampler(serving) if serving is not None else None
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    stop: asyncio.Event | None = None
    errors: list[BaseException] = []

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        ready.set()
        tasks: list[asyncio.Task[Any]] = [asyncio.create_task(client.run(stop), name="load-client")]
        if sampler is not None:
            tasks.append(asyncio.create_task(_sample(sampler, stop), name="load-sampler"))
        await asyncio.gather(*tasks)

    def thread() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as e:  # surfaced in the caller's thread
            errors.append(e)
            ready.set()
        finally:
            loop.close()

    t = threading.Thread(target=thread, name="sandbox-load", daemon=True)
    t.start()
    ready.wait()
    try:
        yield client.result, (sampler.serving if sampler is not None else Serving())
    finally:
        if stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        t.join()
    if errors:
        raise errors[0]


async def _sample(sampler: ServingSampler, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.to_thread(sampler.sample)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(sampler.interval):
                await stop.wait()
