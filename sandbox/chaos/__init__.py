"""Norm's seeded fault campaign (`make chaos`): operator actions and faults at random moments of random
rollout phases on a real sandbox fleet, each run generated from a seed and replayable from it, the
invariants checked after each run from the whole etcd history of the run, the steps' record, the
agents' logs and every engine's containers. See docs/chaos.md."""
