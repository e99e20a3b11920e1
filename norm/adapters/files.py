"""Files Norm owns on the host (the release file; later the environment file), replaced atomically:
a reader, or a crash at any instant, sees the old content or the new, never a mix or a part."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path


def replace_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """write_atomic, blocking: for callers outside an event loop."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # whatever the umask made of it
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)  # the rename itself survives a crash
    finally:
        os.close(dfd)


async def write_atomic(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` (temporary file in the same directory, fsync, rename, fsync of the
    directory). Raises OSError."""
    await asyncio.to_thread(replace_file, Path(path), data, mode)


async def read_file(path: str | Path) -> bytes | None:
    """The file's content, or None if it does not exist."""
    try:
        return await asyncio.to_thread(Path(path).read_bytes)
    except FileNotFoundError:
        return None
