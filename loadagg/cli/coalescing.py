"""The coalescing line of `loadagg demo` and `loadagg top`, read from the aggregator's Prometheus metrics.

router calls/s, rounds/s, callers per round, and the engine reads saved against every router asking every
engine itself: an answer (a GetLoads call of any API, or a WatchLoads answer) would otherwise read each linked
agent's engine once, while the aggregator reads each engine once per round it asks (a collect) and once per
push. Rates are taken between two readings of /metrics; the first reading gives the totals since start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# Counter and gauge samples summed into each figure (every label value of a sample counts).
_CALLS = ("loadagg_getloads_duration_seconds_count", "loadagg_watch_delivered_total")
_FIGURES = {
    "rounds": ("loadagg_rounds_started_total",),
    "callers": ("loadagg_round_callers_total",),
    "engine_reads": ("loadagg_collects_sent_total", "loadagg_pushes_received_total"),
    "agents": ("loadagg_connected_agents",),
    "calls": _CALLS,
}


@dataclass(frozen=True, slots=True)
class Reading:
    """One reading of the aggregator's /metrics (counters since its start; `agents` linked now)."""

    at: float  # monotonic, seconds
    calls: float = 0.0
    rounds: float = 0.0
    callers: float = 0.0
    engine_reads: float = 0.0
    agents: float = 0.0


def read_metrics(text: str, at: float | None = None) -> Reading:
    """The figures of a Prometheus text page (`loadagg serve`'s /metrics, or `AggregatorMetrics.exposition()`)."""
    wanted = {sample: figure for figure, samples in _FIGURES.items() for sample in samples}
    sums = dict.fromkeys(_FIGURES, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            figure = wanted.get(sample.name)
            if figure is not None:
                sums[figure] += sample.value
    return Reading(at=time.monotonic() if at is None else at, **sums)


@dataclass(frozen=True, slots=True)
class Coalescing:
    calls_per_s: float | None  # None on the first reading: no interval to divide by yet
    rounds_per_s: float | None
    callers_per_round: float | None  # None while no round ran
    reads_asked: float  # engine reads if every router asked every engine itself (per s, or total)
    reads_done: float  # engine reads the aggregator caused
    agents: int
    per_second: bool

    @property
    def saved_ratio(self) -> float | None:
        return 1 - self.reads_done / self.reads_asked if self.reads_asked > 0 else None


def coalescing(now: Reading, before: Reading | None = None) -> Coalescing:
    """The figures between two readings (rates), or since the aggregator started when there is no earlier one."""
    base = before if before is not None and now.at > before.at and now.calls >= before.calls else Reading(at=now.at)
    elapsed = now.at - base.at if base is before else 0.0
    calls, rounds = now.calls - base.calls, now.rounds - base.rounds
    callers, reads = now.callers - base.callers, now.engine_reads - base.engine_reads
    scale = 1 / elapsed if elapsed else 1.0
    return Coalescing(
        calls_per_s=calls * scale if elapsed else None,
        rounds_per_s=rounds * scale if elapsed else None,
        callers_per_round=callers / rounds if rounds else None,
        reads_asked=calls * now.agents * scale,
        reads_done=reads * scale,
        agents=int(now.agents),
        per_second=bool(elapsed),
    )


def describe(c: Coalescing) -> str:
    """One line: `router calls 1,998/s  rounds 31/s  callers per round 63.8  engine reads saved 98.4 %: ...`."""
    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f}/s"

    callers = "-" if c.callers_per_round is None else f"{c.callers_per_round:,.1f}"
    unit = "/s" if c.per_second else " since start"
    if c.saved_ratio is None:
        saved = "engine reads saved -"
    else:
        saved = (f"engine reads saved {c.saved_ratio * 100:.1f} %: {c.reads_done:,.0f}{unit}, not "
                 f"{c.reads_asked:,.0f}{unit} with every router asking each of {c.agents} engine(s)")
    return f"router calls {rate(c.calls_per_s)}  rounds {rate(c.rounds_per_s)}  callers per round {callers}  {saved}"
