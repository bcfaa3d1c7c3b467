"""SglangHttpSource: an sglang server's HTTP `GET /v1/loads?include=all`, or the legacy `GET /get_load`.

`/v1/loads` answers `{"timestamp", "version", "loads": [entry per dp rank], ...}` (older releases add
`dp_rank_count` and `aggregate`, newer ones `accelerator` and `num_accelerators`). Each entry carries
the core figures and, when the engine has them, the `memory`, `speculative`, `lora`, `disaggregation`
and `queues` objects. A key the engine leaves out (or sends as null) stays unset in the RankLoad.

Servers older than `/v1/loads` (HTTP 404) are read through `/get_load`: `[{dp_rank, num_reqs,
num_waiting_reqs, num_tokens}]`, where num_reqs counts running + waiting requests and num_tokens the
tokens in use plus the prompts still queued: what `/v1/loads` calls num_total_tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.sources.base import (
    EngineRanks,
    LoadSource,
    PartialRead,
    SourceError,
    not_applicable,
    read_ranks,
    set_figure,
)
from scheduler_agent.sources.http_client import EngineHttp, NotFound
from scheduler_agent.sources.sglang_wire import PrefillRate

V1_LOADS = "/v1/loads?include=all"
V1_LOADS_CORE = "/v1/loads?include=core"
LEGACY = "/get_load"
V1_RECHECK_S = 30.0  # in legacy mode, how often /v1/loads is tried again

_INT, _FLOAT, _STR = "int", "float", "str"
# JSON key -> (RankLoad field, kind). The proto names follow sglang's, so they are the same keys.
_CORE = {
    "num_running_reqs": _INT,
    "num_waiting_reqs": _INT,
    "num_total_reqs": _INT,
    "num_used_tokens": _INT,
    "num_total_tokens": _INT,
    "max_total_num_tokens": _INT,
    "num_waiting_uncached_tokens": _INT,
    "token_usage": _FLOAT,
    "gen_throughput": _FLOAT,
    "cache_hit_rate": _FLOAT,
    "utilization": _FLOAT,
    "max_running_requests": _INT,
    # sglang 0.5.23
    "num_active_tokens": _INT,
    "num_prealloc_ready_tokens": _INT,
    "total_prefill_uncached_tokens": _INT,
    "total_prefill_busy_us": _INT,
}
# JSON section -> (RankLoad section, {JSON key: (proto field, kind)}).
_SECTIONS: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "memory": ("memory", {
        "weight_gb": ("weight_gb", _FLOAT), "kv_cache_gb": ("kv_cache_gb", _FLOAT),
        "graph_gb": ("graph_gb", _FLOAT), "token_capacity": ("token_capacity", _INT),
    }),
    "speculative": ("spec", {"accept_length": ("accept_length", _FLOAT), "accept_rate": ("accept_rate", _FLOAT)}),
    "lora": ("lora", {
        "slots_used": ("slots_used", _INT), "slots_total": ("slots_total", _INT),
        "utilization": ("utilization", _FLOAT),
    }),
    "disaggregation": ("disagg", {
        "mode": ("mode", _STR),
        "prefill_prealloc_queue_reqs": ("prefill_prealloc_queue_reqs", _INT),
        # Newer sglang calls the prefill bootstrap queue by its own name; same queue, same field.
        "prefill_bootstrap_queue_reqs": ("prefill_prealloc_queue_reqs", _INT),
        "prefill_inflight_queue_reqs": ("prefill_inflight_queue_reqs", _INT),
        "decode_prealloc_queue_reqs": ("decode_prealloc_queue_reqs", _INT),
        "decode_transfer_queue_reqs": ("decode_transfer_queue_reqs", _INT),
        "decode_retracted_queue_reqs": ("decode_retracted_queue_reqs", _INT),
        "kv_transfer_speed_gb_s": ("kv_transfer_speed_gb_s", _FLOAT),
        "kv_transfer_latency_ms": ("kv_transfer_latency_ms", _FLOAT),
    }),
    "queues": ("queues", {
        "waiting": ("waiting", _INT), "grammar": ("grammar", _INT),
        "paused": ("paused", _INT), "retracted": ("retracted", _INT),
        "prealloc_ready": ("prealloc_ready", _INT),
    }),
}


def _value(where: str, raw: Any, kind: str) -> Any:
    """`raw` as the proto wants it, or SourceError naming the field (a garbage payload)."""
    if kind == _STR:
        if not isinstance(raw, str):
            raise SourceError(f"{where} is not a string")
        return raw
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise SourceError(f"{where} is not a number")
    if isinstance(raw, float) and not math.isfinite(raw):
        raise SourceError(f"{where} is not finite")
    if raw < 0:
        raise SourceError(f"{where} is negative")
    if kind == _INT:
        if isinstance(raw, float) and not raw.is_integer():
            raise SourceError(f"{where} is not a whole number")
        return int(raw)
    return float(raw)


def _rank_of(entry: Any, where: str, single: bool) -> int:
    if not isinstance(entry, dict):
        raise SourceError(f"{where}: an entry is not an object")
    rank = entry.get("dp_rank")
    if rank is None and single:
        return 0  # a server without data parallelism may leave dp_rank out
    return _value(f"{where}: dp_rank", rank, _INT)


def _taken_at(stamp: Any, now_ms: int) -> int:
    """The scheduler's own snapshot time (unix seconds, some sglang versions send it), if plausible; else now."""
    if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) and math.isfinite(stamp):
        stamp_ms = int(stamp * 1000)
        if abs(now_ms - stamp_ms) < 3_600_000:  # not a monotonic clock or a unit mix-up
            return stamp_ms
    return now_ms


def load_from_v1(entry: dict, now_ms: int, where: str = "/v1/loads", single: bool = False) -> pb.RankLoad:
    """One `/v1/loads` entry as a RankLoad: keys present are copied, keys absent stay unset (`single`: the
    server's only entry, which may leave dp_rank out)."""
    rank = _rank_of(entry, where, single)
    load = pb.RankLoad(dp_rank=rank, timestamp_ms=_taken_at(entry.get("timestamp"), now_ms))
    for key, kind in _CORE.items():
        raw = entry.get(key)
        if raw is not None and not not_applicable(key, raw):
            named = f"{where}: rank {rank} {key}"
            set_figure(load, key, _value(named, raw, kind), named)
    for key, (section, fields) in _SECTIONS.items():
        raw = entry.get(key)
        if raw is None:
            continue
        if not isinstance(raw, dict):
            raise SourceError(f"{where}: rank {rank} {key} is not an object")
        target = getattr(load, section)
        target.SetInParent()  # the engine sent the section: keep it even if every figure is absent
        for json_key, (field, kind) in fields.items():
            value = raw.get(json_key)
            if value is not None:
                named = f"{where}: rank {rank} {key}.{json_key}"
                set_figure(target, field, _value(named, value, kind), named)
    return load


def load_from_legacy(entry: dict, now_ms: int, single: bool) -> pb.RankLoad:
    """One legacy `/get_load` entry: request counts and num_tokens (as num_total_tokens)."""
    rank = _rank_of(entry, LEGACY, single)
    load = pb.RankLoad(dp_rank=rank, timestamp_ms=now_ms)
    total = entry.get("num_reqs")
    waiting = entry.get("num_waiting_reqs")
    for raw, field, key in ((total, "num_total_reqs", "num_reqs"), (waiting, "num_waiting_reqs", "num_waiting_reqs"),
                            (entry.get("num_tokens"), "num_total_tokens", "num_tokens")):
        if raw is not None:
            where = f"{LEGACY}: rank {rank} {key}"
            set_figure(load, field, _value(where, raw, _INT), where)
    if total is not None and waiting is not None and load.num_total_reqs >= load.num_waiting_reqs:
        load.num_running_reqs = load.num_total_reqs - load.num_waiting_reqs
    return load


def engine_facts(body: Any) -> dict[str, Any]:
    """sglang 0.5.23's engine-wide keys, as RankLoad fields: `accelerator` and `num_accelerators` (per rank)."""
    facts: dict[str, Any] = {}
    if not isinstance(body, dict):
        return facts
    name, count = body.get("accelerator"), body.get("num_accelerators")
    if isinstance(name, str) and name:
        facts["accelerator"] = name[:256]
    if isinstance(count, int) and not isinstance(count, bool) and 0 < count < 2**31:
        facts["num_accelerators"] = count
    return facts


def _entries(body: Any, path: str) -> list:
    entries = body.get("loads") if isinstance(body, dict) else body
    if not isinstance(entries, list):
        raise SourceError(f"GET {path}: no list of per-rank loads in the body")
    return entries


class SglangHttpSource(LoadSource):
    """Polls one sglang HTTP server (all its dp ranks in one request per read)."""

    name = "sglang"

    def __init__(self, base_url: str, timeout_s: float | None = None, api_key: str = "") -> None:
        self.http = EngineHttp(base_url, timeout_s, api_key)
        self.legacy = False  # switched on by a 404 on /v1/loads, off again by a 404 on /get_load
        self._legacy_since = 0.0
        self.reads = 0
        self.rates = PrefillRate()

    def set_round_timeout(self, round_timeout_ms: int) -> None:
        self.http.set_round_timeout(round_timeout_ms)

    async def _body(self, v1_path: str) -> tuple[Any, bool]:
        """The parsed body and whether it came from the legacy endpoint."""
        if self.legacy and time.monotonic() - self._legacy_since >= V1_RECHECK_S:
            self.legacy = False  # a 404 during a restart, or an upgraded server: try /v1/loads again
        for _ in range(2):
            try:
                if self.legacy:
                    return await self.http.get_json(LEGACY), True
                return await self.http.get_json(v1_path), False
            except NotFound:
                self.legacy = not self.legacy
                self._legacy_since = time.monotonic()
        raise SourceError("neither GET /v1/loads nor GET /get_load exists on this server: is it sglang?")

    async def read(self, ranks: Sequence[int]) -> dict[int, pb.RankLoad]:
        self.reads += 1
        body, legacy = await self._body(V1_LOADS)
        now_ms = time.time_ns() // 1_000_000
        path = LEGACY if legacy else "/v1/loads"
        entries = _entries(body, path)
        single = len(entries) == 1
        ranked: list[tuple[int, Any]] = []
        unranked: list[str] = []  # an entry without a usable dp_rank fails no other rank
        for entry in entries:
            try:
                ranked.append((_rank_of(entry, path, single), entry))
            except SourceError as error:
                unranked.append(str(error))
        facts = engine_facts(body)
        if legacy:
            convert = lambda _rank, e: load_from_legacy(e, now_ms, single)  # noqa: E731
        else:
            def convert(_rank: int, entry: Any) -> pb.RankLoad:
                load = load_from_v1(entry, now_ms, single=single)
                for name, value in facts.items():
                    setattr(load, name, value)
                return self.rates.apply(load)
        try:
            loads = read_ranks(ranks, ranked, convert, f"GET {path}")
        except PartialRead as partial:
            unranked.append(str(partial))
            loads = partial.loads
        if unranked:
            raise PartialRead("; ".join(unranked), loads)
        return loads

    async def discover(self) -> EngineRanks:
        body, legacy = await self._body(V1_LOADS_CORE)
        path = LEGACY if legacy else "/v1/loads"
        entries = _entries(body, path)
        if not entries:
            raise SourceError(f"GET {path}: the engine reports no dp ranks yet")
        ranks = sorted({_rank_of(e, path, single=len(entries) == 1) for e in entries})
        count = body.get("dp_rank_count") if isinstance(body, dict) else None
        dp_size = count if isinstance(count, int) and count > max(ranks) else max(ranks) + 1
        return EngineRanks(tuple(ranks), dp_size)

    async def close(self) -> None:
        await self.http.close()
