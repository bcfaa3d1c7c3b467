"""`scheduler-agent`: run one agent beside a scheduler. Every flag also reads a LOADAGG_* env var."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from scheduler_agent.agent import SchedulerAgent
from scheduler_agent.channel import add_link_flags, link_security_from_args
from scheduler_agent.config import AgentConfig, default_instance_id, env
from scheduler_agent.sources import SOURCE_NAMES, build_source


def _ranks(text: str) -> list[int]:
    return [int(part) for part in text.replace(" ", "").split(",") if part]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scheduler-agent",
        description="Stream this scheduler's dp-rank loads to a loadagg aggregator.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--aggregator", default=env("AGGREGATOR", "127.0.0.1:50051"),
                   help="aggregator HOST:PORT [LOADAGG_AGGREGATOR]")
    p.add_argument("--dp-rank", dest="dp_ranks", type=int, action="append",
                   help="a dp rank this agent serves; repeat for several [LOADAGG_DP_RANKS=0,1] (default: 0)")
    p.add_argument("--dp-size", type=int, default=int(env("DP_SIZE", "0")),
                   help="cluster dp size; 0 takes the aggregator's [LOADAGG_DP_SIZE]")
    p.add_argument("--instance-id", default=env("INSTANCE_ID") or default_instance_id(),
                   help="stable id of this agent [LOADAGG_INSTANCE_ID]")
    p.add_argument("--source", choices=SOURCE_NAMES, default=env("SOURCE", "simulator"),
                   help="where loads come from [LOADAGG_SOURCE]")
    p.add_argument("--model", default=env("MODEL", ""), help="model name reported in hello [LOADAGG_MODEL]")
    p.add_argument("--seed", type=int, default=None if env("SEED") is None else int(env("SEED")),
                   help="simulator seed [LOADAGG_SEED]")
    p.add_argument("--collect-latency-ms", type=float, default=float(env("COLLECT_LATENCY_MS", "0")),
                   help="simulator: time to answer a collect, as a busy scheduler [LOADAGG_COLLECT_LATENCY_MS]")
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"), help="[LOADAGG_LOG_LEVEL]")
    p.add_argument("--backoff-initial-ms", type=int, default=int(env("BACKOFF_INITIAL_MS", "100")),
                   help="first reconnect delay ceiling; doubles per failure, full jitter [LOADAGG_BACKOFF_INITIAL_MS]")
    p.add_argument("--backoff-max-ms", type=int, default=int(env("BACKOFF_MAX_MS", "5000")),
                   help="largest reconnect delay ceiling [LOADAGG_BACKOFF_MAX_MS]")
    add_link_flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    ranks = args.dp_ranks or _ranks(env("DP_RANKS", "0") or "0")
    return AgentConfig(
        aggregator=args.aggregator,
        dp_ranks=tuple(ranks),
        dp_size=args.dp_size,
        instance_id=args.instance_id,
        source=args.source,
        model=args.model,
        seed=args.seed,
        collect_latency_ms=args.collect_latency_ms,
        backoff_initial_ms=args.backoff_initial_ms,
        backoff_max_ms=args.backoff_max_ms,
        security=link_security_from_args(args),
    )


async def run_agent(config: AgentConfig) -> None:
    """Run until SIGTERM/SIGINT."""
    agent = SchedulerAgent(config, build_source(config))
    task = asyncio.create_task(agent.run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        logging.getLogger(__name__).info("agent %s stopped", config.instance_id)


def run(coro) -> None:
    """asyncio.run on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as error:
        parser().error(str(error))
    run(run_agent(config))


if __name__ == "__main__":
    main()
