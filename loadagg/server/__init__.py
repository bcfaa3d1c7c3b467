"""The aggregator: agent links, watching rounds, answers to routers (gRPC, HTTP, engines' own GetLoads)."""

from __future__ import annotations

from loadagg.common import lazy_exports

_EXPORTS = {
    "Aggregator": "loadagg.server.aggregator",
    "serve": "loadagg.server.aggregator",
    "tune_gc": "loadagg.server.aggregator",
    "AggregatorConfig": "loadagg.server.config",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("loadagg.server", _EXPORTS)
