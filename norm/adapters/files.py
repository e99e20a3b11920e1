"""Files Norm owns on the host (the release file, the environment file), replaced atomically: a
reader, or a crash at any instant, sees the old content or the new, never a mix or a part.

A file is written as a temporary file in the same directory (created exclusively, never through a
symlink, with its final mode and owner before any byte is written: a secret is never readable by
anyone else, not even for an instant), fsynced, renamed over the target, and the directory fsynced.
Temporary files left by a writer that was killed are removed by the next write of the same target.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import os
import pwd
import re
from pathlib import Path

from norm.core.errors import NormError


class OwnerUnknown(NormError):
    """The configured owner (user or user:group) does not exist on this host."""


def resolve_owner(owner: str) -> tuple[int, int]:
    """'user' or 'user:group' to (uid, gid); the user's primary group when no group is given."""
    user, _, group = owner.partition(":")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise OwnerUnknown(f"no user {user!r} on this host") from None
    if not group:
        return entry.pw_uid, entry.pw_gid
    try:
        return entry.pw_uid, grp.getgrnam(group).gr_gid
    except KeyError:
        raise OwnerUnknown(f"no group {group!r} on this host") from None


class OwnerRefused(NormError):
    """This process cannot give a file to the configured owner: it lacks CAP_CHOWN (the hardened
    unit's empty CapabilityBoundingSet=), or the owner is not mapped in its user namespace
    (PrivateUsers=yes maps root only). Permanent for this process: fix the unit or the configuration."""


def check_give_away(directory: Path, owner: tuple[int, int]) -> None:
    """Prove that a file written in `directory` can be given to `owner` (uid, gid), the way
    `replace_file` does it: a temporary file is created there, chowned and removed. Raises
    OwnerRefused when the chown is refused, OSError when the directory cannot be written at all."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".norm-owner-check.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchown(fd, owner[0], owner[1])
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EINVAL):
            raise OwnerRefused(f"chown to {owner[0]}:{owner[1]} refused ({errno.errorcode[e.errno]}: "
                               f"{e.strerror})") from None
        raise
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _tmp_name(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.{pid}.tmp")


def _remove_stale_temps(path: Path) -> None:
    """Remove the temporary files of writers of `path` that are gone (killed mid-write)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.tmp")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # that writer is alive
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        with contextlib.suppress(OSError):
            os.unlink(path.parent / name)


def replace_file(path: Path, data: bytes, mode: int = 0o644, owner: tuple[int, int] | None = None) -> None:
    """write_atomic, blocking: for callers outside an event loop."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = _tmp_name(path, os.getpid())
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # our own, from an earlier write that failed
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode & 0o600)
    try:
        try:
            # The mode first, whatever the umask made of it, while the file is still ours: changing the
            # mode of a file given away needs CAP_FOWNER too, which the hardened unit does not grant.
            os.fchmod(fd, mode)
            if owner is not None:
                os.fchown(fd, owner[0], owner[1])
                if mode & 0o6000:
                    os.fchmod(fd, mode)  # chown clears the setuid and setgid bits
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


async def write_atomic(path: str | Path, data: bytes, mode: int = 0o644,
                       owner: tuple[int, int] | None = None) -> None:
    """Replace `path` with `data` (temporary file in the same directory, fsync, rename, fsync of the
    directory), with `mode` and, when given, `owner` (uid, gid). Raises OSError."""
    await asyncio.to_thread(replace_file, Path(path), data, mode, owner)


async def read_file(path: str | Path) -> bytes | None:
    """The file's content, or None if it does not exist."""
    try:
        return await asyncio.to_thread(Path(path).read_bytes)
    except FileNotFoundError:
        return None
