"""loadagg: gRPC load aggregation for data-parallel LLM schedulers.

Subpackages by audience: `loadagg.client` (routers), `loadagg.server` (the aggregator), `loadagg.cli` (commands),
`loadagg.v1` (the contract), `loadagg.common` (what all of them and the agent share). The names below are
imported lazily, so that `import loadagg.v1` (what agents and routers share) loads nothing of the server.
"""

from __future__ import annotations

from loadagg.common import lazy_exports

_EXPORTS = {
    "Aggregator": "loadagg.server.aggregator",
    "serve": "loadagg.server.aggregator",
    "AggregatorConfig": "loadagg.server.config",
    "AsyncLoadClient": "loadagg.client.load_client",
    "LoadClient": "loadagg.client.load_client",
    "Loads": "loadagg.client.load_client",
    "RetryPolicy": "loadagg.client.load_client",
    "ChannelSecurity": "loadagg.client.channels",
    "WatchEnded": "loadagg.client.load_client",
    "LoadAggError": "loadagg.server.errors",
    "InvalidRequest": "loadagg.server.errors",
    "RankConflict": "loadagg.server.errors",
    "Unauthenticated": "loadagg.server.errors",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("loadagg", _EXPORTS)
