"""sglang 0.5.23's binary load formats as the agent decodes them: the feed's `LoadStat` and the snapshot file's
`LoadSnapshot`, both msgpack (read, not copied, from sglang's `load_publisher.py` and `load_snapshot.py`).

* `LoadStat` is a tagged array: `["LoadStat", num_running_reqs, num_waiting_reqs, num_tokens,
  max_total_num_tokens, attn_dp_rank, num_waiting_uncached_tokens, num_total_tokens, max_running_requests,
  total_prefill_uncached_tokens, total_prefill_busy_us]`. Older schedulers send the first six; fields appended
  by newer ones are ignored. A position the frame does not have stays unset.
* `LoadSnapshot` is a map written with `omit_defaults`: a key left out holds its default (0), so those count
  as sent; the sections are arrays (`memory`, `speculative`, `lora`, `disaggregation`, `queues`).

Every count must be a non-negative integer and every ratio finite: anything else is garbage, and the rank is
failed with msgspec's message saying where.
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec

from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.sources.base import SourceError

Count = Annotated[int, msgspec.Meta(ge=0)]
Figure = Annotated[float, msgspec.Meta(ge=0)]

# The figures a LoadStat carries (RankLoad names), plus num_total_reqs derived from two of them: what a feed
# frame sets and the slower /v1/loads read must not overwrite with older values.
FEED_CORE_FIELDS = frozenset({
    "num_running_reqs", "num_waiting_reqs", "num_total_reqs", "num_used_tokens", "max_total_num_tokens",
    "num_waiting_uncached_tokens", "num_total_tokens", "max_running_requests", "total_prefill_uncached_tokens",
    "total_prefill_busy_us", "prefill_throughput",
})


class LoadStat(msgspec.Struct, array_like=True, tag="LoadStat"):
    num_running_reqs: Count
    num_waiting_reqs: Count
    num_tokens: Count
    max_total_num_tokens: Count
    attn_dp_rank: Count | None = None
    num_waiting_uncached_tokens: Count | None = None
    num_total_tokens: Count | None = None
    max_running_requests: Count | None = None
    total_prefill_uncached_tokens: Count | None = None
    total_prefill_busy_us: Count | None = None


class Memory(msgspec.Struct, array_like=True):
    weight_gb: Figure = 0.0
    kv_cache_gb: Figure = 0.0
    graph_gb: Figure = 0.0
    token_capacity: Count = 0


class Speculative(msgspec.Struct, array_like=True):
    accept_length: Figure = 0.0
    accept_rate: Figure = 0.0


class Lora(msgspec.Struct, array_like=True):
    slots_used: Count = 0
    slots_total: Count = 0
    utilization: Figure = 0.0


class Disaggregation(msgspec.Struct, array_like=True):
    mode: str = "null"
    prefill_bootstrap_queue_reqs: Count = 0
    prefill_inflight_queue_reqs: Count = 0
    decode_prealloc_queue_reqs: Count = 0
    decode_transfer_queue_reqs: Count = 0
    decode_retracted_queue_reqs: Count = 0
    kv_transfer_speed_gb_s: Figure = 0.0
    kv_transfer_latency_ms: Figure = 0.0


class Queues(msgspec.Struct, array_like=True):
    waiting: Count = 0
    grammar: Count = 0
    paused: Count = 0
    retracted: Count = 0
    prealloc_ready: Count | None = None  # absent before 0.5.23


class LoadSnapshot(msgspec.Struct):
    timestamp: float = 0.0
    dp_rank: Count = 0
    num_running_reqs: Count = 0
    num_waiting_reqs: Count = 0
    num_waiting_uncached_tokens: Count = 0
    num_used_tokens: Count = 0
    num_total_tokens: Count = 0
    num_active_tokens: Count = 0
    num_prealloc_ready_tokens: Count = 0
    max_total_num_tokens: Count = 0
    max_running_requests: Count = 0
    token_usage: Figure = 0.0
    gen_throughput: Figure = 0.0
    cache_hit_rate: Figure = 0.0
    utilization: float = 0.0  # -1 on a PD prefill server: "does not apply"
    total_prefill_uncached_tokens: Count = 0
    total_prefill_busy_us: Count = 0
    memory: Memory | None = None
    speculative: Speculative | None = None
    lora: Lora | None = None
    disaggregation: Disaggregation | None = None
    queues: Queues | None = None


_STAT = msgspec.msgpack.Decoder(LoadStat)
_SNAPSHOT = msgspec.msgpack.Decoder(LoadSnapshot)
# Counts copied as they are; capacities whose 0 means "not known" (sglang's own comment on LoadStat).
_SNAPSHOT_COUNTS = ("num_running_reqs", "num_waiting_reqs", "num_waiting_uncached_tokens", "num_used_tokens",
                    "num_total_tokens", "num_active_tokens", "num_prealloc_ready_tokens",
                    "total_prefill_uncached_tokens", "total_prefill_busy_us")
_SNAPSHOT_RATIOS = ("token_usage", "gen_throughput", "cache_hit_rate")
_CAPACITIES = ("max_total_num_tokens", "max_running_requests")


def decode_stat(payload: bytes) -> LoadStat:
    try:
        return _STAT.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise SourceError(f"a load frame that is not a LoadStat ({error})") from None


def decode_snapshot(payload: bytes) -> LoadSnapshot:
    try:
        snapshot = _SNAPSHOT.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise SourceError(f"a slot that is not a LoadSnapshot ({error})") from None
    if not all(map(math.isfinite, (snapshot.token_usage, snapshot.gen_throughput, snapshot.cache_hit_rate,
                                   snapshot.utilization))):
        raise SourceError("a LoadSnapshot with a figure that is not finite")
    return snapshot


class PrefillRate:
    """Uncached prompt tokens per second of prefill step time, per rank, from the cumulative counters' deltas
    between two reads. A counter that went backwards is a restarted scheduler: the rate starts over."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[int, int]] = {}
        self._rate: dict[int, float] = {}

    def reset(self, rank: int) -> None:
        self._last.pop(rank, None)
        self._rate.pop(rank, None)

    def update(self, rank: int, tokens: int, busy_us: int) -> float | None:
        last = self._last.get(rank)
        self._last[rank] = (tokens, busy_us)
        if last is not None:
            if tokens < last[0] or busy_us < last[1]:
                self._rate.pop(rank, None)
            elif busy_us > last[1]:
                self._rate[rank] = (tokens - last[0]) / ((busy_us - last[1]) / 1e6)
        return self._rate.get(rank)

    def apply(self, load: pb.RankLoad) -> pb.RankLoad:
        """`load` with `prefill_throughput` from its cumulative prefill counters' change since the rank's last
        read (unset while there is no rate yet, or when the load carries no counters)."""
        if load.HasField("total_prefill_uncached_tokens") and load.HasField("total_prefill_busy_us"):
            rate = self.update(load.dp_rank, load.total_prefill_uncached_tokens, load.total_prefill_busy_us)
            if rate is not None:
                load.prefill_throughput = rate
        return load


def load_from_stat(stat: LoadStat, rank: int, now_ms: int, rates: PrefillRate) -> pb.RankLoad:
    """One feed frame's figures; the positions an older scheduler does not send stay unset."""
    load = pb.RankLoad(dp_rank=rank, timestamp_ms=now_ms, num_running_reqs=stat.num_running_reqs,
                       num_waiting_reqs=stat.num_waiting_reqs, num_used_tokens=stat.num_tokens,
                       num_total_reqs=stat.num_running_reqs + stat.num_waiting_reqs)
    if stat.max_total_num_tokens:
        load.max_total_num_tokens = stat.max_total_num_tokens
    if stat.num_waiting_uncached_tokens is not None:
        load.num_waiting_uncached_tokens = stat.num_waiting_uncached_tokens
    if stat.num_total_tokens is not None:
        load.num_total_tokens = stat.num_total_tokens
    if stat.max_running_requests:
        load.max_running_requests = stat.max_running_requests
    if stat.total_prefill_uncached_tokens is not None and stat.total_prefill_busy_us is not None:
        load.total_prefill_uncached_tokens = stat.total_prefill_uncached_tokens
        load.total_prefill_busy_us = stat.total_prefill_busy_us
    return rates.apply(load)


def _copy(target, source: msgspec.Struct, renames: dict[str, str] | None = None) -> None:
    target.SetInParent()
    for name in source.__struct_fields__:
        value = getattr(source, name)
        if value is not None:
            setattr(target, (renames or {}).get(name, name), value)


def load_from_snapshot(snapshot: LoadSnapshot, now_ms: int, rates: PrefillRate) -> pb.RankLoad:
    """A whole shared-memory snapshot as a RankLoad (every figure from this one read)."""
    rank = snapshot.dp_rank
    stamp_ms = int(snapshot.timestamp * 1000)
    load = pb.RankLoad(dp_rank=rank, timestamp_ms=stamp_ms if abs(now_ms - stamp_ms) < 3_600_000 else now_ms,
                       num_total_reqs=snapshot.num_running_reqs + snapshot.num_waiting_reqs)
    for name in _SNAPSHOT_COUNTS + _SNAPSHOT_RATIOS:
        setattr(load, name, getattr(snapshot, name))
    for name in _CAPACITIES:
        if getattr(snapshot, name):
            setattr(load, name, getattr(snapshot, name))
    if snapshot.utilization >= 0:
        load.utilization = snapshot.utilization
    rates.apply(load)
    if snapshot.memory is not None:
        _copy(load.memory, snapshot.memory)
    if snapshot.speculative is not None:
        _copy(load.spec, snapshot.speculative)
    if snapshot.lora is not None:
        _copy(load.lora, snapshot.lora)
    if snapshot.disaggregation is not None:
        _copy(load.disagg, snapshot.disaggregation, {"prefill_bootstrap_queue_reqs": "prefill_prealloc_queue_reqs"})
    if snapshot.queues is not None:
        _copy(load.queues, snapshot.queues)
    return load
