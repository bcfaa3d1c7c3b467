"""sglang's /v1/loads shape: field names, section names and the aggregate, as sglang itself builds them.

Reference (read, not copied): sgl-project/sglang python/sglang/srt/entrypoints/v1_loads.py in the releases
that answer `{timestamp, version, dp_rank_count, loads[], aggregate{}}`, and the `SchedulerLoad` /
`AggregateMetrics` messages of `sglang.grpc.scheduler` (PyPI smg-grpc-proto). Used by the HTTP gateway
(JSON and Prometheus text) and by the gRPC SglangScheduler/VllmEngine compat services.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Sequence
from datetime import UTC, datetime

from loadagg.server.render_steps import RENDER_STEP_RANKS, RenderSteps
from loadagg.v1 import loadagg_pb2 as pb

# Per-rank scalar fields, in sglang's order. A figure our source does not have is left out, as sglang
# leaves out a None.
CORE_FIELDS: tuple[str, ...] = (
    "num_running_reqs",
    "num_waiting_reqs",
    "num_used_tokens",
    "num_total_tokens",
    "max_total_num_tokens",
    "token_usage",
    "gen_throughput",
    "cache_hit_rate",
    "utilization",
    "max_running_requests",
    "num_waiting_uncached_tokens",
    # sglang 0.5.23
    "num_active_tokens",
    "num_prealloc_ready_tokens",
    "total_prefill_uncached_tokens",
    "total_prefill_busy_us",
    # loadagg's (derived, or SMG's record): extra keys a client of either generation skips
    "prefill_throughput",
    "active_token_usage",
    "engine_silence_ms",
)
# loadagg section field -> sglang's key for it (sglang names the objects, not the include words).
SECTION_KEYS: dict[str, str] = {
    "memory": "memory",
    "spec": "speculative",
    "lora": "lora",
    "disagg": "disaggregation",
    "queues": "queues",
}
# sglang's Prometheus prefixes: sglang_<field>, sglang_<prefix>_<field>.
PROMETHEUS_PREFIX: dict[str, str] = {"speculative": "spec", "disaggregation": "disagg"}
HELP: dict[str, str] = {
    "num_running_reqs": "Requests running on this dp rank",
    "num_waiting_reqs": "Requests waiting on this dp rank",
    "num_total_reqs": "Running plus waiting requests",
    "num_used_tokens": "Tokens held in the KV cache",
    "num_total_tokens": "Used tokens plus tokens waiting for prefill",
    "max_total_num_tokens": "Token capacity of the KV cache",
    "token_usage": "Token pool usage ratio",
    "gen_throughput": "Generation throughput in tokens per second",
    "cache_hit_rate": "Prefix cache hit rate",
    "utilization": "Overall utilization ratio",
    "max_running_requests": "Running request capacity",
    "num_waiting_uncached_tokens": "Waiting prefill tokens not served from cache",
    "num_active_tokens": "Total tokens less those awaiting a KV transfer",
    "num_prealloc_ready_tokens": "Tokens of requests preallocated and ready",
    "total_prefill_uncached_tokens": "Uncached prompt tokens prefilled since start",
    "total_prefill_busy_us": "Prefill step time since start in microseconds",
    "prefill_throughput": "Uncached prompt tokens per second of prefill step time",
    "active_token_usage": "Non-evictable KV-cache usage ratio",
    "engine_silence_ms": "Engine silence while it holds requests in milliseconds",
}
INT32_MAX = 2**31 - 1


def iso_timestamp(unix_ms: int) -> str:
    return datetime.fromtimestamp(unix_ms / 1000, tz=UTC).isoformat()


def _fields(message) -> dict:
    return {field.name: value for field, value in message.ListFields()}


def total_reqs(load: pb.RankLoad) -> int | None:
    """The rank's running plus waiting requests: as its source said, else the sum when it has both figures."""
    if load.HasField("num_total_reqs"):
        return load.num_total_reqs
    if load.HasField("num_running_reqs") and load.HasField("num_waiting_reqs"):
        return load.num_running_reqs + load.num_waiting_reqs
    return None


def load_dict(load: pb.RankLoad) -> dict:
    """One rank as sglang's JSON has it: dp_rank, core figures, sections, and num_total_reqs."""
    d: dict = {"dp_rank": load.dp_rank}
    for name in CORE_FIELDS:
        if load.HasField(name):
            d[name] = getattr(load, name)
    for section, key in SECTION_KEYS.items():
        if load.HasField(section):
            d[key] = _fields(getattr(load, section))
    if (total := total_reqs(load)) is not None:
        d["num_total_reqs"] = total
    return d


INT64_MAX = 2**63 - 1  # totals saturate here, as the gRPC summary's int64 fields do


def _total(loads: list[pb.RankLoad], name: str) -> int | None:
    present = [getattr(load, name) for load in loads if load.HasField(name)]
    return min(sum(present), INT64_MAX) if present else None


def _mean(loads: list[pb.RankLoad], name: str, ndigits: int) -> float | None:
    present = [getattr(load, name) for load in loads if load.HasField(name)]
    return round(sum(present) / len(present), ndigits) if present else None


def aggregate_steps(loads: Sequence[pb.RankLoad]) -> Generator[None, None, dict]:
    """sglang's `aggregate`, a figure a step: totals, and means rounded as sglang rounds them, over the ranks
    reporting each figure; one that no returned rank reports is left out (as a rank's own missing figure is),
    never a 0."""
    figures: dict = {}
    totals = [t for t in map(total_reqs, loads) if t is not None]
    yield
    for name, figure in (("total_running_reqs", "num_running_reqs"), ("total_waiting_reqs", "num_waiting_reqs")):
        figures[name] = _total(loads, figure)
        yield
    figures["total_reqs"] = min(sum(totals), INT64_MAX) if totals else None
    for name, figure in (("total_used_tokens", "num_used_tokens"), ("total_tokens", "num_total_tokens")):
        figures[name] = _total(loads, figure)
        yield
    for name, figure, ndigits in (("avg_token_usage", "token_usage", 4), ("avg_throughput", "gen_throughput", 2),
                                  ("avg_utilization", "utilization", 4)):
        figures[name] = _mean(loads, figure, ndigits)
        yield
    return {name: value for name, value in figures.items() if value is not None}


def _engine_facts(loads: Sequence[pb.RankLoad]) -> tuple[dict, tuple[str, ...]]:
    """0.5.23's `accelerator` and `num_accelerators`: top level when the ranks agree; else the names each rank
    carries itself (second)."""
    facts: dict = {}
    per_rank: list[str] = []
    for name in ("accelerator", "num_accelerators"):
        values = {getattr(load, name) for load in loads if load.HasField(name)}
        if len(values) == 1:
            facts[name] = values.pop()
        elif values:
            per_rank.append(name)
    return facts, tuple(per_rank)


def _rank_dict(load: pb.RankLoad, per_rank: tuple[str, ...]) -> dict:
    d = load_dict(load)
    for name in per_rank:
        if load.HasField(name):
            d[name] = getattr(load, name)
    return d


def json_body_steps(timestamp_ms: int, loads: Sequence[pb.RankLoad], version: str) -> RenderSteps:
    """The whole sglang JSON body of one caller's view, in steps, one that both generations' clients parse:
    0.5.23's keys (`accelerator`, `num_accelerators`, its per-rank figures) beside the older `dp_rank_count` (ranks
    returned, as sglang counted) and `aggregate`. Strings travel as UTF-8, as in the gRPC answer."""
    facts, per_rank = _engine_facts(loads)
    head = {"timestamp": iso_timestamp(timestamp_ms), "version": version, **facts, "dp_rank_count": len(loads)}
    parts: list[bytes] = []  # (encoded a step at a time: one copy of the whole body at the end)
    for start in range(0, len(loads), RENDER_STEP_RANKS):
        chunk = [_rank_dict(load, per_rank) for load in loads[start:start + RENDER_STEP_RANKS]]
        parts.append(json.dumps(chunk, ensure_ascii=False)[1:-1].encode())  # (json.dumps' separators throughout)
        yield
    totals = json.dumps((yield from aggregate_steps(loads)), ensure_ascii=False)
    head = json.dumps(head, ensure_ascii=False)[:-1]
    return f'{head}, "loads": ['.encode() + b", ".join(parts) + f'], "aggregate": {totals}}}'.encode()


def prometheus_steps(loads: Sequence[pb.RankLoad]) -> RenderSteps:
    """sglang's `format=prometheus`, in steps: one gauge family per figure, a sample per rank labelled dp_rank.
    Samples are kept as their lines (strings: nothing for the garbage collector to walk)."""
    samples: dict[str, list[str]] = {}
    for i, load in enumerate(loads, 1):
        d = load_dict(load)
        rank = d.pop("dp_rank")
        for key, value in d.items():
            if isinstance(value, dict):
                prefix = PROMETHEUS_PREFIX.get(key, key)
                for sub_key, sub_value in value.items():
                    if isinstance(sub_value, (int, float)) and not isinstance(sub_value, bool):
                        name = f"sglang_{prefix}_{sub_key}"
                        samples.setdefault(name, []).append(f'{name}{{dp_rank="{rank}"}} {sub_value}')
            elif isinstance(value, (int, float)):
                name = f"sglang_{key}"
                samples.setdefault(name, []).append(f'{name}{{dp_rank="{rank}"}} {value}')
        if i % RENDER_STEP_RANKS == 0:
            yield
    families: list[bytes] = []
    for name, lines in samples.items():
        field = name.removeprefix("sglang_")
        help_line = f"# HELP {name} {HELP.get(field, field.replace('_', ' '))}\n# TYPE {name} gauge\n"
        families.append((help_line + "\n".join(lines) + "\n").encode())
        yield
    return b"".join(families) or b"\n"
