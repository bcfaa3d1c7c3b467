"""VllmMetricsSource: a vLLM server's Prometheus `GET /metrics`, parsed by prometheus_client's own parser.

Figures per dp rank (the `engine` label in data-parallel deployments; no label = rank 0):
* `vllm:num_requests_running` / `vllm:num_requests_waiting` -> num_running_reqs / num_waiting_reqs;
* `vllm:kv_cache_usage_perc` (v1; a 0..1 ratio despite the name), or the older
  `vllm:gpu_cache_usage_perc` -> token_usage;
* `vllm:cache_config_info{num_gpu_blocks, block_size}` -> max_total_num_tokens (blocks x block size),
  and with it num_used_tokens = token_usage x capacity (block granular). vLLM's front end sums
  num_gpu_blocks over the DP engines it runs and labels every engine with that sum, so each engine
  on a page gets an even share (they run the same model on the same kind of GPU);
* counters `vllm:prefix_cache_hits` / `vllm:prefix_cache_queries` (named `vllm:gpu_prefix_cache_*` in
  v1 releases before 0.10) -> cache_hit_rate over the last window (>= WINDOW_S) that saw queries, the
  lifetime ratio before the first one; v0's `vllm:gpu_prefix_cache_hit_rate` gauge when the counters are absent;
* counter `vllm:generation_tokens` -> gen_throughput, tokens/s over the last window. Unset until a
  window has passed: a rate needs two samples.
Everything else (memory breakdown, spec, lora, disagg, queues) is not on the page and stays unset.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.sources.base import EngineRanks, LoadSource, SourceError, read_ranks, set_figure
from scheduler_agent.sources.http_client import EngineHttp

log = logging.getLogger(__name__)

METRICS = "/metrics"
WINDOW_S = 1.0
_GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:gpu_cache_usage_perc": "kv_usage_v0",
    "vllm:gpu_prefix_cache_hit_rate": "hit_rate_v0",
}
_COUNTERS = {  # sample names (the parser keeps `_total` on samples, drops it from family names)
    "vllm:prefix_cache_hits_total": "hits",
    "vllm:prefix_cache_queries_total": "queries",
    "vllm:gpu_prefix_cache_hits_total": "hits_gpu",  # the same counters before 0.10 (some pages carry both)
    "vllm:gpu_prefix_cache_queries_total": "queries_gpu",
    "vllm:generation_tokens_total": "generated",
}


_FAMILIES = {name.removesuffix("_total") for name in _COUNTERS} | set(_GAUGES) | {"vllm:cache_config_info"}
_SAMPLES = set(_GAUGES) | set(_COUNTERS) | {"vllm:cache_config_info"}


def relevant_lines(text: str) -> str:
    """Only the lines of the families read here (and their HELP/TYPE comments).

    A real vLLM page is mostly histograms (thousands of bucket lines); parsing them all costs ~100 ms
    per read on a busy host. Selecting lines by metric name first keeps the official parser for every
    value used, at a fraction of the cost.
    """
    kept = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE") and parts[2] in _FAMILIES:
                kept.append(line)
        else:
            name = line.split("{", 1)[0].strip().split(" ", 1)[0]
            if name in _SAMPLES:
                kept.append(line)
    return "\n".join(kept) + "\n"


def _finite(value: float | None) -> float | None:
    """A counter sample, or None when there is none or it is not a finite number."""
    return value if value is not None and math.isfinite(value) else None


def _figure(rank: int, name: str, value: float, ratio: bool = False) -> float:
    """A gauge as it is, or SourceError (failing this rank) when it cannot be true."""
    if not math.isfinite(value) or value < 0 or (ratio and value > 1.0):
        kind = "a ratio in [0, 1]" if ratio else "a finite figure >= 0"
        raise SourceError(f"GET {METRICS}: rank {rank} {name} is {value}, not {kind}")
    return value


def _engine_rank(labels: dict[str, str]) -> int:
    engine = labels.get("engine")
    if engine is None:
        return 0
    try:
        rank = int(engine)
    except ValueError:
        raise SourceError(f"GET {METRICS}: engine label {engine!r} is not a dp rank") from None
    if rank < 0:
        raise SourceError(f"GET {METRICS}: engine label {engine!r} is not a dp rank")
    return rank


def parse_page(text: str) -> dict[int, dict[str, float]]:
    """Per rank: the figures above (summed over other labels such as model_name), from one page."""
    figures: dict[int, dict[str, float]] = defaultdict(dict)
    try:
        for family in text_string_to_metric_families(relevant_lines(text)):
            for sample in family.samples:
                name = _GAUGES.get(sample.name) or _COUNTERS.get(sample.name)
                if name is None and sample.name != "vllm:cache_config_info":
                    continue
                try:
                    rank = _engine_rank(sample.labels)
                except SourceError as error:  # one malformed series fails no rank (its own is unknown)
                    log.debug("%s; series skipped", error)
                    continue
                if name is not None:
                    figures[rank][name] = figures[rank].get(name, 0.0) + sample.value
                else:
                    _capacity(figures[rank], sample.labels)
    except Exception as error:  # the parser raises ValueError (and friends) on a malformed page
        raise SourceError(f"GET {METRICS}: not Prometheus text ({type(error).__name__})") from None
    if not any("running" in f for f in figures.values()):
        raise SourceError(f"GET {METRICS}: no vllm:num_requests_running on the page: is this vLLM?")
    sized = [f for f in figures.values() if "capacity" in f]
    for f in sized:  # every engine label carries the front end's sum over its engines
        f["capacity"] /= len(sized)
    for f in figures.values():  # the older names count only when the newer ones are absent
        for old, new in (("hits_gpu", "hits"), ("queries_gpu", "queries")):
            if old in f:
                f.setdefault(new, f[old])
                del f[old]
    return dict(figures)


def _capacity(figures: dict[str, float], labels: dict[str, str]) -> None:
    try:
        blocks, block_size = int(labels["num_gpu_blocks"]), int(labels["block_size"])
    except (KeyError, ValueError):  # "None" before the KV cache is sized
        return
    if blocks > 0 and block_size > 0:
        figures["capacity"] = blocks * block_size


@dataclass
class _Window:
    """Counter samples at the start of the current window, and the rates of the last complete one."""

    at: float
    generated: float | None
    hits: float | None
    queries: float | None
    throughput: float | None = None
    hit_rate: float | None = None


class VllmMetricsSource(LoadSource):
    name = "vllm"

    def __init__(self, base_url: str, timeout_s: float | None = None, window_s: float = WINDOW_S,
                 api_key: str = "") -> None:
        self.http = EngineHttp(base_url, timeout_s, api_key)
        self.window_s = window_s
        self._windows: dict[int, _Window] = {}
        self.reads = 0

    def set_round_timeout(self, round_timeout_ms: int) -> None:
        self.http.set_round_timeout(round_timeout_ms)

    def _rates(self, rank: int, f: dict[str, float], now: float) -> _Window:
        """Advance `rank`'s window with this page's counters (a counter that went down restarts it; one that
        is not a finite figure is treated as absent, so it yields no rate rather than 0 or 1)."""
        w = self._windows.get(rank)
        generated, hits, queries = (_finite(f.get(name)) for name in ("generated", "hits", "queries"))
        restarted = w is not None and any(
            new is not None and old is not None and new < old
            for new, old in ((generated, w.generated), (hits, w.hits), (queries, w.queries))
        )
        if w is None or restarted:
            w = self._windows[rank] = _Window(now, generated, hits, queries)
            return w
        elapsed = now - w.at
        if elapsed >= self.window_s:
            if generated is not None and w.generated is not None:
                w.throughput = (generated - w.generated) / elapsed
            if hits is not None and queries is not None and w.hits is not None and w.queries is not None:
                if queries > w.queries:
                    w.hit_rate = min(1.0, (hits - w.hits) / (queries - w.queries))
            w.at, w.generated, w.hits, w.queries = now, generated, hits, queries
        return w

    def _load(self, rank: int, f: dict[str, float], now: float, now_ms: int) -> pb.RankLoad:
        """One rank's RankLoad; SourceError (that rank only) for a gauge that cannot be true: NaN, negative,
        a usage ratio above 1, a count past its field. Never clamped into a plausible figure."""
        load = pb.RankLoad(dp_rank=rank, timestamp_ms=now_ms)
        for name, field in (("running", "num_running_reqs"), ("waiting", "num_waiting_reqs")):
            if name in f:
                set_figure(load, field, int(_figure(rank, name, f[name])), f"{METRICS}: rank {rank} {name}")
        usage = f.get("kv_usage", f.get("kv_usage_v0"))
        if usage is not None:
            load.token_usage = _figure(rank, "kv cache usage", usage, ratio=True)
        capacity = f.get("capacity")
        if capacity:
            set_figure(load, "max_total_num_tokens", int(capacity), f"{METRICS}: rank {rank} capacity")
            if usage is not None:
                load.num_used_tokens = round(load.token_usage * capacity)
        w = self._rates(rank, f, now)
        if w.throughput is not None:
            load.gen_throughput = max(0.0, w.throughput)
        hits, queries = _finite(f.get("hits")), _finite(f.get("queries"))
        if w.hit_rate is not None:
            load.cache_hit_rate = max(0.0, w.hit_rate)
        elif queries and hits is not None and hits >= 0:
            load.cache_hit_rate = min(1.0, hits / queries)
        elif "hit_rate_v0" in f:
            load.cache_hit_rate = _figure(rank, "prefix cache hit rate", f["hit_rate_v0"], ratio=True)
        return load

    async def read(self, ranks: Sequence[int]) -> dict[int, pb.RankLoad]:
        self.reads += 1
        figures = parse_page(await self.http.get_text(METRICS))
        now, now_ms = time.monotonic(), time.time_ns() // 1_000_000
        return read_ranks(ranks, figures.items(), lambda rank, f: self._load(rank, f, now, now_ms), f"GET {METRICS}")

    async def discover(self) -> EngineRanks:
        figures = parse_page(await self.http.get_text(METRICS))
        ranks = sorted(rank for rank, f in figures.items() if "running" in f)
        return EngineRanks(tuple(ranks), max(ranks) + 1)

    async def close(self) -> None:
        await self.http.close()
