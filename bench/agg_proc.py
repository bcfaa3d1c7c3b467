"""Child: one loadagg Aggregator (as `loadagg serve` runs it) plus a control channel for its counters.

`python -m bench.agg_proc --dp-size 8 --mode watching [--profile out.prof]` prints {"port", "pid"} when
serving, answers "stats" with the communicator's counters and its own CPU/RSS, and stops on "quit".
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import logging
import os

from bench.child import control_loop, emit, own_usage, run
from loadagg.server.aggregator import Aggregator, tune_gc
from loadagg.server.config import AggregatorConfig


async def main(args: argparse.Namespace) -> None:
    config = AggregatorConfig(host="127.0.0.1", port=0, dp_size=args.dp_size, mode=args.mode,
                              round_timeout_ms=args.round_timeout_ms, grace_s=1.0)
    aggregator = Aggregator(config)
    port = await aggregator.start()
    tune_gc()  # as `loadagg serve` does
    profiler = cProfile.Profile() if args.profile else None

    def stats() -> dict:
        watch = getattr(aggregator.loads, "watch", None)  # WatchLoads (issue 5): its ticks prove sharing
        return {
            **dataclasses.asdict(aggregator.communicator.stats),
            **({f"watch_{k}": v for k, v in dataclasses.asdict(watch.stats).items()} if watch else {}),
            "live_ranks": len(aggregator.registry.live_ranks()),
            "agents": len(aggregator.registry.sessions()),
            **own_usage(),
        }

    def profile_on() -> dict:
        if profiler:
            profiler.enable()
        return {"profiling": bool(profiler)}

    def profile_off() -> dict:
        if profiler:
            profiler.disable()
            profiler.dump_stats(args.profile)
        return {"profile": args.profile}

    emit({"port": port, "pid": os.getpid()})
    try:
        await control_loop({"stats": stats, "profile_on": profile_on, "profile_off": profile_off})
    finally:
        await aggregator.stop(grace=0.5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--dp-size", type=int, required=True)
    parser.add_argument("--mode", default="watching", choices=("watching", "queueing"))
    parser.add_argument("--round-timeout-ms", type=int, default=500)
    parser.add_argument("--profile", default="", help="cProfile output path (profiling between profile_on/off)")
    logging.basicConfig(level=logging.WARNING)
    run(main(parser.parse_args()))
