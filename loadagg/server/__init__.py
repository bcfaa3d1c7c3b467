"""The aggregator: agent links, watching rounds, answers to routers (gRPC, HTTP, engines' own GetLoads)."""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "Aggregator": "loadagg.server.aggregator",
    "serve": "loadagg.server.aggregator",
    "tune_gc": "loadagg.server.aggregator",
    "AggregatorConfig": "loadagg.server.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loadagg.server' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
