"""A local EC2 instance metadata service (IMDSv2 only) on a free loopback port, in its own process.

It serves what Norm and botocore ask of the real one:
- PUT /latest/api/token with `X-aws-ec2-metadata-token-ttl-seconds` (1 to 21600): a token; every
  other request must carry a live token in `X-aws-ec2-metadata-token` or gets 401 (IMDSv1 is off);
- /latest/meta-data/instance-id, placement/region, placement/availability-zone;
- /latest/meta-data/tags/instance/ (the names) and tags/instance/<name> (404 when absent);
- /latest/meta-data/iam/security-credentials/ (the role) and .../<role>: temporary credentials in the
  shape botocore's default credential chain reads (so an S3 client with no keys of its own signs with
  them when AWS_EC2_METADATA_SERVICE_ENDPOINT, or botocore's ec2_metadata_service_endpoint, points here).

What it serves is read from a JSON state file on every request, so a test changes it by rewriting the
file (`MetadataServer.update`). Every request is counted per path (GET /_sandbox/requests), so tests can
check that tokens are reused and that an unchanged object is not downloaded again.

`python -m sandbox.imds -p PORT --state FILE` is the server's entry point.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sandbox.procs import LocalServer, serve_app, venv_python

MAX_TTL = 21600


def default_state() -> dict[str, Any]:
    return {
        "instance_id": "i-0123456789abcdef0",
        "region": "us-east-1",
        "tags": {},
        "role": "norm-host",
        "credentials": {
            "AccessKeyId": "ASIA" + secrets.token_hex(8).upper(),
            "SecretAccessKey": secrets.token_urlsafe(30),
            "Token": secrets.token_urlsafe(60),
        },
    }


@dataclass
class MetadataServer(LocalServer):
    state: dict[str, Any] = field(default_factory=default_state)

    name = "imds"

    @property
    def state_file(self) -> Path:
        return self.workdir / "imds-state.json"

    def update(self, **changes: Any) -> None:
        """Change what is served from the next request on (instance_id, region, tags, role, credentials)."""
        self.state.update(changes)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.state_file)

    def prepare(self) -> None:
        self.update()

    def argv(self) -> list[str]:
        return [venv_python(), "-m", "sandbox.imds", "-p", str(self.port), "--state", str(self.state_file)]

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/_sandbox/requests", timeout=1) as r:
                return int(r.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def requests(self) -> dict[str, int]:
        """Requests served so far, by "METHOD path"."""
        with urllib.request.urlopen(f"{self.endpoint}/_sandbox/requests", timeout=5) as r:
            counts: dict[str, int] = json.loads(r.read())
            return counts



# ---------------------------------------------------------------------------------------------------
# The server


def serve(argv: list[str]) -> None:
    from collections import Counter

    from aiohttp import web

    parser = argparse.ArgumentParser(prog="python -m sandbox.imds")
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    parser.add_argument("--state", type=Path, required=True)
    args = parser.parse_args(argv)

    tokens: dict[str, float] = {}  # token -> expiry (monotonic)
    counts: Counter[str] = Counter()

    def state() -> dict[str, Any]:
        data: dict[str, Any] = json.loads(args.state.read_text())
        return data

    def text(body: str) -> web.Response:
        return web.Response(text=body, content_type="text/plain")

    @web.middleware
    async def enforce_token(request: web.Request, handler: Any) -> web.StreamResponse:
        counts[f"{request.method} {request.path}"] += 1
        if request.path.startswith("/_sandbox/") or request.path == "/latest/api/token":
            return await handler(request)  # type: ignore[no-any-return]
        token = request.headers.get("X-aws-ec2-metadata-token", "")
        expiry = tokens.get(token)
        if expiry is None or expiry < time.monotonic():
            return web.Response(status=401, text="Unauthorized")
        return await handler(request)  # type: ignore[no-any-return]

    async def put_token(request: web.Request) -> web.Response:
        ttl = request.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= MAX_TTL:
            return web.Response(status=400, text="Bad Request")
        token = secrets.token_urlsafe(32)
        tokens[token] = time.monotonic() + int(ttl)
        return web.Response(text=token, headers={"X-aws-ec2-metadata-token-ttl-seconds": ttl})

    async def instance_id(request: web.Request) -> web.Response:
        return text(state()["instance_id"])

    async def region(request: web.Request) -> web.Response:
        return text(state()["region"])

    async def zone(request: web.Request) -> web.Response:
        return text(state()["region"] + "a")

    async def tag_names(request: web.Request) -> web.Response:
        tags = state().get("tags")
        if tags is None:  # tags not exposed in instance metadata at all
            raise web.HTTPNotFound()
        return text("\n".join(sorted(tags)))

    async def tag(request: web.Request) -> web.Response:
        tags = state().get("tags") or {}
        name = request.match_info["name"]
        if name not in tags:
            raise web.HTTPNotFound()
        return text(str(tags[name]))

    async def role(request: web.Request) -> web.Response:
        name = state().get("role")
        if not name:
            raise web.HTTPNotFound()
        return text(name)

    async def credentials(request: web.Request) -> web.Response:
        s = state()
        if request.match_info["role"] != s.get("role"):
            raise web.HTTPNotFound()
        now = datetime.now(UTC).replace(microsecond=0)
        body = {
            "Code": "Success",
            "LastUpdated": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "Type": "AWS-HMAC",
            **s["credentials"],
            "Expiration": (now + timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        return web.json_response(body)

    async def requests_seen(request: web.Request) -> web.Response:
        return web.json_response(dict(counts))

    app = web.Application(middlewares=[enforce_token])
    md = "/latest/meta-data"
    app.router.add_put("/latest/api/token", put_token)
    app.router.add_get(f"{md}/instance-id", instance_id)
    app.router.add_get(f"{md}/placement/region", region)
    app.router.add_get(f"{md}/placement/availability-zone", zone)
    app.router.add_get(f"{md}/placement/availability-zone/", zone)
    app.router.add_get(f"{md}/tags/instance", tag_names)
    app.router.add_get(f"{md}/tags/instance/", tag_names)
    app.router.add_get(f"{md}/tags/instance/{{name}}", tag)
    app.router.add_get(f"{md}/iam/security-credentials", role)
    app.router.add_get(f"{md}/iam/security-credentials/", role)
    app.router.add_get(f"{md}/iam/security-credentials/{{role}}", credentials)
    app.router.add_get("/_sandbox/requests", requests_seen)

    serve_app(app, args.host, args.port, f"instance metadata on http://{args.host}:{args.port}")

if __name__ == "__main__":
    serve(sys.argv[1:])
