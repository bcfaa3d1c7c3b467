"""Prometheus metrics of the aggregator itself, on a registry of its own (many aggregators may share a process).

Counters that the communicator and watch hub already keep are read at scrape time (no double
bookkeeping); per-round histograms are fed by the communicator's round-end hook; call latency by
outcome is measured by `timed_handler` around every loads RPC, and by the HTTP gateway.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from loadagg.communicator import Communicator
from loadagg.registry import AgentRegistry
from loadagg.rounds import RoundResult
from loadagg.watch import WatchHub

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_CALLER_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class _StateCollector(Collector):
    """Gauges and counters read from the live objects at scrape time."""

    def __init__(self, communicator: Communicator, registry: AgentRegistry, watch: WatchHub) -> None:
        self.communicator = communicator
        self.registry = registry
        self.watch = watch

    def collect(self) -> Iterator:
        stats = self.communicator.stats
        for name, value, doc in (
            ("loadagg_rounds_started", stats.rounds_started, "Collection rounds started."),
            ("loadagg_rounds_timed_out", stats.rounds_timed_out, "Rounds that ended at their deadline."),
            ("loadagg_round_callers", stats.callers, "Callers that waited on a round (led or joined)."),
            ("loadagg_reports_dropped", stats.reports_dropped, "Agent reports for a round not in flight."),
            ("loadagg_partial_answers", stats.partial_answers, "Callers answered before their round ended."),
            ("loadagg_watch_ticks", self.watch.stats.ticks, "WatchLoads ticks that asked for a round."),
            ("loadagg_watch_ticks_skipped", self.watch.stats.ticks_skipped, "Ticks missed: round outlasted interval."),
            ("loadagg_watch_delivered", self.watch.stats.delivered, "WatchLoads answers handed to streams."),
            ("loadagg_watch_replaced", self.watch.stats.replaced,
             "WatchLoads answers replaced by a newer one before a slow watcher took them."),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily("loadagg_connected_agents", "Agents with a live AgentLink stream.",
                                value=len(self.registry.sessions()))
        yield GaugeMetricFamily("loadagg_live_ranks", "dp ranks served by a connected agent.",
                                value=len(self.registry.live_ranks()))
        yield GaugeMetricFamily("loadagg_dp_size", "dp ranks this aggregator expects.", value=self.registry.dp_size)
        yield GaugeMetricFamily("loadagg_rounds_in_flight", "Rounds in flight now.",
                                value=self.communicator.rounds_in_flight)
        yield GaugeMetricFamily("loadagg_watchers", "Open WatchLoads streams.", value=self.watch.watchers)


class AggregatorMetrics:
    def __init__(self, communicator: Communicator, registry: AgentRegistry, watch: WatchHub) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_StateCollector(communicator, registry, watch))
        self.round_duration = Histogram(
            "loadagg_round_duration_seconds", "Time from a round's collect broadcast to its end.",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.callers_per_round = Histogram(
            "loadagg_callers_per_round", "Callers that shared one round (coalescing).",
            buckets=_CALLER_BUCKETS, registry=self.registry,
        )
        self.missing_ranks = Gauge(
            "loadagg_missing_ranks", "Ranks that did not answer the last round.", registry=self.registry,
        )
        self.missing_rank_total = Counter(
            "loadagg_missing_rank_answers", "Rank answers missing from rounds, summed over rounds.",
            registry=self.registry,
        )
        self.call_duration = Histogram(
            "loadagg_getloads_duration_seconds", "Loads calls by API and outcome (gRPC status or HTTP status).",
            ["api", "code"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        communicator.on_round_end(self.round_ended)

    def round_ended(self, result: RoundResult) -> None:
        self.round_duration.observe(result.duration_ms / 1000)
        self.callers_per_round.observe(result.callers)
        self.missing_ranks.set(len(result.missing))
        self.missing_rank_total.inc(len(result.missing))

    def observe_call(self, api: str, code: str, seconds: float) -> None:
        self.call_duration.labels(api=api, code=code).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def timed_handler(metrics: AggregatorMetrics, api: str, handler: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
    """Wrap a unary grpc.aio handler to record its latency labelled by the status it ended with."""

    async def wrapped(request, context: grpc.aio.ServicerContext):
        started = time.perf_counter()
        code = "UNKNOWN"
        try:
            response = await handler(request, context)
            status = context.code()
            code = status.name if isinstance(status, grpc.StatusCode) else "OK"
            return response
        except BaseException as error:
            status = context.code()
            if isinstance(status, grpc.StatusCode):
                code = status.name
            elif isinstance(error, (TimeoutError,)):
                code = "DEADLINE_EXCEEDED"
            elif type(error).__name__ == "CancelledError":
                code = "CANCELLED"
            raise
        finally:
            metrics.observe_call(api, code, time.perf_counter() - started)

    return wrapped
