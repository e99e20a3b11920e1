"""A moto server (S3, ELBv2, EC2, STS over real HTTP) on a free loopback port.

`moto_server` as installed cannot be used as is with this project's clients: werkzeug's request
handler sends a `Server: Werkzeug/...` header and moto adds its own `server: amazon.com`, and aiohttp
(3.13.4 and later; 3.14 here) rejects a response with two Server headers ("Duplicate 'Server' header
found"), so aiobotocore fails on every call. This module is therefore also the server's entry point:
`python -m sandbox.moto -H HOST -p PORT` serves moto's own WSGI application exactly as `moto_server`
does, with a request handler that leaves the Server header to the application.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from types import FrameType

from sandbox.procs import LocalServer, venv_python

# How long a reply from the server may take: it is Python, on a machine other tests keep busy, so a
# generous deadline, not a guess at how fast it is.
REPLY_TIMEOUT = 60.0


@dataclass
class MotoServer(LocalServer):
    name = "moto"

    def argv(self) -> list[str]:
        return [venv_python(), "-m", "sandbox.moto", "-H", "127.0.0.1", "-p", str(self.port)]

    def env(self) -> dict[str, str]:
        return dict(super().env(), AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                    AWS_DEFAULT_REGION="us-east-1")

    def answers(self, timeout: float = REPLY_TIMEOUT) -> bool:
        """Whether the server answers HTTP within `timeout` seconds. Asked of its management API's
        configuration, which every service shares, and which is small whatever the server holds (its
        data.json holds every resource a session made)."""
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/config", timeout=timeout) as r:
                return int(r.status) < 500
        except urllib.error.HTTPError as e:
            return e.code < 500

    def enforce_auth(self) -> None:
        """From now on, check every request's credentials and IAM policies (moto allows everything until
        this is called): a key of an IAM user without policies then gets AccessDenied. Server-wide: use
        it on a server of the test's own, not the shared one."""
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=REPLY_TIMEOUT):
            pass

    def reset(self) -> None:
        """Forget every resource (moto's own reset endpoint): a clean account for the next test."""
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=REPLY_TIMEOUT):
            pass


def serve(argv: list[str]) -> None:
    """`moto_server -H HOST -p PORT`, with responses that carry a single Server header."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    parser = argparse.ArgumentParser(prog="python -m sandbox.moto")
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    args = parser.parse_args(argv)

    class OneServerHeader(MotoRequestHandler):
        def send_response(self, code: int, message: str | None = None) -> None:
            # BaseHTTPRequestHandler.send_response without its Server header: moto sends one.
            self.log_request(code)
            self.send_response_only(code, message)
            self.send_header("Date", self.date_time_string())

    def exit_on(signum: int, frame: FrameType | None) -> None:
        sys.exit(0)

    signal.signal(signal.SIGTERM, exit_on)
    os.environ.setdefault("MOTO_PORT", str(args.port))  # moto builds some URLs to itself from it
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(args.host, args.port, app, threaded=True, request_handler=OneServerHeader)


if __name__ == "__main__":
    serve(sys.argv[1:])
