"""Norm's metrics, on one explicit registry that the agent owns and the HTTP endpoint serves."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Info

from norm import __version__


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
        self.lease_lost = Counter("norm_lease_lost_total", "Leases this agent could not keep alive.",
                                  registry=r)
