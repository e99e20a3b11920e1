"""Norm: keeps a fleet of Docker-on-systemd hosts healthy and up to date, driven by etcd."""

__version__ = "0.1.0"
