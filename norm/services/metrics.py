"""Norm's metrics, on one explicit registry that the agent owns and the HTTP endpoint serves."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from norm import __version__
from norm.core.record import Phase, Release

# The values of norm_rollout_phase's `phase` label: every phase, and "none" before any rollout.
PHASES = ("none", *(p.value for p in Phase))


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        self.build_info = Info("norm_build", "Norm's version.", registry=r)
        self.build_info.info({"version": __version__})
        self.etcd_connected = Gauge("norm_etcd_connected", "1 while etcd answers this agent.",
                                    registry=r)
        self.host_registered = Gauge("norm_host_registered",
                                     "1 while this host's record is in etcd on a live lease.", registry=r)
        self.leader = Gauge("norm_leader", "1 while this agent holds fleet leadership.", registry=r)
        self.watch_events = Counter("norm_watch_events_total", "Changes seen on watched etcd keys.",
                                    ["key"], registry=r)
        self.watch_resyncs = Counter("norm_watch_resyncs_total",
                                     "Watches that re-listed after their revision was compacted.",
                                     ["key"], registry=r)
        self.rejected_values = Counter("norm_rejected_values_total",
                                       "Values read from outside that were refused.", ["key"],
                                       registry=r)
        self.unit_active = Gauge("norm_unit_active", "1 while a managed unit is active.", ["unit"],
                                 registry=r)
        self.heal_attempts = Counter("norm_heal_attempts_total",
                                     "Healing regimens run (stop, reset, start), by outcome.",
                                     ["unit", "result"], registry=r)
        self.heal_seconds = Histogram(
            "norm_heal_seconds", "From a unit's failure seen to the unit active again.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800), registry=r)
        self.units_quarantined = Gauge("norm_units_quarantined",
                                       "Managed units Norm has stopped trying to heal.", registry=r)
        self.control_pending = Gauge(
            "norm_control_pending", "Operator requests (units stop/start, heal lift) this agent has "
            "not carried out yet; above 0 for long, see `norm units` and control.action_failed.", registry=r)
        self.rollout_phase = Gauge(
            "norm_rollout_phase", "1 for the phase of the current rollout as this agent last saw it, 0 for "
            "every other phase (none, resolve, pull, stop, migrate, start, roll, done, failed, superseded, "
            "halted, rolled_back).", ["phase"], registry=r)
        self.show_phase(None)
        self.release_info = Gauge(
            "norm_release_info", "1, labelled with the release this host's units run (its release file); "
            "no series before the host has run one.", ["tag", "digest"], registry=r)
        self._release: Release | None = None
        self.rollout_phase_seconds = Histogram(
            "norm_rollout_phase_seconds", "How long each phase of a rollout took (observed by the leader).",
            ["phase"], buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=r)
        self.pull_seconds = Histogram(
            "norm_pull_seconds", "This host's image pulls for rollouts, from asked to pulled.",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=r)
        self.barrier_hosts = Gauge("norm_barrier_hosts",
                                   "Hosts of the current pull barrier by state (leader only).",
                                   ["state"], registry=r)
        self.rollout_batch = Gauge(
            "norm_rollout_batch", "Batches of the current rolling update (leader only), by state: total, "
            "passed (the one moving is passed + 1), and hosts moving now.", ["state"], registry=r)
        self.rollout_rollbacks = Counter(
            "norm_rollout_rollbacks_total", "Rollouts this agent rolled back as leader (a host failing its "
            "health gate, a batch without progress in time, or an abort).", registry=r)
        self.migrations = Counter("norm_migrations_total",
                                  "One-off steps (migrations, static files) this host ran, by result.",
                                  ["result"], registry=r)
        self.rollouts = Counter("norm_rollouts_total",
                                "Rollouts this agent ended as leader, by outcome (done, failed, superseded, "
                                "halted, rolled_back); an unknown tag or a refused value is a failed one.",
                                ["outcome"], registry=r)
        self.lease_lost = Counter("norm_lease_lost_total", "Leases this agent could not keep alive.",
                                  registry=r)
        self.lb_registered = Gauge("norm_lb_registered",
                                   "1 while this host is registered in the group (ELBv2 target group, "
                                   "HAProxy backend).",
                                   ["target_group"], registry=r)
        self.update_gate = Counter(
            "norm_update_gate_total", "Health gates of updates on this host (every updated unit active and "
            "healthy for update.min_healthy seconds), by outcome: passed, failed.", ["outcome"], registry=r)
        self.update_gate_seconds = Histogram(
            "norm_update_gate_seconds", "From the start of a health gate to its outcome.",
            buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800), registry=r)
        # Environment files from S3. Never their content, nor anything derived from it.
        self.env_fetches = Counter(
            "norm_env_fetches_total", "Checks of the environment file's object, by result: changed, "
            "unchanged, missing, denied, unavailable, invalid, too_large, write_failed.", ["result"],
            registry=r)
        self.env_body_bytes = Counter(
            "norm_env_body_bytes_total", "Body bytes downloaded for the environment file (a check of an "
            "unchanged object downloads none).", registry=r)
        self.env_up_to_date = Gauge(
            "norm_env_up_to_date", "1 while the environment file written is the object's content as last "
            "checked; 0 after a failed check, or while the object is refused.", registry=r)
        self.env_last_success = Gauge(
            "norm_env_last_success_timestamp_seconds",
            "Unix time of the last successful check of the environment file's object.", registry=r)
        self.env_restarts = Counter(
            "norm_env_restarts_total", "Units restarted for a changed environment file, by result: ok, "
            "failed, held (left alone: held by an update or an operator), inactive (not running: it reads "
            "the new file when it starts).", ["unit", "result"], registry=r)
        # Webhook notifications (norm.services.notifier): labelled by the webhook's name, never its URL.
        self.webhook_deliveries = Counter(
            "norm_webhook_deliveries_total", "Deliveries of notices to webhooks by the leader, by result: ok "
            "(a 2xx answer), retry (no answer, a 5xx, 408 or 429, the URL file unreadable: tried again "
            "with backoff), refused (another 4xx: not tried again for that notice).", ["webhook", "result"],
            registry=r)
        self.outbox_pending = Gauge(
            "norm_outbox_pending", "Notices in the outbox not yet delivered to every webhook that wants "
            "them (leader only).", registry=r)

    def show_phase(self, phase: Phase | None) -> None:
        """norm_rollout_phase: 1 for `phase` (None: "none"), 0 for every other."""
        current = "none" if phase is None else phase.value
        for name in PHASES:
            self.rollout_phase.labels(name).set(1 if name == current else 0)

    def show_release(self, release: Release | None) -> None:
        """norm_release_info: one series, for `release` (none for None)."""
        if release == self._release:
            return
        if self._release is not None:
            self.release_info.remove(self._release.tag, self._release.digest)
        if release is not None:
            self.release_info.labels(release.tag, release.digest).set(1)
        self._release = release
