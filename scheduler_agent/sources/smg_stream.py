"""SmgStreamSource: a gRPC engine behind an SMG servicer, read from the load records of `SubscribeKvEvents`.

SMG's servicers (PyPI `smg-grpc-servicer`: the gRPC front of `vllm serve --grpc`, and SMG's fronts for sglang
and TokenSpeed) attach an `EngineLoad` record to every `KvEventBatch`, and send `load_only` batches when the
record moved without a KV event and as heartbeats while idle. This source subscribes with
`load_records_before_first_batch` and keeps, per `dp_rank`:

* the core (running, waiting, queued tokens, KV usage, rate, admission window, engine silence), which rides
  every batch, taken `age_ms` before the servicer sent it;
* the telemetry (cache hit rate, token counts, sections), which rides only the heartbeats and the stream's
  first record: the last one is kept and each batch's core laid over it, with its own age (`detail_age_ms`).

Liveness is the stream's, as SMG's gateway counts it: any record is contact with the engine. A heartbeat goes
out each second, each 5 s once idle, and repeats only the last batch's rank, so a quiet rank on a live stream
keeps its last record, its age growing. A stream silent past the silence bound (about two idle heartbeats), or
broken, is subscribed again and meanwhile its ranks are polled with `GetLoads`, as a servicer whose stream
carries no record, or that answers UNIMPLEMENTED, is from the start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import grpc
from smg_grpc_proto.generated import common_pb2

from loadagg.common import field_default
from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.config import AgentConfig
from scheduler_agent.sources.base import EngineRanks, SourceError
from scheduler_agent.sources.engine_grpc import EngineGrpcSource, check_figure
from scheduler_agent.sources.held import HeldLoads, HeldSource, now_s, read_held_or_polled, stop_task

log = logging.getLogger(__name__)

# Batches without a record after which a stream is taken for one that carries none (cache events only).
NO_RECORD_BATCHES = 3
NO_RECORD_S = 5.0  # ... or seconds of a live stream without any record
RETRY_S = (0.1, 5.0)  # resubscribe backoff after a broken or silent stream (first, most)
RETRY_NO_RECORDS_S = 60.0  # a servicer without records (or RPC) is asked again this rarely (an upgrade)
CORE_FIELDS = frozenset({"num_running_reqs", "num_waiting_reqs", "num_total_reqs", "num_waiting_uncached_tokens",
                         "token_usage", "active_token_usage", "gen_throughput", "max_running_requests",
                         "engine_silence_ms"})
_SECTIONS = {"memory": "memory", "queues": "queues", "speculative": "spec", "lora": "lora",
             "disaggregation": "disagg"}


def core_from(record: common_pb2.EngineLoad, rank: int, now_ms: int, flavor: str = "sglang",
              capacity_known: bool = True) -> pb.RankLoad:
    """The routing core every record carries, under GetLoads' presence rules (engine_grpc): the record's
    scalars have no presence, so a 0 KV usage counts only with a known capacity and a 0 rate only from sglang."""
    check_figure("token_usage", record.token_usage)
    check_figure("gen_throughput", record.gen_throughput)
    load = pb.RankLoad(dp_rank=rank, timestamp_ms=now_ms - record.age_ms, num_running_reqs=record.running_requests,
                       num_waiting_reqs=record.waiting_requests,
                       num_total_reqs=record.running_requests + record.waiting_requests)
    if record.token_usage or capacity_known:
        load.token_usage = record.token_usage
    if record.gen_throughput or flavor == "sglang":
        load.gen_throughput = record.gen_throughput
    if record.HasField("waiting_uncached_tokens"):
        load.num_waiting_uncached_tokens = record.waiting_uncached_tokens
    if record.HasField("active_token_usage"):
        check_figure("active_token_usage", record.active_token_usage)
        load.active_token_usage = record.active_token_usage
    if record.max_running_requests:
        load.max_running_requests = record.max_running_requests
    if record.HasField("engine_silence_ms"):
        load.engine_silence_ms = record.engine_silence_ms
    return load


def telemetry_from(record: common_pb2.EngineLoad, rank: int, flavor: str = "sglang") -> pb.RankLoad | None:
    """The telemetry of a heartbeat or a first record; None when the record carries none (an event batch).
    smg's servicers fill the hit rate and token counts on every such record, known or not: a 0 counts as in
    GetLoads (tokens in use with a known capacity, a hit rate from sglang)."""
    load = pb.RankLoad(dp_rank=rank)
    found = False
    if record.HasField("cache_hit_rate"):
        check_figure("cache_hit_rate", record.cache_hit_rate)
        found = True
        if record.cache_hit_rate or flavor == "sglang":
            load.cache_hit_rate = record.cache_hit_rate
    if record.HasField("num_used_tokens"):
        check_figure("num_used_tokens", record.num_used_tokens)
        found = True
        if record.num_used_tokens or record.max_total_num_tokens > 0:
            load.num_used_tokens = record.num_used_tokens
    if record.HasField("max_total_num_tokens") and record.max_total_num_tokens > 0:
        load.max_total_num_tokens, found = record.max_total_num_tokens, True
    for name, section in _SECTIONS.items():
        if record.HasField(name):
            source, target = getattr(record, name), getattr(load, section)
            target.SetInParent()
            for field, value in source.ListFields():
                if field.name in target.DESCRIPTOR.fields_by_name:
                    if not isinstance(value, str):
                        check_figure(f"{name}.{field.name}", value)
                    setattr(target, field.name, value)
            if name == "disaggregation" and source.prefill_prealloc_queue_reqs:
                target.prefill_prealloc_queue_reqs = source.prefill_prealloc_queue_reqs
            found = True
    return load if found else None


class SmgStreamSource(HeldSource):
    """Load records pushed on the engine's KV-event stream; `GetLoads` while the stream cannot give them."""

    def __init__(self, polling: EngineGrpcSource,
                 silence_s: float = field_default(AgentConfig, "stream_silence_ms") / 1000) -> None:
        self.polling = polling
        self.name = polling.name
        self.silence_s = silence_s
        self.held = HeldLoads(self.name, CORE_FIELDS)
        self.state = "starting"  # live | silent | broken | no-records | unimplemented
        self._ranks: set[int] = set()  # ranks a record came for since the stream went live
        self._task: asyncio.Task | None = None

    @property
    def pushes(self) -> bool:  # type: ignore[override]
        return self.state == "live"

    def set_round_timeout(self, round_timeout_ms: int) -> None:
        self.polling.set_round_timeout(round_timeout_ms)

    async def start(self) -> None:
        await self.polling.start()
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name=f"{self.name}-load-stream")

    async def discover(self) -> EngineRanks:
        return await self.polling.discover()

    def _become(self, state: str, why: str = "") -> None:
        if state == self.state:
            return
        before, self.state = self.state, state
        self._ranks.clear()
        if state == "live":
            log.info("%s: load records on SubscribeKvEvents: ranks answered from the stream", self.name)
        elif before == "live" or state in ("no-records", "unimplemented"):
            log.warning("%s: %s: its ranks are polled with GetLoads until the stream carries records again",
                        self.name, why)
        self.held.notify()

    async def _follow(self) -> None:
        """Subscribe, read records until the stream ends, subscribe again (backing off); forever."""
        failures = 0
        while True:
            wait = RETRY_S[0]
            try:
                await self._subscribe()
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    self._become("unimplemented", "the servicer has no SubscribeKvEvents")
                    wait = RETRY_NO_RECORDS_S
                elif error.code() != grpc.StatusCode.CANCELLED:
                    self._become("broken", f"the load stream broke ({error.code().name})")
            except TimeoutError:
                self._become("silent", f"the load stream sent nothing for {self.silence_s:.1f} s")
            except _NoRecords:
                self._become("no-records", "the servicer's stream carries no load record")
                wait = RETRY_NO_RECORDS_S
            failures = 0 if self.state == "live" else failures + 1
            await asyncio.sleep(max(wait, min(RETRY_S[1], RETRY_S[0] * 2 ** min(failures, 8))))

    async def _subscribe(self) -> None:
        stub = await self.polling.engine_stub()
        call = stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(load_records_before_first_batch=True))
        opened, without = now_s(), 0
        try:
            while True:
                batch = await asyncio.wait_for(call.read(), self.silence_s)
                if batch is grpc.aio.EOF:
                    raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                               "the servicer ended the stream")
                if not batch.HasField("load"):
                    without += 1
                    if self.state != "live" and (without >= NO_RECORD_BATCHES or now_s() - opened > NO_RECORD_S):
                        raise _NoRecords
                    continue
                self._become("live")
                self._take(batch)
        finally:
            call.cancel()

    def _take(self, batch: common_pb2.KvEventBatch) -> None:
        record, received = batch.load, now_s()
        rank = batch.dp_rank if batch.HasField("dp_rank") else 0
        taken = received - record.age_ms / 1000
        flavor = self.polling.flavor
        held = self.held.ranks.get(rank)
        capacity_known = record.max_total_num_tokens > 0 or (
            held is not None and held.detail is not None and held.detail.max_total_num_tokens > 0)
        try:
            core = core_from(record, rank, time.time_ns() // 1_000_000, flavor, capacity_known)
            telemetry = telemetry_from(record, rank, flavor)
        except SourceError as error:
            self.held.fail(rank, f"a load record with {error}")
            return
        except (ValueError, TypeError) as error:
            self.held.fail(rank, f"a load record figure no RankLoad holds ({type(error).__name__})")
            return
        self._ranks.add(rank)
        if telemetry is not None:
            self.held.set_detail(rank, telemetry, taken)
        self.held.set_core(rank, core, taken)

    def _streamed(self, rank: int) -> bool:
        """Whether `rank` is answered from the stream now (else with `GetLoads`)."""
        return self.state == "live" and rank in self._ranks

    def held_ranks(self, ranks: Sequence[int]) -> list[int]:
        return [r for r in ranks if self._streamed(r)]

    async def read(self, ranks: Sequence[int]) -> dict[int, pb.RankLoad]:
        """Ranks with a record on the live stream from memory; the rest with one `GetLoads`."""
        return await read_held_or_polled(self.held, ranks, self._streamed, self.polling.read)

    async def close(self) -> None:
        await stop_task(self._task)
        self._task = None
        await self.polling.close()


class _NoRecords(Exception):
    """The stream flows but carries no load record."""
