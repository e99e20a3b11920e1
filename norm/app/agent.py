"""`norm agent`: the services under one TaskGroup, signals, sd_notify, and a bounded graceful stop.

A signal handler only sets a flag. Services see `stopping` and finish; if they have not within
`agent.shutdown_timeout`, or a second SIGTERM or SIGINT comes first, what remains is cancelled. A
service that fails or returns while the agent is not stopping takes the whole agent down with exit
status 1, and systemd restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from norm import __version__
from norm.adapters.etcd import Etcd, EtcdRejected, EtcdTlsFailed
from norm.app.sdnotify import Notifier
from norm.app.settings import Identity, etcd_password
from norm.core.backoff import Backoff
from norm.core.config import Config
from norm.core.errors import Temporary
from norm.core.host import HostRecord, control_prefix
from norm.services.base import Retry, Service, ServiceDied, cancel_and_wait, pause
from norm.services.context import HostContext
from norm.services.holds import Holds
from norm.services.http import HttpEndpoint
from norm.services.leadership import LeaderElection
from norm.services.metrics import Metrics
from norm.services.registration import Registration
from norm.services.watcher import DesiredStateWatcher

if TYPE_CHECKING:
    from norm.adapters.docker import Docker
    from norm.adapters.systemd import Systemd
    from norm.core.notify import Webhook
    from norm.services.balancers import ElbTargets, HaproxyBackends, LoadBalancer
    from norm.services.envfiles import EnvFiles
    from norm.services.executor import Executor
    from norm.services.healer import Healer
    from norm.services.presence import Presence

log = structlog.get_logger("norm.agent")

EXIT_OK = 0
EXIT_SERVICE_FAILED = 1
EXIT_CONFIG = 2

HEALING_STATE = "healing.json"  # in agent.state_dir


class Agent:
    def __init__(self, config: Config, identity: Identity, notifier: Notifier | None = None, *,
                 host_given: frozenset[str] = frozenset()) -> None:
        self.config = config
        self.identity = identity
        # Host metadata: the configuration's, or with aws.use_metadata, the instance's where the
        # configuration is silent (host_given: the [host] keys some source set).
        self.host_given = host_given
        self.environment = config.host.environment
        self.role = config.host.role
        self.instance_id: str | None = None
        self.region = config.aws.region
        self.envfiles: EnvFiles | None = None
        self.notifier = notifier or Notifier()
        self.metrics = Metrics()
        self.stopping = asyncio.Event()
        self.forced = asyncio.Event()  # a second signal: no more waiting for the services to finish
        self.holds = Holds(operator_holds=config.healing.enabled)  # read by the control service
        self._systemd: Systemd | None = None
        self._docker: Docker | None = None
        self.healer: Healer | None = None
        self.executor: Executor | None = None
        self.presence: Presence | None = None

    def _on_signal(self, signum: int) -> None:
        if not self.stopping.is_set():
            log.info("agent.stopping", signal=signal.Signals(signum).name)
            self.stopping.set()
        elif not self.forced.is_set():
            log.warning("agent.stop_forced", signal=signal.Signals(signum).name)
            self.forced.set()

    async def run(self) -> int:
        structlog.contextvars.bind_contextvars(host=self.identity.name)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            return await self._run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def _run(self) -> int:
        log.info("agent.starting", version=__version__, machine_id=self.identity.machine_id, pid=os.getpid())
        problem = await self._env_owner_problem()
        if problem is not None:
            log.error("agent.env_owner_refused", reason=problem)
            return EXIT_CONFIG
        etcd = Etcd(self.config.etcd, password=etcd_password(self.config),
                    on_state=lambda up: self.metrics.etcd_connected.set(1 if up else 0),
                    seed=self.identity.machine_id)
        # Each adapter opened is closed on the way out, the last opened first.
        async with contextlib.AsyncExitStack() as adapters:
            adapters.push_async_callback(etcd.close)  # connected below, retried until etcd answers
            try:
                if not await self._connect(etcd):
                    return EXIT_OK
                if self.config.aws.use_metadata and not await self._read_metadata():
                    return EXIT_OK
                if self._needs_systemd() and not await self._open_systemd(adapters):
                    return EXIT_OK
                if self.config.update.image is not None:
                    from norm.adapters.docker import Docker

                    # Connects lazily: an engine that is down now is retried by each call.
                    self._docker = await adapters.enter_async_context(
                        Docker(self.config.docker.host, pull_timeout=self.config.update.pull_timeout))
                return await self._serve(etcd)
            except EtcdRejected as e:
                log.error("agent.etcd_refused", error=str(e))
                return EXIT_CONFIG

    async def _env_owner_problem(self) -> str | None:
        """Why the environment file cannot be given to env.owner by this process, or None. Tried for
        real (a file created next to env.path and chowned), since what decides it is how the agent
        runs (the unit's capabilities and user namespace), which no configuration check can see."""
        from norm.adapters.files import OwnerRefused, OwnerUnknown, check_give_away, resolve_owner

        env = self.config.env
        if env.bucket is None or env.owner is None:
            return None
        try:
            owner = resolve_owner(env.owner)
            await asyncio.to_thread(check_give_away, Path(env.path).parent, owner)
        except OwnerUnknown as e:
            return f"env.owner: {e}"
        except OwnerRefused as e:
            return (f"env.owner: this agent cannot give {env.path} to {env.owner!r}: {e}. Under "
                    f"deploy/norm.service it has no capability and PrivateUsers=yes maps no user but "
                    f"root: add the drop-in deploy/env-owner.conf (CAP_CHOWN, @chown, PrivateUsers=no), "
                    f"or leave env.owner unset (systemd reads EnvironmentFile= as root, whoever owns "
                    f"the file)")
        except OSError as e:  # the directory itself: the environment file service reports it as it writes
            log.warning("agent.env_owner_unchecked", path=env.path, error=f"{type(e).__name__}: {e.strerror}")
        return None

    def _needs_systemd(self) -> bool:
        return (self.config.healing.enabled or self.config.update.image is not None
                or bool(self.config.lb.groups)
                or (self.config.env.bucket is not None and self.config.env.on_change == "restart"))

    async def _connect(self, etcd: Etcd) -> bool:
        """Wait for etcd (forever, unless stopping). A failed TLS handshake is waited out too, logged
        as an error each time: it is most often the configuration, but an endpoint being restarted or
        replaced, or a clock not yet set at boot, looks the same, and exiting with EXIT_CONFIG would
        leave the host without an agent for good. What is the configuration's fault for certain (a
        certificate file that cannot be read, a password refused, a permission missing) is raised."""
        unreachable, tls_failed = Retry(Backoff(first=0.2, cap=5.0)), Retry(Backoff(first=1.0, cap=30.0))
        while not self.stopping.is_set():
            try:
                # The host's own control keys: a host's etcd role may read them and little else.
                await etcd.check(control_prefix(self.config.keys.prefix, self.identity.machine_id))
                self.metrics.etcd_connected.set(1)
                log.info("agent.etcd_connected", endpoints=list(self.config.etcd.endpoints))
                return True
            except Temporary as e:
                await self._back_off(unreachable, "agent.etcd_unreachable", e)
            except EtcdTlsFailed as e:
                await self._back_off(tls_failed, "agent.etcd_tls_failed", e, level="error")
        return False

    async def _back_off(self, retry: Retry, event: str, error: Exception, level: str = "warning") -> None:
        """After a failed attempt at reaching something the agent needs: say so, and wait (unless
        stopping) before the next."""
        delay = retry.next_delay()
        (log.error if level == "error" else log.warning)(event, error=str(error), retry_in=round(delay, 2))
        await pause(delay, self.stopping)

    async def _open_systemd(self, adapters: contextlib.AsyncExitStack) -> bool:
        """Connect to systemd's manager (forever, unless stopping). Imported only when healing is on:
        a host that does not use D-Bus does not pay for its library."""
        from norm.adapters.systemd import Systemd, SystemdError

        retry = Retry(Backoff(first=0.2, cap=5.0))
        while not self.stopping.is_set():
            systemd = Systemd(self.config.systemd.bus_address, call_timeout=self.config.systemd.call_timeout)
            try:
                await adapters.enter_async_context(systemd)
            except SystemdError as e:
                await self._back_off(retry, "agent.systemd_unreachable", e)
                continue
            self._systemd = systemd
            log.info("agent.systemd_connected", bus=self.config.systemd.bus_address or "system")
            return True
        return False

    def services(self, etcd: Etcd) -> list[Service]:
        c = self.config
        record = HostRecord(
            machine_id=self.identity.machine_id, name=self.identity.name,
            environment=self.environment, role=self.role, agent_version=__version__,
            http=c.http.listen, started_at=round(time.time(), 3), instance_id=self.instance_id)
        self.host = HostContext(etcd, c.keys.prefix, self.identity.machine_id, self.metrics, self.holds,
                                units=c.units.patterns)
        self.registration = Registration(self.host, record)
        self.leadership = LeaderElection(self.host, self.registration, ineligible=self._not_leading())
        self.watcher = DesiredStateWatcher(etcd, c.keys.version, c.keys.environment, self.metrics,
                                           c.agent.resync_interval)
        self.http = HttpEndpoint(c.http.listen, self.metrics, self._readiness)
        self._etcd = etcd
        services: list[Service] = [self.registration, self.leadership, self.watcher, self.http]
        if c.lb.backend != "haproxy" and c.lb.haproxy_backends:
            log.warning("lb.haproxy_backends_ignored", reason='lb.backend is not "haproxy"')
        if self._systemd is not None and c.lb.groups:
            # Before the executor, which takes the host out of the load balancer before a stop.
            self.presence = self._presence_service(self._systemd)
            services += [self.presence] if self.presence is not None else []
        if c.env.bucket is not None:
            services.append(self._envfile_service())
        if self._systemd is not None and self._docker is not None:
            services += self._update_services(self._systemd, self._docker)
        if self._systemd is not None and c.healing.enabled:
            services += self._healing_services(self._systemd)
        return services

    def _not_leading(self) -> str | None:
        """Why this host never campaigns for leadership, or None: the leader runs the rollouts, so
        a host that cannot (no update.image, or not let lead) must never win the election."""
        if not self.config.agent.leader_eligible:
            return "agent.leader_eligible is false"
        if self.config.update.image is None:
            return "update.image is not set: this host runs no updates"
        return None

    def _update_services(self, systemd: Systemd, docker: Docker) -> list[Service]:
        from norm.services.analysis import canary_analyser
        from norm.services.executor import Executor, Hooks
        from norm.services.gate import UpdateGates
        from norm.services.policy import PolicyWatcher
        from norm.services.updater import Updater

        c = self.config
        assert c.update.image is not None
        self.policy = PolicyWatcher(self.host.etcd, c.keys.prefix, c.update, self.metrics,
                                    c.agent.resync_interval)
        gates = UpdateGates(systemd, docker, c, self.metrics)
        self.executor = Executor(self.host, systemd, docker, c.update, self.registration.set_release,
                                 leading=self.leadership.is_leader,
                                 hooks=Hooks(presence=self.presence, gate=gates),
                                 secret_files=(c.env.path,) if c.env.bucket else ())
        self.updater = Updater(self.host, c.update, self.environment, self.leadership, self.watcher,
                               docker.resolve, self.policy,
                               analyse=canary_analyser(c.update.prometheus_url))
        services: list[Service] = [self.policy, self.executor, self.updater]
        if self._not_leading() is None:  # the leader delivers the outbox to the fleet's webhooks
            from norm.services.notifier import Notifier

            policy = self.policy

            def webhooks() -> tuple[Webhook, ...] | None:
                return policy.current().webhooks if policy.synced.is_set() else None

            services.append(Notifier(self.host.etcd, c.keys.prefix, self.leadership, webhooks, self.metrics))
        return services

    def _healing_services(self, systemd: Systemd) -> list[Service]:
        from norm.core.backoff import Backoff as BackoffPolicy
        from norm.core.healing import HealPolicy
        from norm.core.host import units_key
        from norm.services.control import Control
        from norm.services.healer import Healer

        h = self.config.healing
        policy = HealPolicy(
            backoff=BackoffPolicy(first=h.backoff_initial, factor=2.0, cap=h.backoff_max, jitter=0.2),
            budget=h.budget, window=h.window, cooldown=h.cooldown, forget_after=h.forget_after)
        key = units_key(self.config.keys.prefix, self.identity.machine_id)

        async def publish(body: bytes) -> None:
            lease = await self.registration.current_lease()
            await self.host.etcd.put(key, body, lease=lease.id)

        from norm.core.notify import quarantine_notice
        from norm.services.notifier import NoticePoster

        notices = NoticePoster(self.host.etcd, self.config.keys.prefix, self.identity.machine_id)

        def quarantined(unit: str, attempts: int) -> None:
            notices.post(quarantine_notice(self.identity.machine_id, unit, f"{attempts} attempts failed",
                                           time.time(), host=self.identity.name))

        self.healer = Healer(self.host, systemd, policy, resync_interval=h.resync_interval, publish=publish,
                             gate=None if self.executor is None else self.executor.primed,
                             state_file=Path(self.config.agent.state_dir) / HEALING_STATE,
                             quarantined=quarantined)
        control = Control(self.host, systemd, self.healer)
        return [self.healer, control, notices]

    def _presence_service(self, systemd: Systemd) -> Presence | None:
        """Load-balancer presence; None (with the reason logged) when it cannot work here."""
        from norm.services.executor import HOLD_OWNER
        from norm.services.presence import Presence

        balancer: LoadBalancer | None
        balancer = self._haproxy_backends() if self.config.lb.backend == "haproxy" else self._elb_targets()
        if balancer is None:
            return None
        return Presence(systemd, balancer, self.config.lb, self.metrics, holds=self.holds,
                        hold_owner=HOLD_OWNER)

    def _elb_targets(self) -> ElbTargets | None:
        from norm.adapters.elb import Elb
        from norm.core.presence import arn_region
        from norm.services.balancers import ElbTargets

        c = self.config
        regions = sorted({arn_region(g) for g in c.lb.target_groups})
        if len(regions) > 1:
            log.error("lb.presence_off", reason="the target groups are in several regions", regions=regions)
            return None
        # The configuration's, or the one read from instance metadata at start (aws.use_metadata).
        instance_id = c.lb.instance_id or self.instance_id
        if instance_id is None:
            log.error("lb.presence_off", reason="instance metadata gave no instance id" if c.aws.use_metadata
                      else "no instance id: set lb.instance_id, or aws.use_metadata on EC2")
            return None
        # ELBv2 calls go to the target groups' own region, whatever aws.region says.
        elb = Elb(regions[0], endpoint_url=c.aws.endpoint_url, call_timeout=c.aws.call_timeout,
                  metadata_url=c.aws.metadata_url)
        return ElbTargets(elb, instance_id, c.lb.port)

    def _haproxy_backends(self) -> HaproxyBackends | None:
        from norm.adapters.haproxy import NAME, Haproxy
        from norm.services.balancers import HaproxyBackends

        lb = self.config.lb
        # The configuration's server name, or the host's name (checked here: a hostname need not be one).
        server = lb.haproxy_server or self.identity.name
        if not NAME.fullmatch(server):
            log.error("lb.presence_off", reason="the host's name is not an HAProxy server name: set "
                      "lb.haproxy_server")
            return None
        return HaproxyBackends(Haproxy(lb.haproxy_socket), server)

    def _envfile_service(self) -> EnvFiles:
        from norm.adapters.s3 import ObjectStore
        from norm.services.envfiles import EnvFiles

        c = self.config
        store = ObjectStore(region=self.region, endpoint_url=c.aws.endpoint_url,
                            metadata_url=c.aws.metadata_url, timeout=c.aws.call_timeout)
        self.envfiles = EnvFiles(self.host, c.env, store, self.watcher, self.environment,
                                 self.registration.set_env_etag, systemd=self._systemd)
        return self.envfiles

    async def _read_metadata(self) -> bool:
        """Instance id, region (unless configured), and environment and role from the instance's tags
        where the configuration is silent; tried until the service answers (unless stopping). An answer
        that is refused changes nothing. False if the agent is stopping."""
        from norm.adapters.imds import InstanceMetadata, MetadataError
        from norm.core.host import METADATA_TAGS, host_metadata

        aws = self.config.aws
        retry = Retry(Backoff(first=0.5, cap=30.0))
        while not self.stopping.is_set():
            try:
                async with InstanceMetadata(aws.metadata_url, aws.call_timeout) as md:
                    try:
                        self.instance_id = await md.instance_id()
                        self.region = self.region or await md.region()
                    except Temporary:
                        raise
                    except MetadataError as e:
                        self.metrics.rejected_values.labels("instance-metadata").inc()
                        log.error("agent.metadata_refused", error=str(e))
                    wanted = [t for name, tags in METADATA_TAGS.items() if name not in self.host_given
                              for t in tags]
                    tags = {t: await md.tag(t) for t in wanted}
            except Temporary as e:
                await self._back_off(retry, "agent.metadata_unavailable", e)
                continue
            values, refused = host_metadata({"environment": self.environment, "role": self.role},
                                            self.host_given, tags)
            for problem in refused:
                self.metrics.rejected_values.labels("instance-metadata").inc()
                log.error("agent.metadata_refused", error=str(problem))
            self.environment, self.role = values["environment"], values["role"]
            log.info("agent.metadata", instance_id=self.instance_id, region=self.region,
                     environment=self.environment, role=self.role)
            return True
        return False

    def _readiness(self) -> dict[str, bool]:
        return {"etcd": self._etcd.connected, "registered": self.registration.registered.is_set()}

    async def _serve(self, etcd: Etcd) -> int:
        services = self.services(etcd)
        main = asyncio.create_task(self._supervise(services), name="services")
        ended = asyncio.Event()
        main.add_done_callback(lambda _: ended.set())
        await pause(None, ended, self.stopping)
        if not main.done():
            self.notifier.notify("STOPPING=1")
            await pause(self.config.agent.shutdown_timeout, ended, self.forced)
            if main.done():
                main.result()  # an error while stopping is raised as it is
            else:
                log.warning("agent.shutdown_forced", bound=self.config.agent.shutdown_timeout,
                            second_signal=self.forced.is_set())
                await cancel_and_wait([main])
                return EXIT_OK
        error = main.exception()
        if error is not None:
            causes = error.exceptions if isinstance(error, BaseExceptionGroup) else (error,)
            for e in causes:
                log.error("agent.service_died", error=str(e))
            self.notifier.notify("STOPPING=1")
            if not all(isinstance(e, ServiceDied) for e in causes):
                raise error
            return EXIT_SERVICE_FAILED
        log.info("agent.stopped")
        return EXIT_OK

    async def _supervise(self, services: list[Service]) -> None:
        async with asyncio.TaskGroup() as tg:
            for svc in services:
                tg.create_task(self._guard(svc), name=svc.name)
            tg.create_task(self._guard_aux("ready", self._ready()), name="ready")
            if self.notifier.watchdog_interval:
                tg.create_task(self._guard_aux("watchdog", self._watchdog(self.notifier.watchdog_interval)),
                               name="watchdog")

    async def _guard(self, svc: Service) -> None:
        structlog.contextvars.bind_contextvars(service=svc.name)
        try:
            await svc.run(self.stopping)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("service.failed")
            raise ServiceDied(f"service {svc.name} failed: {type(e).__name__}: {e}") from e
        if not self.stopping.is_set():
            raise ServiceDied(f"service {svc.name} returned while the agent was running")

    async def _guard_aux(self, name: str, coro: object) -> None:
        try:
            await coro  # type: ignore[misc]
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise ServiceDied(f"{name} failed: {type(e).__name__}: {e}") from e

    async def _ready(self) -> None:
        await self.registration.registered.wait()
        await self.http.bound.wait()
        if self.executor is not None:
            await self.executor.primed.wait()
        if self.healer is not None:
            await self.healer.synced.wait()
        self.notifier.notify("READY=1")
        log.info("agent.ready")

    async def _watchdog(self, interval: float) -> None:
        # Pinged from the loop itself: a blocked loop or a dead TaskGroup stops the pings.
        while not await pause(interval, self.stopping):
            self.notifier.notify("WATCHDOG=1")
