"""A webhook receiver on a free loopback port, in its own process: what Norm's notifications are
delivered to in the tests and the sandbox.

Every POST to /hook is appended to `received.jsonl` in its directory as one JSON line: `at` (the
receiver's wall clock when it took it), `idempotency_key` (the Idempotency-Key header, or null),
`content_type` and `body` (the body as JSON, or null with `raw` holding it as text when it is not
JSON), `status`, what it answered: the status it was started with (200 unless told otherwise), and
`repeat`: whether a POST with the same Idempotency-Key was taken before (across restarts too: the
receiver reads its file as it starts). A receiver that honours the key, as a real one should, acts on
the lines that are not repeats: each event once. The line is written before the answer: a line in the
file is a POST the receiver took, whether or not its answer reached the sender.

`python -m sandbox.webhooks -p PORT --log FILE [--status N]` is the receiver's entry point.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.procs import LocalServer, serve_app, venv_python


@dataclass
class WebhookReceiver(LocalServer):
    status: int = 200

    name = "webhooks"

    @property
    def url(self) -> str:
        """Where the webhook posts (the same across restarts: the port is kept)."""
        return f"{self.endpoint}/hook"

    @property
    def received_file(self) -> Path:
        return self.workdir / "received.jsonl"

    def argv(self) -> list[str]:
        return [venv_python(), "-m", "sandbox.webhooks", "-p", str(self.port), "--log",
                str(self.received_file), "--status", str(self.status)]

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/_sandbox/ping", timeout=1) as r:
                return int(r.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self, timeout: float = 30.0, *, status: int | None = None) -> None:
        """Start (again, on the same port), answering `status` if given, else as before."""
        if status is not None:
            if self.alive:
                self.stop()
            self.status = status
        super().start(timeout)

    def received(self) -> list[dict[str, Any]]:
        """Every POST taken so far, in the order taken."""
        try:
            text = self.received_file.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def taken(self) -> list[dict[str, Any]]:
        """The POSTs acted on, as a receiver honouring the Idempotency-Key acts: every one but the
        repeats, in order."""
        return [r for r in self.received() if not r.get("repeat")]

    def keys(self, *, answered_ok: bool = False) -> list[str]:
        """The Idempotency-Key of each POST taken so far, in order (of those answered with a 2xx only,
        with `answered_ok`)."""
        return [r["idempotency_key"] for r in self.received()
                if not answered_ok or 200 <= r["status"] < 300]


# ---------------------------------------------------------------------------------------------------
# The receiver


def serve(argv: list[str]) -> None:

    from aiohttp import web

    parser = argparse.ArgumentParser(prog="python -m sandbox.webhooks")
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--status", type=int, default=200)
    args = parser.parse_args(argv)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    if args.log.exists():
        for text in args.log.read_text(encoding="utf-8").splitlines():
            try:
                seen.add(json.loads(text)["idempotency_key"])
            except (ValueError, KeyError, TypeError):
                continue
    out = open(args.log, "a", encoding="utf-8")  # noqa: SIM115 (open for the process's life)

    async def hook(request: web.Request) -> web.Response:
        raw = await request.read()
        line: dict[str, Any] = {"at": time.time(), "idempotency_key": request.headers.get("Idempotency-Key"),
                                "content_type": request.headers.get("Content-Type"), "path": request.path,
                                "status": args.status}
        key = line["idempotency_key"]
        line["repeat"] = key is not None and key in seen
        if key is not None and 200 <= args.status < 300:
            seen.add(key)
        try:
            line["body"] = json.loads(raw)
        except ValueError:
            line["body"], line["raw"] = None, raw.decode("utf-8", "replace")
        out.write(json.dumps(line, sort_keys=True) + "\n")
        out.flush()
        return web.Response(status=args.status, text="ok" if args.status < 300 else "not now")

    async def ping(request: web.Request) -> web.Response:
        return web.Response(text="pong")

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_post("/hook/{rest:.*}", hook)
    app.router.add_get("/_sandbox/ping", ping)

    serve_app(app, args.host, args.port,
              f"webhook receiver on http://{args.host}:{args.port}/hook, answering {args.status}", out.close)


if __name__ == "__main__":
    serve(sys.argv[1:])
