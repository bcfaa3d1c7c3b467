"""Child: a bare grpc.aio relay, the transport's floor for the freshness scenario.

Real SchedulerAgents link to it as to an aggregator (AgentLink.Connect: welcome after hello); every message
an agent sends (its pushes) is forwarded, as the same bytes and unparsed, to every subscriber stream of
`/bench.Relay/Subscribe` (unary-stream). Like the aggregator, each subscriber holds at most one message
not yet written (latest wins), so a slow one never holds the others back. No parsing, validation, store,
change detection or views: what is left is Python gRPC moving the same messages from N agents to M
subscribers. Prints {"port", "pid"}; "stats": messages in and out, its own CPU.
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
RELAY_SERVICE = "bench.Relay"
SUBSCRIBE_METHOD = f"/{RELAY_SERVICE}/Subscribe"


class _Slot:
    """One subscriber's newest unsent message."""

    def __init__(self) -> None:
        self.message: bytes | None = None
        self.ready = asyncio.Event()

    def offer(self, message: bytes) -> None:
        self.message = message
        self.ready.set()


async def main(args: argparse.Namespace) -> None:
    welcome = pb.AggregatorMessage(welcome=pb.Welcome(aggregator_id="relay", dp_size=args.dp_size,
                                                      round_timeout_ms=1000)).SerializeToString()
    subscribers: set[_Slot] = set()
    counts = {"received": 0, "forwarded": 0}

    async def connect(requests, context: grpc.aio.ServicerContext) -> None:
        await context.read()  # the hello
        await context.write(welcome)
        while (message := await context.read()) is not grpc.aio.EOF:
            counts["received"] += 1
            for slot in subscribers:
                slot.offer(message)
            counts["forwarded"] += len(subscribers)

    async def subscribe(request: bytes, context: grpc.aio.ServicerContext) -> None:
        slot = _Slot()
        subscribers.add(slot)
        try:
            while True:
                await slot.ready.wait()
                slot.ready.clear()
                message, slot.message = slot.message, None
                if message is not None:
                    await context.write(message)
        finally:
            subscribers.discard(slot)

    server = grpc.aio.server(options=LimitsConfig().server_options())
    server.add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler(AGENT_SERVICE, {
            "Connect": grpc.stream_stream_rpc_method_handler(connect, request_deserializer=None,
                                                             response_serializer=None)}),
        grpc.method_handlers_generic_handler(RELAY_SERVICE, {
            "Subscribe": grpc.unary_stream_rpc_method_handler(subscribe, request_deserializer=None,
                                                              response_serializer=None)}),
    ])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    emit({"port": port, "pid": os.getpid()})
    try:
        await control_loop({"stats": lambda: {**counts, "subscribers": len(subscribers), **own_usage()}})
    finally:
        await server.stop(0.5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--dp-size", type=int, required=True)
    logging.basicConfig(level=logging.WARNING)
    run(main(parser.parse_args()))
