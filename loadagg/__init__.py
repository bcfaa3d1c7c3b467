"""loadagg: gRPC load aggregation for data-parallel LLM schedulers.

Public API (imported lazily, so `import loadagg.v1` — the contract agents share — stays light):
Aggregator, AggregatorConfig, AsyncLoadClient, LoadClient, Loads, RetryPolicy, WatchHub, WatchingCommunicator, QueueingCommunicator,
AgentRegistry, and the exceptions of loadagg.errors.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "Aggregator": "loadagg.server",
    "serve": "loadagg.server",
    "AggregatorConfig": "loadagg.config",
    "AsyncLoadClient": "loadagg.client",
    "LoadClient": "loadagg.client",
    "Loads": "loadagg.client",
    "RetryPolicy": "loadagg.client",
    "WatchHub": "loadagg.watch",
    "WatchingCommunicator": "loadagg.communicator",
    "QueueingCommunicator": "loadagg.communicator",
    "AgentRegistry": "loadagg.registry",
    "RoundResult": "loadagg.rounds",
    "LoadAggError": "loadagg.errors",
    "InvalidRequest": "loadagg.errors",
    "RankConflict": "loadagg.errors",
    "Unauthenticated": "loadagg.errors",
    "WatchEnded": "loadagg.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loadagg' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
