"""Loading the configuration: the TOML file, then NORM_* environment, then --set flags; then the
host's identity. Everything that can be wrong raises ConfigError naming the key and the source."""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from norm.core import config as cfg
from norm.core.config import Config
from norm.core.errors import ConfigError, InvalidValue
from norm.core.host import parse_machine_id
from norm.core.secret import Secret


def load(path: str | None, environ: Mapping[str, str] | None = None,
         flags: list[str] | None = None) -> Config:
    """`path` None means the default file, which may be absent (environment and flags only)."""
    return cfg.build(load_tree(path, environ, flags))


def given(tree: cfg.RawTree, section: str) -> frozenset[str]:
    """The keys of `section` that some source (file, environment, flag) set."""
    return frozenset(tree.get(section, {}))


def load_tree(path: str | None, environ: Mapping[str, str] | None = None,
              flags: list[str] | None = None) -> cfg.RawTree:
    """The merged raw values of every source, before validation (`cfg.build` makes the Config)."""
    env = os.environ if environ is None else environ
    file = path or env.get("NORM_CONFIG") or cfg.DEFAULT_PATH
    explicit = path is not None or "NORM_CONFIG" in env
    tree: cfg.RawTree = {}
    try:
        with open(file, "rb") as f:
            data = tomllib.load(f)
        tree = cfg.raw_from_toml(data, file)
    except FileNotFoundError:
        if explicit:
            raise ConfigError("-", file, "no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("-", file, f"not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError("-", file, "not UTF-8 text") from None
    except IsADirectoryError:
        raise ConfigError("-", file, "is a directory") from None
    except PermissionError:
        raise ConfigError("-", file, "permission denied") from None
    except OSError as e:
        raise ConfigError("-", file, f"cannot read it: {e.strerror or type(e).__name__}") from None
    except ValueError:  # tomllib refuses some values (an integer too long) with a bare ValueError
        raise ConfigError("-", file, "not valid TOML: a value cannot be read") from None
    return cfg.merge(tree, cfg.raw_from_env(env), cfg.raw_from_flags(flags or []))


@dataclass(frozen=True)
class Identity:
    machine_id: str
    name: str


def identity(config: Config) -> Identity:
    host = config.host
    machine_id = host.machine_id
    if machine_id is None:
        try:
            text = Path(host.machine_id_path).read_text()
        except OSError as e:
            raise ConfigError("host.machine_id_path", host.machine_id_path,
                              f"cannot read the machine id: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError("host.machine_id_path", host.machine_id_path,
                              "a machine id is 32 lowercase hex digits") from None
        try:
            machine_id = parse_machine_id(text, host.machine_id_path)
        except InvalidValue as e:
            raise ConfigError("host.machine_id_path", host.machine_id_path, e.reason) from None
    return Identity(machine_id, host.name or socket.gethostname().split(".")[0])


def etcd_password(config: Config) -> Secret | None:
    etcd = config.etcd
    if etcd.password_file is None:
        return etcd.password
    try:
        text = Path(etcd.password_file).read_text()
    except OSError as e:
        raise ConfigError("etcd.password_file", etcd.password_file,
                          f"cannot read the password: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("etcd.password_file", etcd.password_file, "not UTF-8 text") from None
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise ConfigError("etcd.password_file", etcd.password_file, "the first line is empty")
    return Secret(lines[0])
