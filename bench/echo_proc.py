"""Child: a bare grpc.aio unary server answering every call with the same pre-serialized bytes.

The baseline for throughput and storm: what gRPC in Python costs with no aggregation at all. It parses
the request as a GetLoadsRequest (as the aggregator does) and returns a real GetLoadsResponse's bytes,
so one client, deserializing the same message, can call both.
"""

from __future__ import annotations

import argparse
import logging
import os

import grpc

from bench.child import control_loop, emit, own_usage, run
from loadagg.server.limits import LimitsConfig
from loadagg.v1 import loadagg_pb2 as pb

ECHO_METHOD = "/bench.Echo/Echo"


async def main(args: argparse.Namespace) -> None:
    with open(args.payload, "rb") as f:
        payload = f.read()
    calls = 0

    async def echo(request: pb.GetLoadsRequest, context: grpc.aio.ServicerContext) -> bytes:
        nonlocal calls
        calls += 1
        return payload

    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(
            echo, request_deserializer=pb.GetLoadsRequest.FromString, response_serializer=bytes),
    })
    # The aggregator's server options (pending-call backlog, message size, keepalive): a like-for-like baseline.
    server = grpc.aio.server(options=LimitsConfig().server_options())
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    emit({"port": port, "pid": os.getpid(), "payload_bytes": len(payload)})
    try:
        await control_loop({"stats": lambda: {"calls": calls, **own_usage()}})
    finally:
        await server.stop(0.5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--payload", required=True, help="file with the serialized response to return")
    logging.basicConfig(level=logging.WARNING)
    run(main(parser.parse_args()))
