"""How the health gate's shell reads its settings (no I/O: the adapters are made, never opened)."""

from __future__ import annotations

from norm.adapters.docker import Docker
from norm.adapters.systemd import Systemd
from norm.core import config as cfg
from norm.core.record import Gate
from norm.services.gate import HealthGate, container_of

WEB, API, WORKER = "djed-web.service", "djed-api.service", "djed-worker.service"


def test_containers_are_named_after_their_units() -> None:
    assert container_of(WEB) == "djed-web"
    assert container_of("app@1.service") is None  # '@' is no container name's
    assert container_of("djed.timer") is None
    assert container_of("x.service") is None  # one character: too short for the engine


def test_the_gate_of_an_update_as_the_host_config_sets_it() -> None:
    config = cfg.build(cfg.raw_from_flags([
        f"update.health_checks={API}=http://127.0.0.1:8001/healthz?token=abcd",
        "lb.health_url=http://127.0.0.1:8000/healthz",
        f"update.health_containers={API}=api-container,{WORKER}="]))
    gate = HealthGate.for_update(Systemd("unix:path=/nonexistent"), Docker("unix:///nonexistent"), config,
                                 [WEB, API, WORKER], Gate(min_healthy=4.0, healthy_deadline=40.0))
    assert gate.health_urls == {WEB: "http://127.0.0.1:8000/healthz",
                                API: "http://127.0.0.1:8001/healthz?token=abcd"}
    assert gate.containers == {WEB: "djed-web", API: "api-container"}
    assert (gate.spec.min_healthy, gate.spec.healthy_deadline) == (4.0, 40.0)
    assert gate.spec.with_url == {WEB, API} and gate.spec.with_container == {WEB, API}


def test_without_docker_no_container_is_checked() -> None:
    gate = HealthGate(Systemd("unix:path=/nonexistent"), None, units=[WEB], health_urls={WEB: None},
                      min_healthy=1, healthy_deadline=2)
    assert gate.containers == {} and gate.health_urls == {}
    assert gate.spec.with_url == frozenset() and gate.spec.with_container == frozenset()
