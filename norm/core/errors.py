"""Error types that tell the caller what to do: fix the input, or try again later."""

from __future__ import annotations


class NormError(Exception):
    """Base of every error Norm raises on purpose."""


class InvalidValue(NormError):
    """A value read from outside (config, etcd, CLI) is not acceptable. Permanent: fix the value.

    The message never quotes the value itself, which may be a secret; it names where it came from.
    """

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


class ConfigError(InvalidValue):
    """The configuration is not acceptable: names the key and the source (file, environment, flag)."""

    def __init__(self, key: str, source: str, reason: str) -> None:
        NormError.__init__(self, f"{source}: {key}: {reason}")
        self.where = f"{source}: {key}"
        self.key = key
        self.source = source
        self.reason = reason


class Temporary(NormError):
    """Try again later: the other side could not be reached, did not answer in time, was busy or failed
    on its side. Nothing is wrong with the request. Every adapter's "unavailable" error is one, so that
    a caller that retries what is transient catches this, whichever adapter it calls."""


class Permanent(NormError):
    """Retrying the same request will not help: it was refused, or names what does not exist. Fix the
    request, the configuration, the permissions or the unit first."""
