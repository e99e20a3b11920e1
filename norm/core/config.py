"""The configuration: one frozen tree, built once from layered sources and validated as a whole.

Sources, later ones winning: the TOML file, then `NORM_<SECTION>__<KEY>` environment variables, then
`--set section.key=value` flags. Reading the sources is the shell's job; this module only turns the
merged raw values into a `Config`, or raises `ConfigError` naming the key and the source.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

from norm.core.errors import ConfigError
from norm.core.secret import Secret

DEFAULT_PATH = "/etc/norm/norm.toml"
ENV_PREFIX = "NORM_"


def _doc(text: str, **kw: Any) -> Any:
    return field(metadata={"doc": text}, **kw)


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...] = _doc(
        "etcd client URLs (http:// or https://); the agent fails over between them.",
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
    dial_timeout: float = _doc("Seconds to wait for a connection to etcd.", default=5.0)
    request_timeout: float = _doc("Seconds any single etcd request may take.", default=5.0)
    keepalive_time: float = _doc(
        "Seconds between gRPC keepalive pings (etcd refuses pings more often than every 5 s).",
        default=10.0)
    keepalive_timeout: float = _doc("Seconds without a ping answer before the connection is dead.",
                                    default=5.0)
    lease_ttl: int = _doc("TTL in seconds of the agent's lease (host registration, leadership).",
                          default=10)
    failover_after: int = _doc(
        "Requests failing in a row on one etcd member (unavailable, timed out) after which the agent "
        "moves to the next endpoint; a member that says it has no leader is left at once.",
        default=2)


@dataclass(frozen=True)
class KeysConfig:
    version: str = _doc("Key holding the desired image tag.", default="/djed-version")
    environment: str = _doc("Key naming the environment file.", default="/djed-environment")
    prefix: str = _doc("Prefix under which Norm keeps everything of its own.", default="/norm")


@dataclass(frozen=True)
class HostConfig:
    machine_id_path: str = _doc("File holding this host's machine id.", default="/etc/machine-id")
    machine_id: str | None = _doc("Machine id to use instead of reading machine_id_path.", default=None)
    name: str | None = _doc("Display name of the host; the system's hostname when unset.", default=None)
    environment: str = _doc("Environment this host serves (prod, stage, test, ...).", default="prod")
    role: str = _doc("Role of this host (django, celery, ...).", default="app")


@dataclass(frozen=True)
class UnitsConfig:
    patterns: tuple[str, ...] = _doc(
        "systemd unit name patterns (fnmatch) that Norm manages.", default=("djed*.service",))


@dataclass(frozen=True)
class SystemdConfig:
    bus_address: str | None = _doc("D-Bus address of the systemd manager; the system bus when unset.",
                                   default=None)
    call_timeout: float = _doc("Seconds a systemd call or job (start, stop) may take.", default=30.0)


@dataclass(frozen=True)
class HealingConfig:
    enabled: bool = _doc("Heal the managed units when they fail.", default=True)
    backoff_initial: float = _doc(
        "Seconds before the second attempt of a failure episode (the first is immediate); doubles "
        "with each attempt.", default=1.0)
    backoff_max: float = _doc("Longest wait between two attempts, in seconds.", default=60.0)
    budget: int = _doc("Attempts allowed per unit in any window; then the unit is quarantined.",
                       default=5)
    window: float = _doc("Seconds of the window the budget counts attempts in.", default=600.0)
    cooldown: float = _doc("Seconds a quarantine lasts unless an operator releases the unit first.",
                           default=1800.0)
    forget_after: float = _doc("Seconds a unit must stay healthy before its failures are forgotten.",
                               default=300.0)
    resync_interval: float = _doc("Seconds between safety-net re-reads of every unit's state.",
                                  default=60.0)


@dataclass(frozen=True)
class DockerConfig:
    host: str = _doc("Docker engine address.", default="unix:///var/run/docker.sock")


@dataclass(frozen=True)
class UpdateConfig:
    image: str | None = _doc(
        "Image repository the desired tag names (registry.example.com/djed/app); update mode is off "
        "while unset.", default=None)
    release_file: str = _doc(
        "The release file Norm writes for the units' EnvironmentFile= (image pinned by digest).",
        default="/run/norm/release.env")
    roles: tuple[str, ...] = _doc(
        "Roles that take part in updates (hosts of the leader's environment); every role when empty.",
        default=())
    steps: tuple[str, ...] = _doc(
        "One-off commands run once per version by the leader in the new image, in order, between the "
        "fleet's stop and start (migrations, then static files).", default=("migrate", "collectstatic"))
    steps_env_file: str | None = _doc(
        "Environment file (KEY=VALUE lines) given to the one-off commands.", default=None)
    steps_network: str = _doc("Docker network of the one-off commands' containers.", default="host")
    steps_mounts: tuple[str, ...] = _doc(
        "Bind mounts of the one-off commands' containers, as host_path:container_path.", default=())
    compatible: tuple[str, ...] = _doc(
        "Tags or digests safe to set the fleet back to without a down-migration.", default=())
    pull_timeout: float = _doc("Seconds every host has to pull the new image (the pull barrier).",
                               default=600.0)
    stop_timeout: float = _doc("Seconds every host has to stop the units.", default=120.0)
    migration_timeout: float = _doc("Seconds one one-off command may run before it is killed.",
                                    default=1800.0)
    start_timeout: float = _doc("Seconds every host has to start the new release.", default=300.0)
    on_trouble: Literal["exclude", "abort"] = _doc(
        "What happens to a rollout when a host dies, fails to pull or is too slow before the cut-over: "
        "exclude the host (it gets the release later), or abort the rollout.", default="exclude")
    history: int = _doc("Finished rollouts kept in etcd.", default=20)


@dataclass(frozen=True)
class AwsConfig:
    region: str | None = _doc("AWS region; from instance metadata when unset.", default=None)
    endpoint_url: str | None = _doc(
        "Endpoint of S3, ELBv2 and EC2 instead of AWS's own (a private endpoint, or a test server).",
        default=None)
    metadata_url: str = _doc("Instance metadata service (IMDSv2: token-based).",
                             default="http://169.254.169.254")
    use_metadata: bool = _doc(
        "Read the instance id, the region, and the environment and role from the instance tags "
        "environment (or Environment) and role (or Role) from instance metadata (the configuration "
        "wins where both speak).", default=False)
    call_timeout: float = _doc("Seconds an AWS or instance metadata call may take.", default=10.0)


@dataclass(frozen=True)
class EnvFileConfig:
    bucket: str | None = _doc(
        "S3 bucket holding the environment files; environment files are off while unset.", default=None)
    key: str = _doc("Object key of the environment file; {environment} is replaced by the value of "
                    "keys.environment in etcd (the host's environment while that key is absent).",
                    default="{environment}.env")
    path: str = _doc("Where the environment file is written, for the units' EnvironmentFile=.",
                     default="/run/norm/app.env")
    owner: str | None = _doc(
        "Owner of the written file, as user or user:group; root when unset. Under the shipped unit it "
        "needs the drop-in deploy/env-owner.conf: the agent tries a chown at start and "
        "exits 2 when it is refused.", default=None)
    interval: float = _doc("Seconds between checks of the object (conditional GET on its ETag).",
                           default=60.0)
    on_change: Literal["restart", "next_rollout"] = _doc(
        "When the file changes: restart the units using it one at a time, each active again before the "
        "next, or leave them for the next rollout.", default="restart")
    units: tuple[str, ...] = _doc("Units using the file (restarted on a change); every managed unit "
                                  "when empty.", default=())


@dataclass(frozen=True)
class LbConfig:
    target_groups: tuple[str, ...] = _doc(
        "ELBv2 target group ARNs this host joins while its web unit is healthy; presence is off while "
        "empty.", default=())
    instance_id: str | None = _doc("The host's EC2 instance id; from instance metadata when unset.",
                                   default=None)
    unit: str = _doc("The unit whose health puts the host in the target groups.",
                     default="djed-web.service")
    health_url: str | None = _doc(
        "URL that must answer 2xx before the host is registered (checked after the unit is active).",
        default=None)
    health_timeout: float = _doc("Seconds one try of the health URL may take.", default=2.0)
    health_give_up: float = _doc(
        "Seconds a run of the unit may take to answer its health URL before presence gives up on that "
        "run (it stays out of the target groups until the unit runs again).", default=300.0)
    port: int | None = _doc("Port registered in the target groups; the groups' own when unset.",
                            default=None)
    drain_timeout: float = _doc(
        "Seconds to wait for a deregistered target to finish draining before stopping its units; in "
        "update mode, shorter than update.stop_timeout (match the target groups' deregistration delay).",
        default=60.0)
    recheck_interval: float = _doc(
        "Seconds between reads of the host's state in each target group, so that a registration "
        "changed by someone else is put back as presence wants it; 0 turns the reads off.", default=60.0)


@dataclass(frozen=True)
class HttpConfig:
    listen: str = _doc("host:port of the /metrics, /healthz and /readyz endpoint.",
                       default="127.0.0.1:9847")


@dataclass(frozen=True)
class AgentConfig:
    shutdown_timeout: float = _doc(
        "Seconds a graceful stop may take before running work is cancelled; keep it below the "
        "unit's TimeoutStopSec.", default=20.0)
    resync_interval: float = _doc("Seconds between safety-net re-reads of the watched keys.",
                                  default=300.0)
    leader_eligible: bool = _doc(
        "Campaign for fleet leadership. Set it false on hosts whose etcd user has no norm-leader role "
        "(see `norm access`): they follow rollouts but never lead.", default=True)
    state_dir: str = _doc(
        "Directory of what the agent keeps across its restarts and the host's (healing.json: each "
        "unit's healing attempts, backoff and quarantine). The unit's StateDirectory=.",
        default="/var/lib/norm")


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


def _coerce(tp: Any, raw: Raw, key: str) -> object:
    value = raw.value
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or value == "":
            return None
        return _coerce(args[0], raw, key)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(key, raw.source, f"must be one of {', '.join(map(str, choices))}")
        return value
    if origin is tuple:
        (item,) = get_args(tp)[:1]
        if isinstance(value, str):
            items: list[object] = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            raise ConfigError(key, raw.source, "expected a list")
        return tuple(_coerce(item, Raw(v, raw.source), key) for v in items)
    if tp is Secret:
        if not isinstance(value, str):
            raise ConfigError(key, raw.source, "expected a string")
        return Secret(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(key, raw.source, "expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(key, raw.source, "expected a whole number")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,18}", value.strip()):
            return int(value)
        raise ConfigError(key, raw.source, "expected a whole number")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(key, raw.source, "expected a number")
        try:
            number = float(value) if isinstance(value, int | float | str) else math.nan
        except (ValueError, OverflowError):
            number = math.nan
        if not math.isfinite(number):
            raise ConfigError(key, raw.source, "expected a number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, raw.source, "expected a string")
        return value
    raise TypeError(f"unsupported config type {tp!r}")  # a bug in the schema, not in the input


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
# Whole-tree validation


_UNIT_PATTERN = re.compile(r"[A-Za-z0-9:_.\\@*?\[\]!-]+\.(service|socket|timer|target|path|mount)")
_MACHINE_ID = re.compile(r"[0-9a-f]{32}")
_KEY = re.compile(r"/[\x21-\x7e]*")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_AWS_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_OWNER = re.compile(r"[a-z_][a-z0-9_-]{0,31}(:[a-z_][a-z0-9_-]{0,31})?")
_TARGET_GROUP = re.compile(
    r"arn:aws[a-z-]*:elasticloadbalancing:[a-z0-9-]+:[0-9]{12}:targetgroup/[A-Za-z0-9-]{1,32}/[0-9a-f]{16}")
_INSTANCE_ID = re.compile(r"i-[0-9a-f]{8}([0-9a-f]{9})?")


def _source(tree: RawTree, dotted: str) -> str:
    section, _, key = dotted.partition(".")
    raw = tree.get(section, {}).get(key)
    return raw.source if raw else "default"


def parse_listen(value: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); raises ValueError with the reason."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected host:port with a port from 1 to 65535")
    host = host.strip("[]")
    if not host:
        raise ValueError("expected host:port with a host")
    return host, int(port)


_IMAGE_REPO = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")


def _is_http_url(url: str, *, with_host: bool = True) -> bool:
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and (bool(parts.hostname) or not with_host)
    except ValueError:  # an unbalanced [ or ] in the host
        return False


def step_name(command: str) -> str:
    """A one-off command's name in the ledger and in keys: its words, lowercased, joined by '-'."""
    return re.sub(r"[^a-z0-9_]+", "-", command.lower()).strip("-_")[:63].strip("-_")


def _validate(config: Config, tree: RawTree) -> None:
    def fail(dotted: str, reason: str) -> typing.NoReturn:
        raise ConfigError(dotted, _source(tree, dotted), reason)

    etcd = config.etcd
    if not etcd.endpoints:
        fail("etcd.endpoints", "at least one endpoint is needed")
    schemes = set()
    for ep in etcd.endpoints:
        try:
            parts = urlsplit(ep)
            usable = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port is not None
        except ValueError:
            usable = False
        if not usable:
            fail("etcd.endpoints", "each endpoint must look like http://host:port or https://host:port")
        if parts.path not in ("", "/"):
            fail("etcd.endpoints", "an endpoint has no path")
        schemes.add(parts.scheme)
    if len(schemes) > 1:
        fail("etcd.endpoints", "endpoints must all be http or all https")
    if (etcd.cert_file is None) != (etcd.key_file is None):
        fail("etcd.cert_file" if etcd.cert_file is None else "etcd.key_file",
             "cert_file and key_file go together")
    if etcd.cert_file and "https" not in schemes:
        fail("etcd.cert_file", "client certificates need https endpoints")
    if etcd.password is not None and etcd.password_file is not None:
        fail("etcd.password_file", "set password or password_file, not both")
    if (etcd.password is not None or etcd.password_file is not None) and not etcd.username:
        fail("etcd.username", "a password needs a username")
    if etcd.username and etcd.password is None and etcd.password_file is None:
        fail("etcd.password", "a username needs password or password_file")
    for name in ("dial_timeout", "request_timeout", "keepalive_timeout"):
        if not 0 < getattr(etcd, name) <= 300:
            fail(f"etcd.{name}", "must be more than 0 and at most 300 seconds")
    if not 5 <= etcd.keepalive_time <= 3600:
        fail("etcd.keepalive_time", "must be from 5 to 3600 seconds (etcd refuses faster pings)")
    if not 3 <= etcd.lease_ttl <= 3600:
        fail("etcd.lease_ttl", "must be from 3 to 3600 seconds")
    if not 1 <= etcd.failover_after <= 100:
        fail("etcd.failover_after", "must be from 1 to 100")
    if etcd.request_timeout >= etcd.lease_ttl:
        fail("etcd.request_timeout", "must be shorter than etcd.lease_ttl")

    keys = config.keys
    for name in ("version", "environment", "prefix"):
        value = getattr(keys, name)
        if not _KEY.fullmatch(value) or value.endswith("/"):
            fail(f"keys.{name}", "must start with /, hold printable ASCII without spaces, not end with /")
    prefix = keys.prefix + "/"
    for name in ("version", "environment"):
        if getattr(keys, name).startswith(prefix):
            fail(f"keys.{name}", "must not live under keys.prefix, which Norm owns")

    host = config.host
    if host.machine_id is not None and not _MACHINE_ID.fullmatch(host.machine_id):
        fail("host.machine_id", "must be 32 lowercase hex digits, as in /etc/machine-id")
    for name in ("environment", "role"):
        if not _LABEL.fullmatch(getattr(host, name)):
            fail(f"host.{name}", "must be 1 to 63 letters, digits, '_', '.' or '-'")
    if host.name is not None and not _LABEL.fullmatch(host.name):
        fail("host.name", "must be 1 to 63 letters, digits, '_', '.' or '-'")

    if not config.units.patterns:
        fail("units.patterns", "at least one pattern is needed")
    for pattern in config.units.patterns:
        if not _UNIT_PATTERN.fullmatch(pattern) or len(pattern) > 255:
            fail("units.patterns", "each pattern must be a systemd unit name such as 'djed-*.service'")

    try:
        host_part, _ = parse_listen(config.http.listen)
    except ValueError as e:
        fail("http.listen", str(e))
    if host_part != "localhost":
        try:
            ipaddress.ip_address(host_part)
        except ValueError:
            fail("http.listen", "the host must be an IP address or localhost")

    try:
        docker_scheme = urlsplit(config.docker.host).scheme
    except ValueError:
        docker_scheme = ""
    if docker_scheme not in ("unix", "tcp", "http", "https"):
        fail("docker.host", "must be unix:///path or tcp://host:port")

    if not 0 < config.systemd.call_timeout <= 600:
        fail("systemd.call_timeout", "must be more than 0 and at most 600 seconds")
    if config.systemd.bus_address is not None and ":" not in config.systemd.bus_address:
        fail("systemd.bus_address", "must be a D-Bus address such as unix:path=/run/dbus/system_bus_socket")
    heal = config.healing
    if not 0 < heal.backoff_initial <= heal.backoff_max <= 86400:
        fail("healing.backoff_initial", "must be more than 0 and at most healing.backoff_max (<= 86400)")
    if not 1 <= heal.budget <= 1000:
        fail("healing.budget", "must be from 1 to 1000 attempts")
    for name in ("window", "cooldown", "forget_after"):
        if not 0 < getattr(heal, name) <= 7 * 86400:
            fail(f"healing.{name}", "must be more than 0 and at most a week, in seconds")
    if heal.cooldown < heal.window:
        fail("healing.cooldown", "must be at least healing.window (a quarantine starts a fresh budget)")
    if not 1 <= heal.resync_interval <= 86400:
        fail("healing.resync_interval", "must be from 1 to 86400 seconds")

    up = config.update
    if up.image is not None and not _IMAGE_REPO.fullmatch(up.image):
        fail("update.image", "must be an image repository without tag or digest, such as "
             "registry.example.com/djed/app")
    if not up.release_file.startswith("/") or up.release_file.endswith("/"):
        fail("update.release_file", "must be an absolute file path")
    for role in up.roles:
        if not _LABEL.fullmatch(role):
            fail("update.roles", "each role must be 1 to 63 letters, digits, '_', '.' or '-'")
    names = [step_name(c) for c in up.steps]
    if any(not n for n in names) or len(set(names)) != len(names):
        fail("update.steps", "each step must be a distinct, non-empty command")
    for mount in up.steps_mounts:
        src, sep, dst = mount.partition(":")
        if not sep or not src.startswith("/") or not dst.startswith("/"):
            fail("update.steps_mounts", "each mount must be /host/path:/container/path")
    for name in ("pull_timeout", "stop_timeout", "start_timeout", "migration_timeout"):
        if not 0 < getattr(up, name) <= 86400:
            fail(f"update.{name}", "must be more than 0 and at most 86400 seconds")
    if not 1 <= up.history <= 1000:
        fail("update.history", "must be from 1 to 1000 rollouts")

    aws = config.aws
    for name in ("endpoint_url", "metadata_url"):
        url = getattr(aws, name)
        if url is not None and not _is_http_url(url):
            fail(f"aws.{name}", "must be an http:// or https:// URL")
    if aws.region is not None and not _AWS_REGION.fullmatch(aws.region):
        fail("aws.region", "must be a region name such as eu-west-1")
    if not 0 < aws.call_timeout <= 300:
        fail("aws.call_timeout", "must be more than 0 and at most 300 seconds")
    env = config.env
    if env.bucket is not None and not _BUCKET.fullmatch(env.bucket):
        fail("env.bucket", "must be an S3 bucket name (3 to 63 of a-z 0-9 . -)")
    if not env.key or env.key.startswith("/") or env.key.replace("{environment}", "").count("{"):
        fail("env.key", "must be an object key, with {environment} as its only placeholder")
    if not env.path.startswith("/") or env.path.endswith("/"):
        fail("env.path", "must be an absolute file path")
    if env.owner is not None and not _OWNER.fullmatch(env.owner):
        fail("env.owner", "must be user or user:group")
    if not 1 <= env.interval <= 86400:
        fail("env.interval", "must be from 1 to 86400 seconds")
    for unit in env.units:
        if not _UNIT_PATTERN.fullmatch(unit):
            fail("env.units", "each must be a systemd unit name such as 'djed-web.service'")
    lb = config.lb
    for arn in lb.target_groups:
        if not _TARGET_GROUP.fullmatch(arn):
            fail("lb.target_groups", "each must be a target group ARN "
                 "(arn:aws:elasticloadbalancing:REGION:ACCOUNT:targetgroup/NAME/ID)")
    if lb.instance_id is not None and not _INSTANCE_ID.fullmatch(lb.instance_id):
        fail("lb.instance_id", "must be an EC2 instance id such as i-0123456789abcdef0")
    if not _UNIT_PATTERN.fullmatch(lb.unit):
        fail("lb.unit", "must be a systemd unit name such as 'djed-web.service'")
    if lb.health_url is not None and not _is_http_url(lb.health_url, with_host=False):
        fail("lb.health_url", "must be an http:// or https:// URL")
    if lb.port is not None and not 1 <= lb.port <= 65535:
        fail("lb.port", "must be a port from 1 to 65535")
    if not 0 <= lb.drain_timeout <= 3600:
        fail("lb.drain_timeout", "must be from 0 to 3600 seconds")
    if not 0.1 <= lb.health_timeout <= 60:
        fail("lb.health_timeout", "must be from 0.1 to 60 seconds")
    if not lb.health_timeout <= lb.health_give_up <= 86400:
        fail("lb.health_give_up", "must be from lb.health_timeout to 86400 seconds")
    if lb.recheck_interval != 0 and not 1 <= lb.recheck_interval <= 86400:
        fail("lb.recheck_interval", "must be 0 (off) or from 1 to 86400 seconds")
    if lb.target_groups and up.image is not None and lb.drain_timeout >= up.stop_timeout:
        fail("lb.drain_timeout", "must be shorter than update.stop_timeout: an update's stop waits for "
             "the draining")

    if not 0 < config.agent.shutdown_timeout <= 600:
        fail("agent.shutdown_timeout", "must be more than 0 and at most 600 seconds")
    if not 1 <= config.agent.resync_interval <= 86400:
        fail("agent.resync_interval", "must be from 1 to 86400 seconds")
    if not config.agent.state_dir.startswith("/"):
        fail("agent.state_dir", "must be an absolute directory path")


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
        "naming the key and the source, when something is wrong.",
        "",
    ]
    for section, cls in _section_types().items():
        hints = typing.get_type_hints(cls)
        lines += [f"## [{section}]", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        default = cls()
        for f in dataclasses.fields(cls):
            lines.append(
                f"| `{f.name}` | {_type_name(hints[f.name])} | `{_default_text(getattr(default, f.name))}` "
                f"| {f.metadata.get('doc', '')} |"
            )
        lines.append("")
    return "\n".join(lines)
