"""`loadagg` command: serve, loads, demo, health. Every flag also reads a LOADAGG_* environment variable."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from loadagg.cli.grpc_core import use_classic_listener

use_classic_listener()  # gRPC reads its experiments when first imported: just below, for the `loadagg` command
import grpc  # noqa: E402

from loadagg.client.channels import add_client_flags
from loadagg.server.config import (DEFAULT_WATCH_INTERVAL_MS, LOG_LEVELS, AggregatorConfig, env, env_bool, env_choice,
                            env_int, non_negative_int)
from loadagg.server.limits import add_server_flags as add_limit_flags
from loadagg.server.security import add_server_flags as add_security_flags


def run(coro):
    """asyncio.run on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _serve(args: argparse.Namespace) -> int:
    from loadagg.server.limits import limits_from_args
    from loadagg.server.security import security_from_args
    from loadagg.server.aggregator import serve

    config = AggregatorConfig(
        host=args.host,
        port=args.port,
        dp_size=args.dp_size,
        mode=args.mode,
        round_timeout_ms=args.round_timeout_ms,
        grace_s=args.grace_s,
        http_port=None if args.http_port < 0 else args.http_port,
        sglang_compat=args.sglang_compat,
        vllm_compat=args.vllm_compat,
        default_watch_interval_ms=args.watch_interval_ms,
        min_watch_interval_ms=args.min_watch_interval_ms,
        hello_timeout_ms=args.hello_timeout_ms,
        security=security_from_args(args),
        limits=limits_from_args(args),
    )
    run(serve(config))
    return 0


def _loads(args: argparse.Namespace) -> int:
    from loadagg.client.channels import channel_security_from_args
    from loadagg.client.load_client import LoadClient
    from loadagg.cli.render import to_json, to_table

    include = [s for s in (args.include or "").split(",") if s]
    with LoadClient(args.target, timeout=args.timeout, security=channel_security_from_args(args)) as client:
        try:
            response = client.get_loads(
                args.dp_rank, include, allow_stale=args.allow_stale, freshness=args.freshness,
                max_staleness_ms=args.max_staleness_ms,
            ).response
        except grpc.RpcError as error:
            print(f"loadagg loads: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(to_json(response) if args.json else to_table(response))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from loadagg.cli.demo import DemoConfig, run_demo

    config = DemoConfig(
        dp_size=args.dp_size,
        agents=args.agents or args.dp_size,
        port=args.port,
        collect_latency_ms=args.collect_latency_ms,
        interval_s=args.interval,
        duration_s=args.duration,
        mode=args.mode,
    )
    try:
        run(run_demo(config))
    except KeyboardInterrupt:
        pass
    return 0


def _health(args: argparse.Namespace) -> int:
    from loadagg.client.channels import channel_security_from_args
    from loadagg.cli.health_check import check_health

    result = check_health(args.target, args.service, timeout=args.timeout, security=channel_security_from_args(args))
    print(f"loadagg health: {result.message}", file=sys.stdout if result.serving else sys.stderr)
    return 0 if result.serving else 1


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)", except where the help says the default itself or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default" in text or action.default in (None, "") else super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loadagg", description="gRPC load aggregation for data-parallel LLM schedulers.")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = HelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                        default=env_choice("LOG_LEVEL", "INFO", LOG_LEVELS), help="[LOADAGG_LOG_LEVEL]")

    s = sub.add_parser("serve", help="run the aggregator", parents=[common], formatter_class=fmt)
    s.add_argument("--host", default=env("HOST", "0.0.0.0"), help="bind address [LOADAGG_HOST]")
    s.add_argument("--port", type=int, default=env_int("PORT", 50051), help="gRPC port [LOADAGG_PORT]")
    s.add_argument("--dp-size", type=int, default=env_int("DP_SIZE", 1), help="expected dp ranks [LOADAGG_DP_SIZE]")
    s.add_argument("--mode", choices=("watching", "queueing"), default=env("MODE", "watching"),
                   help="how concurrent GetLoads share rounds [LOADAGG_MODE]")
    s.add_argument("--round-timeout-ms", type=int, default=env_int("ROUND_TIMEOUT_MS", 500),
                   help="a round ends at this deadline even if ranks are missing [LOADAGG_ROUND_TIMEOUT_MS]")
    s.add_argument("--grace-s", type=float, default=env("GRACE_S", "5"),
                   help="SIGTERM: time for in-flight calls [LOADAGG_GRACE_S]")
    s.add_argument("--http-port", type=int, default=env_int("HTTP_PORT", -1),
                   help="serve sglang-compatible GET /v1/loads and /metrics on this port; -1: no HTTP, "
                        "0: any free port [LOADAGG_HTTP_PORT]")
    s.add_argument("--sglang-compat", action=argparse.BooleanOptionalAction, default=env_bool("SGLANG_COMPAT", True),
                   help="also answer sglang.grpc.scheduler.SglangScheduler/GetLoads [LOADAGG_SGLANG_COMPAT]")
    s.add_argument("--vllm-compat", action=argparse.BooleanOptionalAction, default=env_bool("VLLM_COMPAT", True),
                   help="also answer vllm.grpc.engine.VllmEngine/GetLoads [LOADAGG_VLLM_COMPAT]")
    s.add_argument("--watch-interval-ms", type=int, default=env_int("WATCH_INTERVAL_MS", DEFAULT_WATCH_INTERVAL_MS),
                   help="WatchLoads interval when a watcher asks for 0 [LOADAGG_WATCH_INTERVAL_MS]")
    s.add_argument("--min-watch-interval-ms", type=int, default=env_int("MIN_WATCH_INTERVAL_MS", 10),
                   help="shortest WatchLoads interval accepted [LOADAGG_MIN_WATCH_INTERVAL_MS]")
    s.add_argument("--hello-timeout-ms", type=int, default=env_int("HELLO_TIMEOUT_MS", 10_000),
                   help="an agent link that says no hello this soon is closed [LOADAGG_HELLO_TIMEOUT_MS]")
    add_security_flags(s)
    add_limit_flags(s)
    s.set_defaults(func=_serve)

    q = sub.add_parser("loads", help="call GetLoads and print the answer", parents=[common], formatter_class=fmt)
    q.add_argument("--target", default=env("TARGET", "127.0.0.1:50051"), help="aggregator HOST:PORT [LOADAGG_TARGET]")
    q.add_argument("--dp-rank", type=int, default=None, help="only this rank")
    q.add_argument("--include", default="", help="sections, comma-separated: core,memory,gpu,spec,lora,disagg,queues,all")
    q.add_argument("--allow-stale", action="store_true", help="show last known loads of ranks that missed the round")
    q.add_argument("--freshness", choices=("join", "new_round", "cached"), default=None,
                   help="join the round in flight (default), demand a new round, or accept a cached answer")
    q.add_argument("--max-staleness-ms", type=non_negative_int, default=None, help="with cached: oldest answer accepted")
    q.add_argument("--json", action="store_true", help="print JSON (proto field names)")
    q.add_argument("--timeout", type=float, default=5.0, help="seconds")
    add_client_flags(q)
    q.set_defaults(func=_loads)

    d = sub.add_parser("demo", help="local cluster: aggregator + simulated agents, live loads", parents=[common], formatter_class=fmt)
    d.add_argument("--dp-size", type=int, default=env_int("DP_SIZE", 4), help="[LOADAGG_DP_SIZE]")
    d.add_argument("--agents", type=int, default=0, help="agent processes (default: one per rank)")
    d.add_argument("--port", type=int, default=env_int("PORT", 0), help="0 picks a free port [LOADAGG_PORT]")
    d.add_argument("--collect-latency-ms", type=float, default=20.0, help="simulated scheduler answer time")
    d.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    d.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: Ctrl-C)")
    d.add_argument("--mode", choices=("watching", "queueing"), default="watching")
    d.set_defaults(func=_demo)

    from loadagg.cli.top import add_parser as add_top

    add_top(sub, common, fmt)

    from loadagg.cli.health_check import default_target

    h = sub.add_parser("health", help="grpc.health.v1 Check: exit 0 when SERVING, 1 otherwise (container probes)",
                       parents=[common], formatter_class=fmt)
    h.add_argument("--target", default=default_target(),
                   help="HOST:PORT [LOADAGG_TARGET; else $LOADAGG_HOST (127.0.0.1 when it binds all addresses):$LOADAGG_PORT]")
    h.add_argument("--service", default="", help="health service name; '' = the whole server, "
                   "or loadagg.v1.LoadAggregator / loadagg.v1.AgentLink")
    h.add_argument("--timeout", type=float, default=3.0, help="seconds")
    add_client_flags(h, token=False)  # health is open: TLS flags only
    h.set_defaults(func=_health)
    return p


def main(argv: list[str] | None = None) -> None:
    try:
        args = parser().parse_args(argv)  # the defaults read LOADAGG_* variables: a bad one is a usage error
    except ValueError as error:
        print(f"loadagg: error: bad environment variable: {error}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader that went away (`| head -1`) shows up here, not as a traceback at exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to say to a closed pipe
        sys.exit(1)
    except ValueError as error:
        print(f"loadagg {args.command}: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # a port that cannot be bound, a file that cannot be read: one line, not a traceback
        print(f"loadagg {args.command}: {error}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)


if __name__ == "__main__":
    main()
