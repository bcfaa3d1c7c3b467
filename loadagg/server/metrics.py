"""Prometheus metrics of the aggregator itself, on a registry of its own (many aggregators may share a process).

Counters that the communicator and watch hub already keep are read at scrape time (no double
bookkeeping); per-round histograms are fed by the communicator's round-end hook; call latency by
outcome is measured by `timed_handler` around every loads RPC, and by the HTTP gateway.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator
from itertools import accumulate

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from loadagg.server.communicator import Communicator
from loadagg.server.registry import AgentRegistry
from loadagg.server.rounds import RoundResult
from loadagg.server.watch import WatchHub

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
            ("loadagg_collects_sent", stats.collects_sent, "Collects sent to agents: each asks one engine read."),
            ("loadagg_pushes_received", stats.pushes_accepted,
             "Unsolicited agent reports (pushes): each is one engine read."),
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


class _RankCollector(Collector):
    """Per-rank state at scrape time: linked, missing, pushing, and the age of the newest figures held.

    One series per rank and figure (dp_size is bounded by the aggregator's limits), so an alert can say
    which rank is missing or stale, and for how long.
    """

    def __init__(self, communicator: Communicator, registry: AgentRegistry) -> None:
        self.communicator = communicator
        self.registry = registry

    def collect(self) -> Iterator:
        now = time.monotonic()
        live = self.registry.live_ranks()
        pushing = self.registry.push_fed_ranks()
        last = self.communicator.last_result
        missed = frozenset(last.missing) if last is not None else frozenset()
        linked = GaugeMetricFamily("loadagg_rank_linked", "1 when a connected agent serves the dp rank.",
                                   labels=["dp_rank"])
        missing = GaugeMetricFamily(
            "loadagg_rank_missing", "1 when the dp rank would be missing from an answer now: no agent serves it, "
            "or it did not answer the last round.", labels=["dp_rank"])
        push_fed = GaugeMetricFamily("loadagg_rank_push_fed", "1 when the dp rank's agent pushes its figures "
                                     "unasked (on its current link).", labels=["dp_rank"])
        age = GaugeMetricFamily(
            "loadagg_rank_figures_age_seconds", "Age of the newest figures held for the dp rank (a round answer or "
            "a push), on the aggregator's clock: what a cached or stale answer gives routers.", labels=["dp_rank"])
        for rank in range(self.registry.dp_size):
            label = [str(rank)]
            linked.add_metric(label, rank in live)
            missing.add_metric(label, rank not in live or rank in missed)
            push_fed.add_metric(label, rank in pushing)
            snapshot = self.registry.snapshot(rank)
            if snapshot is not None:  # a rank never heard of has no age (not 0, not infinity)
                age.add_metric(label, snapshot.age_ms(now) / 1000)
        yield from (linked, missing, push_fed, age)


class CountersCollector(Collector):
    """Counters read at scrape time from callables: (name, help, read) each."""

    def __init__(self, counters: list[tuple[str, str, Callable[[], float]]]) -> None:
        self.counters = counters

    def collect(self) -> Iterator:
        for name, doc, read in self.counters:
            yield CounterMetricFamily(name, doc, value=read())


class HttpStreamsCollector(Collector):
    """The HTTP gateway's SSE streams (`GET /v1/loads/watch`): open now, refused at the limit, dropped for
    not reading. Read at scrape time from the gateway's counters (http_stream.HttpStreams)."""

    def __init__(self, streams) -> None:
        self.streams = streams

    def collect(self) -> Iterator:
        yield GaugeMetricFamily("loadagg_http_streams", "HTTP watch streams (GET /v1/loads/watch) open now.",
                                value=self.streams.open)
        yield CounterMetricFamily("loadagg_http_streams_refused", "HTTP watch streams refused past "
                                  "--max-http-streams (429 RESOURCE_EXHAUSTED).", value=self.streams.refused)
        yield CounterMetricFamily("loadagg_http_streams_dropped", "HTTP watch streams dropped because their client "
                                  "read nothing for --http-stream-send-timeout-s.", value=self.streams.dropped)


class _CallLatency(Collector):
    """loadagg_getloads_duration_seconds{api, code}, kept in plain lists.

    It is observed on every loads call. prometheus_client's Histogram takes a lock per update, and that
    showed in a 1000-caller storm; here an observation is a bisect and two additions (one event loop
    thread writes, a scrape reads).
    """

    NAME = "loadagg_getloads_duration_seconds"

    def __init__(self) -> None:
        self._series: dict[tuple[str, str], list] = {}  # (api, code) -> [count per bucket, +Inf last; sum]

    def observe(self, api: str, code: str, seconds: float) -> None:
        series = self._series.get((api, code))
        if series is None:
            series = self._series[api, code] = [[0] * (len(_LATENCY_BUCKETS) + 1), 0.0]
        series[0][bisect_left(_LATENCY_BUCKETS, seconds)] += 1  # first bucket whose bound >= seconds
        series[1] += seconds

    def collect(self) -> Iterator:
        family = HistogramMetricFamily(self.NAME, "Loads calls by API and outcome (gRPC status or HTTP status).",
                                       labels=["api", "code"])
        bounds = [*map(floatToGoString, _LATENCY_BUCKETS), "+Inf"]
        for (api, code), (counts, total) in sorted(self._series.items()):
            family.add_metric([api, code], list(zip(bounds, accumulate(counts), strict=False)), total)
        yield family


class AggregatorMetrics:
    def __init__(self, communicator: Communicator, registry: AgentRegistry, watch: WatchHub) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_StateCollector(communicator, registry, watch))
        self.registry.register(_RankCollector(communicator, registry))
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
        self.call_duration = _CallLatency()
        self.registry.register(self.call_duration)
        communicator.on_round_end(self.round_ended)

    def round_ended(self, result: RoundResult) -> None:
        self.round_duration.observe(result.duration_ms / 1000)
        self.callers_per_round.observe(result.callers)
        self.missing_ranks.set(len(result.missing))
        self.missing_rank_total.inc(len(result.missing))

    def observe_call(self, api: str, code: str, seconds: float) -> None:
        self.call_duration.observe(api, code, seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _failure_code(status, error: BaseException) -> str:
    if isinstance(status, grpc.StatusCode):
        return status.name
    if isinstance(error, TimeoutError):
        return "DEADLINE_EXCEEDED"
    if type(error).__name__ == "CancelledError":
        return "CANCELLED"
    return "UNKNOWN"


def timed_handler(metrics: AggregatorMetrics, api: str, handler: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
    """Wrap a unary grpc.aio handler to record its latency labelled by the status it ended with."""

    observe = metrics.observe_call

    async def wrapped(request, context: grpc.aio.ServicerContext):
        started = time.perf_counter()
        try:
            response = await handler(request, context)
        except BaseException as error:
            observe(api, _failure_code(context.code(), error), time.perf_counter() - started)
            raise
        status = context.code()  # set when the handler aborted
        observe(api, status.name if isinstance(status, grpc.StatusCode) else "OK", time.perf_counter() - started)
        return response

    return wrapped
