"""Images the sandbox builds offline on one of its engines: nothing is ever pulled from a public registry.

- `demo_app_image`: the stand-in for the Django app, FROM scratch with a static busybox, pushed to the
  local registry as `<registry>/djed/app:<version>`; `DemoOptions` builds one that misbehaves as a
  test asks (a migrations label, a failing /healthz, a serve that exits, a Docker HEALTHCHECK).
- `etcd_image`: the host's etcd binary and the libraries it links, `docker import`ed (for testcontainers).
- `base_image`: Debian 12 with python3, debootstrapped by scripts/build-base-image.sh (cached).
- `norm_image`: docker/Dockerfile on top of that base, installing Norm from wheels built on the host.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from norm.core.gate import MIGRATIONS_LABEL
from sandbox.docker import DockerEngine
from sandbox.procs import SandboxError, venv_python
from sandbox.registry import Registry

REPO = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("NORM_CACHE_DIR", "/var/cache/norm"))
BUSYBOX = Path("/bin/busybox")
ETCD = Path(shutil.which("etcd") or "/usr/bin/etcd")
ETCDCTL = Path(shutil.which("etcdctl") or "/usr/bin/etcdctl")

DEMO_REPOSITORY = "djed/app"
BASE_TAG = "norm/base:bookworm"


def image_exists(engine: DockerEngine, ref: str) -> bool:
    return bool(engine.docker("image", "inspect", "--format", "{{.Id}}", ref, check=False).strip())


def repo_digest(engine: DockerEngine, ref: str) -> str:
    """`registry/repo@sha256:...` of an image this engine pushed or pulled (what Norm pins)."""
    repository = ref.rsplit(":", 1)[0] if ":" in ref.rsplit("/", 1)[-1] else ref
    fmt = "{{range .RepoDigests}}{{.}} {{end}}"
    digests = engine.docker("image", "inspect", "--format", fmt, ref).split()
    for d in digests:
        if d.split("@", 1)[0] == repository:
            return d
    raise SandboxError(f"{ref} has no digest for {repository} on {engine.name} (not pushed or pulled?)")


# -- the demo application -------------------------------------------------------------------------

_SERVE = """#!/bin/sh
# The demo app: serves its version over HTTP on $PORT (default 8080): / and /version give the version,
# /health gives ok. As PID 1 of its container it must handle SIGTERM itself (the kernel ignores
# signals PID 1 has no handler for), so that `docker stop` takes milliseconds, not the 10 s timeout.
httpd -f -p "${PORT:-8080}" -h /app/www &
child=$!
trap 'kill -TERM "$child" 2>/dev/null; wait "$child"; exit 0' TERM INT
wait "$child"
"""

_TASK = """#!/bin/sh
# migrate / collectstatic: append "<version> <command> <timestamp> <began> <ended>" to
# $NORM_DEMO_RECORD (default /data/record.log, in a mounted dir); <began> and <ended> are the
# machine's uptime in seconds (/proc/uptime, the same clock in every container of the machine), which
# shows whether two runs overlapped. Each run also appends "<version> <command> <began>" to began.log
# next to the record as it begins, so that a run killed before its end still shows. Knobs for tests:
# NORM_DEMO_TASK_SECONDS makes the command take that long first; NORM_DEMO_TASK_FAIL=1 makes it fail
# without recording.
set -e
cmd=$(basename "$0")
record="${NORM_DEMO_RECORD:-/data/record.log}"
began=$(cut -d' ' -f1 /proc/uptime)
mkdir -p "$(dirname "$record")"
echo "$(cat /app/VERSION) $cmd $began" >> "$(dirname "$record")/began.log"
if [ -n "${NORM_DEMO_TASK_SECONDS:-}" ]; then sleep "$NORM_DEMO_TASK_SECONDS"; fi
if [ "${NORM_DEMO_TASK_FAIL:-0}" = 1 ]; then echo "$cmd: failing as asked" >&2; exit 1; fi
ended=$(cut -d' ' -f1 /proc/uptime)
echo "$(cat /app/VERSION) $cmd $(date -u +%Y-%m-%dT%H:%M:%SZ) $began $ended" >> "$record"
echo "$cmd done"
"""


# The demo app as a build may ask it to misbehave (see DemoOptions): its own tiny HTTP server, run by
# `nc -ll -e` for each connection, so that /healthz can answer any status, / can answer 500 now and
# then, and /metrics can count what it answered (busybox httpd serves files, and runs CGI only under
# /cgi-bin/).
_HTTP = """#!/bin/sh
# One HTTP request on stdin, its answer on stdout: /healthz answers $NORM_DEMO_HEALTHZ_STATUS, /metrics
# the requests answered so far in Prometheus's text format, any other path the file of that name under
# /app/www (/ is index.html). $NORM_DEMO_ERROR_PPM of every million requests to / answer 500 instead,
# spread evenly: the n-th fails when n * ppm / 1000000 (rounded down) is more than for the one before.
# Each request answered (but those to /metrics) appends one byte to the file of its status in
# $NORM_DEMO_COUNTS: appends are atomic, so that requests handled side by side are all counted.
counts="${NORM_DEMO_COUNTS:-/tmp/demo-counts}"
read -r method path proto
while IFS= read -r line; do
  line=$(printf %s "$line" | tr -d '\\r')
  [ -z "$line" ] && break
done
path=${path%%\\?*}
answer() {
  [ "$path" = /metrics ] || printf x >> "$counts/${1%% *}"
  printf 'HTTP/1.0 %s\\r\\nContent-Type: text/plain\\r\\nContent-Length: %s\\r\\n' \\
    "$1" "$(printf %s "$2" | wc -c)"
  printf 'Connection: close\\r\\n\\r\\n'
  printf %s "$2"
}
metrics() {
  echo "# HELP djed_http_requests_total Requests the demo app answered (but scrapes), by status code."
  echo "# TYPE djed_http_requests_total counter"
  for f in "$counts"/[0-9][0-9][0-9]; do
    [ -f "$f" ] && echo "djed_http_requests_total{code=\\"${f##*/}\\"} $(stat -c %s "$f")"
  done
}
failing() {
  ppm=${NORM_DEMO_ERROR_PPM:-0}
  [ "$ppm" -gt 0 ] || return 1
  printf x >> "$counts/requests"
  n=$(stat -c %s "$counts/requests")
  [ $((n * ppm / 1000000)) -gt $(((n - 1) * ppm / 1000000)) ]
}
case "$path" in
  /healthz) answer "${NORM_DEMO_HEALTHZ_STATUS:-200} As built" "healthz: ${NORM_DEMO_HEALTHZ_STATUS:-200}
" ;;
  /metrics) answer "200 OK" "$(metrics)
" ;;
  *..*) answer "404 Not Found" "not found
" ;;
  *)
    if [ "$path" = / ] && failing; then answer "500 Internal Server Error" "failing as built
"; exit 0; fi
    file="/app/www$path"
    [ "$path" = / ] && file=/app/www/index.html
    if [ -f "$file" ]; then answer "200 OK" "$(cat "$file")
"; else answer "404 Not Found" "not found
"; fi ;;
esac
"""

_LABEL_VALUE = re.compile(r"[A-Za-z0-9 _.:/+-]{0,128}")


@dataclass(frozen=True)
class DemoOptions:
    """How a build of the demo app differs from a plain one (every default: a plain build).

    - `migrations`: the value of its `org.norm.migrations` label (norm.core.gate.MIGRATIONS_LABEL); any
      text of letters, digits, blanks and `_.:/+-`, so that a malformed one can be built too.
    - `healthz_status`: the HTTP status its /healthz answers (a plain build answers 200).
    - `exit_after`: `serve` exits, status 1, this many seconds after it started.
    - `healthcheck`: a Docker HEALTHCHECK that GETs /healthz every second (unhealthy after two
      failures in a row).
    - `metrics`: serve /metrics: `djed_http_requests_total{code="200"}` and so on, in Prometheus's
      text format, counting the requests answered (but scrapes) by status code since it started;
      the 200 and 500 series are there from the start, at 0.
    - `error_rate`: that fraction (0 to 1) of the requests to / answer 500, spread evenly (at 0.05,
      the 20th, 40th, ... request); /healthz, /version and /metrics never do. Implies `metrics`.

    A build with any of healthz_status, metrics or error_rate runs the demo app's own small server
    (one shell per request) instead of busybox httpd; each of those serves /metrics."""

    migrations: str | None = None
    healthz_status: int = 200
    exit_after: float | None = None
    healthcheck: bool = False
    metrics: bool = False
    error_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.migrations is not None and not _LABEL_VALUE.fullmatch(self.migrations):
            raise ValueError("migrations: letters, digits, blanks and _.:/+- only, at most 128")
        if not 100 <= self.healthz_status <= 599:
            raise ValueError("healthz_status must be an HTTP status")
        if self.exit_after is not None and not 0 <= self.exit_after <= 86400:
            raise ValueError("exit_after must be from 0 to 86400 seconds")
        if not isinstance(self.error_rate, int | float) or not 0 <= self.error_rate <= 1:
            raise ValueError("error_rate must be from 0 to 1")

    @property
    def own_server(self) -> bool:
        """Whether the build runs the demo app's own server (_HTTP) rather than busybox httpd."""
        return self.healthz_status != 200 or self.metrics or self.error_rate > 0

    @property
    def error_ppm(self) -> int:
        """The requests to / that answer 500, per million."""
        return round(self.error_rate * 1_000_000)

    @property
    def plain_server(self) -> bool:
        return not self.own_server and self.exit_after is None


def _serve_script(options: DemoOptions) -> str:
    """The `serve` command: _SERVE itself for a plain build (its behaviour stays that of every build
    before these options), a variant otherwise."""
    if options.plain_server:
        return _SERVE
    status = options.healthz_status
    server = (f'NORM_DEMO_HEALTHZ_STATUS={status} NORM_DEMO_ERROR_PPM={options.error_ppm} '
              'nc -ll -p "${PORT:-8080}" -e /bin/demo-http'
              if options.own_server else 'httpd -f -p "${PORT:-8080}" -h /app/www')
    lines = [
        "#!/bin/sh",
        "# The demo app, built to misbehave (sandbox.images.DemoOptions): as _SERVE otherwise.",
    ]
    if options.own_server:  # the counters /metrics shows: 200 and 500 from the start
        lines += ['counts="${NORM_DEMO_COUNTS:-/tmp/demo-counts}"',
                  'mkdir -p "$counts" && : > "$counts/200" && : > "$counts/500" && : > "$counts/requests"']
    lines += [
        f"{server} &",
        "child=$!",
        """trap 'kill -TERM "$child" 2>/dev/null; wait "$child"; exit 0' TERM INT""",
    ]
    if options.exit_after is None:
        lines += ['wait "$child"']
    else:
        lines += [
            f"sleep {options.exit_after:g} &",
            'wait "$!"',
            f'echo "serve: exiting after {options.exit_after:g}s, as built to" >&2',
            'kill -TERM "$child" 2>/dev/null',
            'wait "$child"',
            "exit 1",
        ]
    return "\n".join(lines) + "\n"


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    info.mtime = 0
    tar.addfile(info)


def _add_symlink(tar: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mtime = 0
    tar.addfile(info)


def _busybox_applets() -> list[str]:
    out = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout
    return sorted({a for a in out.split() if a and a != "busybox"})


def _demo_context(version: str, size_mb: int, options: DemoOptions = DemoOptions()) -> bytes:
    """The build context as a tar stream: Dockerfile, the rootfs layer, an optional padding layer."""
    if not BUSYBOX.exists():
        raise SandboxError(f"{BUSYBOX} is missing: install busybox-static (scripts/bootstrap.sh does)")
    dockerfile = [
        "FROM scratch",
        "COPY rootfs/ /",
    ]
    if size_mb > 0:
        dockerfile.append("COPY pad/ /pad/")
    dockerfile += [
        "ENV PATH=/bin",
        f'LABEL org.opencontainers.image.version="{version}" org.opencontainers.image.title="djed demo app"',
    ]
    if options.migrations is not None:
        dockerfile.append(f'LABEL {MIGRATIONS_LABEL}="{options.migrations}"')
    if options.healthcheck:
        dockerfile.append('HEALTHCHECK --interval=1s --timeout=2s --retries=2 '
                          'CMD wget -q -O /dev/null "http://127.0.0.1:${PORT:-8080}/healthz" || exit 1')
    dockerfile += [
        'CMD ["serve"]',
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _add_file(tar, "Dockerfile", ("\n".join(dockerfile) + "\n").encode())
        for d in ("rootfs", "rootfs/bin", "rootfs/app", "rootfs/app/www", "rootfs/data", "rootfs/tmp"):
            _add_dir(tar, d, 0o1777 if d.endswith("tmp") else 0o755)
        _add_file(tar, "rootfs/bin/busybox", BUSYBOX.read_bytes(), 0o755)
        for applet in _busybox_applets():
            _add_symlink(tar, f"rootfs/bin/{applet}", "busybox")
        _add_file(tar, "rootfs/bin/serve", _serve_script(options).encode(), 0o755)
        if options.own_server:
            _add_file(tar, "rootfs/bin/demo-http", _HTTP.encode(), 0o755)
        _add_file(tar, "rootfs/bin/demo-task", _TASK.encode(), 0o755)
        _add_symlink(tar, "rootfs/bin/migrate", "demo-task")
        _add_symlink(tar, "rootfs/bin/collectstatic", "demo-task")
        _add_file(tar, "rootfs/app/VERSION", f"{version}\n".encode())
        _add_file(tar, "rootfs/app/www/index.html", f"{version}\n".encode())
        _add_file(tar, "rootfs/app/www/version", f"{version}\n".encode())
        _add_file(tar, "rootfs/app/www/health", b"ok\n")
        _add_file(tar, "rootfs/app/www/healthz", b"ok\n")
        if size_mb > 0:
            _add_dir(tar, "pad")
            # Random bytes: compression gains nothing, every version's padding is its own layer.
            _add_file(tar, "pad/random.bin", os.urandom(size_mb * 1024 * 1024))
    return buf.getvalue()


def demo_app_image(
    engine: DockerEngine,
    registry: Registry,
    version: str,
    size_mb: int = 0,
    repository: str = DEMO_REPOSITORY,
    options: DemoOptions = DemoOptions(),
) -> str:
    """Build the demo app at `version` (padded to about `size_mb` MB), push it, return its reference
    `<registry>/djed/app:<version>`. Its default command serves the version over HTTP (/healthz and
    /health answer ok); `migrate` and `collectstatic` record themselves (see _TASK). `options` builds
    one that declares its migrations, answers /healthz with another status, exits after a while, or
    has a Docker HEALTHCHECK (see DemoOptions)."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", version):
        raise ValueError(f"not a valid image tag: {version!r}")
    ref = f"{registry.address}/{repository}:{version}"
    context = _demo_context(version, size_mb, options)
    engine.docker("build", "--network", "host", "-q", "-t", ref, "-", input=context, timeout=600)
    engine.docker("push", ref, timeout=600)
    return ref


# -- etcd for testcontainers -----------------------------------------------------------------------

def _linked_libraries(binary: Path) -> list[Path]:
    """What `ldd` says `binary` loads (the dynamic loader included), as absolute paths."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False).stdout
    libs: list[Path] = []
    for line in out.splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def etcd_version() -> str:
    out = subprocess.run([str(ETCD), "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"etcd Version:\s*(\S+)", out)
    if not m:
        raise SandboxError(f"cannot read the etcd version from {out!r}")
    return m.group(1)


def etcd_image(engine: DockerEngine, tag: str | None = None) -> str:
    """`norm/etcd:<version>`: /usr/bin/etcd and etcdctl with the libraries they link, ENTRYPOINT etcd.
    Run it with `--listen-client-urls http://0.0.0.0:2379 --advertise-client-urls ...`."""
    tag = tag or f"norm/etcd:{etcd_version()}"
    if image_exists(engine, tag):
        return tag
    files = {Path("/usr/bin/etcd"): ETCD, Path("/usr/bin/etcdctl"): ETCDCTL}
    for binary in (ETCD, ETCDCTL):
        for lib in _linked_libraries(binary):
            files[lib] = lib
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dirs = sorted({str(p) for dest in files for p in dest.parents if str(p) != "/"})
        for d in [*dirs, "/tmp", "/var", "/var/lib", "/var/lib/etcd"]:
            _add_dir(tar, d.lstrip("/"), 0o1777 if d == "/tmp" else 0o755)
        for dest, source in files.items():
            _add_file(tar, str(dest).lstrip("/"), source.resolve().read_bytes(), 0o755)
    engine.docker(
        "import",
        "-c", 'ENTRYPOINT ["/usr/bin/etcd"]',
        "-c", "ENV ETCD_DATA_DIR=/var/lib/etcd",
        "-c", "EXPOSE 2379 2380",
        "-", tag,
        input=buf.getvalue(),
        timeout=300,
    )
    return tag


# -- Debian base and the Norm image ----------------------------------------------------------------

def base_image(engine: DockerEngine, tag: str = BASE_TAG, timeout: float = 1200) -> str:
    """Debian 12 + python3 + python3-venv from scripts/build-base-image.sh (debootstrap, cached under
    /var/cache/norm: cold about a minute, then only the import)."""
    if image_exists(engine, tag):
        return tag
    r = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-base-image.sh"), "-H", engine.host, "-t", tag],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "NORM_CACHE_DIR": str(CACHE_DIR)},
    )
    if r.returncode != 0:
        raise SandboxError(f"build-base-image.sh failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return tag


def norm_version() -> str:
    m = re.search(r'^__version__\s*=\s*"([^"]+)"', (REPO / "norm" / "__init__.py").read_text(), re.M)
    if not m:
        raise SandboxError("no __version__ in norm/__init__.py")
    return m.group(1)


def _pip(*args: str, cwd: Path = REPO, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [venv_python(), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )


def _copy_source(dest: Path) -> None:
    """What a wheel of Norm is built from, copied so that setuptools' scratch files (build/, egg-info)
    never land in the working tree others edit."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "setup.cfg", "setup.py", "MANIFEST.in", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "norm", dest / "norm", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def build_wheels(dest: Path) -> None:
    """Norm's wheel (from this tree) and its runtime dependencies' wheels (pinned by constraints.txt)
    into `dest`. The dependency wheels are cached under CACHE_DIR by the hash of pyproject.toml and
    constraints.txt: only a cold cache asks the package index."""
    dest.mkdir(parents=True, exist_ok=True)
    source = dest.parent / "norm-source"
    shutil.rmtree(source, ignore_errors=True)
    _copy_source(source)
    r = _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), str(source), cwd=source)
    if r.returncode != 0:  # no setuptools in this interpreter: let pip fetch it
        r = _pip("wheel", "--no-deps", "-w", str(dest), str(source), cwd=source)
    shutil.rmtree(source, ignore_errors=True)
    if r.returncode != 0:
        raise SandboxError(f"pip wheel of norm failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")

    pyproject = (REPO / "pyproject.toml").read_bytes()
    constraints = (REPO / "constraints.txt").read_bytes()
    deps = list(tomllib.loads(pyproject.decode())["project"]["dependencies"])
    key = hashlib.sha256(pyproject + constraints + sys.version.encode()).hexdigest()[:16]
    cache = CACHE_DIR / f"wheels-{key}"
    cache.mkdir(parents=True, exist_ok=True)
    common = ["wheel", "-c", str(REPO / "constraints.txt"), "--find-links", str(cache), "-w", str(cache)]
    r = _pip(*common, "--no-index", *deps)
    if r.returncode != 0:
        r = _pip(*common, *deps)
    if r.returncode != 0:
        detail = f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        raise SandboxError(f"pip wheel of Norm's dependencies failed:\n{detail}")
    for wheel in cache.glob("*.whl"):
        target = dest / wheel.name
        if not target.exists():
            try:
                os.link(wheel, target)
            except OSError:
                shutil.copy2(wheel, target)


def norm_image(engine: DockerEngine, base: str, tag: str | None = None) -> str:
    """Build docker/Dockerfile on `base` (see base_image) with Norm installed from host-built wheels;
    ENTRYPOINT ["norm"]. The build context is a fresh dir holding only `wheels/`."""
    tag = tag or f"norm/norm:{norm_version()}"
    context = engine.workdir / "build" / "norm-context"
    shutil.rmtree(context, ignore_errors=True)
    build_wheels(context / "wheels")
    shutil.copy2(REPO / "docker" / "Dockerfile", context / "Dockerfile")
    engine.docker(
        "build", "--network", "host", "-q",
        "--build-arg", f"BASE={base}",
        "-t", tag,
        str(context),
        timeout=900,
    )
    shutil.rmtree(context, ignore_errors=True)
    return tag
