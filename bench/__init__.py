"""Benchmarks: each prints one JSON line of figures last."""
