"""`loadagg` command: serve, loads, demo, health. Every flag also reads a LOADAGG_* environment variable."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from loadagg.cli.grpc_core import use_classic_listener

use_classic_listener()  # gRPC reads its experiments when first imported: just below, for the `loadagg` command
import grpc  # noqa: E402

from loadagg.cli.demo import DemoConfig  # noqa: E402
from loadagg.cli.flags import (  # noqa: E402
    add_client_flags,
    add_serve_flags,
    add_target_flag,
    aggregator_config_from_args,
    channel_security_from_args,
    non_negative_int,
)
from loadagg.client.load_client import DEFAULT_TIMEOUT_S  # noqa: E402
from loadagg.common import LOG_LEVELS, HelpFormatter, env_int, env_log_level, missing_extra, run  # noqa: E402
from loadagg.common import field_default as default  # noqa: E402
from loadagg.server.config import MODE_NAMES  # noqa: E402


def _serve(args: argparse.Namespace) -> int:
    from loadagg.server.aggregator import serve

    run(serve(aggregator_config_from_args(args)))
    return 0


def _loads(args: argparse.Namespace) -> int:
    from loadagg.cli.render import to_json, to_table
    from loadagg.client.load_client import LoadClient

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
    from loadagg.cli.demo import run_demo

    config = DemoConfig(
        dp_size=args.dp_size,
        agents=args.agents or args.dp_size,
        port=args.port,
        collect_latency_ms=args.collect_latency_ms,
        interval_s=args.interval,
        duration_s=args.duration,
        mode=args.mode,
        routers=args.routers,
        router_interval_ms=args.router_interval_ms,
    )
    try:
        run(run_demo(config))
    except KeyboardInterrupt:
        pass
    return 0


def _health(args: argparse.Namespace) -> int:
    from loadagg.cli.health_check import check_health

    result = check_health(args.target, args.service, timeout=args.timeout, security=channel_security_from_args(args))
    print(f"loadagg health: {result.message}", file=sys.stdout if result.serving else sys.stderr)
    return 0 if result.serving else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loadagg", description="gRPC load aggregation for data-parallel LLM schedulers.")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = HelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                        default=env_log_level(), help="[LOADAGG_LOG_LEVEL]")

    s = sub.add_parser("serve", help="run the aggregator", parents=[common], formatter_class=fmt)
    add_serve_flags(s)
    s.set_defaults(func=_serve, extra="server")

    q = sub.add_parser("loads", help="call GetLoads and print the answer", parents=[common], formatter_class=fmt)
    add_target_flag(q)
    q.add_argument("--dp-rank", type=int, default=None, help="only this rank")
    q.add_argument("--include", default="",
                   help="sections, comma-separated: core,memory,gpu,spec,lora,disagg,queues,all")
    q.add_argument("--allow-stale", action="store_true", help="show last known loads of ranks that missed the round")
    q.add_argument("--freshness", choices=("join", "new_round", "cached"), default=None,
                   help="join the round in flight (default), demand a new round, or accept a cached answer")
    q.add_argument("--max-staleness-ms", type=non_negative_int, default=None,
                   help="with cached: oldest answer accepted")
    q.add_argument("--json", action="store_true", help="print JSON (proto field names)")
    q.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds")
    add_client_flags(q)
    q.set_defaults(func=_loads)

    d = sub.add_parser("demo", help="local cluster: aggregator + simulated agents, live loads", parents=[common],
                       formatter_class=fmt)
    c = DemoConfig
    d.add_argument("--dp-size", type=int, default=env_int("DP_SIZE", default(c, "dp_size")), help="[LOADAGG_DP_SIZE]")
    d.add_argument("--agents", type=int, default=0, help="agent processes (default: one per rank)")
    d.add_argument("--port", type=int, default=env_int("PORT", default(c, "port")),
                   help="0 picks a free port [LOADAGG_PORT]")
    d.add_argument("--collect-latency-ms", type=float, default=default(c, "collect_latency_ms"),
                   help="simulated scheduler answer time")
    d.add_argument("--interval", type=float, default=default(c, "interval_s"), help="seconds between refreshes")
    d.add_argument("--duration", type=float, default=default(c, "duration_s"),
                   help="stop after this many seconds (0: Ctrl-C)")
    d.add_argument("--mode", choices=MODE_NAMES, default=default(c, "mode"))
    d.add_argument("--routers", type=non_negative_int, default=default(c, "routers"),
                   help="simulated routers asking GetLoads all the while (0: none)")
    d.add_argument("--router-interval-ms", type=int, default=default(c, "router_interval_ms"),
                   help="each router asks this often")
    d.set_defaults(func=_demo, extra="server,agent")

    from loadagg.cli.top import add_parser as add_top

    add_top(sub, common, fmt)

    from loadagg.cli.health_check import DEFAULT_TIMEOUT_S as HEALTH_TIMEOUT_S
    from loadagg.cli.health_check import default_target

    h = sub.add_parser("health", help="grpc.health.v1 Check: exit 0 when SERVING, 1 otherwise (container probes)",
                       parents=[common], formatter_class=fmt)
    h.add_argument("--target", default=default_target(),
                   help="HOST:PORT [LOADAGG_TARGET; else $LOADAGG_HOST (127.0.0.1 when it binds all addresses)"
                        ":$LOADAGG_PORT]")
    h.add_argument("--service", default="", help="health service name; '' = the whole server, "
                   "or loadagg.v1.LoadAggregator / loadagg.v1.AgentLink")
    h.add_argument("--timeout", type=float, default=HEALTH_TIMEOUT_S, help="seconds")
    add_client_flags(h, token=False)  # health is open: TLS flags only
    h.set_defaults(func=_health, extra="server")
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
    except ModuleNotFoundError as error:  # an install without this command's extra (`pip install loadagg`)
        if getattr(args, "extra", None) is None or (error.name or "").split(".")[0] in ("loadagg", "scheduler_agent"):
            raise
        print(missing_extra(f"loadagg {args.command}", error, args.extra), file=sys.stderr)
        sys.exit(1)
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
