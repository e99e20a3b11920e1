"""A real webhook receiver per test, in its own process (sandbox.webhooks)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox.webhooks import WebhookReceiver


@pytest.fixture
def webhook_receiver(tmp_path: Path) -> Iterator[WebhookReceiver]:
    """A receiver answering 200: `url` to post to, `received()` what it took, `stop()` and `start()`
    (`start(status=500)` to answer that) to take it down and back on the same port."""
    receiver = WebhookReceiver(tmp_path / "webhooks")
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture
def webhook_receivers(tmp_path: Path) -> Iterator[Callable[[str], WebhookReceiver]]:
    """More receivers: `webhook_receivers(name)` starts one more, stopped after the test."""
    made: list[WebhookReceiver] = []

    def make(name: str) -> WebhookReceiver:
        receiver = WebhookReceiver(tmp_path / f"webhooks-{name}")
        made.append(receiver)
        receiver.start()
        return receiver

    try:
        yield make
    finally:
        for receiver in made:
            receiver.stop()
