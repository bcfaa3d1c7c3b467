"""`loadagg top`: a live terminal view of every rank, fed by WatchLoads on change (or at an interval).

Running/waiting requests, token-usage bars, throughput, cache hit rate, GPU memory and the age of
each rank's figures; stale ranks (answered from a last-known snapshot, or older than --stale-ms) in
yellow, missing ranks in red. `--frames N` / `--once` print N frames and exit (scripts, tests).
With `--metrics-url` (the aggregator's HTTP gateway /metrics) a line above the ranks shows the coalescing:
router calls/s, rounds/s, callers per round and the engine reads saved, as `loadagg demo` does.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass

import grpc

from loadagg.cli.flags import add_client_flags, add_target_flag, channel_security_from_args, non_negative_int
from loadagg.client.channels import ChannelSecurity
from loadagg.common import DEFAULT_WATCH_INTERVAL_MS, env, env_choice, env_int, field_default, run

WATCH_MODES = ("change", "interval")  # --watch: TopConfig.on_change true / false


@dataclass(frozen=True, slots=True)
class TopConfig:
    target: str
    interval_ms: int = 1000  # on change: at most one frame this often; at an interval: one frame per interval
    dp_rank: int | None = None
    frames: int = 0  # 0: until Ctrl-C
    stale_ms: int = 0  # 0: three intervals (interval 0 is the server's default watch interval, 1 s unless changed)
    width: int | None = None
    security: ChannelSecurity | None = None  # TLS / mutual TLS and the router token
    metrics_url: str = ""  # the aggregator's /metrics (HTTP gateway): the coalescing line; "" hides it
    on_change: bool = True  # a frame when a rank changes (and a heartbeat when quiet), not one per interval

    @property
    def stale_after_ms(self) -> int:
        """On change a quiet rank is confirmed once per heartbeat (the server's default watch interval)."""
        period = max(self.interval_ms, DEFAULT_WATCH_INTERVAL_MS) if self.on_change else self.interval_ms
        return self.stale_ms or 3 * (period or DEFAULT_WATCH_INTERVAL_MS)

    def watch_options(self) -> dict:
        if self.on_change:
            return {"on_change": True, "min_interval_ms": self.interval_ms}
        return {"interval_ms": self.interval_ms}


def _top(args: argparse.Namespace) -> int:
    from rich.console import Console  # the `top` extra

    from loadagg.cli.top_view import run_top

    frames = 1 if args.once else args.frames
    config = TopConfig(args.target, args.interval_ms, args.dp_rank, frames, args.stale_ms, args.width,
                       security=channel_security_from_args(args), metrics_url=args.metrics_url,
                       on_change=args.watch == "change")
    console = Console(width=args.width) if args.width else Console()
    try:
        run(run_top(config, console))
    except grpc.RpcError as error:
        print(f"loadagg top: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    return 0


def add_parser(sub, common: argparse.ArgumentParser, fmt) -> None:
    t = sub.add_parser("top", help="live view of every rank, refreshed by WatchLoads", parents=[common],
                       formatter_class=fmt)
    add_target_flag(t)
    t.add_argument("--interval-ms", type=non_negative_int,
                   default=env_int("TOP_INTERVAL_MS", field_default(TopConfig, "interval_ms")),
                   help="on change: at most one frame this often; at an interval: the interval "
                        "[LOADAGG_TOP_INTERVAL_MS]")
    t.add_argument("--watch", choices=WATCH_MODES,
                   default=env_choice("TOP_WATCH", WATCH_MODES[not field_default(TopConfig, "on_change")], WATCH_MODES),
                   help="a frame whenever a rank's figures change (and once a heartbeat when quiet), or one per "
                        "interval (a collection round each) [LOADAGG_TOP_WATCH]")
    t.add_argument("--dp-rank", type=int, default=None, help="only this rank")
    t.add_argument("--frames", type=non_negative_int, default=field_default(TopConfig, "frames"),
                   help="print this many frames, then exit (0: until Ctrl-C)")
    t.add_argument("--once", action="store_true", help="print one frame and exit (= --frames 1)")
    t.add_argument("--stale-ms", type=non_negative_int, default=field_default(TopConfig, "stale_ms"),
                   help="highlight ranks whose figures are older (0: 3 intervals; on change at least 3 heartbeats)")
    t.add_argument("--width", type=int, default=None, help="terminal width (default: detected; 80 when piped)")
    t.add_argument("--metrics-url", default=env("METRICS_URL", field_default(TopConfig, "metrics_url")),
                   help="the aggregator's /metrics (`serve --http-port`), e.g. http://127.0.0.1:8080/metrics: adds "
                        "the coalescing line (calls/s, rounds/s, callers per round, engine reads saved) "
                        "[LOADAGG_METRICS_URL]")
    add_client_flags(t)
    t.set_defaults(func=_top, extra="top")
