"""What the aggregator, the client, the CLI and the agent share, written once: LOADAGG_* readers, log levels,
the uvloop runner, the authorization header, keepalive options, PEM reading and the version.

Dependency-free on purpose (the standard library only): the agent imports exactly this module and the contract.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ENV_PREFIX = "LOADAGG_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_LOG_LEVEL = "INFO"
AUTHORIZATION = "authorization"  # the metadata key (HTTP: Authorization) that carries `Bearer <token>`
DEFAULT_PORT = 50051
DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_PORT}"
DEFAULT_WATCH_INTERVAL_MS = 1000  # what a WatchLoads asking for interval 0 gets, unless --watch-interval-ms
VERSION_FALLBACK = "0+unknown"  # a source tree that was never installed
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
# Keepalive: pinging idle peers is how a hung or vanished one is eventually dropped.
DEFAULT_KEEPALIVE_S = 20.0
DEFAULT_KEEPALIVE_TIMEOUT_S = 10.0
MIN_PING_INTERVAL_S = 5.0  # the aggregator accepts pings this often; a peer pinging more often is dropped


def env(name: str, default: str | None = None) -> str | None:
    """LOADAGG_<NAME> from the environment (how containers configure us), else `default`."""
    return os.environ.get(f"{ENV_PREFIX}{name}", default)


def _unset(value: str | None) -> bool:
    return value is None or value.strip() == ""


def env_int(name: str, default: int) -> int:
    """LOADAGG_<NAME> as an integer, else `default`; a value that is not one fails, naming the variable."""
    value = env(name)
    if _unset(value):
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name} must be an integer, got {value!r}") from None


def env_float(name: str, default: float) -> float:
    """LOADAGG_<NAME> as a number, else `default`; a value that is not one fails, naming the variable."""
    value = env(name)
    if _unset(value):
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name} must be a number, got {value!r}") from None


def env_optional_int(name: str) -> int | None:
    """LOADAGG_<NAME> as an integer, or None when unset."""
    value = env(name)
    if _unset(value):
        return None
    return env_int(name, 0)


def env_bool(name: str, default: bool) -> bool:
    """LOADAGG_<NAME> as a switch. A typo (`ture`) fails, naming the variable, rather than silently meaning off."""
    value = env(name)
    if _unset(value):
        return default
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{ENV_PREFIX}{name} must be true or false, got {value!r}")


def env_choice(name: str, default: str, choices: Sequence[str]) -> str:
    """LOADAGG_<NAME> as one of `choices` (any case), else `default`. argparse checks `choices` only on the
    command line, never on a default: a bad variable must fail here, naming itself."""
    value = env(name)
    if _unset(value):
        return default
    for choice in choices:
        if value.strip().lower() == choice.lower():
            return choice
    raise ValueError(f"{ENV_PREFIX}{name} must be one of {', '.join(choices)}, got {value!r}")


def env_log_level() -> str:
    """LOADAGG_LOG_LEVEL, else INFO."""
    return env_choice("LOG_LEVEL", DEFAULT_LOG_LEVEL, LOG_LEVELS)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)", except where the help says the default itself or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default" in text or action.default in (None, "") else super()._get_help_string(action)


def read_pem(path: str, flag: str) -> bytes:
    """The bytes of a PEM file; a file that cannot be read raises ValueError naming `flag`."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {flag} {path!r}: {error.strerror}") from None


def keepalive_options(interval_s: float, timeout_s: float = DEFAULT_KEEPALIVE_TIMEOUT_S) -> list[tuple[str, int]]:
    """gRPC channel/server options that ping an idle peer every `interval_s` (0: none) and drop one silent for
    `timeout_s`. Without the last two, gRPC stops after 2 pings or waits 5 minutes between them, and a hung
    peer on an idle stream (an agent between rounds sends no data) goes unnoticed."""
    if not interval_s:
        return []
    return [
        ("grpc.keepalive_time_ms", int(interval_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(timeout_s * 1000)),
        ("grpc.http2.ping_timeout_ms", int(timeout_s * 1000)),  # the ack wait newer gRPC cores use
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_time_between_pings_ms", int(interval_s * 1000)),
    ]


def package_version() -> str:
    """The installed loadagg distribution's version (both commands ship in it), else VERSION_FALLBACK."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("loadagg")
    except PackageNotFoundError:
        return VERSION_FALLBACK


def missing_extra(command: str, error: ModuleNotFoundError, extra: str) -> str:
    """What a command says when a package of its install extra is missing: which extra to install."""
    return (f"{command}: needs {error.name or 'a package'} (not installed): "
            f"pip install 'loadagg[{extra}]'")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def field_default(cls: type, name: str) -> Any:
    """The default of the dataclass `cls`'s field `name`: flags and env readers take their defaults from the
    config dataclasses, so every default is written once (slotted dataclasses keep none as a class attribute)."""
    import dataclasses

    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ValueError(f"{cls.__name__}.{name} has no default")
    raise AttributeError(f"{cls.__name__} has no field {name!r}")
