"""What the aggregator, the client, the CLI and the agent share, written once: LOADAGG_* readers, log levels,
the uvloop runner, the authorization header, keepalive options, PEM reading, the version, and the "same figures"
comparison of two loads (both sides push or pass on only what changed).

Dependency-free on purpose (the standard library only): the agent imports exactly this module and the contract.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import import_module
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
# The oldest figures a report may carry (RankLoad.age_ms, detail_age_ms): the aggregator refuses a load older than
# this, and push sources leave out detail figures older than it rather than lose their rank's fresh core with them.
MAX_REPORTED_AGE_MS = 3_600_000


def env(name: str, default: str | None = None) -> str | None:
    """LOADAGG_<NAME> from the environment (how containers configure us), else `default`."""
    return os.environ.get(f"{ENV_PREFIX}{name}", default)


def _unset(value: str | None) -> bool:
    return value is None or value.strip() == ""


def _env_number(name: str, default: T, parse: Callable[[str], T], what: str) -> T:
    value = env(name)
    if _unset(value):
        return default
    try:
        return parse(value)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name} must be {what}, got {value!r}") from None


def env_int(name: str, default: int) -> int:
    """LOADAGG_<NAME> as an integer, else `default`; a value that is not one fails, naming the variable."""
    return _env_number(name, default, int, "an integer")


def env_float(name: str, default: float) -> float:
    """LOADAGG_<NAME> as a number, else `default`; a value that is not one fails, naming the variable."""
    return _env_number(name, default, float, "a number")


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


@dataclass(frozen=True, slots=True)
class TlsClient:
    """How a client (a router's channel, an agent's link) dials the aggregator: a token, TLS files, a server name.

    The router library and the agent each add their gRPC side (credentials, interceptors, keepalive) to this
    one description, so the rules and the flags for it are written once."""

    token: str = field(default="", repr=False)  # sent as `authorization: Bearer <token>`
    tls: bool = False  # TLS with the system's trusted roots (implied by tls_ca / tls_cert)
    tls_ca: str = ""  # CA that signed the aggregator's certificate (PEM path)
    tls_cert: str = ""  # this client's certificate, for mutual TLS
    tls_key: str = ""
    tls_server_name: str = ""  # name expected in the aggregator's certificate, when not the target's host

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together (a client certificate and its key)")
        if any(c in self.token for c in "\r\n"):
            raise ValueError("the token must be a single line")

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls or self.tls_ca or self.tls_cert)

    def pem_files(self) -> dict[str, bytes | None]:
        """The keyword arguments of grpc.ssl_channel_credentials; an unreadable file raises ValueError naming it."""
        return {
            "root_certificates": read_pem(self.tls_ca, "--tls-ca") if self.tls_ca else None,
            "private_key": read_pem(self.tls_key, "--tls-key") if self.tls_key else None,
            "certificate_chain": read_pem(self.tls_cert, "--tls-cert") if self.tls_cert else None,
        }

    def name_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.tls_server_name)] if self.tls_server_name else []


def add_tls_client_flags(group: argparse._ArgumentGroup, defaults: type[TlsClient], *, cert_env: str,
                         key_env: str) -> None:
    """--tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name of a command that dials the aggregator."""
    group.add_argument("--tls", action="store_true", default=env_bool("TLS", field_default(defaults, "tls")),
                       help="use TLS, trusting the system's CAs (implied by --tls-ca/--tls-cert) [LOADAGG_TLS]")
    group.add_argument("--tls-ca", default=env("TLS_CA", field_default(defaults, "tls_ca")),
                       help="CA certificate (PEM) of the aggregator [LOADAGG_TLS_CA]")
    group.add_argument("--tls-cert", default=env(cert_env, field_default(defaults, "tls_cert")),
                       help=f"client certificate (PEM), for mutual TLS [{ENV_PREFIX}{cert_env}]")
    group.add_argument("--tls-key", default=env(key_env, field_default(defaults, "tls_key")),
                       help=f"key of --tls-cert (PEM) [{ENV_PREFIX}{key_env}]")
    group.add_argument("--tls-server-name", default=env("TLS_SERVER_NAME", field_default(defaults, "tls_server_name")),
                       help="name to expect in the aggregator's certificate [LOADAGG_TLS_SERVER_NAME]")


def tls_client_args(args: argparse.Namespace, token_env: str) -> dict[str, Any]:
    """TlsClient's fields from parsed flags; the token from `token_env` when --token is absent (or not a flag)."""
    token = getattr(args, "token", None)
    return {"token": token if token is not None else env(token_env, ""), "tls": args.tls, "tls_ca": args.tls_ca,
            "tls_cert": args.tls_cert, "tls_key": args.tls_key, "tls_server_name": args.tls_server_name}


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's __getattr__ and __dir__ that import each public name from its module on first use, so that
    importing the package (or its contract, loadagg.v1) loads nothing else."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(module), name)
        setattr(import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__


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


def same_figures(new, old) -> bool:
    """Whether two RankLoads of one rank carry the same figures, their time stamps and ages (all three) aside.

    One C-level comparison: `new`'s stamps are set to `old`'s for it and put back at once (single-threaded,
    nothing reads `new` meanwhile), which costs far less than copying either message without its stamps.
    (The messages are the contract's; this module reads them by their field names and imports nothing of it.)
    """
    stamp, age = new.timestamp_ms, new.age_ms
    detail = new.detail_age_ms if new.HasField("detail_age_ms") else None
    new.timestamp_ms, new.age_ms = old.timestamp_ms, old.age_ms
    _set_detail_age(new, old.detail_age_ms if old.HasField("detail_age_ms") else None)
    try:
        return new == old
    finally:
        new.timestamp_ms, new.age_ms = stamp, age
        _set_detail_age(new, detail)


def _set_detail_age(load, value: int | None) -> None:
    if value is None:
        load.ClearField("detail_age_ms")
    else:
        load.detail_age_ms = value
