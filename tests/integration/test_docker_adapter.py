"""The Docker adapter against real engines and a real registry."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from norm.adapters.docker import (
    NAMED_RUN_LABEL,
    RUN_LABEL,
    ContainerGone,
    ContainerHealth,
    Docker,
    DockerRejected,
    DockerUnavailable,
    PullProgress,
    RunTimeout,
)
from norm.core.gate import MIGRATIONS_LABEL, declared_migrations, migrations_of
from norm.core.protocol import step_outcome
from sandbox.docker import DOCKER, DockerEngine
from sandbox.images import DemoOptions
from sandbox.procs import free_port
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
        with pytest.raises(DockerUnavailable):
            await docker.run_named("engine-down", app, ["migrate"], timeout=5)
        with pytest.raises(DockerUnavailable):
            await docker.container_status("engine-down")
        with pytest.raises(DockerUnavailable):
            await docker.remove_container("engine-down")
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


# -- run_named --------------------------------------------------------------------------------------

@pytest.fixture
async def named(docker: Docker) -> AsyncIterator[Callable[[str], str]]:
    """Names for named runs: whatever a test leaves of them is removed after it (run_named never
    removes its container; the engine is shared by the module's tests)."""
    names: list[str] = []

    def name(n: str) -> str:
        names.append(n)
        return n

    yield name
    for n in names:
        await docker.remove_container(n)


def record_lines(data: Path) -> list[str]:
    record = data / "record.log"
    return record.read_text().splitlines() if record.exists() else []


async def test_named_run_returns_its_result_and_leaves_the_container_until_removed(
    docker: Docker, engine: DockerEngine, app: str, named: Callable[[str], str], tmp_path: Path
) -> None:
    name = named("named-ok")
    data = tmp_path / "data"
    data.mkdir()

    result = await docker.run_named(name, app, ["migrate"], mounts=[(str(data), "/data")], timeout=20)

    assert result.exit_code == 0
    assert "migrate done" in result.logs
    assert 0 < result.seconds < 20
    assert [line.split()[:2] for line in record_lines(data)] == [["v1", "migrate"]]
    assert await docker.container_status(name) == "exited"
    labels = engine.docker("inspect", "--format", "{{json .Config.Labels}}", name)
    assert f'"{RUN_LABEL}":"1"' in labels and f'"{NAMED_RUN_LABEL}":"1"' in labels
    assert await docker.remove_container(name) is True
    assert await docker.container_status(name) is None
    assert await docker.remove_container(name) is False
    assert containers(engine) == []


async def test_cancelled_named_run_keeps_running_and_the_next_one_adopts_it(
    docker: Docker, engine: DockerEngine, app: str, named: Callable[[str], str], tmp_path: Path
) -> None:
    name = named("named-cancelled")
    data = tmp_path / "data"
    data.mkdir()
    mounts = [(str(data), "/data")]
    env = {"NORM_DEMO_TASK_SECONDS": "3"}
    since = time.time()
    run = asyncio.create_task(docker.run_named(name, app, ["migrate"], env=env, mounts=mounts, timeout=60))
    await container_started(engine, name, since)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert await docker.container_status(name) == "running", "cancelling only stopped the waiting"

    # As a restarted agent would: the same call again.
    with capture_logs() as logs:
        result = await docker.run_named(name, app, ["migrate"], env=env, mounts=mounts, timeout=60)

    assert result.exit_code == 0
    assert "migrate done" in result.logs
    assert 2 < result.seconds < 60, "counted from the container's start"
    assert [line.split()[:2] for line in record_lines(data)] == [["v1", "migrate"]], "it ran once"
    adopted = [e for e in logs if e["event"] == "docker.adopted"]
    assert adopted == [{"event": "docker.adopted", "log_level": "warning", "container": name,
                        "status": "running", "image_matches": True}]
    assert len(containers(engine)) == 1 and await docker.container_status(name) == "exited"


async def test_adopting_an_exited_named_run_gives_its_result_without_running_it_again(
    docker: Docker, engine: DockerEngine, app: str, named: Callable[[str], str], tmp_path: Path
) -> None:
    name = named("named-failed")
    data = tmp_path / "data"
    data.mkdir()
    (data / "record.log").write_text("before\n")
    mounts = [(str(data), "/data")]
    first = await docker.run_named(name, app, ["migrate"], env={"NORM_DEMO_TASK_FAIL": "1"}, mounts=mounts,
                                   timeout=20)
    assert first.exit_code != 0 and "failing as asked" in first.logs
    started = engine.docker("inspect", "--format", "{{.State.StartedAt}}", name)

    # Another command, without the failure knob: the container's own config is what counts, and it is
    # only read, not run again.
    with capture_logs() as logs:
        again = await docker.run_named(name, app, ["collectstatic"], mounts=mounts, timeout=20)

    assert again.exit_code == first.exit_code
    assert again.logs.count("failing as asked") == 1
    assert 0 <= again.seconds < 20
    assert record_lines(data) == ["before"]
    assert engine.docker("inspect", "--format", "{{.State.StartedAt}}", name) == started
    assert [e["status"] for e in logs if e["event"] == "docker.adopted"] == ["exited"]
    assert len(containers(engine)) == 1


async def test_a_created_but_never_started_container_is_adopted_and_started(
    docker: Docker, engine: DockerEngine, app: str, named: Callable[[str], str], tmp_path: Path
) -> None:
    name = named("named-created")
    data = tmp_path / "data"
    data.mkdir()
    # As an agent killed between create and start leaves it.
    engine.docker("create", "--name", name, "-v", f"{data}:/data", app, "migrate")

    result = await docker.run_named(name, app, ["migrate"], mounts=[(str(data), "/data")], timeout=20)

    assert result.exit_code == 0
    assert [line.split()[:2] for line in record_lines(data)] == [["v1", "migrate"]]
    assert len(containers(engine)) == 1


async def test_two_named_runs_at_once_make_one_container_and_run_once(
    docker: Docker, engine: DockerEngine, app: str, named: Callable[[str], str], tmp_path: Path
) -> None:
    name = named("named-twice")
    data = tmp_path / "data"
    data.mkdir()
    mounts = [(str(data), "/data")]
    env = {"NORM_DEMO_TASK_SECONDS": "1"}

    with capture_logs() as logs:
        # Both look before either creates: one creates, the other's create conflicts and it adopts.
        results = await asyncio.gather(
            *(docker.run_named(name, app, ["migrate"], env=env, mounts=mounts, timeout=20) for _ in range(2)))

    assert [r.exit_code for r in results] == [0, 0]
    assert [line.split()[:2] for line in record_lines(data)] == [["v1", "migrate"]]
    assert [e["event"] for e in logs if e["event"] == "docker.adopted"] == ["docker.adopted"]
    assert len(containers(engine)) == 1


async def test_named_run_past_its_timeout_is_killed_and_left_until_removed(
    docker: Docker, engine: DockerEngine, app: str, named: Callable[[str], str]
) -> None:
    # "timeout" in the name: the engine's "No such container: named-timeout" must still read as none.
    name = named("named-timeout")
    t0 = time.monotonic()
    with pytest.raises(RunTimeout) as info:
        await docker.run_named(name, app, ["sh", "-c", "echo started; exec migrate"],
                               env={"NORM_DEMO_TASK_SECONDS": "30"}, timeout=1.0)
    assert time.monotonic() - t0 < 10
    assert "started" in info.value.logs and info.value.ref == name
    assert await docker.container_status(name) == "exited"
    assert await docker.remove_container(name) is True
    assert await docker.container_status(name) is None
    assert await docker.remove_container(name) is False
    assert containers(engine) == []


async def test_adopted_running_container_times_out_counted_from_its_start(
    docker: Docker, engine: DockerEngine, app: str, named: Callable[[str], str]
) -> None:
    name = named("named-slow")
    env = {"NORM_DEMO_TASK_SECONDS": "30"}
    t0 = time.monotonic()
    since = time.time()
    run = asyncio.create_task(docker.run_named(name, app, ["migrate"], env=env, timeout=3))
    await container_started(engine, name, since)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run

    t1 = time.monotonic()
    with pytest.raises(RunTimeout):
        await docker.run_named(name, app, ["migrate"], env=env, timeout=3)

    assert time.monotonic() - t1 < 3.5, "the second wait was what is left of 3 s, not 3 s more"
    assert time.monotonic() - t0 >= 2.5, "not before the 3 s from the start"
    assert await docker.container_status(name) == "exited"


async def test_adoption_measures_the_run_so_far_by_the_wall_clock(
    docker: Docker, engine: DockerEngine, app: str, named: Callable[[str], str]
) -> None:
    """As the previous test, but the restarted agent comes 2.5 s after the start (by its clock, which
    the adapter takes as an argument): of the 3 s, about 0.5 s are left, not 3."""
    name = named("named-late")
    env = {"NORM_DEMO_TASK_SECONDS": "30"}
    since = time.time()
    run = asyncio.create_task(docker.run_named(name, app, ["migrate"], env=env, timeout=3))
    await container_started(engine, name, since)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run

    async with Docker(engine.host, call_timeout=CALL_TIMEOUT, wall_clock=lambda: time.time() + 2.5) as later:
        t0 = time.monotonic()
        with pytest.raises(RunTimeout):
            await later.run_named(name, app, ["migrate"], env=env, timeout=3)
        assert time.monotonic() - t0 < 1.5
    assert await docker.container_status(name) == "exited"


async def test_named_run_of_an_image_not_on_the_engine_is_rejected(
    docker: Docker, engine: DockerEngine, app: str, named: Callable[[str], str]
) -> None:
    missing = app.partition("@")[0] + "@sha256:" + "0" * 64
    with pytest.raises(DockerRejected):
        await docker.run_named(named("named-no-image"), missing, ["migrate"], timeout=5)
    with pytest.raises(DockerRejected):
        await docker.run_named("bad/name", app, ["migrate"], timeout=5)
    assert containers(engine) == []


async def test_a_named_run_whose_container_is_removed_while_it_runs_is_gone_and_never_made_again(
    docker: Docker, engine: DockerEngine, app: str, named: Callable[[str], str], tmp_path: Path
) -> None:
    name = named("named-removed")
    data = tmp_path / "data"
    data.mkdir()
    mounts = [(str(data), "/data")]
    env = {"NORM_DEMO_TASK_SECONDS": "30"}
    since = time.time()
    run = asyncio.create_task(docker.run_named(name, app, ["migrate"], env=env, mounts=mounts, timeout=60))
    await container_started(engine, name, since)
    await asyncio.to_thread(engine.docker, "rm", "-f", name)
    with pytest.raises(ContainerGone):
        async with asyncio.timeout(DEADLINE):
            await run
    # As the migrator does after an attempt cut short, or its agent restarted: adopt, never make.
    with pytest.raises(ContainerGone):
        await docker.run_named(name, app, ["migrate"], env=env, mounts=mounts, timeout=60, adopt_only=True)
    assert containers(engine) == [] and record_lines(data) == []


async def test_a_named_run_killed_by_its_engine_dying_has_an_unknown_outcome(
    docker: Docker, engine: DockerEngine, app: str, named: Callable[[str], str], tmp_path: Path
) -> None:
    name = named("named-engine-killed")
    data = tmp_path / "data"
    data.mkdir()
    mounts = [(str(data), "/data")]
    env = {"NORM_DEMO_TASK_SECONDS": "30"}
    since = time.time()
    run = asyncio.create_task(docker.run_named(name, app, ["migrate"], env=env, mounts=mounts, timeout=60))
    await container_started(engine, name, since)
    await asyncio.to_thread(engine.kill)
    try:
        with pytest.raises(DockerUnavailable):
            async with asyncio.timeout(DEADLINE):
                await run
    finally:
        await asyncio.to_thread(engine.start)
    # The engine back, the container is adopted, not made again: it was killed mid-step, and says so
    # by an exit code that no step gives of itself.
    result = await docker.run_named(name, app, ["migrate"], env=env, mounts=mounts, timeout=60,
                                    adopt_only=True)
    assert step_outcome(result.exit_code, killed_by_norm=False) == "unknown", result
    assert record_lines(data) == [] and len(containers(engine)) == 1


async def test_a_named_run_made_first_is_started_only_by_its_adopter(
    docker: Docker, engine: DockerEngine, app: str, named: Callable[[str], str], tmp_path: Path
) -> None:
    name = named("named-made-first")
    data = tmp_path / "data"
    data.mkdir()
    mounts = [(str(data), "/data")]
    assert await docker.create_named(name, app, ["migrate"], mounts=mounts) is True
    assert await docker.create_named(name, app, ["migrate"], mounts=mounts) is False  # one, once
    assert await docker.container_status(name) == "created" and record_lines(data) == []
    result = await docker.run_named(name, app, ["migrate"], mounts=mounts, timeout=20, adopt_only=True)
    assert result.exit_code == 0
    assert [line.split()[:2] for line in record_lines(data)] == [["v1", "migrate"]]
    assert len(containers(engine)) == 1


# -- image labels and container health -------------------------------------------------------------

async def test_inspect_image_gives_the_labels_and_the_declared_migrations(
    docker: Docker, app: str, demo_app_digest: Callable[..., str]
) -> None:
    plain = await docker.inspect_image(app)
    assert plain.labels["org.opencontainers.image.version"] == "v1"
    assert MIGRATIONS_LABEL not in plain.labels and migrations_of(plain.labels) is None
    for version, value, kind in (("v-mig-expand", "expand", "expand"), ("v-mig-bad", "sideways", None)):
        ref = await asyncio.to_thread(demo_app_digest, version, 0, DemoOptions(migrations=value))
        await docker.pull(ref)
        labels = (await docker.inspect_image(ref)).labels
        assert labels[MIGRATIONS_LABEL] == value and migrations_of(labels) == kind
    assert declared_migrations(labels).problem == (f"{MIGRATIONS_LABEL} is 'sideways', not one of none, "
                                                   "expand, breaking")


async def wait_health(docker: Docker, name: str, want: str) -> ContainerHealth:
    """The container's health once it is `want` (bounded: the engine checks every second)."""
    async with asyncio.timeout(DEADLINE):
        while True:
            health = await docker.container_health(name)
            if health is not None and health.health == want:
                return health
            await asyncio.sleep(0.2)


async def test_container_health_follows_the_engines_healthcheck(
    docker: Docker, engine: DockerEngine, demo_app_digest: Callable[..., str]
) -> None:
    assert await docker.container_health("no-such-container") is None
    good = await asyncio.to_thread(demo_app_digest, "v-hc-good", 0, DemoOptions(healthcheck=True))
    bad = await asyncio.to_thread(demo_app_digest, "v-hc-bad", 0,
                                  DemoOptions(healthcheck=True, healthz_status=500))
    plain = await asyncio.to_thread(demo_app_digest, "v1")
    names = {"hc-good": good, "hc-bad": bad, "hc-plain": plain}
    try:
        for name, ref in names.items():
            await docker.pull(ref)
            await asyncio.to_thread(engine.docker, "run", "-d", "--name", name, "--network", "host",
                                    "-e", f"PORT={free_port()}", ref, "serve")
        healthy = await wait_health(docker, "hc-good", "healthy")
        assert healthy.running and healthy.state == "running" and healthy.exit_code == 0
        unhealthy = await wait_health(docker, "hc-bad", "unhealthy")
        assert unhealthy.running and unhealthy.exit_code == 1 and unhealthy.failing_streak >= 2
        assert "500" in unhealthy.output, unhealthy
        none = await docker.container_health("hc-plain")
        assert none is not None and none.health == "none" and none.running and none.output == ""
        await asyncio.to_thread(engine.docker, "kill", "hc-plain")
        stopped = await docker.container_health("hc-plain")
        assert stopped is not None and not stopped.running and stopped.state == "exited"
    finally:
        for name in names:
            await docker.remove_container(name)
