"""Child: a bare grpc.aio AgentLink server, the floor for what agent streams cost in Python gRPC.

It speaks just enough of the contract for real SchedulerAgents to link (welcome after hello) and then
only moves bytes: every `--collect-interval-ms` it writes one pre-serialized collect to every stream,
and it reads whatever agents send (answers, pushes) without parsing, validating or storing anything.
Side by side with the aggregator under the same agents, its CPU is the part no aggregator code adds.

`python -m bench.link_floor_proc --dp-size 100 --collect-interval-ms 50` prints {"port", "pid"} and
answers "stats" with the messages it read and its own CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

import grpc

from bench.child import control_loop, emit, own_usage, run
from loadagg.server.limits import LimitsConfig
from loadagg.v1 import loadagg_pb2 as pb

AGENT_SERVICE = pb.DESCRIPTOR.services_by_name["AgentLink"].full_name


async def main(args: argparse.Namespace) -> None:
    welcome = pb.AggregatorMessage(welcome=pb.Welcome(aggregator_id="floor", dp_size=args.dp_size,
                                                      round_timeout_ms=1000)).SerializeToString()
    streams: set[asyncio.Queue[bytes]] = set()
    received = 0

    async def connect(requests, context: grpc.aio.ServicerContext) -> None:
        nonlocal received
        await context.read()  # the hello
        await context.write(welcome)
        outbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1)
        streams.add(outbox)

        async def read() -> None:
            nonlocal received
            while await context.read() is not grpc.aio.EOF:
                received += 1

        reader = asyncio.create_task(read())
        try:
            while True:
                await context.write(await outbox.get())
        finally:
            streams.discard(outbox)
            reader.cancel()

    async def tick() -> None:
        round_id = 0
        while True:
            await asyncio.sleep(args.collect_interval_ms / 1000)
            round_id += 1
            collect = pb.AggregatorMessage(collect=pb.CollectRequest(round_id=round_id, include=["all"]))
            payload = collect.SerializeToString()
            for outbox in streams:
                if outbox.empty():
                    outbox.put_nowait(payload)

    handler = grpc.method_handlers_generic_handler(AGENT_SERVICE, {
        "Connect": grpc.stream_stream_rpc_method_handler(connect, request_deserializer=None,
                                                         response_serializer=None),
    })
    server = grpc.aio.server(options=LimitsConfig().server_options())
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ticker = asyncio.create_task(tick()) if args.collect_interval_ms else None
    emit({"port": port, "pid": os.getpid()})
    try:
        await control_loop({"stats": lambda: {"received": received, "streams": len(streams), **own_usage()}})
    finally:
        if ticker is not None:
            ticker.cancel()
        await server.stop(0.5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--dp-size", type=int, required=True)
    parser.add_argument("--collect-interval-ms", type=int, default=0, help="0: write nothing (agents push)")
    logging.basicConfig(level=logging.WARNING)
    run(main(parser.parse_args()))
