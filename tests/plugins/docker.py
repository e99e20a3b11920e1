"""Real Docker engines, a local registry and the images the tests need, all made offline.

- `docker_engine`: a fresh engine per test (`--bridge=none`; containers go on `--network host`).
- `docker_engines`: a factory of more engines for one test, all stopped afterwards.
- `bridge_docker_engine`: an engine with a bridge of its own and port publishing, for testcontainers;
  `testcontainers_engine` also points testcontainers at it (no ryuk, mapped ports on 127.0.0.1).
- `registry`: one docker-registry for the session; `image_engine`: the session's builder engine.
- `demo_app`: `demo_app(version, size_mb=0, options=None)` builds and pushes the demo app once per
  session and returns its reference (`<registry>/djed/app:<version>`); `demo_app_digest(version)` its
  digest ref. `options` (sandbox.images.DemoOptions) builds one that misbehaves as a test asks.
- `base_image`, `norm_image`: the Debian base (debootstrap, cached in /var/cache/norm) and Norm's
  image built from docker/Dockerfile on it, in `image_engine`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox import images
from sandbox.docker import DockerEngine
from sandbox.registry import Registry


def _stop_all(engines: list[DockerEngine]) -> None:
    errors: list[BaseException] = []
    for engine in reversed(engines):
        try:
            engine.stop()
        except Exception as e:  # stop the others all the same, then report
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture
def docker_engine(tmp_path: Path) -> Iterator[DockerEngine]:
    """A running engine of its own; `docker_engine.host` is its DOCKER_HOST."""
    engine = DockerEngine("engine", tmp_path / "docker")
    try:
        engine.start()
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def docker_engines(tmp_path: Path) -> Iterator[Callable[[int], list[DockerEngine]]]:
    """A factory: `docker_engines(n)` starts n more engines side by side; all stop after the test."""
    started: list[DockerEngine] = []

    def make(n: int) -> list[DockerEngine]:
        made = [DockerEngine(f"engine{len(started) + i}", tmp_path / f"engine{len(started) + i}")
                for i in range(n)]
        started.extend(made)  # before start(): a half-started one is stopped too
        for engine in made:
            engine.start()
        return made

    try:
        yield make
    finally:
        _stop_all(started)


@pytest.fixture
def bridge_docker_engine(tmp_path: Path) -> Iterator[DockerEngine]:
    """An engine whose containers get their own network namespace on its own bridge, and whose
    published ports (`-p 127.0.0.1::PORT`) are reachable from the host."""
    engine = DockerEngine("bridged", tmp_path / "bridged", bridge=True)
    try:
        engine.start()
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def testcontainers_engine(
    bridge_docker_engine: DockerEngine, monkeypatch: pytest.MonkeyPatch
) -> DockerEngine:
    """`bridge_docker_engine`, with testcontainers pointed at it for this test: DOCKER_HOST, ryuk off
    (its image cannot be pulled), and mapped ports reached on 127.0.0.1 (this machine looks like a
    container to testcontainers, which would otherwise aim at a gateway address)."""
    from testcontainers.core.config import ConnectionMode, testcontainers_config

    monkeypatch.setenv("DOCKER_HOST", bridge_docker_engine.host)
    monkeypatch.setenv("TESTCONTAINERS_RYUK_DISABLED", "true")
    monkeypatch.setattr(testcontainers_config, "ryuk_disabled", True)
    monkeypatch.setattr(testcontainers_config, "tc_host_override", "127.0.0.1")
    monkeypatch.setattr(testcontainers_config, "connection_mode_override", ConnectionMode.docker_host)
    return bridge_docker_engine


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """`registry.address` ("127.0.0.1:PORT") prefixes image references; no TLS, no auth."""
    reg = Registry(tmp_path_factory.mktemp("registry"))
    try:
        reg.start()
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def image_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    """The session's image builder: images are built here once and pushed to `registry`."""
    engine = DockerEngine("images", tmp_path_factory.mktemp("image-engine"))
    try:
        engine.start()
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def demo_app(image_engine: DockerEngine, registry: Registry) -> Callable[..., str]:
    """`demo_app(version, size_mb=0, options=None)`: the demo app's reference in `registry`, built once
    per session (`options`: an images.DemoOptions; give each set of options a version of its own)."""
    built: dict[tuple[str, int, images.DemoOptions], str] = {}

    def make(version: str, size_mb: int = 0, options: images.DemoOptions | None = None) -> str:
        key = (version, size_mb, options or images.DemoOptions())
        if key not in built:
            built[key] = images.demo_app_image(image_engine, registry, version, size_mb=size_mb,
                                               options=key[2])
        return built[key]

    return make


@pytest.fixture(scope="session")
def demo_app_digest(image_engine: DockerEngine, demo_app: Callable[..., str]) -> Callable[..., str]:
    """`demo_app_digest(version, size_mb=0, options=None)`: `<registry>/djed/app@sha256:...` of that
    build."""

    def digest(version: str, size_mb: int = 0, options: images.DemoOptions | None = None) -> str:
        return images.repo_digest(image_engine, demo_app(version, size_mb, options))

    return digest


@pytest.fixture(scope="session")
def base_image(image_engine: DockerEngine) -> str:
    """`norm/base:bookworm` in `image_engine` (Debian 12 + python3, see scripts/build-base-image.sh)."""
    return images.base_image(image_engine)


@pytest.fixture(scope="session")
def norm_image(image_engine: DockerEngine, base_image: str) -> str:
    """Norm's image (docker/Dockerfile on `base_image`) in `image_engine`: `norm/norm:<version>`."""
    return images.norm_image(image_engine, base_image)
