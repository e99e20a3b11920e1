"""The Docker adapter against real engines and a real registry."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from norm.adapters.docker import (
    RUN_LABEL,
    Docker,
    DockerRejected,
    DockerUnavailable,
    PullProgress,
    RunTimeout,
)
from sandbox.docker import DOCKER, DockerEngine
from sandbox.registry import Registry

pytestmark = pytest.mark.slow

CALL_TIMEOUT = 10.0
DEADLINE = 20.0


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    """One engine for this module's tests (an engine takes seconds to start); none of the images is
    on it until a test pulls them."""
    e = DockerEngine("adapter", tmp_path_factory.mktemp("adapter-engine"))
    try:
        e.start()
        yield e
    finally:
        e.stop()


@pytest.fixture
async def docker(engine: DockerEngine) -> AsyncIterator[Docker]:
    async with Docker(engine.host, call_timeout=CALL_TIMEOUT) as d:
        yield d
    left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("docker-")]
    assert not left, f"tasks left behind: {left}"


@pytest.fixture
async def app(docker: Docker, demo_app: Callable[..., str], demo_app_digest: Callable[..., str]) -> str:
    """The demo app v1, pulled by digest onto the module's engine: its digest reference."""
    ref = await asyncio.to_thread(demo_app_digest, "v1")
    await docker.pull(ref)
    return ref


def containers(engine: DockerEngine) -> list[str]:
    return engine.docker("ps", "-a", "-q").split()


async def container_started(engine: DockerEngine, name: str, since: float) -> None:
    """Wait (bounded) for the engine's start event of container `name`, from `since` on (events
    before the subscription are replayed: no race with the start)."""
    proc = await asyncio.create_subprocess_exec(
        DOCKER, "-H", engine.host, "events", "--since", f"{since:.3f}", "--filter", "type=container",
        "--filter", "event=start", "--filter", f"container={name}", "--format", "{{.Actor.Attributes.name}}",
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(DEADLINE):
            line = await proc.stdout.readline()
        assert line.decode().strip() == name
    finally:
        proc.kill()
        await proc.wait()


# -- resolve ----------------------------------------------------------------------------------------

async def test_resolve_gives_the_digest_the_registry_has(
    docker: Docker, demo_app: Callable[..., str], demo_app_digest: Callable[..., str]
) -> None:
    ref = await asyncio.to_thread(demo_app, "v1")
    want = await asyncio.to_thread(demo_app_digest, "v1")
    assert await docker.resolve(ref) == want
    assert await docker.resolve(want) == want  # a digest resolves to itself
    assert not await docker.has_image(ref), "resolving pulls nothing"


async def test_unknown_tag_and_bad_reference_are_rejected_fast(
    docker: Docker, registry: Registry, demo_app: Callable[..., str]
) -> None:
    await asyncio.to_thread(demo_app, "v1")  # the repository exists; the tag does not
    t0 = time.monotonic()
    with pytest.raises(DockerRejected) as info:
        await docker.resolve(f"{registry.address}/djed/app:no-such-tag")
    assert time.monotonic() - t0 < 2.0
    assert info.value.ref.endswith(":no-such-tag") and info.value.action == "resolving"
    with pytest.raises(DockerRejected):
        await docker.pull(f"{registry.address}/djed/app:no-such-tag")
    with pytest.raises(DockerRejected):
        await docker.resolve(f"{registry.address}/no/such-repo:v1")
    for bad in (f"{registry.address}/Djed/App:v1", "app::v1", "app v1", "app@sha256:abc"):
        with pytest.raises(DockerRejected):
            await docker.resolve(bad)
        with pytest.raises(DockerRejected):
            await docker.pull(bad)
    assert time.monotonic() - t0 < 5.0


# -- pull -------------------------------------------------------------------------------------------

async def test_pull_by_digest_on_another_engine_with_progress(
    docker: Docker, demo_app_digest: Callable[..., str]
) -> None:
    ref = await asyncio.to_thread(demo_app_digest, "v5mb", 5)
    seen: list[PullProgress] = []
    assert not await docker.has_image(ref)

    image_id = await docker.pull(ref, seen.append)

    info = await docker.inspect_image(ref)
    assert info.id == image_id
    assert ref in info.repo_digests
    assert info.size >= 5 * 1024 * 1024
    assert await docker.has_image(ref)
    assert seen, "progress was reported"
    last = seen[-1]
    assert last.layers >= 1 and last.layers_done == last.layers
    assert last.bytes_total >= 5 * 1024 * 1024 and last.bytes_done == last.bytes_total
    assert any(0 < p.bytes_done < p.bytes_total for p in seen) or len(seen) > 2
    # Again: already there, still the same id.
    assert await docker.pull(ref) == image_id
    assert await docker.remove_image(ref)
    assert not await docker.has_image(ref)
    assert not await docker.remove_image(ref)


async def test_registry_down_is_unavailable_then_the_pull_works(
    docker: Docker, registry: Registry, demo_app_digest: Callable[..., str]
) -> None:
    ref = await asyncio.to_thread(demo_app_digest, "vreg")
    tag = ref.split("@")[0] + ":vreg"
    await asyncio.to_thread(registry.stop)
    try:
        with pytest.raises(DockerUnavailable) as info:
            await docker.pull(ref)
        assert not isinstance(info.value, DockerRejected)
        with pytest.raises(DockerUnavailable):
            await docker.resolve(tag)
    finally:
        await asyncio.to_thread(registry.start)
    assert await docker.resolve(tag) == ref
    await docker.pull(ref)
    assert ref in (await docker.inspect_image(ref)).repo_digests


# -- the engine going away --------------------------------------------------------------------------

async def test_engine_down_is_unavailable_then_calls_work_again(
    docker: Docker, engine: DockerEngine, app: str
) -> None:
    await asyncio.to_thread(engine.kill)
    try:
        with pytest.raises(DockerUnavailable):
            await docker.has_image(app)
        with pytest.raises(DockerUnavailable):
            await docker.pull(app)
        with pytest.raises(DockerUnavailable):
            await docker.run_once(app, ["migrate"], timeout=5)
    finally:
        await asyncio.to_thread(engine.start)
    assert await docker.has_image(app)  # the same adapter, connections made afresh

    # A restart between two calls: the pooled connection is dead; either the call works or it says
    # Unavailable, and the next one works.
    await asyncio.to_thread(engine.restart)
    with contextlib.suppress(DockerUnavailable):
        await docker.inspect_image(app)
    assert await docker.has_image(app)


async def test_engine_dying_during_a_run_is_unavailable_and_the_container_removed_later(
    docker: Docker, engine: DockerEngine, app: str
) -> None:
    since = time.time()
    run = asyncio.create_task(docker.run_once(app, ["migrate"], env={"NORM_DEMO_TASK_SECONDS": "30"},
                                              timeout=60, name="crashed-run"))
    await container_started(engine, "crashed-run", since)
    await asyncio.to_thread(engine.kill)
    try:
        with pytest.raises(DockerUnavailable):
            async with asyncio.timeout(DEADLINE):
                await run
        assert docker.orphans == {"crashed-run"}, "it could not be removed with the engine down"
    finally:
        await asyncio.to_thread(engine.start)
    # The engine came back with the container left exited: the next run_once removes it first.
    result = await docker.run_once(app, ["collectstatic"], timeout=20)
    assert result.exit_code == 0
    assert containers(engine) == [] and docker.orphans == frozenset()


# -- run_once ---------------------------------------------------------------------------------------

async def test_run_once_records_into_a_mount_and_returns_exit_0(
    docker: Docker, engine: DockerEngine, app: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    env_file = tmp_path / "app.env"
    env_file.write_text("# the app's environment\nNORM_DEMO_RECORD=/data/from-env-file.log\n\n"
                        "SECRET=hunter2\n")

    result = await docker.run_once(app, ["migrate"], env_file=str(env_file), mounts=[(str(data), "/data")],
                                   timeout=20)

    assert result.exit_code == 0
    assert "migrate done" in result.logs
    assert 0 < result.seconds < 20
    assert (data / "from-env-file.log").read_text().startswith("v1 migrate ")
    # env overrides the file
    result = await docker.run_once(app, ["collectstatic"], env_file=str(env_file),
                                   env={"NORM_DEMO_RECORD": "/data/record.log"},
                                   mounts=[(str(data), "/data")], timeout=20)
    assert result.exit_code == 0
    assert (data / "record.log").read_text().startswith("v1 collectstatic ")
    assert containers(engine) == []


async def test_bad_env_file_line_is_rejected_without_its_value(
    docker: Docker, app: str, tmp_path: Path
) -> None:
    env_file = tmp_path / "bad.env"
    env_file.write_text("GOOD=1\nhunter2-not-a-pair\n")
    with pytest.raises(DockerRejected) as info:
        await docker.run_once(app, ["migrate"], env_file=str(env_file), timeout=5)
    assert "line 2" in str(info.value) and "hunter2" not in str(info.value)


async def test_failing_command_returns_its_exit_code(docker: Docker, engine: DockerEngine, app: str) -> None:
    result = await docker.run_once(app, ["migrate"], env={"NORM_DEMO_TASK_FAIL": "1"}, timeout=20)
    assert result.exit_code != 0
    assert "failing as asked" in result.logs
    assert containers(engine) == []


async def test_run_past_its_timeout_is_killed_and_removed(
    docker: Docker, engine: DockerEngine, app: str
) -> None:
    t0 = time.monotonic()
    with pytest.raises(RunTimeout) as info:
        await docker.run_once(app, ["sh", "-c", "echo started; exec migrate"],
                              env={"NORM_DEMO_TASK_SECONDS": "30"}, timeout=1.0)
    assert time.monotonic() - t0 < 10
    assert "started" in info.value.logs
    assert containers(engine) == []


async def test_cancelled_run_leaves_no_container(docker: Docker, engine: DockerEngine, app: str) -> None:
    since = time.time()
    run = asyncio.create_task(docker.run_once(app, ["migrate"], env={"NORM_DEMO_TASK_SECONDS": "30"},
                                              timeout=60, name="cancelled-run"))
    await container_started(engine, "cancelled-run", since)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert containers(engine) == []
    labelled = engine.docker("ps", "-a", "-q", "--filter", f"label={RUN_LABEL}")
    assert labelled.strip() == ""
