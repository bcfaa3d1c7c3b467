"""EngineGrpcSource: an engine in gRPC mode, read through its own `GetLoads` RPC.

sglang (`--grpc-mode`) serves `sglang.grpc.scheduler.SglangScheduler/GetLoads`, vLLM's gRPC entrypoint
`vllm.grpc.engine.VllmEngine/GetLoads`, TokenSpeed (behind SMG's servicer)
`tokenspeed.grpc.scheduler.TokenSpeedScheduler/GetLoads`. Each answers every dp rank in one `GetLoadsResponse`
of per-rank `SchedulerLoad`s. The stubs come from the PyPI package `smg-grpc-proto`; no proto is copied.

Those protos give the core scalars no presence (0 is both "zero" and "not known"), so the mapping is:
* request counts (running, waiting, total) are always known to a scheduler: copied, 0 included;
* capacities (`max_total_num_tokens`, `max_running_requests`) cannot be 0 on a live engine: 0 = unset,
  and `num_used_tokens` / `token_usage` are only trusted at 0 when the capacity is known;
* sglang fills every other core figure: copied as sent, except `num_waiting_uncached_tokens`, which
  some sglang servicers never set: a 0 there beside waiting requests is left unset (with none waiting it
  is a true 0). vLLM documents "unset fields are 0", so a 0 from vLLM in any other figure is left unset;
* `utilization` -1 is sglang's "does not apply" (PD prefill servers): left unset, the rank still read;
* TokenSpeed reads as vLLM does (a 0 it may leave unset stays unset), plus its optional `active_token_usage`;
* the sections (sglang; TokenSpeed's memory and queues) do have presence: a section the engine sent is
  copied, one it left out stays out; an empty disaggregation `mode` stays unset.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc
from smg_grpc_proto import (
    sglang_scheduler_pb2,
    sglang_scheduler_pb2_grpc,
    tokenspeed_scheduler_pb2,
    tokenspeed_scheduler_pb2_grpc,
    vllm_engine_pb2,
    vllm_engine_pb2_grpc,
)

from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.sources.base import EngineRanks, LoadSource, SourceError, not_applicable, read_ranks
from scheduler_agent.sources.http_client import DEFAULT_TIMEOUT_S, MIN_TIMEOUT_S, ROUND_SHARE

_FLAVORS = {
    "sglang": (sglang_scheduler_pb2, sglang_scheduler_pb2_grpc.SglangSchedulerStub),
    "vllm": (vllm_engine_pb2, vllm_engine_pb2_grpc.VllmEngineStub),
    "tokenspeed": (tokenspeed_scheduler_pb2, tokenspeed_scheduler_pb2_grpc.TokenSpeedSchedulerStub),
}
# An engine that restarts should be read again within about a second, not after gRPC's default
# backoff (which grows to two minutes).
_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
              ("grpc.max_reconnect_backoff_ms", 1000)]
_COUNTS = ("num_running_reqs", "num_waiting_reqs", "num_total_reqs")
_OTHER_CORE = ("gen_throughput", "cache_hit_rate", "utilization", "num_waiting_uncached_tokens")
_SECTIONS = {  # engine section -> (RankLoad section, fields copied by name)
    "memory": ("memory", ("weight_gb", "kv_cache_gb", "graph_gb", "token_capacity")),
    "speculative": ("spec", ("accept_length", "accept_rate")),
    "lora": ("lora", ("slots_used", "slots_total", "utilization")),
    "disaggregation": ("disagg", (
        "prefill_prealloc_queue_reqs", "prefill_inflight_queue_reqs", "decode_prealloc_queue_reqs",
        "decode_transfer_queue_reqs", "decode_retracted_queue_reqs", "kv_transfer_speed_gb_s",
        "kv_transfer_latency_ms",
    )),
    "queues": ("queues", ("waiting", "grammar", "paused", "retracted")),
}


def check_figure(where: str, value: float) -> None:
    """SourceError unless `value` is a finite, non-negative figure (the engines' unset-means-0 scalars)."""
    if value != value or value in (float("inf"), float("-inf")):
        raise SourceError(f"{where} is not finite")
    if value < 0:
        raise SourceError(f"{where} is negative")


def load_from_scheduler_load(src, flavor: str, now_ms: int) -> pb.RankLoad:
    """One engine `SchedulerLoad` as a RankLoad, under the presence rules in the module docstring."""
    where = f"GetLoads: rank {src.dp_rank}"
    load = pb.RankLoad(dp_rank=src.dp_rank, timestamp_ms=now_ms)
    for field in _COUNTS:
        value = getattr(src, field)
        check_figure(f"{where} {field}", value)
        setattr(load, field, value)
    capacity_known = src.max_total_num_tokens > 0
    if capacity_known:
        load.max_total_num_tokens = src.max_total_num_tokens
    if src.max_running_requests > 0:
        load.max_running_requests = src.max_running_requests
    for field in ("num_used_tokens", "token_usage"):
        value = getattr(src, field)
        check_figure(f"{where} {field}", value)
        if value or capacity_known:
            setattr(load, field, value)
    for field in _OTHER_CORE:
        if not hasattr(src, field):
            continue
        value = getattr(src, field)
        if not_applicable(field, value) or (field == "num_waiting_uncached_tokens" and not value
                                             and src.num_waiting_reqs):
            continue
        check_figure(f"{where} {field}", value)
        if value or flavor == "sglang":
            setattr(load, field, value)
    if "active_token_usage" in src.DESCRIPTOR.fields_by_name and src.HasField("active_token_usage"):
        check_figure(f"{where} active_token_usage", src.active_token_usage)
        load.active_token_usage = src.active_token_usage
    for engine_name, (section, fields) in _SECTIONS.items():
        if engine_name not in src.DESCRIPTOR.fields_by_name or not src.HasField(engine_name):
            continue
        source, target = getattr(src, engine_name), getattr(load, section)
        target.SetInParent()
        for field in fields:
            value = getattr(source, field)
            check_figure(f"{where} {engine_name}.{field}", value)
            setattr(target, field, value)
        if engine_name == "disaggregation" and source.mode:
            target.mode = source.mode
    return load


class EngineGrpcSource(LoadSource):
    """One `GetLoads` call per read, for every rank the agent serves."""

    def __init__(self, target: str, flavor: str, timeout_s: float | None = None) -> None:
        if flavor not in _FLAVORS:
            raise ValueError(f"no gRPC GetLoads for engine {flavor!r}; choose one of {sorted(_FLAVORS)}")
        self.target = target
        self.flavor = flavor
        self.name = f"{flavor}-grpc"
        self._messages, self._stub_class = _FLAVORS[flavor]
        self.fixed_timeout = timeout_s
        self.timeout_s = timeout_s or DEFAULT_TIMEOUT_S
        self._channel: grpc.aio.Channel | None = None
        self._stub = None
        self.calls = 0

    def set_round_timeout(self, round_timeout_ms: int) -> None:
        if self.fixed_timeout is None and round_timeout_ms > 0:
            self.timeout_s = max(MIN_TIMEOUT_S, min(DEFAULT_TIMEOUT_S, round_timeout_ms / 1000 * ROUND_SHARE))

    async def start(self) -> None:
        # The channel reconnects by itself when the engine comes back; wait_for_ready stays off so a
        # down engine fails fast (UNAVAILABLE) instead of eating the round's deadline.
        self._channel = grpc.aio.insecure_channel(self.target, options=_RECONNECT)
        self._stub = self._stub_class(self._channel)

    async def engine_stub(self):
        """The engine's stub (its channel opened if need be), for the load stream beside GetLoads."""
        if self._stub is None:
            await self.start()
        return self._stub

    async def _get_loads(self, include: list[str]):
        if self._stub is None:
            await self.start()
        self.calls += 1
        request = self._messages.GetLoadsRequest(include=include)
        try:
            return await self._stub.GetLoads(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise SourceError("GetLoads: no answer within the engine timeout") from None
            raise SourceError(f"GetLoads: {error.code().name}") from None

    async def read(self, ranks: Sequence[int]) -> dict[int, pb.RankLoad]:
        response = await self._get_loads(["all"])
        now_ms = time.time_ns() // 1_000_000
        return read_ranks(ranks, ((src.dp_rank, src) for src in response.loads),
                          lambda _rank, src: load_from_scheduler_load(src, self.flavor, now_ms), "GetLoads")

    async def discover(self) -> EngineRanks:
        response = await self._get_loads(["core"])
        ranks = sorted({src.dp_rank for src in response.loads if src.dp_rank >= 0})
        if not ranks:
            raise SourceError("GetLoads: the engine reports no dp ranks yet")
        count = response.dp_rank_count
        return EngineRanks(tuple(ranks), count if count > max(ranks) else max(ranks) + 1)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None
