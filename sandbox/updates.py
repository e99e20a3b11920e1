"""Reading and driving fleet updates on a sandbox fleet from the outside, as an operator with etcdctl
would: set the desired version, read the rollout header, record, reports and ledger, and wait for a
rollout to end. Used by the demo, the fleet tests and the benchmarks."""

from __future__ import annotations

import base64
import json
from typing import Any

from sandbox.fleet import Fleet
from sandbox.procs import SandboxError, wait_for

PREFIX = "/norm"
VERSION_KEY = "/djed-version"
TERMINAL = ("done", "failed", "superseded", "halted", "rolled_back")


def put(fleet: Fleet, key: str, value: str) -> int:
    """Put a value exactly as given (`etcdctl put` reads it from its standard input, so that any value
    fits, a trailing newline included); return the revision it was written at."""
    if value:
        out = json.loads(fleet.etcdctl("put", "-w", "json", key, input=value))
    else:  # etcdctl reads no empty value from its input
        out = json.loads(fleet.etcdctl("put", "-w", "json", key, ""))
    return int(out["header"]["revision"])


def set_version(fleet: Fleet, tag: str) -> int:
    return put(fleet, VERSION_KEY, tag)


def get_kvs(fleet: Fleet, key: str, prefix: bool = False) -> list[dict[str, Any]]:
    """[{key, value (bytes), mod_revision, create_revision}] as etcd holds them."""
    args = ["get", "-w", "json", key] + (["--prefix"] if prefix else [])
    out = json.loads(fleet.etcdctl(*args))
    return [{"key": base64.b64decode(kv["key"]).decode(), "value": base64.b64decode(kv.get("value", "")),
             "mod_revision": int(kv["mod_revision"]), "create_revision": int(kv["create_revision"])}
            for kv in out.get("kvs", [])]


def get_json(fleet: Fleet, key: str) -> Any:
    kvs = get_kvs(fleet, key)
    return json.loads(kvs[0]["value"]) if kvs else None


def header(fleet: Fleet) -> dict[str, Any] | None:
    value = get_json(fleet, f"{PREFIX}/rollout")
    return value if isinstance(value, dict) else None


def record(fleet: Fleet, revision: int) -> dict[str, Any] | None:
    return get_json(fleet, f"{PREFIX}/rollouts/{revision}/record") or get_json(
        fleet, f"{PREFIX}/history/{revision:012d}")


def reports(fleet: Fleet, revision: int) -> dict[str, list[dict[str, Any]]]:
    """The reports of a rollout by kind: [{name, value (decoded JSON), mod_revision}], `name` the
    machine id (pulled, stopped, started) or the step (migrated, claim). From the hosts' own ranges
    (`reports/<mid>/<rev12>/...`), the claims (`claims/<rev12>/<step>`), and the keys of the previous
    layout under the rollout's prefix (`rollouts/<rev>/<kind>/<name>`)."""
    out: dict[str, list[dict[str, Any]]] = {}

    def add(kind: str, name: str, kv: dict[str, Any]) -> None:
        out.setdefault(kind, []).append({"name": name, "value": json.loads(kv["value"]),
                                         "mod_revision": kv["mod_revision"]})

    rev12 = f"{revision:012d}"
    for kv in get_kvs(fleet, f"{PREFIX}/reports/", prefix=True):
        mid, _, rest = kv["key"].removeprefix(f"{PREFIX}/reports/").partition("/")
        rev, _, rest = rest.partition("/")
        kind, _, step = rest.partition("/")
        if rev == rev12 and kind:
            add(kind, step if kind == "migrated" else mid, kv)
    claims = f"{PREFIX}/claims/{rev12}/"
    for kv in get_kvs(fleet, claims, prefix=True):
        add("claim", kv["key"].removeprefix(claims), kv)
    base = f"{PREFIX}/rollouts/{revision}/"  # the previous layout
    for kv in get_kvs(fleet, base, prefix=True):
        kind, _, name = kv["key"].removeprefix(base).partition("/")
        if name:
            add(kind, name, kv)
    for found in out.values():
        found.sort(key=lambda r: r["mod_revision"])
    return out


def ledger(fleet: Fleet) -> list[dict[str, Any]]:
    return [json.loads(kv["value"]) for kv in get_kvs(fleet, f"{PREFIX}/ledger/", prefix=True)]


def history(fleet: Fleet) -> list[dict[str, Any]]:
    return [json.loads(kv["value"]) for kv in get_kvs(fleet, f"{PREFIX}/history/", prefix=True)]


def wait_phase(fleet: Fleet, revision: int, phases: tuple[str, ...] = TERMINAL,
               timeout: float = 120.0) -> dict[str, Any]:
    """Wait until the header shows rollout `revision` (or a later one) in one of `phases`."""
    seen: dict[str, Any] = {}

    def reached() -> bool:
        h = header(fleet)
        if h is None:
            return False
        seen.clear()
        seen.update(h)
        return int(h["revision"]) > revision or (int(h["revision"]) == revision and h["phase"] in phases)

    try:
        wait_for(reached, timeout=timeout, what=f"rollout {revision} in {'/'.join(phases)}", interval=0.05)
    except SandboxError:
        raise SandboxError(f"rollout {revision} did not reach {'/'.join(phases)} in {timeout:.0f}s; "
                           f"the header says {seen}") from None
    return dict(seen)


def deploy(fleet: Fleet, tag: str, timeout: float = 180.0) -> dict[str, Any]:
    """Set the desired version and wait for its rollout to end; the final header."""
    revision = set_version(fleet, tag)
    h = wait_phase(fleet, revision, timeout=timeout)
    if int(h["revision"]) != revision:
        raise SandboxError(f"rollout {revision} of {tag} was overtaken by rollout {h['revision']}")
    return h
