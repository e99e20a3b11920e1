"""Docker: Norm's own small typed interface over aiodocker, for one engine.

What this adds to the client library:
- a timeout on every call (aiodocker has none by default), and errors that say what to do:
  DockerUnavailable (engine or registry unreachable, restarting, too slow: retry later) or
  DockerRejected (unknown tag or digest, bad reference, unauthorized: permanent for that reference);
- `resolve`: a tag to its digest at the registry, through the engine, without pulling;
- `pull` that notices a stream cut short (aiodocker ends a pull stream quietly when the connection
  breaks) and checks that an image pulled by digest carries that digest;
- `run_once`: a one-off container that is always removed, on success, failure, timeout and
  cancellation alike (the removal runs in a task of its own, shielded from the caller's cancellation);
- `run_named`: a one-off container under a name of the caller's, for what must run exactly once (a
  database migration) even when the agent is killed mid-run and restarted: a container of that name
  that is already on the engine is adopted (started, waited for, or read), never made a second time,
  and it is never removed by the run: the caller removes it (`remove_container`) once it has recorded
  the result durably. It never makes one again either: with `adopt_only` (the caller may have made
  it before) and when the container vanishes while waited for, it raises ContainerGone: whatever ran
  in it, its outcome is unknown. `create_named` makes the container without starting it, for a caller
  that commits to the run only after the container exists. `container_status` says where such a
  container is;
- `container_health`: a container's state and, where its image has a HEALTHCHECK, the engine's health
  status with the last check's output; `inspect_image` gives an image's labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiodocker
import aiohttp
import structlog

from norm.core.errors import NormError, Permanent, Temporary

log = structlog.get_logger("norm.docker")

LOG_TAIL_BYTES = 64 * 1024  # what a RunResult keeps of a container's output: the last 64 KiB
_LOG_TAIL_LINES = 4096  # asked of the engine, so that a chatty container is not read whole
RUN_LABEL = "norm.run-once"  # set on every container run_once and run_named make
NAMED_RUN_LABEL = "norm.named-run"  # set on the containers run_named makes

# What the engine accepts as a container name (daemon/names: RestrictedNameChars).
_CONTAINER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{1,254}", re.ASCII)

# The reference grammar of distribution/reference, without the normalisation of short names.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*(?::[0-9]+)?"
_REFERENCE = re.compile(
    rf"(?P<name>(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?",
    re.ASCII,
)
_IMAGE_ID = re.compile(r"(?:sha256:)?[0-9a-f]{12,64}")

# What the engine says when the reference itself is the problem (permanent for that reference).
_REJECTED_WORDS = (
    "manifest unknown", "name unknown", "not found", "no such image", "invalid reference",
    "repository name must", "unauthorized", "denied", "forbidden", "authentication required",
    "invalid tag", "invalid digest", "does not match",
)
# ... and when nobody (engine or registry) could be reached or answered in time (transient).
_UNAVAILABLE_WORDS = (
    "connection refused", "connection reset", "i/o timeout", "timeout", "timed out", "eof",
    "no route to host", "network is unreachable", "no such host", "temporary", "try again",
    "service unavailable", "bad gateway", "too many requests", "toomanyrequests",
    "cannot connect", "server misbehaving", "broken pipe", "context canceled",
)


# ---------------------------------------------------------------------------------------------------
# Errors: what the caller should do


class DockerError(NormError):
    """Something went wrong with Docker. `ref` is the image (or container) concerned, `action` what
    was being done ("pulling", "resolving", ...). Raised as such for what fits neither subclass."""

    def __init__(self, message: str, *, ref: str = "", action: str = "", status: int | None = None) -> None:
        where = " ".join(x for x in (action, ref) if x)
        super().__init__(f"{where}: {message}" if where else message)
        self.ref = ref
        self.action = action
        self.status = status


class DockerUnavailable(DockerError, Temporary):
    """The engine or the registry could not be reached, was restarting, or did not answer in time.
    Transient: retry later."""


class DockerRejected(DockerError, Permanent):
    """The engine or the registry refused: unknown tag or digest, a bad reference, unauthorized.
    Permanent for that reference: retrying will not help."""


class RunTimeout(DockerError):
    """A one-off container ran past its timeout and was killed (and removed by run_once; left, exited,
    by run_named). `logs` holds what it wrote until then (the last 64 KiB)."""

    def __init__(self, ref: str, command: Sequence[str], timeout: float, logs: str) -> None:
        super().__init__(f"{list(command)!r} still ran after {timeout:g}s: killed", ref=ref,
                         action="running")
        self.command = tuple(command)
        self.timeout = timeout
        self.logs = logs


class ContainerGone(DockerError):
    """A named run's container is not on the engine (any more): removed, or the engine's state wiped,
    before its result was read. Whatever ran in it, its outcome is unknown; running it again could run
    it twice."""


def _classify(e: BaseException, ref: str, action: str) -> DockerError:
    """Turn what aiodocker and aiohttp raise into a DockerError that tells what to do."""
    if isinstance(e, DockerError):
        return e
    if isinstance(e, TimeoutError):
        return DockerUnavailable("no answer in time", ref=ref, action=action)
    if isinstance(e, aiohttp.ClientError | OSError):  # connection refused, reset, the engine went away
        return DockerUnavailable(f"engine unreachable: {e!r}", ref=ref, action=action)
    if isinstance(e, aiodocker.DockerError):
        status, message = e.status, str(e.message).strip()
        lowered = message.lower()
        if status == 900:  # aiodocker's "cannot connect"
            return DockerUnavailable(message, ref=ref, action=action, status=status)
        # The registry's own answer comes first: the engine wraps "connection refused" in a 500, and
        # a 404 for a manifest in a stream error of status 0.
        if any(w in lowered for w in _UNAVAILABLE_WORDS) and "manifest unknown" not in lowered:
            return DockerUnavailable(message, ref=ref, action=action, status=status)
        if any(w in lowered for w in _REJECTED_WORDS) or 400 <= status < 500:
            return DockerRejected(message, ref=ref, action=action, status=status)
        if status >= 500 or status == 0:
            return DockerUnavailable(message, ref=ref, action=action, status=status)
        return DockerError(message, ref=ref, action=action, status=status)
    return DockerError(repr(e), ref=ref, action=action)


# ---------------------------------------------------------------------------------------------------
# References


@dataclass(frozen=True, slots=True)
class ImageRef:
    """A parsed image reference: `name[:tag][@digest]`."""

    name: str
    tag: str | None
    digest: str | None

    @property
    def pinned(self) -> str:
        """`name@digest` (only when there is a digest)."""
        assert self.digest is not None
        return f"{self.name}@{self.digest}"

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def parse_ref(ref: str, action: str = "parsing") -> ImageRef:
    """Parse an image reference; DockerRejected when it is not one."""
    m = _REFERENCE.fullmatch(ref) if len(ref) <= 512 else None
    if m is None or len(m.group("name")) > 255:
        raise DockerRejected("not a valid image reference", ref=ref[:300], action=action)
    return ImageRef(m.group("name"), m.group("tag"), m.group("digest"))


def _container_name(name: str, action: str) -> str:
    """A container name, checked (it becomes part of the engine's URL paths)."""
    if not _CONTAINER_NAME.fullmatch(name):
        raise DockerRejected("not a valid container name", ref=name[:300], action=action)
    return name


def _engine_time(value: object) -> float | None:
    """An engine timestamp (RFC 3339 with nanoseconds, "2024-05-06T07:08:09.123456789Z") as seconds
    since the epoch; None for the engine's zero time ("0001-01-01T00:00:00Z": never) or no time."""
    if not isinstance(value, str) or not value or value.startswith("0001-"):
        return None
    m = re.fullmatch(r"(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", value.strip(), re.ASCII)
    if m is None:
        return None
    base, fraction, zone = m.groups()
    try:
        moment = datetime.fromisoformat(base + ("+00:00" if zone == "Z" else zone))
    except ValueError:
        return None
    return moment.timestamp() + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


def _labels(value: object) -> dict[str, str]:
    """Labels as the engine gives them (a JSON object, or null when there are none)."""
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _image_key(ref: str, action: str) -> str:
    """A reference or an image id, checked (a local image can be named by its id)."""
    if _IMAGE_ID.fullmatch(ref):
        return ref
    return str(parse_ref(ref, action))


# ---------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class PullProgress:
    """Where a pull is: layers seen and complete, bytes downloaded of the layers whose size is known."""

    ref: str
    layers: int
    layers_done: int
    bytes_done: int
    bytes_total: int
    status: str  # the engine's last status line ("Downloading", "Pull complete", ...)


@dataclass(frozen=True, slots=True)
class ImageInfo:
    id: str
    repo_digests: tuple[str, ...]
    repo_tags: tuple[str, ...]
    size: int
    created: str  # RFC 3339, as the engine gives it
    labels: Mapping[str, str] = field(default_factory=dict)  # the image config's Labels


@dataclass(frozen=True, slots=True)
class ContainerHealth:
    """A container's state and, when its image has a HEALTHCHECK, its health (State.Health).

    `state`: the engine's status ("running", "exited", ...). `health`: "starting", "healthy",
    "unhealthy", or "none" without a healthcheck. `output`/`exit_code`: the last health check's
    output (the engine keeps at most 4 KiB of it) and exit code, "" and None before the first."""

    state: str
    running: bool
    health: str = "none"
    failing_streak: int = 0
    output: str = ""
    exit_code: int | None = None


@dataclass(frozen=True, slots=True)
class RunResult:
    exit_code: int
    logs: str  # stdout and stderr interleaved, the last 64 KiB
    seconds: float


class _Layers:
    """Per-layer progress of a pull, summed into PullProgress."""

    _DONE = frozenset({"Pull complete", "Already exists"})
    _DOWNLOADED = frozenset({"Download complete", "Verifying Checksum", "Extracting", *_DONE})

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.done: dict[str, int] = {}
        self.total: dict[str, int] = {}
        self.complete: set[str] = set()
        self.status = ""

    def update(self, msg: Mapping[str, Any]) -> PullProgress | None:
        layer, status = msg.get("id"), str(msg.get("status", ""))
        if not isinstance(layer, str) or status.startswith(("Pulling from", "Digest:", "Status:")):
            return None
        self.status = status
        self.done.setdefault(layer, 0)
        detail = msg.get("progressDetail") or {}
        if status == "Downloading":
            if isinstance(detail.get("total"), int):
                self.total[layer] = detail["total"]
            if isinstance(detail.get("current"), int):
                self.done[layer] = detail["current"]
        elif status in self._DOWNLOADED and layer in self.total:
            self.done[layer] = self.total[layer]
        if status in self._DONE:
            self.complete.add(layer)
        return PullProgress(self.ref, len(self.done), len(self.complete), sum(self.done.values()),
                            sum(self.total.values()), status)


# ---------------------------------------------------------------------------------------------------
# The adapter


class Docker:
    """One Docker engine: `async with Docker("unix:///var/run/docker.sock") as docker: ...`.

    Every call gives up after `call_timeout` seconds (DockerUnavailable). A pull may take longer
    (up to `pull_timeout`) as long as the engine reports progress at least every `call_timeout`.
    `wall_clock` (seconds since the epoch) is what the engine's timestamps are compared with: the
    time a named run adopted while running has run already."""

    def __init__(self, host: str, *, call_timeout: float = 30.0, pull_timeout: float = 600.0,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.host = host
        self.call_timeout = call_timeout
        self.pull_timeout = pull_timeout
        self._wall_clock = wall_clock
        self._client: aiodocker.Docker | None = None
        self._cleanups: set[asyncio.Task[None]] = set()
        self._orphans: set[str] = set()  # containers run_once could not remove yet (engine down)

    # -- lifecycle

    async def __aenter__(self) -> Self:
        self._client = aiodocker.Docker(url=self.host)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Wait (bounded) for container removals still running, then close the client."""
        if self._cleanups:
            await asyncio.wait(set(self._cleanups), timeout=self.call_timeout)
        for task in list(self._cleanups):
            task.cancel()
        if self._cleanups:
            await asyncio.wait(set(self._cleanups))
        if self._orphans:
            log.warning("docker.containers_left", containers=sorted(self._orphans))
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    @property
    def orphans(self) -> frozenset[str]:
        """Containers made by run_once that could not be removed yet (removal is retried on the next
        run_once)."""
        return frozenset(self._orphans)

    @property
    def _docker(self) -> aiodocker.Docker:
        if self._client is None:
            raise DockerError("the Docker adapter is not open (use `async with`)")
        return self._client

    @contextlib.contextmanager
    def _errors(self, ref: str, action: str) -> Iterator[None]:
        """Every failure of aiodocker or aiohttp in the block as a DockerError for `ref`."""
        try:
            yield
        except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError) as e:
            raise _classify(e, ref, action) from e

    async def _call(self, ref: str, action: str, fn: Callable[[], Any]) -> Any:
        with self._errors(ref, action):
            async with asyncio.timeout(self.call_timeout):
                return await fn()

    # -- images

    async def resolve(self, ref: str) -> str:
        """The digest the registry serves for `ref` now, as `name@sha256:...`, without pulling.
        DockerRejected for an unknown tag or a bad reference; DockerUnavailable when the engine or the
        registry cannot be reached."""
        parsed = parse_ref(ref, "resolving")
        data = await self._call(ref, "resolving",
                                lambda: self._docker._query_json(f"distribution/{parsed}/json"))
        digest = (data or {}).get("Descriptor", {}).get("digest")
        if not isinstance(digest, str) or not digest.startswith("sha256:"):
            raise DockerError(f"the engine gave no digest ({str(data)[:200]})", ref=ref, action="resolving")
        return f"{parsed.name}@{digest}"

    async def inspect_image(self, ref: str) -> ImageInfo:
        """The local image `ref` names (a reference or an image id). DockerRejected when there is none."""
        key = _image_key(ref, "inspecting")
        data = await self._call(ref, "inspecting", lambda: self._docker.images.inspect(key))
        return ImageInfo(
            id=str(data["Id"]),
            repo_digests=tuple(data.get("RepoDigests") or ()),
            repo_tags=tuple(data.get("RepoTags") or ()),
            size=int(data.get("Size") or 0),
            created=str(data.get("Created", "")),
            labels=_labels((data.get("Config") or {}).get("Labels")),
        )

    async def has_image(self, ref: str) -> bool:
        """Whether the engine has the image `ref` names locally."""
        try:
            await self.inspect_image(ref)
        except DockerRejected as e:
            if e.status == 404:
                return False
            raise
        return True

    async def pull(self, ref: str, progress: Callable[[PullProgress], None] | None = None) -> str:
        """Pull `ref` (by tag or by digest) and return the local image id. `progress` is called (in
        the loop) with a summary after every progress message of the engine. An image pulled by
        digest is checked to carry that digest in its RepoDigests."""
        parsed = parse_ref(ref, "pulling")
        layers = _Layers(ref)
        finished = False
        loop = asyncio.get_running_loop()
        with self._errors(ref, "pulling"):
            async with asyncio.timeout(self.pull_timeout):
                stream = self._docker.images.pull(str(parsed), stream=True)
                try:
                    while True:
                        # Each message must come within call_timeout: a stalled pull is an error.
                        async with asyncio.timeout_at(loop.time() + self.call_timeout):
                            try:
                                msg = await anext(stream)
                            except StopAsyncIteration:
                                break
                        if str(msg.get("status", "")).startswith("Status:"):
                            finished = True
                        summary = layers.update(msg)
                        if summary is not None and progress is not None:
                            progress(summary)
                finally:
                    await stream.aclose()  # type: ignore[attr-defined]
        if not finished:
            # aiodocker ends the stream quietly when the connection breaks (the engine went away).
            raise DockerUnavailable("the pull was cut short (the engine went away?)", ref=ref,
                                    action="pulling")
        info = await self.inspect_image(ref)
        if parsed.digest is not None and parsed.pinned not in info.repo_digests:
            raise DockerError(f"the pulled image {info.id} does not carry that digest "
                              f"(it has {list(info.repo_digests)})", ref=ref, action="pulling")
        log.info("docker.pulled", ref=ref, image=info.id, layers=len(layers.done))
        return info.id

    async def remove_image(self, ref: str, *, force: bool = False) -> bool:
        """Remove the local image (one tag of it, when it has several). False when there was none."""
        key = _image_key(ref, "removing")
        try:
            await self._call(ref, "removing", lambda: self._docker.images.delete(key, force=force))
        except DockerRejected as e:
            if e.status == 404:
                return False
            raise
        return True

    # -- one-off containers

    async def run_once(
        self,
        image: str,
        command: Sequence[str],
        *,
        env_file: str | None = None,
        env: Mapping[str, str] | None = None,
        network: str = "host",
        mounts: Sequence[tuple[str, str]] = (),
        timeout: float,  # noqa: ASYNC109 (the container's run time, not a call's)
        name: str | None = None,
    ) -> RunResult:
        """Run `command` in a new container of `image` (which must be local), wait up to `timeout`
        seconds for it to exit, and return its exit code and logs. A non-zero exit is a result, not an
        error. Past the timeout the container is killed and RunTimeout raised. The container is
        removed in every case, cancellation included.

        `env_file` lines (KEY=VALUE; blank lines and # comments skipped) become the container's
        environment, then `env` on top. Values never appear in logs or errors. `mounts` are
        (host path, container path) bind mounts.

        An engine that goes away during the run (crash, SIGKILL) gives DockerUnavailable, and the
        container is removed by the next run_once once the engine is back (see `orphans`). An engine
        that is stopped in order (`systemctl restart docker`) stops the container itself first: the
        wait then ends with the container's exit code (137 after the engine's 10 s stop timeout for a
        command that ignores SIGTERM), which cannot be told from the command failing."""
        key = _image_key(image, "running")
        await self._sweep_orphans()
        config = await self._run_config(key, command, env_file, env, network, mounts, {RUN_LABEL: "1"})
        name = name or f"norm-run-{uuid.uuid4().hex[:12]}"
        loop = asyncio.get_running_loop()
        try:
            # From here on the container may exist (even when the answer to create is lost, or the
            # call is cancelled): the finally removes it by name.
            container = await self._call(image, "creating a container",
                                         lambda: self._docker.containers.create(config, name=name))
            started = loop.time()
            await self._call(image, "starting a container", container.start)
            try:
                with self._errors(image, "waiting for a container"):
                    async with asyncio.timeout(timeout):
                        status = await container.wait()
            except DockerUnavailable as e:
                if not isinstance(e.__cause__, TimeoutError):
                    raise
                with contextlib.suppress(DockerError):
                    await self._call(image, "killing a container", container.kill)
                logs = ""
                with contextlib.suppress(DockerError):
                    logs = await self._logs(container, image)
                raise RunTimeout(image, command, timeout, logs) from None
            seconds = loop.time() - started
            logs = await self._logs(container, image)
            code = status.get("StatusCode")
            if not isinstance(code, int):
                raise DockerError(f"the engine gave no exit code ({status.get('Error')})", ref=image,
                                  action="running")
            return RunResult(exit_code=code, logs=logs, seconds=seconds)
        finally:
            await self._remove_container(name)

    async def _run_config(self, key: str, command: Sequence[str], env_file: str | None,
                          env: Mapping[str, str] | None, network: str, mounts: Sequence[tuple[str, str]],
                          labels: Mapping[str, str]) -> dict[str, Any]:
        lines = await self._env_lines(env_file) if env_file is not None else []
        lines += [f"{k}={v}" for k, v in (env or {}).items()]
        return {
            "Image": key,
            "Cmd": list(command),
            "Env": lines,
            "Labels": dict(labels),
            "AttachStdout": False,
            "AttachStderr": False,
            "Tty": False,
            "HostConfig": {
                "NetworkMode": network,
                "Binds": [f"{src}:{dst}" for src, dst in mounts],
                "AutoRemove": False,
            },
        }

    # -- named one-off containers: run exactly once, across restarts of the agent

    async def run_named(  # noqa: PLR0913 (a run's options, keyword-only, as for run_once)
        self,
        name: str,
        image: str,
        command: Sequence[str],
        *,
        env_file: str | None = None,
        env: Mapping[str, str] | None = None,
        network: str = "host",
        mounts: Sequence[tuple[str, str]] = (),
        timeout: float,  # noqa: ASYNC109 (the container's run time, not a call's)
        adopt_only: bool = False,
    ) -> RunResult:
        """Run `command` in a container called `name` of `image` (which must be local), once: wait up
        to `timeout` seconds for it to exit and return its exit code and logs (a non-zero exit is a
        result). Arguments as for run_once.

        `adopt_only`: the caller may have made the container before (it claimed the run earlier): one
        is adopted as below, and when there is none, none is made: ContainerGone. A container that
        vanishes while it is waited for (removed, the engine's state wiped) raises ContainerGone too,
        in every case.

        When a container called `name` is on the engine already (an agent killed mid-run made it, or
        someone made it meanwhile), it is adopted, whatever its image and command, and no second one
        is made: one never started is started; one running is waited for until `timeout` after it
        started (by its StartedAt against `wall_clock`); one exited gives its exit code and logs at
        once. (An adopted container that a run before killed for its timeout thus gives exit code 137.)

        Past the timeout the container is killed, waited for (bounded) and RunTimeout raised. The
        container is never removed here, in no case (success, failure, timeout, cancellation, the
        engine going away): a cancelled run_named only stops waiting, the container runs on, and the
        next run_named of that name adopts it. The caller removes it with remove_container once it
        has recorded the result."""
        name = _container_name(name, "running")
        key = _image_key(image, "running")
        made = not adopt_only and await self._make_named(name, key, image, command, env_file, env, network,
                                                          mounts)
        if made:
            return await self._start_and_wait(name, tuple(command), timeout)
        data = await self._inspect_container(name)
        if data is None:
            raise ContainerGone("no container of that name to adopt: it may have run, and its result is "
                                "lost", ref=name, action="running", status=404)
        return await self._adopt(name, key, data, timeout, prepared=adopt_only)

    async def create_named(
        self,
        name: str,
        image: str,
        command: Sequence[str],
        *,
        env_file: str | None = None,
        env: Mapping[str, str] | None = None,
        network: str = "host",
        mounts: Sequence[tuple[str, str]] = (),
    ) -> bool:
        """Make the container `name` for a named run, without starting it, unless one of that name is
        on the engine already: True when it was made here. A caller that makes it before it commits
        to the run (`run_named(..., adopt_only=True)` starts it) knows afterwards that a container
        missing is one that vanished, not one never made."""
        name = _container_name(name, "creating a container")
        key = _image_key(image, "creating a container")
        return await self._make_named(name, key, image, command, env_file, env, network, mounts)

    async def _make_named(self, name: str, key: str, image: str, command: Sequence[str], env_file: str | None,
                          env: Mapping[str, str] | None, network: str,
                          mounts: Sequence[tuple[str, str]]) -> bool:
        config: dict[str, Any] | None = None
        loop = asyncio.get_running_loop()
        give_up, pause = loop.time() + self.call_timeout, 0.02
        while await self._inspect_container(name) is None:
            if config is None:
                config = await self._run_config(key, command, env_file, env, network, mounts,
                                                {RUN_LABEL: "1", NAMED_RUN_LABEL: "1"})
            try:
                await self._call(image, "creating a container",
                                 functools.partial(self._docker.containers.create, config, name=name))
            except DockerError as e:
                # 409: someone else is making a container of that name. The engine reserves the name
                # before the container can be inspected, and frees it again if that create fails:
                # look again (briefly) until there is one to adopt, or none and the name is free.
                if e.status != 409:
                    raise
                if loop.time() >= give_up:
                    raise DockerUnavailable("a container of that name is being made by someone else",
                                            ref=name, action="running") from e
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.5)
            else:
                return True
        return False

    async def remove_container(self, name: str) -> bool:
        """Force-remove the container `name` (with its anonymous volumes). False when there was none."""
        name = _container_name(name, "removing a container")
        try:
            await self._call(name, "removing a container",
                             lambda: self._docker.containers.container(name).delete(force=True, v=True))
        except DockerError as e:
            if e.status == 404:
                return False
            raise
        return True

    async def container_status(self, name: str) -> str | None:
        """The engine's state of the container `name` ("created", "running", "exited", ...); None when
        there is no such container."""
        data = await self._inspect_container(_container_name(name, "inspecting a container"))
        return None if data is None else str(data["State"]["Status"])

    async def container_health(self, name: str) -> ContainerHealth | None:
        """The state and health of the container `name`; None when there is no such container."""
        data = await self._inspect_container(_container_name(name, "inspecting a container"))
        if data is None:
            return None
        state = data.get("State") or {}
        health = state.get("Health") or {}
        status = str(health.get("Status") or "none")
        entries = [e for e in health.get("Log") or () if isinstance(e, dict)]
        last = entries[-1] if entries else {}
        code = last.get("ExitCode")
        streak = health.get("FailingStreak")
        return ContainerHealth(
            state=str(state.get("Status", "")),
            running=state.get("Running") is True,
            health=status,
            failing_streak=streak if isinstance(streak, int) else 0,
            output=str(last.get("Output") or ""),
            exit_code=code if isinstance(code, int) else None,
        )

    async def _inspect_container(self, name: str) -> dict[str, Any] | None:
        try:
            data = await self._call(name, "inspecting a container",
                                    lambda: self._docker.containers.container(name).show())
        except DockerError as e:
            # By the status, not by the class: the engine's message holds the name, which may hold a
            # word that _classify takes for a transient error ("timeout").
            if e.status == 404:
                return None
            raise
        return dict(data)

    async def _adopt(self, name: str, key: str, data: Mapping[str, Any], limit: float, *,
                     prepared: bool = False) -> RunResult:
        """Take up a container of the run's name. `prepared`: the caller made it (create_named) and
        one found never started is the usual case, not something left behind."""
        state = data.get("State") or {}
        status = str(state.get("Status", ""))
        command = tuple((data.get("Config") or {}).get("Cmd") or ())
        level = log.info if prepared and status == "created" else log.warning
        level("docker.adopted", container=name, status=status,
              image_matches=await self._image_matches(key, data))
        if status == "created":
            return await self._start_and_wait(name, command, limit)
        container = self._docker.containers.container(name)
        started = _engine_time(state.get("StartedAt"))
        if status in ("exited", "dead"):
            code = state.get("ExitCode")
            if not isinstance(code, int):
                raise DockerError(f"the engine gave no exit code ({state.get('Error')})", ref=name,
                                  action="running")
            finished = _engine_time(state.get("FinishedAt"))
            seconds = max(0.0, finished - started) if finished is not None and started is not None else 0.0
            with self._gone(name):
                logs = await self._logs(container, name)
            return RunResult(exit_code=code, logs=logs, seconds=seconds)
        if status in ("running", "paused", "restarting"):
            elapsed = 0.0 if started is None else min(max(0.0, self._wall_clock() - started), limit)
            return await self._wait_named(name, command, limit, elapsed)
        # "removing": it is going away; whoever removes it has the result.
        raise DockerUnavailable(f"the container is {status or 'in an unknown state'}", ref=name,
                                action="running")

    async def _image_matches(self, key: str, data: Mapping[str, Any]) -> bool:
        if (data.get("Config") or {}).get("Image") == key:
            return True
        try:
            return (await self.inspect_image(key)).id == data.get("Image")
        except DockerError as e:
            if e.status == 404:
                return False
            raise

    async def _start_and_wait(self, name: str, command: tuple[str, ...], limit: float) -> RunResult:
        container = self._docker.containers.container(name)
        await self._call(name, "starting a container", container.start)
        return await self._wait_named(name, command, limit, elapsed=0.0)

    async def _wait_named(self, name: str, command: tuple[str, ...], limit: float,
                          elapsed: float) -> RunResult:
        """Wait for the started container `name`, which has run `elapsed` of its `limit` seconds."""
        container = self._docker.containers.container(name)
        loop = asyncio.get_running_loop()
        started = loop.time() - elapsed
        try:
            async with asyncio.timeout_at(started + limit):
                with self._gone(name), self._errors(name, "waiting for a container"):
                    status = await container.wait()
        except TimeoutError:  # the deadline's alone: _errors made any other one a DockerError
            await self._kill(name)
            logs = ""
            with contextlib.suppress(DockerError):
                logs = await self._logs(container, name)
            log.warning("docker.run_killed", container=name, timeout=limit)
            raise RunTimeout(name, command, limit, logs) from None
        seconds = loop.time() - started
        code = status.get("StatusCode")
        if not isinstance(code, int):
            raise DockerError(f"the engine gave no exit code ({status.get('Error')})", ref=name,
                              action="running")
        with self._gone(name):
            # Removed as it exited (`docker rm -f` kills, then removes): its exit code is the kill's.
            data = await self._inspect_container(name)
            if data is None or str((data.get("State") or {}).get("Status")) in ("removing", "dead"):
                raise DockerError("removed as it exited", ref=name, action="running", status=404)
            logs = await self._logs(container, name)
        return RunResult(exit_code=code, logs=logs, seconds=seconds)

    @contextlib.contextmanager
    def _gone(self, name: str) -> Iterator[None]:
        """A 404 for the named run's container in the block: it vanished (ContainerGone)."""
        try:
            yield
        except DockerError as e:
            gone = e.status == 404 or (e.status == 409 and "removal" in str(e))  # being removed
            if not gone or isinstance(e, ContainerGone):
                raise
            raise ContainerGone("the container vanished before its result was read", ref=name,
                                action="running", status=404) from e

    async def _kill(self, name: str) -> None:
        """Kill the container `name` and wait (bounded) until the engine has it stopped. A container
        that is gone or stopped already is fine; any other failure is raised (it may run on)."""
        container = self._docker.containers.container(name)
        try:
            await self._call(name, "killing a container", container.kill)
            await self._call(name, "waiting for a killed container", container.wait)
        except DockerError as e:
            if e.status not in (404, 409):  # 404: gone; 409: not running (any more)
                raise

    async def _env_lines(self, path: str) -> list[str]:
        def read() -> list[str]:
            out: list[str] = []
            for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                if "=" not in line or not line.split("=", 1)[0].strip():
                    # The line number only: the line may hold a secret.
                    raise DockerRejected(f"line {n} is not KEY=VALUE", ref=path, action="reading env file")
                out.append(line)
            return out

        try:
            return await asyncio.to_thread(read)
        except OSError as e:
            raise DockerError(f"cannot read it: {e.strerror}", ref=path, action="reading env file") from None
        except UnicodeDecodeError:
            raise DockerRejected("not UTF-8 text", ref=path, action="reading env file") from None

    async def _logs(self, container: Any, image: str) -> str:
        chunks = await self._call(image, "reading container logs", lambda: container.log(
            stdout=True, stderr=True, tail=_LOG_TAIL_LINES))
        text = "".join(chunks)
        if len(text.encode()) > LOG_TAIL_BYTES:
            text = text.encode()[-LOG_TAIL_BYTES:].decode(errors="replace")
        return str(text)

    async def _remove_container(self, name: str) -> None:
        """Force-remove a container in a task of its own: a cancellation of the caller does not stop
        it (the caller still sees its CancelledError; close() waits for the task)."""
        task = asyncio.create_task(self._force_remove(name), name=f"docker-remove-{name}")
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        await asyncio.shield(task)

    async def _force_remove(self, name: str) -> None:
        try:
            await self._call(name, "removing a container",
                             lambda: self._docker.containers.container(name).delete(force=True, v=True))
        except DockerRejected as e:
            if e.status != 404:  # 404: never created, or gone already
                self._orphans.add(name)
                log.warning("docker.remove_failed", container=name, error=str(e))
                return
        except DockerError as e:
            self._orphans.add(name)
            log.warning("docker.remove_failed", container=name, error=str(e))
            return
        self._orphans.discard(name)

    async def _sweep_orphans(self) -> None:
        for name in list(self._orphans):
            await self._remove_container(name)
