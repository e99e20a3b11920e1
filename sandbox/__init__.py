"""Real components on one machine: etcd members and clusters, Docker engines, an image registry,
systemd managers reachable over D-Bus, and moto. Used by the test fixtures and by `make demo`.

Every process is started on free ports under a given directory and stopped by its pid; nothing here
assumes a port is free or a daemon absent, and nothing stops what it did not start.
"""
