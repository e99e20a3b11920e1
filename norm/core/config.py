"""The configuration: one frozen tree, built once from layered sources and validated as a whole.

Sources, later ones winning: the TOML file, then `NORM_<SECTION>__<KEY>` environment variables, then
`--set section.key=value` flags. Reading the sources is the shell's job; this module only turns the
merged raw values into a `Config`, or raises `ConfigError` naming the key and the source.

Each field declares its own constraints next to its documentation (`_doc(text, *constraints)`); one
generic walk (`_validate`) applies them, then the few rules that span fields (`RULES`). The
reference (`norm config reference`) shows the same constraints.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

from norm.core import values
from norm.core.errors import ConfigError
from norm.core.secret import Secret
from norm.core.units import valid_unit_name

DEFAULT_PATH = "/etc/norm/norm.toml"
ENV_PREFIX = "NORM_"

# ---------------------------------------------------------------------------------------------------
# Declared constraints: what a field's value must be, in words that never quote the value


class Constraint(typing.Protocol):
    @property
    def says(self) -> str:
        """The error's reason, and what the reference shows."""
        ...

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` (an unset optional value is never asked), or None."""
        ...


@dataclass(frozen=True)
class Between:
    """A number from lo to hi inclusive (more than lo with `above`); `off` is one more value allowed,
    the one that turns the feature off. `wording` replaces the generated reason."""

    lo: float
    hi: float
    unit: str = "seconds"
    above: bool = False
    off: float | None = None
    note: str = ""
    wording: str = ""

    @property
    def says(self) -> str:
        if self.wording:
            return self.wording
        span = f"more than {self.lo} and at most {self.hi}" if self.above else f"from {self.lo} to {self.hi}"
        off = "" if self.off is None else f"{self.off} (off) or "
        note = f" ({self.note})" if self.note else ""
        return f"must be {off}{span} {self.unit}".rstrip() + note

    def admits(self, value: float) -> bool:
        inside = self.lo < value <= self.hi if self.above else self.lo <= value <= self.hi
        return inside or value == self.off

    def problem(self, value: Any) -> str | None:
        return None if self.admits(value) else self.says


@dataclass(frozen=True)
class Matches:
    """Text the whole of which the grammar matches, at most max_len characters."""

    grammar: re.Pattern[str]
    says: str
    max_len: int | None = None

    def problem(self, value: Any) -> str | None:
        fits = self.max_len is None or len(value) <= self.max_len
        return None if fits and self.grammar.fullmatch(value) else self.says


@dataclass(frozen=True)
class NonEmpty:
    says: str

    def problem(self, value: Any) -> str | None:
        return None if value else self.says


@dataclass(frozen=True)
class Holds:
    """A predicate of the value that the other constraints do not express."""

    test: Callable[[Any], bool]
    says: str

    def problem(self, value: Any) -> str | None:
        return None if self.test(value) else self.says


@dataclass(frozen=True)
class Judged:
    """A check with more than one reason: `judge` returns the reason, or None; `says` sums them up."""

    judge: Callable[[Any], str | None]
    says: str

    def problem(self, value: Any) -> str | None:
        return self.judge(value)


@dataclass(frozen=True)
class Each:
    """The inner constraint on every item of a list, the first failing item's reason."""

    inner: Constraint

    @property
    def says(self) -> str:
        return self.inner.says

    def problem(self, value: Any) -> str | None:
        return next((p for item in value if (p := self.inner.problem(item)) is not None), None)


def _doc(text: str, *constraints: Constraint, **kw: Any) -> Any:
    return field(metadata={"doc": text, "constraints": constraints}, **kw)


def constraints_of(f: dataclasses.Field[Any]) -> tuple[Constraint, ...]:
    return typing.cast(tuple[Constraint, ...], f.metadata.get("constraints", ()))


# The grammars and predicates the fields below declare. A machine id, a label (environment, role) and
# an instance id have the grammar the values Norm reads back from etcd are held to.

_UNIT_PATTERN = re.compile(r"[A-Za-z0-9:_.\\@*?\[\]!-]+\.(service|socket|timer|target|path|mount)")
# Starts with /, printable ASCII without spaces, and does not end with / (nor is / alone).
_KEY = re.compile(r"/[\x21-\x7e]*[\x21-\x2e\x30-\x7e]")
_AWS_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_OWNER = re.compile(r"[a-z_][a-z0-9_-]{0,31}(:[a-z_][a-z0-9_-]{0,31})?")
_HAPROXY_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,255}")
_TARGET_GROUP = re.compile(
    r"arn:aws[a-z-]*:elasticloadbalancing:[a-z0-9-]+:[0-9]{12}:targetgroup/[A-Za-z0-9-]{1,32}/[0-9a-f]{16}")
_IMAGE_REPO = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")

WEEK = 7 * 86400


def parse_listen(value: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); raises ValueError with the reason."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected host:port with a port from 1 to 65535")
    host = host.strip("[]")
    if not host:
        raise ValueError("expected host:port with a host")
    return host, int(port)


def _listen_problem(value: str) -> str | None:
    try:
        host, _ = parse_listen(value)
    except ValueError as e:
        return str(e)
    if host == "localhost":
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "the host must be an IP address or localhost"
    return None


def step_name(command: str) -> str:
    """A one-off command's name in the ledger and in keys: its words, lowercased, joined by '-'."""
    return re.sub(r"[^a-z0-9_]+", "-", command.lower()).strip("-_")[:63].strip("-_")


def _distinct_steps(commands: tuple[str, ...]) -> bool:
    names = [step_name(c) for c in commands]
    return all(names) and len(set(names)) == len(names)


def _endpoint_problem(endpoint: str) -> str | None:
    try:
        parts = urlsplit(endpoint)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port is not None
    except ValueError:
        usable = False
    if not usable:
        return "each endpoint must look like http://host:port or https://host:port"
    if parts.path not in ("", "/"):
        return "an endpoint has no path"
    return None


def _one_scheme(endpoints: tuple[str, ...]) -> bool:
    # Asked once every endpoint has passed _endpoint_problem.
    return len({urlsplit(e).scheme for e in endpoints}) <= 1


def _is_http_url(url: str, *, with_host: bool = True) -> bool:
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and (bool(parts.hostname) or not with_host)
    except ValueError:  # an unbalanced [ or ] in the host
        return False


def _docker_address(address: str) -> bool:
    try:
        return urlsplit(address).scheme in ("unix", "tcp", "http", "https")
    except ValueError:
        return False


def _absolute_file(path: str) -> bool:
    return path.startswith("/") and not path.endswith("/")


def _mount(mount: str) -> bool:
    src, sep, dst = mount.partition(":")
    return bool(sep) and src.startswith("/") and dst.startswith("/")


def _object_key(key: str) -> bool:
    return bool(key) and not key.startswith("/") and not key.replace("{environment}", "").count("{")


def _unit_entry(entry: str) -> tuple[str, str] | None:
    """UNIT=VALUE as (unit, value); None when UNIT is not a systemd unit name."""
    unit, sep, value = entry.partition("=")
    unit = unit.strip()
    return (unit, value.strip()) if sep and valid_unit_name(unit) else None


def _health_check_problem(entry: str) -> str | None:
    parsed = _unit_entry(entry)
    if parsed is None:
        return "each must be UNIT=URL, UNIT a systemd unit name such as 'djed-web.service'"
    if not _is_http_url(parsed[1]):
        return "each must be UNIT=URL, URL an http:// or https:// URL with a host"
    return None


_CONTAINER = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{1,254}")


def _health_container_problem(entry: str) -> str | None:
    parsed = _unit_entry(entry)
    if parsed is None:
        return "each must be UNIT=CONTAINER, UNIT a systemd unit name such as 'djed-web.service'"
    if parsed[1] and not _CONTAINER.fullmatch(parsed[1]):
        return "each must be UNIT=CONTAINER, CONTAINER a container name (letters, digits, '_.-') or nothing"
    return None


def _one_value_per_unit(entries: tuple[str, ...]) -> bool:
    # Asked once every entry has passed its own check. The same entry twice is harmless.
    given: dict[str, str] = {}
    for unit, value in (p for e in entries if (p := _unit_entry(e)) is not None):
        if given.setdefault(unit, value) != value:
            return False
    return True


_TIMEOUT = Between(0, 300, above=True)
_INTERVAL = Between(1, 86400)
_PHASE = Between(0, 86400, above=True)
_WITHIN_A_WEEK = Between(0, WEEK, above=True, wording="must be more than 0 and at most a week, in seconds")
_ETCD_KEY = Matches(_KEY, "must start with /, hold printable ASCII without spaces, not end with /")
_HOST_LABEL = Matches(values.LABEL, "must be 1 to 63 letters, digits, '_', '.' or '-'")
_ABSOLUTE_FILE = Holds(_absolute_file, "must be an absolute file path")
_HTTP_URL = Holds(_is_http_url, "must be an http:// or https:// URL")

# ---------------------------------------------------------------------------------------------------
# The schema


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...] = _doc(
        "etcd client URLs (http:// or https://); the agent fails over between them.",
        NonEmpty("at least one endpoint is needed"),
        Each(Judged(_endpoint_problem, "each endpoint must look like http://host:port or https://host:port, "
                    "with no path")),
        Holds(_one_scheme, "endpoints must all be http or all https"),
        default=("http://127.0.0.1:2379",),
    )
    ca_file: str | None = _doc("CA bundle that signs the etcd servers' certificates (https endpoints).",
                               default=None)
    cert_file: str | None = _doc("Client certificate presented to etcd (needs key_file).", default=None)
    key_file: str | None = _doc("Private key of the client certificate.", default=None)
    server_name: str | None = _doc(
        "Name checked against the servers' certificates when it differs from the endpoints' host.",
        default=None)
    username: str | None = _doc("etcd user for password authentication.", default=None)
    password: Secret | None = _doc(
        "Password of that user. Prefer password_file or the NORM_ETCD__PASSWORD environment variable.",
        default=None)
    password_file: str | None = _doc("File whose first line is the etcd password.", default=None)
    dial_timeout: float = _doc("Seconds to wait for a connection to etcd.", _TIMEOUT, default=5.0)
    request_timeout: float = _doc("Seconds any single etcd request may take.", _TIMEOUT, default=5.0)
    keepalive_time: float = _doc(
        "Seconds between gRPC keepalive pings (etcd refuses pings more often than every 5 s).",
        Between(5, 3600, note="etcd refuses faster pings"), default=10.0)
    keepalive_timeout: float = _doc("Seconds without a ping answer before the connection is dead.",
                                    _TIMEOUT, default=5.0)
    lease_ttl: int = _doc("TTL in seconds of the agent's lease (host registration, leadership).",
                          Between(3, 3600), default=10)
    failover_after: int = _doc(
        "Requests failing in a row on one etcd member (unavailable, timed out) after which the agent "
        "moves to the next endpoint; a member that says it has no leader is left at once.",
        Between(1, 100, unit=""), default=2)


@dataclass(frozen=True)
class KeysConfig:
    version: str = _doc("Key holding the desired image tag.", _ETCD_KEY, default="/djed-version")
    environment: str = _doc("Key naming the environment file.", _ETCD_KEY, default="/djed-environment")
    prefix: str = _doc("Prefix under which Norm keeps everything of its own.", _ETCD_KEY, default="/norm")


@dataclass(frozen=True)
class HostConfig:
    machine_id_path: str = _doc("File holding this host's machine id.", default="/etc/machine-id")
    machine_id: str | None = _doc("Machine id to use instead of reading machine_id_path.",
                                 Matches(values.MACHINE_ID,
                                         "must be 32 lowercase hex digits, as in /etc/machine-id"),
                                 default=None)
    name: str | None = _doc("Display name of the host; the system's hostname when unset.", _HOST_LABEL,
                           default=None)
    environment: str = _doc("Environment this host serves (prod, stage, test, ...).", _HOST_LABEL,
                           default="prod")
    role: str = _doc("Role of this host (django, celery, ...).", _HOST_LABEL, default="app")


@dataclass(frozen=True)
class UnitsConfig:
    patterns: tuple[str, ...] = _doc(
        "systemd unit name patterns (fnmatch) that Norm manages.",
        NonEmpty("at least one pattern is needed"),
        Each(Matches(_UNIT_PATTERN, "each pattern must be a systemd unit name such as 'djed-*.service'",
                     max_len=255)),
        default=("djed*.service",))


@dataclass(frozen=True)
class SystemdConfig:
    bus_address: str | None = _doc("D-Bus address of the systemd manager; the system bus when unset.",
                                   Holds(lambda a: ":" in a, "must be a D-Bus address such as "
                                         "unix:path=/run/dbus/system_bus_socket"),
                                   default=None)
    call_timeout: float = _doc("Seconds a systemd call or job (start, stop) may take.",
                                Between(0, 600, above=True), default=30.0)


@dataclass(frozen=True)
class HealingConfig:
    enabled: bool = _doc("Heal the managed units when they fail.", default=True)
    backoff_initial: float = _doc(
        "Seconds before the second attempt of a failure episode (the first is immediate); doubles "
        "with each attempt.", default=1.0)
    backoff_max: float = _doc("Longest wait between two attempts, in seconds.", default=60.0)
    budget: int = _doc("Attempts allowed per unit in any window; then the unit is quarantined.",
                       Between(1, 1000, unit="attempts"), default=5)
    window: float = _doc("Seconds of the window the budget counts attempts in.", _WITHIN_A_WEEK,
                         default=600.0)
    cooldown: float = _doc("Seconds a quarantine lasts unless an operator lifts it first.",
                           _WITHIN_A_WEEK, default=1800.0)
    forget_after: float = _doc("Seconds a unit must stay healthy before its failures are forgotten.",
                               _WITHIN_A_WEEK, default=300.0)
    resync_interval: float = _doc("Seconds between safety-net re-reads of every unit's state.",
                                  _INTERVAL, default=60.0)


@dataclass(frozen=True)
class DockerConfig:
    host: str = _doc("Docker engine address.",
                    Holds(_docker_address, "must be unix:///path or tcp://host:port"), default="unix:///var/run/docker.sock")


@dataclass(frozen=True)
class UpdateConfig:
    image: str | None = _doc(
        "Image repository the desired tag names (registry.example.com/djed/app); update mode is off "
        "while unset.",
        Matches(_IMAGE_REPO, "must be an image repository without tag or digest, such as "
                "registry.example.com/djed/app"),
        default=None)
    release_file: str = _doc(
        "The release file Norm writes for the units' EnvironmentFile= (image pinned by digest).",
        _ABSOLUTE_FILE, default="/run/norm/release.env")
    roles: tuple[str, ...] = _doc(
        "Roles that take part in updates (hosts of the leader's environment); every role when empty.",
        Each(Matches(values.LABEL, "each role must be 1 to 63 letters, digits, '_', '.' or '-'")), default=())
    steps: tuple[str, ...] = _doc(
        "One-off commands run once per version by the leader in the new image, in order, between the "
        "fleet's stop and start (migrations, then static files).",
        Holds(_distinct_steps, "each step must be a distinct, non-empty command"),
        default=("migrate", "collectstatic"))
    steps_env_file: str | None = _doc(
        "Environment file (KEY=VALUE lines) given to the one-off commands.", default=None)
    steps_network: str = _doc("Docker network of the one-off commands' containers.", default="host")
    steps_mounts: tuple[str, ...] = _doc(
        "Bind mounts of the one-off commands' containers, as host_path:container_path.",
        Each(Holds(_mount, "each mount must be /host/path:/container/path")), default=())
    compatible: tuple[str, ...] = _doc(
        "Tags or digests safe to set the fleet back to without a down-migration.", default=())
    pull_timeout: float = _doc("Seconds every host has to pull the new image (the pull barrier).",
                               _PHASE, default=600.0)
    stop_timeout: float = _doc("Seconds every host has to stop the units.", _PHASE, default=120.0)
    migration_timeout: float = _doc("Seconds one one-off command may run before it is killed.",
                                    _PHASE, default=1800.0)
    start_timeout: float = _doc("Seconds every host has to start the new release.", _PHASE,
                                default=300.0)
    on_trouble: Literal["exclude", "abort"] = _doc(
        "What happens to a rollout when a host dies, fails to pull or is too slow before the cut-over: "
        "exclude the host (it gets the release later), or abort the rollout.", default="exclude")
    history: int = _doc("Finished rollouts kept in etcd.", Between(1, 1000, unit="rollouts"), default=20)
    prometheus_url: str | None = _doc(
        "Prometheus server the leader asks a canary's analysis queries (the fleet policy's [[analysis]]); "
        "set it on every leader-eligible host. Credentials in it never reach a log or an error.",
        _HTTP_URL, default=None)
    health_checks: tuple[str, ...] = _doc(
        "Health URLs of this host's units, as UNIT=URL, asked by the health gate once an update started "
        "the units (ports differ per host). lb.health_url serves for lb.unit when it has none here. A unit "
        "without a URL needs only to be active, and its container healthy where the image has a Docker "
        "HEALTHCHECK.",
        Each(Judged(_health_check_problem, "each must be UNIT=URL: a systemd unit name such as "
                    "'djed-web.service' and an http:// or https:// URL")),
        Holds(_one_value_per_unit, "a unit may not be given two different values"), default=())
    health_containers: tuple[str, ...] = _doc(
        "The container each unit runs, as UNIT=CONTAINER (UNIT= for a unit that runs none), checked by "
        "the health gate in Docker; by default a unit's name without .service (djed-web.service runs "
        "djed-web).",
        Each(Judged(_health_container_problem, "each must be UNIT=CONTAINER: a systemd unit name and a "
                    "container name (letters, digits, '_.-'), or nothing")),
        Holds(_one_value_per_unit, "a unit may not be given two different values"), default=())


@dataclass(frozen=True)
class AwsConfig:
    region: str | None = _doc("AWS region; from instance metadata when unset.",
                                 Matches(_AWS_REGION, "must be a region name such as eu-west-1"),
                                 default=None)
    endpoint_url: str | None = _doc(
        "Endpoint of S3, ELBv2 and EC2 instead of AWS's own (a private endpoint, or a test server).",
        _HTTP_URL, default=None)
    metadata_url: str = _doc("Instance metadata service (IMDSv2: token-based).", _HTTP_URL,
                             default="http://169.254.169.254")
    use_metadata: bool = _doc(
        "Read the instance id, the region, and the environment and role from the instance tags "
        "environment (or Environment) and role (or Role) from instance metadata (the configuration "
        "wins where both speak).", default=False)
    call_timeout: float = _doc("Seconds an AWS or instance metadata call may take.", _TIMEOUT,
                                default=10.0)


@dataclass(frozen=True)
class EnvFileConfig:
    bucket: str | None = _doc(
        "S3 bucket holding the environment files; environment files are off while unset.",
        Matches(_BUCKET, "must be an S3 bucket name (3 to 63 of a-z 0-9 . -)"), default=None)
    key: str = _doc("Object key of the environment file; {environment} is replaced by the value of "
                    "keys.environment in etcd (the host's environment while that key is absent).",
                    Holds(_object_key, "must be an object key, with {environment} as its only placeholder"),
                    default="{environment}.env")
    path: str = _doc("Where the environment file is written, for the units' EnvironmentFile=.",
                     _ABSOLUTE_FILE, default="/run/norm/app.env")
    owner: str | None = _doc(
        "Owner of the written file, as user or user:group; root when unset. Under the shipped unit it "
        "needs the drop-in deploy/env-owner.conf: the agent tries a chown at start and "
        "exits 2 when it is refused.", Matches(_OWNER, "must be user or user:group"), default=None)
    interval: float = _doc("Seconds between checks of the object (conditional GET on its ETag).",
                           _INTERVAL, default=60.0)
    on_change: Literal["restart", "next_rollout"] = _doc(
        "When the file changes: restart the units using it one at a time, each active again before the "
        "next, or leave them for the next rollout.", default="restart")
    units: tuple[str, ...] = _doc("Units using the file (restarted on a change); every managed unit "
                                  "when empty.",
                                  Each(Matches(_UNIT_PATTERN, "each must be a systemd unit name such as "
                                               "'djed-web.service'")),
                                  default=())


@dataclass(frozen=True)
class LbConfig:
    backend: Literal["elbv2", "haproxy"] = _doc(
        "The load balancer presence keeps this host in: elbv2 (its target_groups) or haproxy (its "
        "haproxy_backends, through HAProxy's Runtime API).", default="elbv2")
    target_groups: tuple[str, ...] = _doc(
        "ELBv2 target group ARNs this host joins while its web unit is healthy (backend elbv2); "
        "presence is off while empty.",
        Each(Matches(_TARGET_GROUP, "each must be a target group ARN "
                     "(arn:aws:elasticloadbalancing:REGION:ACCOUNT:targetgroup/NAME/ID)")),
        default=())
    haproxy_backends: tuple[str, ...] = _doc(
        "HAProxy backends this host's server is put in service in while its web unit is healthy "
        "(backend haproxy); presence is off while empty.",
        Each(Matches(_HAPROXY_NAME, "each must be an HAProxy backend name: 1 to 255 letters, digits, "
                     "'-', '_', '.' or ':'")),
        default=())
    haproxy_server: str | None = _doc(
        "This host's server name in those backends; the host's name (host.name) when unset.",
        Matches(_HAPROXY_NAME, "must be an HAProxy server name: 1 to 255 letters, digits, '-', '_', "
                "'.' or ':'"), default=None)
    haproxy_socket: str = _doc(
        "HAProxy's Runtime API socket, declared with `stats socket PATH level admin` (backend haproxy).",
        Holds(lambda p: p.startswith("/"), "must be an absolute path"), default="/run/haproxy/admin.sock")
    instance_id: str | None = _doc("The host's EC2 instance id; from instance metadata when unset.",
                                   Matches(values.INSTANCE_ID, "must be an EC2 instance id such as "
                                           "i-0123456789abcdef0"),
                                   default=None)
    unit: str = _doc("The unit whose health puts the host in the target groups.",
                     Matches(_UNIT_PATTERN, "must be a systemd unit name such as 'djed-web.service'"),
                     default="djed-web.service")
    health_url: str | None = _doc(
        "URL that must answer 2xx before the host is registered (checked after the unit is active).",
        Holds(lambda url: _is_http_url(url, with_host=False), "must be an http:// or https:// URL"),
        default=None)
    health_timeout: float = _doc("Seconds one try of the health URL may take.", Between(0.1, 60),
                                default=2.0)
    health_give_up: float = _doc(
        "Seconds a run of the unit may take to answer its health URL before presence gives up on that "
        "run (it stays out of the target groups until the unit runs again).", default=300.0)
    port: int | None = _doc("Port registered in the target groups; the groups' own when unset.",
                            Between(1, 65535, wording="must be a port from 1 to 65535"), default=None)
    drain_timeout: float = _doc(
        "Seconds to wait for a deregistered target to finish draining before stopping its units; in "
        "update mode, shorter than update.stop_timeout (match the target groups' deregistration delay).",
        Between(0, 3600), default=60.0)
    recheck_interval: float = _doc(
        "Seconds between reads of the host's state in each target group, so that a registration "
        "changed by someone else is put back as presence wants it; 0 turns the reads off.",
        Between(1, 86400, off=0), default=60.0)

    @property
    def groups(self) -> tuple[str, ...]:
        """What presence keeps the host in: the target groups (elbv2) or the backends (haproxy).
        Presence is off while there are none."""
        return self.haproxy_backends if self.backend == "haproxy" else self.target_groups


@dataclass(frozen=True)
class HttpConfig:
    listen: str = _doc("host:port of the /metrics, /healthz and /readyz endpoint.",
                       Judged(_listen_problem, "must be host:port, the host an IP address or localhost, "
                              "the port from 1 to 65535"),
                       default="127.0.0.1:9847")


@dataclass(frozen=True)
class AgentConfig:
    shutdown_timeout: float = _doc(
        "Seconds a graceful stop may take before running work is cancelled; keep it below the "
        "unit's TimeoutStopSec.", Between(0, 600, above=True), default=20.0)
    resync_interval: float = _doc("Seconds between safety-net re-reads of the watched keys.",
                                  _INTERVAL, default=300.0)
    leader_eligible: bool = _doc(
        "Campaign for fleet leadership. Set it false on hosts whose etcd user has no norm-leader role "
        "(see `norm access`): they follow rollouts but never lead. A host without update.image never "
        "campaigns, whatever this says: the leader runs the rollouts.", default=True)
    state_dir: str = _doc(
        "Directory of what the agent keeps across its restarts and the host's (healing.json: each "
        "unit's healing attempts, backoff and quarantine). The unit's StateDirectory=.",
        Holds(lambda p: p.startswith("/"), "must be an absolute directory path"), default="/var/lib/norm")


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = _doc("Lowest level logged.", default="info")
    format: Literal["auto", "json", "console"] = _doc(
        "json, console, or auto: console on a terminal, json otherwise.", default="auto")


@dataclass(frozen=True)
class Config:
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    host: HostConfig = field(default_factory=HostConfig)
    units: UnitsConfig = field(default_factory=UnitsConfig)
    systemd: SystemdConfig = field(default_factory=SystemdConfig)
    healing: HealingConfig = field(default_factory=HealingConfig)
    docker: DockerConfig = field(default_factory=DockerConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    aws: AwsConfig = field(default_factory=AwsConfig)
    env: EnvFileConfig = field(default_factory=EnvFileConfig)
    lb: LbConfig = field(default_factory=LbConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _section_types() -> dict[str, type[Any]]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}



# ---------------------------------------------------------------------------------------------------
# Raw values with their origin


@dataclass(frozen=True)
class Raw:
    """A value as a source gave it: typed (TOML) or text (environment, flags)."""

    value: object
    source: str


RawTree = dict[str, dict[str, Raw]]


def raw_from_toml(data: Mapping[str, object], source: str) -> RawTree:
    tree: RawTree = {}
    known = _section_types()
    for section, body in data.items():
        if not isinstance(body, Mapping):
            raise ConfigError(section, source, "expected a table like [section] with keys under it")
        if section not in known:
            raise ConfigError(section, source, f"unknown section (known: {', '.join(known)})")
        tree[section] = {str(k): Raw(v, source) for k, v in body.items()}
    return tree


def raw_from_env(environ: Mapping[str, str]) -> RawTree:
    tree: RawTree = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX):].partition("__")
        tree.setdefault(section.lower(), {})[key.lower()] = Raw(value, f"environment variable {name}")
    return tree


def raw_from_flags(assignments: list[str]) -> RawTree:
    tree: RawTree = {}
    for item in assignments:
        dotted, eq, value = item.partition("=")
        section, _, key = dotted.strip().partition(".")
        if not eq or not re.fullmatch(r"[a-z_]+\.[a-z_]+", dotted.strip()):
            # Not echoed: a malformed flag may well carry a password.
            raise ConfigError("-", "--set", "expected section.key=value, with a known section and key")
        tree.setdefault(section, {})[key] = Raw(value, f"--set {dotted}")
    return tree


def merge(*trees: RawTree) -> RawTree:
    out: RawTree = {}
    for tree in trees:
        for section, body in tree.items():
            out.setdefault(section, {}).update(body)
    return out


# ---------------------------------------------------------------------------------------------------
# Coercion: raw value -> typed value, per the dataclass annotations

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _to_bool(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    return None


def _to_int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    # At most 18 digits: int() of a longer text may exceed the interpreter's digit limit.
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,18}", value.strip()):
        return int(value)
    return None


def _to_float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _to_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _to_secret(value: object) -> Secret | None:
    return Secret(value) if isinstance(value, str) else None


# Each scalar type: its conversion (None when the value is not one) and what the error says then.
_SCALARS: dict[object, tuple[Callable[[object], object | None], str]] = {
    bool: (_to_bool, "expected true or false"),
    int: (_to_int, "expected a whole number"),
    float: (_to_float, "expected a number"),
    str: (_to_str, "expected a string"),
    Secret: (_to_secret, "expected a string"),
}


def _items(raw: Raw, key: str) -> list[object]:
    if isinstance(raw.value, str):
        return [v.strip() for v in raw.value.split(",") if v.strip()]
    if isinstance(raw.value, list | tuple):
        return list(raw.value)
    raise ConfigError(key, raw.source, "expected a list")


def _coerce(tp: Any, raw: Raw, key: str) -> object:
    """The typed value of `raw` for annotation `tp`. Only the type is checked here: the bounds and
    grammars are the fields' declared constraints, checked by _validate once the whole tree is built."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if raw.value is None or raw.value == "":
            return None
        return _coerce(next(a for a in get_args(tp) if a is not type(None)), raw, key)
    if origin is Literal:
        if raw.value not in get_args(tp):
            raise ConfigError(key, raw.source, f"must be one of {', '.join(map(str, get_args(tp)))}")
        return raw.value
    if origin is tuple:
        return tuple(_coerce(get_args(tp)[0], Raw(v, raw.source), key) for v in _items(raw, key))
    if tp not in _SCALARS:
        raise TypeError(f"unsupported config type {tp!r}")  # a bug in the schema, not in the input
    convert, expected = _SCALARS[tp]
    value = convert(raw.value)
    if value is None:
        raise ConfigError(key, raw.source, expected)
    return value


def build(tree: RawTree) -> Config:
    """Turn merged raw values into a validated Config. Unknown sections and keys are errors."""
    sections = _section_types()
    built: dict[str, object] = {}
    for section, body in tree.items():
        if section not in sections:
            source = next(iter(body.values())).source if body else "config"
            raise ConfigError(section, source, f"unknown section (known: {', '.join(sections)})")
    for section, cls in sections.items():
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        body = tree.get(section, {})
        kwargs: dict[str, object] = {}
        for key, raw in body.items():
            dotted = f"{section}.{key}"
            if key not in names:
                raise ConfigError(dotted, raw.source, f"unknown key (known: {', '.join(sorted(names))})")
            kwargs[key] = _coerce(hints[key], raw, dotted)
        built[section] = cls(**kwargs)
    config = Config(**built)  # type: ignore[arg-type]
    _validate(config, tree)
    return config

# ---------------------------------------------------------------------------------------------------
# Whole-tree validation: each field's declared constraints, then the rules across fields


@dataclass(frozen=True)
class Rule:
    """A check that spans fields. `broken(config)` says it fails; the error names `key`. It runs right
    after the constraints of the field `after`, once every field it reads has passed its own."""

    name: str
    key: str
    says: str
    broken: Callable[[Config], bool]
    after: str


def _no_https(c: Config) -> bool:
    return c.etcd.cert_file is not None and urlsplit(c.etcd.endpoints[0]).scheme != "https"


def _under_prefix(key: str, c: Config) -> bool:
    return key.startswith(c.keys.prefix + "/")


RULES: tuple[Rule, ...] = (
    Rule("tls-key-with-cert", "etcd.key_file", "cert_file and key_file go together",
         lambda c: c.etcd.cert_file is not None and c.etcd.key_file is None, after="etcd.key_file"),
    Rule("tls-cert-with-key", "etcd.cert_file", "cert_file and key_file go together",
         lambda c: c.etcd.cert_file is None and c.etcd.key_file is not None, after="etcd.key_file"),
    Rule("client-cert-needs-https", "etcd.cert_file", "client certificates need https endpoints",
         _no_https, after="etcd.key_file"),
    Rule("one-password", "etcd.password_file", "set password or password_file, not both",
         lambda c: c.etcd.password is not None and c.etcd.password_file is not None,
         after="etcd.password_file"),
    Rule("password-needs-username", "etcd.username", "a password needs a username",
         lambda c: (c.etcd.password is not None or c.etcd.password_file is not None) and not c.etcd.username,
         after="etcd.password_file"),
    Rule("username-needs-password", "etcd.password", "a username needs password or password_file",
         lambda c: bool(c.etcd.username) and c.etcd.password is None and c.etcd.password_file is None,
         after="etcd.password_file"),
    Rule("request-within-lease", "etcd.request_timeout", "must be shorter than etcd.lease_ttl",
         lambda c: c.etcd.request_timeout >= c.etcd.lease_ttl, after="etcd.failover_after"),
    Rule("version-outside-prefix", "keys.version", "must not live under keys.prefix, which Norm owns",
         lambda c: _under_prefix(c.keys.version, c), after="keys.prefix"),
    Rule("environment-outside-prefix", "keys.environment", "must not live under keys.prefix, which Norm owns",
         lambda c: _under_prefix(c.keys.environment, c), after="keys.prefix"),
    Rule("backoff-within-max", "healing.backoff_initial",
         "must be more than 0 and at most healing.backoff_max (<= 86400)",
         lambda c: not 0 < c.healing.backoff_initial <= c.healing.backoff_max <= 86400,
         after="healing.backoff_max"),
    Rule("cooldown-covers-window", "healing.cooldown",
         "must be at least healing.window (a quarantine starts a fresh budget)",
         lambda c: c.healing.cooldown < c.healing.window, after="healing.forget_after"),
    Rule("give-up-after-a-try", "lb.health_give_up", "must be from lb.health_timeout to 86400 seconds",
         lambda c: not c.lb.health_timeout <= c.lb.health_give_up <= 86400, after="lb.health_give_up"),
    Rule("target-groups-are-elbv2", "lb.target_groups",
         "are ELBv2's: with lb.backend = \"haproxy\", list the backends in lb.haproxy_backends",
         lambda c: c.lb.backend == "haproxy" and bool(c.lb.target_groups), after="lb.haproxy_socket"),
    Rule("drain-within-stop", "lb.drain_timeout",
         "must be shorter than update.stop_timeout: an update's stop waits for the draining",
         lambda c: bool(c.lb.groups) and c.update.image is not None
         and c.lb.drain_timeout >= c.update.stop_timeout,
         after="lb.recheck_interval"),
)


def health_urls(config: Config) -> dict[str, str]:
    """{unit: health URL} for the update's health gate: update.health_checks, and lb.health_url for
    lb.unit when that unit has no entry there."""
    urls = dict(p for e in config.update.health_checks if (p := _unit_entry(e)) is not None)
    if config.lb.health_url is not None:
        urls.setdefault(config.lb.unit, config.lb.health_url)
    return urls


def health_containers(config: Config) -> dict[str, str | None]:
    """{unit: container, or None for none} as update.health_containers gives them (the units it does
    not name run the container of their own name: norm.services.gate.container_of)."""
    return {unit: value or None for e in config.update.health_containers
            if (p := _unit_entry(e)) is not None for unit, value in (p,)}


def _source(tree: RawTree, dotted: str) -> str:
    section, _, key = dotted.partition(".")
    raw = tree.get(section, {}).get(key)
    return raw.source if raw else "default"


def _fields(config: Config) -> typing.Iterator[tuple[str, object, tuple[Constraint, ...]]]:
    """Every field of the tree, in the schema's order: its dotted key, value and constraints."""
    for s in dataclasses.fields(config):
        section = getattr(config, s.name)
        for f in dataclasses.fields(section):
            yield f"{s.name}.{f.name}", getattr(section, f.name), constraints_of(f)


def _first_problem(config: Config) -> tuple[str, str] | None:
    """The first broken constraint or rule, as (key, reason): fields in the schema's order, each rule
    right after the field it names as `after`."""
    for dotted, value, constraints in _fields(config):
        if value is not None:
            reason = next((p for c in constraints if (p := c.problem(value)) is not None), None)
            if reason is not None:
                return dotted, reason
        rule = next((r for r in RULES if r.after == dotted and r.broken(config)), None)
        if rule is not None:
            return rule.key, rule.says
    return None


def _validate(config: Config, tree: RawTree) -> None:
    problem = _first_problem(config)
    if problem is not None:
        key, reason = problem
        raise ConfigError(key, _source(tree, key), reason)


# ---------------------------------------------------------------------------------------------------
# Reference documentation, generated from the schema so that the docs cannot drift from the code


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) if a is not type(None) else "unset" for a in get_args(tp))
    if origin is Literal:
        return " | ".join(f'"{a}"' for a in get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(get_args(tp)[0])}"
    if tp is Secret:
        return "secret string"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(tp, str(tp))


def _default_text(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def constraints_text(dotted: str, f: dataclasses.Field[Any]) -> str:
    """What the reference says a field must be: its declared constraints, then the rules naming it."""
    says = [c.says for c in constraints_of(f)] + [r.says for r in RULES if r.key == dotted]
    return "; ".join(dict.fromkeys(says))


def reference_markdown() -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `norm config reference`; `make test` checks that it matches the code. -->",
        "",
        f"Norm reads one TOML file (default `{DEFAULT_PATH}`, or `--config FILE`), then environment",
        "variables `NORM_<SECTION>__<KEY>` (for example `NORM_ETCD__ENDPOINTS`), then",
        "`--set section.key=value` flags; a later source wins. Lists given as text are comma-separated.",
        "Unknown sections or keys are errors. `norm config check FILE` validates a file and exits 2,",
        "naming the key and the source, when something is wrong. The constraints column says what each",
        "key must be, in the words of the error it is refused with.",
        "",
    ]
    for section, cls in _section_types().items():
        hints = typing.get_type_hints(cls)
        lines += [f"## [{section}]", "", "| key | type | default | constraints | meaning |",
                  "| --- | --- | --- | --- | --- |"]
        default = cls()
        for f in dataclasses.fields(cls):
            lines.append(
                f"| `{f.name}` | {_type_name(hints[f.name])} | `{_default_text(getattr(default, f.name))}` "
                f"| {constraints_text(f'{section}.{f.name}', f)} | {f.metadata.get('doc', '')} |"
            )
        lines.append("")
    return "\n".join(lines)
