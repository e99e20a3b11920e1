"""The agent's HTTP endpoint: /metrics (Prometheus text), /healthz (the loop answers), /readyz
(etcd reachable and the host registered). Loopback by default."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from norm.core.config import parse_listen
from norm.services.metrics import Metrics

log = structlog.get_logger("norm.http")


class HttpEndpoint:
    name = "http"

    def __init__(self, listen: str, metrics: Metrics,
                 readiness: Callable[[], dict[str, bool]]) -> None:
        self.host, self.port = parse_listen(listen)
        self._metrics = metrics
        self._readiness = readiness
        self.bound = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_handler)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        checks = self._readiness()
        ready = all(checks.values())
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    async def run(self, stopping: asyncio.Event) -> None:
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
            await site.start()
            self.bound.set()
            log.info("http.listening", address=f"{self.host}:{self.port}")
            await stopping.wait()
        finally:
            await runner.cleanup()
