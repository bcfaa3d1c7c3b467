"""loadagg: gRPC load aggregation for data-parallel LLM schedulers.

Public API (imported lazily, so `import loadagg.v1` — the contract agents share — stays light):
Aggregator, AggregatorConfig, AsyncLoadClient, LoadClient, Loads, RetryPolicy, WatchHub, WatchingCommunicator, QueueingCommunicator,
AgentRegistry, and the exceptions of loadagg.server.errors.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "Aggregator": "loadagg.server.aggregator",
    "serve": "loadagg.server.aggregator",
    "AggregatorConfig": "loadagg.server.config",
    "AsyncLoadClient": "loadagg.client.load_client",
    "LoadClient": "loadagg.client.load_client",
    "Loads": "loadagg.client.load_client",
    "RetryPolicy": "loadagg.client.load_client",
    "WatchHub": "loadagg.server.watch",
    "WatchingCommunicator": "loadagg.server.communicator",
    "QueueingCommunicator": "loadagg.server.communicator",
    "AgentRegistry": "loadagg.server.registry",
    "RoundResult": "loadagg.server.rounds",
    "LoadAggError": "loadagg.server.errors",
    "InvalidRequest": "loadagg.server.errors",
    "RankConflict": "loadagg.server.errors",
    "Unauthenticated": "loadagg.server.errors",
    "WatchEnded": "loadagg.server.errors",
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
