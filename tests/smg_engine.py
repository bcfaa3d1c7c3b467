"""An sglang engine behind SMG's gRPC servicer, with the KV-event stream that carries load records.

Built on smg-grpc-proto's `SglangSchedulerServicer` base (through tests/engines.py's `SglangGrpcEngine`, whose
`GetLoads` it keeps). `SubscribeKvEvents` streams what a servicer relays: a batch per scheduler step that
stored KV blocks (`step(rank)`), each stamped with its load record by smg-grpc-servicer's own `LoadRecorder`
from `engine_load_from` of this engine's `SchedulerLoad` (telemetry on the first record and the heartbeats
only, `load_only` heartbeats paced by the recorder itself). Switches: `records` (a servicer that attaches
none), `silent` (a wedged servicer: the stream stays open, nothing flows), `unimplemented`.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from engines import SglangGrpcEngine
from smg_grpc_proto.generated import common_pb2
from smg_grpc_servicer.load_record import LoadRecorder, engine_load_from


class SmgSglangEngine(SglangGrpcEngine):
    def __init__(self, dp_size: int, *, records: bool = True, heartbeat_s: float = 0.2, backoff_s: float = 0.5,
                 tick_s: float = 0.02) -> None:
        super().__init__(dp_size)
        self.records = records
        self.silent = False
        self.unimplemented = False
        self.record_age_ms = 0  # a servicer reading a sample this old (EngineLoad.age_ms)
        self.heartbeat_s, self.backoff_s, self.tick_s = heartbeat_s, backoff_s, tick_s
        self.subscriptions = 0
        self.sent = 0
        self._steps: asyncio.Queue[int] = asyncio.Queue()

    def step(self, rank: int) -> None:
        """A scheduler step on `rank` that stored KV blocks: one event batch (with the record) goes out."""
        self._steps.put_nowait(rank)

    def record(self, rank: int | None) -> common_pb2.EngineLoad:
        """The servicer's LoadSource: its GetLoads figures for the rank, as the record."""
        loads = self.response(garbage=self.mode == "garbage").loads
        load = next(entry for entry in loads if entry.dp_rank == (rank or 0))
        record = engine_load_from(load, queued_token_work=True)
        record.age_ms = self.record_age_ms
        return record

    async def SubscribeKvEvents(self, request, context):
        self.subscriptions += 1
        if self.unimplemented:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        recorder = LoadRecorder.optional(self.record if self.records else None, load_tick=self.tick_s,
                                         heartbeat_interval=self.heartbeat_s, heartbeat_backoff=self.backoff_s)
        if recorder is not None and request.load_records_before_first_batch:
            for rank in range(self.dp_size):  # load_only batches numbered 0, before the publisher's first
                batch = recorder.stamp(common_pb2.KvEventBatch(sequence_number=0, timestamp=time.time(), dp_rank=rank))
                batch.load.load_only = True
                yield self._sending(batch)
        sequence = 0
        while True:
            try:
                rank = await asyncio.wait_for(self._steps.get(), self.tick_s)
            except TimeoutError:
                heartbeat = recorder.heartbeat() if recorder is not None and not self.silent else None
                if heartbeat is not None:
                    yield self._sending(heartbeat)
                continue
            if self.silent:
                continue
            sequence += 1
            stored = common_pb2.KvBlocksStored(blocks=[common_pb2.KvBlock(block_hash=sequence, token_ids=[1, 2, 3],
                                                                           block_size=16)])
            batch = common_pb2.KvEventBatch(sequence_number=sequence, timestamp=time.time(), dp_rank=rank,
                                            events=[common_pb2.KvCacheEvent(event_id=sequence, stored=stored)])
            yield self._sending(recorder.stamp(batch) if recorder is not None else batch)

    def _sending(self, batch: common_pb2.KvEventBatch) -> common_pb2.KvEventBatch:
        self.sent += 1
        return batch
