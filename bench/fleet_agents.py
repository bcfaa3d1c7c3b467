"""Child: a fleet of agent streams simulated in one process, every rank changing all the time.

`--streams 64 --ranks-per-stream 8 --push-ms 10`: 64 AgentLink streams (hello, welcome) of 8 ranks each; every
`--push-ms` each stream pushes all its ranks, each changed (a rank changing 100 times a second, its changes
coalesced into one push per window, as an agent's push interval does). Each rank's `gen_throughput` carries
the push's time (µs mod 10^12, bench.freshness_engine's stamp), patched into a report serialized once per
stream: a real agent per stream would take more CPU than this box has beside the aggregator it measures.
Prints {"ready"} once linked; "stats": pushes sent, its own CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import struct
import time

import grpc

from bench.child import control_loop, emit, own_usage, run
from bench.freshness_engine import stamp_us
from loadagg.v1 import loadagg_pb2 as pb

SENTINEL = 987654321.125  # a gen_throughput no real figure has: where each rank's stamp goes
_DOUBLE = struct.Struct("<d")


def template(first_rank: int, ranks: int) -> tuple[bytearray, list[int]]:
    """A serialized push of `ranks` ranks and the offsets of their gen_throughput doubles."""
    loads = [pb.RankLoad(dp_rank=r, timestamp_ms=time.time_ns() // 1_000_000, num_running_reqs=3, num_waiting_reqs=1,
                         num_used_tokens=1000 + r, max_total_num_tokens=100_000, token_usage=0.01,
                         gen_throughput=SENTINEL, memory=pb.MemoryMetrics(kv_cache_gb=40.0))
             for r in range(first_rank, first_rank + ranks)]
    raw = bytearray(pb.AgentMessage(report=pb.LoadReport(round_id=0, loads=loads)).SerializeToString())
    mark = _DOUBLE.pack(SENTINEL)
    offsets, at = [], raw.find(mark)
    while at >= 0:
        offsets.append(at)
        at = raw.find(mark, at + 1)
    if len(offsets) != ranks:
        raise RuntimeError(f"found {len(offsets)} stamp slots in the template, expected {ranks}")
    return raw, offsets


async def main(args: argparse.Namespace) -> None:
    dp_size = args.streams * args.ranks_per_stream
    channels = [grpc.aio.insecure_channel(args.aggregator) for _ in range(max(1, args.streams // 8))]
    pushes = 0
    calls = []
    for i in range(args.streams):
        stub = channels[i % len(channels)].stream_stream("/loadagg.v1.AgentLink/Connect", request_serializer=None,
                                                         response_deserializer=None)
        call = stub()
        first = i * args.ranks_per_stream
        hello = pb.AgentMessage(hello=pb.AgentHello(instance_id=f"fleet-{i}", dp_size=dp_size,
                                                    dp_ranks=list(range(first, first + args.ranks_per_stream))))
        await call.write(hello.SerializeToString())
        await call.read()  # the welcome
        calls.append((call, *template(first, args.ranks_per_stream)))

    async def drain(call) -> None:  # collects (a refresh round) are read and left unanswered
        while await call.read() is not grpc.aio.EOF:
            pass

    drains = [asyncio.create_task(drain(call)) for call, _, _ in calls]
    emit({"ready": True, "pid": os.getpid(), "streams": len(calls)})

    async def push_loop() -> None:
        nonlocal pushes
        loop = asyncio.get_running_loop()
        period = args.push_ms / 1000
        due = loop.time()
        while True:
            stamp = float(stamp_us())
            for call, raw, offsets in calls:
                for offset in offsets:
                    _DOUBLE.pack_into(raw, offset, stamp)
                await call.write(bytes(raw))
                pushes += 1
            due += period
            now = loop.time()
            if due <= now:  # a window that overran skips, never bunches
                due += ((now - due) // period + 1) * period
            await asyncio.sleep(due - now)

    pusher = asyncio.create_task(push_loop())
    try:
        await control_loop({"stats": lambda: {"pushes_sent": pushes, **own_usage()}})
    finally:
        pusher.cancel()
        for task in drains:
            task.cancel()
        for call, _, _ in calls:
            call.cancel()
        for channel in channels:
            await channel.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--aggregator", required=True)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--ranks-per-stream", type=int, default=8)
    parser.add_argument("--push-ms", type=float, default=10.0)
    logging.basicConfig(level=logging.ERROR)
    run(main(parser.parse_args()))
