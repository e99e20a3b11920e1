"""Atomic replacement of the files Norm owns: mode and owner from the first byte, and a writer killed
with SIGKILL at any instant leaves the old file or the new one, whole."""

from __future__ import annotations

import hashlib
import os
import pwd
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from norm.adapters.files import OwnerUnknown, replace_file, resolve_owner, write_atomic

REPO = Path(__file__).resolve().parents[2]
SIZE = 4 * 1024 * 1024

WRITER = """
import hashlib, sys
from pathlib import Path
from norm.adapters.files import replace_file

def version(n, size):
    payload = bytes([65 + n % 26]) * size
    return b"version %d\\n" % n + payload + b"\\n" + hashlib.sha256(payload).hexdigest().encode() + b"\\n"

path, size, first = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
n = first
while True:
    print(n, flush=True)  # about to write version n
    replace_file(path, version(n, size), 0o600)
    n += 1
"""


def whole_version(data: bytes) -> int:
    """The version number of a file the writer wrote; fails if the file is partial or mixed."""
    head, _, rest = data.partition(b"\n")
    assert head.startswith(b"version "), "not a file the writer wrote"
    n = int(head.split()[1])
    payload, digest = rest[:SIZE], rest[SIZE + 1:]
    assert len(payload) == SIZE and payload == bytes([65 + n % 26]) * SIZE, f"version {n} is partial"
    assert digest == hashlib.sha256(payload).hexdigest().encode() + b"\n", f"version {n} is partial"
    return n


def test_sigkill_during_writes_leaves_old_or_new_never_partial(tmp_path: Path) -> None:
    target = tmp_path / "app.env"
    rng = random.Random()
    seen = set()
    first, current = 0, -1
    for _ in range(25):
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(SIZE), str(first)],
                                 stdout=subprocess.PIPE, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert child.stdout is not None
        # Wait until it is writing (a condition, not a guess), let it run a random while, kill it.
        started = int(child.stdout.readline())
        deadline = time.monotonic() + rng.uniform(0.0, 0.08)
        while time.monotonic() < deadline:
            pass
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        lines = child.stdout.read().split()
        child.stdout.close()
        last_begun = int(lines[-1]) if lines else started
        if target.exists():
            n = whole_version(target.read_bytes())
            assert current <= n <= last_begun  # what was there, or one this run began
            seen.add(n - first)
            current = n
            assert stat.S_IMODE(target.stat().st_mode) == 0o600
        first = last_begun + 1
    # Temporary files of killed writers are removed by the next write.
    replace_file(target, b"A=1\n", 0o600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.env"]
    assert len(seen) > 1  # the kills landed at different points


def test_mode_and_owner_from_the_first_byte(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    nobody = pwd.getpwnam("nobody")
    owner = resolve_owner("nobody")
    assert owner == (nobody.pw_uid, nobody.pw_gid)
    target = tmp_path / "run" / "norm" / "app.env"
    old_umask = os.umask(0)
    try:
        replace_file(target, b"A=1\n", 0o600, owner)
    finally:
        os.umask(old_umask)
    st = target.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, nobody.pw_uid, nobody.pw_gid)
    assert resolve_owner("root:nogroup")[1] != 0


async def test_async_write_keeps_the_default_mode_for_the_release_file(tmp_path: Path) -> None:
    target = tmp_path / "release.env"
    await write_atomic(target, b"NORM_IMAGE=x\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 and target.read_bytes() == b"NORM_IMAGE=x\n"


def test_unknown_owner_is_refused() -> None:
    with pytest.raises(OwnerUnknown, match="no user"):
        resolve_owner("no-such-user-here")
    with pytest.raises(OwnerUnknown, match="no group"):
        resolve_owner("root:no-such-group-here")
