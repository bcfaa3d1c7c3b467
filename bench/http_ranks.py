"""Child: sglang-style HTTP `/v1/loads` endpoints, one aiohttp server (own port) per dp rank, on uvloop.

This is what routers poll today. Each request is a scheduler hit: it waits the collect latency (the
scheduler answering), then returns sglang's JSON shape for that rank. "stats" answers the hits.
"""

from __future__ import annotations

import argparse
import logging
import os

from aiohttp import web
from google.protobuf import json_format

from bench.child import control_loop, emit, own_usage, run
from scheduler_agent.sources.simulator import SimulatedSource


async def serve_v1_loads(handlers: list) -> tuple[list[web.AppRunner], list[int]]:
    """One aiohttp server on a free loopback port per handler, each answering GET /v1/loads: runners, ports."""
    runners, ports = [], []
    for handler in handlers:
        app = web.Application()
        app.router.add_get("/v1/loads", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        ports.append(site._server.sockets[0].getsockname()[1])
    return runners, ports


async def main(args: argparse.Namespace) -> None:
    hits = 0
    source = SimulatedSource(seed=args.first_rank, collect_latency_ms=args.collect_latency_ms)

    def handler_for(rank: int):
        async def loads(request: web.Request) -> web.Response:
            nonlocal hits
            hits += 1
            load = (await source.read([rank]))[rank]
            entry = json_format.MessageToDict(load, preserving_proto_field_name=True)
            return web.json_response({"timestamp": load.timestamp_ms / 1000, "dp_rank_count": args.dp_size,
                                      "loads": [entry]})
        return loads

    ranks = range(args.first_rank, args.first_rank + args.ranks)
    runners, ports = await serve_v1_loads([handler_for(rank) for rank in ranks])
    emit({"ports": ports, "pid": os.getpid()})
    try:
        await control_loop({"stats": lambda: {"hits": hits, **own_usage()}})
    finally:
        for runner in runners:
            await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--first-rank", type=int, default=0)
    parser.add_argument("--ranks", type=int, required=True)
    parser.add_argument("--dp-size", type=int, required=True)
    parser.add_argument("--collect-latency-ms", type=float, default=0.0)
    logging.basicConfig(level=logging.WARNING)
    run(main(parser.parse_args()))
