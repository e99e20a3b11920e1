"""Fixtures that stand up real components live in tests/plugins, one module per component."""

pytest_plugins = [
    "tests.plugins.agent",
    "tests.plugins.etcd",
    "tests.plugins.systemd",
    "tests.plugins.moto",
    "tests.plugins.imds",
    "tests.plugins.docker",
    "tests.plugins.haproxy",
    "tests.plugins.prometheus",
    "tests.plugins.webhooks",
]
