"""`scheduler-agent`: run one agent beside a scheduler. Every flag also reads a LOADAGG_* env var."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys

from loadagg.common import (
    LOG_LEVELS,
    HelpFormatter,
    add_tls_client_flags,
    env,
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_log_level,
    env_optional_int,
    missing_extra,
    run,
    tls_client_args,
)
from loadagg.common import field_default as default
from scheduler_agent.agent import SchedulerAgent
from scheduler_agent.channel import LinkSecurity
from scheduler_agent.config import ENGINE_STREAM_MODES, AgentConfig, default_instance_id
from scheduler_agent.fanout import AggregatorFanout, FanoutConfig, split_target
from scheduler_agent.sources import ENGINE_SOURCES, SOURCE_NAMES, build_source


def _ranks(text: str) -> list[int]:
    return [int(part) for part in text.replace(" ", "").split(",") if part]


_GPU_WORDS = {"auto": "auto", "on": "on", "1": "on", "true": "on", "yes": "on",
              "off": "off", "0": "off", "false": "off", "no": "off"}


def _gpu_mode(text: str | None) -> str:
    mode = _GPU_WORDS.get((text or default(AgentConfig, "gpu")).strip().lower())
    if mode is None:
        raise ValueError(f"LOADAGG_GPU={text!r}: use auto, on or off")
    return mode


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scheduler-agent",
        description="Stream this scheduler's dp-rank loads to a loadagg aggregator.",
        formatter_class=HelpFormatter,
    )
    c = AgentConfig
    p.add_argument("--aggregator", default=env("AGGREGATOR", default(c, "aggregator")),
                   help="aggregator HOST:PORT [LOADAGG_AGGREGATOR]")
    p.add_argument("--dp-rank", dest="dp_ranks", type=int, action="append",
                   help="a dp rank this agent serves; repeat for several [LOADAGG_DP_RANKS=0,1] (default: 0; "
                        "with --source sglang/vllm: every rank the engine runs)")
    p.add_argument("--dp-size", type=int, default=env_int("DP_SIZE", default(c, "dp_size")),
                   help="cluster dp size; 0 takes the engine's (sglang/vllm) or the aggregator's [LOADAGG_DP_SIZE]")
    p.add_argument("--rank-offset", type=int, default=env_int("RANK_OFFSET", default(c, "rank_offset")),
                   help="serve the source's dp rank r as cluster rank r + N: one aggregator over several engines "
                        "that each number their ranks from 0 (--dp-rank and --gpu-devices keep the engine's "
                        "numbering) [LOADAGG_RANK_OFFSET]")
    p.add_argument("--instance-id", default=env("INSTANCE_ID") or default_instance_id(),
                   help="stable id of this agent [LOADAGG_INSTANCE_ID]")
    p.add_argument("--source", choices=SOURCE_NAMES, default=env_choice("SOURCE", default(c, "source"), SOURCE_NAMES),
                   help="where loads come from [LOADAGG_SOURCE]")
    p.add_argument("--engine-url", default=env("ENGINE_URL", default(c, "engine_url")),
                   help="the engine beside this agent: http://HOST:PORT, or grpc://HOST:PORT for an engine in "
                        "gRPC mode (default: sglang http://127.0.0.1:30000, vllm http://127.0.0.1:8000) "
                        "[LOADAGG_ENGINE_URL]")
    p.add_argument("--engine-timeout-ms", type=int, default=env_int("ENGINE_TIMEOUT_MS", default(c,
                                                                                                 "engine_timeout_ms")),
                   help="per-request engine timeout; 0: 60%% of the aggregator's round timeout, at most 2 s "
                        "[LOADAGG_ENGINE_TIMEOUT_MS]")
    p.add_argument("--engine-api-key", default=None,  # read from the environment later, so --help never prints it
                   help="the key an HTTP engine was started with (sglang/vLLM --api-key), sent as a Bearer "
                        "token [LOADAGG_ENGINE_API_KEY]")
    p.add_argument("--rediscover-interval-s", type=float, default=env_float("REDISCOVER_INTERVAL_S", default(c,
                                                                                                             "rediscover_interval_s")),
                   help="sglang/vllm: ask the engine for its dp ranks again this often and re-link when they "
                        "changed (an engine restarted with another DP); 0: only at start "
                        "[LOADAGG_REDISCOVER_INTERVAL_S]")
    p.add_argument("--gpu", dest="gpu", action="store_const", const="on", default=_gpu_mode(env("GPU")),
                   help="add NVML GPU telemetry (default auto: when NVML is there, not for the simulator) "
                        "[LOADAGG_GPU=auto|on|off]")
    p.add_argument("--no-gpu", dest="gpu", action="store_const", const="off", help="no GPU telemetry")
    p.add_argument("--gpu-devices", default=env("GPU_DEVICES", default(c, "gpu_devices")),
                   help="GPUs per dp rank, 'RANK=DEV[,DEV];...' (NVML indices or UUIDs); default: the visible "
                        "devices (CUDA_VISIBLE_DEVICES) split evenly over the ranks [LOADAGG_GPU_DEVICES]")
    p.add_argument("--push-interval-ms", type=int, default=env_int("PUSH_INTERVAL_MS", default(c, "push_interval_ms")),
                   help="also push changed loads unasked at this interval; 0: only answer rounds "
                        "[LOADAGG_PUSH_INTERVAL_MS]")
    p.add_argument("--push-refresh-ms", type=int, default=env_int("PUSH_REFRESH_MS", default(c, "push_refresh_ms")),
                   help="re-push a rank unchanged for this long (keeps its snapshot age honest); 0: never "
                        "[LOADAGG_PUSH_REFRESH_MS]")
    p.add_argument("--push-coalesce-ms", type=float,
                   default=env_float("PUSH_COALESCE_MS", default(c, "push_coalesce_ms")),
                   help="push sources (sglang feed, sglang-shm, SMG stream): changes within this window go out "
                        "in one push [LOADAGG_PUSH_COALESCE_MS]")
    p.add_argument("--sglang-load-endpoint", default=env("SGLANG_LOAD_ENDPOINT", default(c, "sglang_load_endpoint")),
                   help="sglang: its load feed, tcp://HOST:BASEPORT (rank r at BASEPORT + r), when /server_info "
                        "cannot say; 'off': poll /v1/loads only (default: the feed /server_info advertises) "
                        "[LOADAGG_SGLANG_LOAD_ENDPOINT]")
    p.add_argument("--feed-silence-ms", type=int, default=env_int("FEED_SILENCE_MS", default(c, "feed_silence_ms")),
                   help="sglang feed: a rank silent this long is polled through /v1/loads until it publishes "
                        "again [LOADAGG_FEED_SILENCE_MS]")
    p.add_argument("--detail-interval-ms", type=int,
                   default=env_int("DETAIL_INTERVAL_MS", default(c, "detail_interval_ms")),
                   help="sglang feed: how often /v1/loads is read for the figures the feed lacks "
                        "[LOADAGG_DETAIL_INTERVAL_MS]")
    p.add_argument("--shm-path", default=env("SHM_PATH", default(c, "shm_path")),
                   help="sglang-shm: the engine's snapshot file (default: the one /dev/shm/sglang_loads_*.shm) "
                        "[LOADAGG_SHM_PATH]")
    p.add_argument("--shm-watch-ms", type=float, default=env_float("SHM_WATCH_MS", default(c, "shm_watch_ms")),
                   help="sglang-shm: how often the slots are checked for a change [LOADAGG_SHM_WATCH_MS]")
    p.add_argument("--engine-stream", choices=ENGINE_STREAM_MODES,
                   default=env_choice("ENGINE_STREAM", default(c, "engine_stream"), ENGINE_STREAM_MODES),
                   help="grpc:// engines: read SMG's load records on SubscribeKvEvents (auto) or only poll "
                        "GetLoads (off) [LOADAGG_ENGINE_STREAM]")
    p.add_argument("--stream-silence-ms", type=int,
                   default=env_int("STREAM_SILENCE_MS", default(c, "stream_silence_ms")),
                   help="grpc:// engines: a load stream silent this long (about two idle heartbeats) makes its "
                        "ranks stale and GetLoads takes over [LOADAGG_STREAM_SILENCE_MS]")
    p.add_argument("--model", default=env("MODEL", default(c, "model")),
                   help="model name reported in hello [LOADAGG_MODEL]")
    p.add_argument("--seed", type=int, default=env_optional_int("SEED"),
                   help="simulator seed [LOADAGG_SEED]")
    p.add_argument("--collect-latency-ms", type=float, default=env_float("COLLECT_LATENCY_MS", default(c,
                                                                                                       "collect_latency_ms")),
                   help="simulator: time to answer a collect, as a busy scheduler [LOADAGG_COLLECT_LATENCY_MS]")
    p.add_argument("--resolve-all", action="store_true",
                   default=env_bool("RESOLVE_ALL", default(FanoutConfig, "resolve_all")),
                   help="link to EVERY address --aggregator's name resolves to (a headless Service: all replicas), "
                        "following changes [LOADAGG_RESOLVE_ALL=true]")
    p.add_argument("--resolve-interval-s", type=float,
                   default=env_float("RESOLVE_INTERVAL_S", default(FanoutConfig, "resolve_interval_s")),
                   help="--resolve-all: seconds between re-resolutions [LOADAGG_RESOLVE_INTERVAL_S]")
    p.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                   default=env_log_level(), help="[LOADAGG_LOG_LEVEL]")
    p.add_argument("--backoff-initial-ms", type=int,
                   default=env_int("BACKOFF_INITIAL_MS", default(c, "backoff_initial_ms")),
                   help="first reconnect delay ceiling; doubles per failure, full jitter [LOADAGG_BACKOFF_INITIAL_MS]")
    p.add_argument("--backoff-max-ms", type=int, default=env_int("BACKOFF_MAX_MS", default(c, "backoff_max_ms")),
                   help="largest reconnect delay ceiling [LOADAGG_BACKOFF_MAX_MS]")
    add_link_flags(p)
    return p


def add_link_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("secure link to the aggregator")
    g.add_argument("--token", default=None,  # read from the environment later, so --help never prints it
                   help="shared agent token (the aggregator's --agent-token) [LOADAGG_AGENT_TOKEN]")
    add_tls_client_flags(g, LinkSecurity, cert_env="TLS_CERT", key_env="TLS_KEY")
    g.add_argument("--keepalive-s", type=float, default=env_float("KEEPALIVE_S", default(LinkSecurity, "keepalive_s")),
                   help="keepalive ping interval; 0 turns pings off [LOADAGG_KEEPALIVE_S]")


def link_security_from_args(args: argparse.Namespace) -> LinkSecurity:
    return LinkSecurity(**tls_client_args(args, "AGENT_TOKEN"), keepalive_s=args.keepalive_s)


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    from_engine = args.source in ENGINE_SOURCES
    ranks = args.dp_ranks or _ranks(env("DP_RANKS", "") or ("" if from_engine else "0"))
    if from_engine:  # fail now on a bad URL, endpoint or device map, not after the first connect
        from scheduler_agent.sources import engine_endpoint
        from scheduler_agent.sources.gpu import parse_gpu_devices

        if args.source != "sglang-shm":
            engine_endpoint(args.source, args.engine_url)
        elif not args.shm_path:  # several engines' files: say which now (none yet: the engine may be starting)
            from scheduler_agent.sources.sglang_shm import refuse_several

            refuse_several()
        if args.sglang_load_endpoint not in ("", "off"):
            from scheduler_agent.sources.sglang_feed import parse_endpoint

            parse_endpoint(args.sglang_load_endpoint)
        parse_gpu_devices(args.gpu_devices)
    return AgentConfig(
        aggregator=args.aggregator,
        dp_ranks=tuple(ranks),
        dp_size=args.dp_size,
        rank_offset=args.rank_offset,
        instance_id=args.instance_id,
        source=args.source,
        model=args.model,
        seed=args.seed,
        collect_latency_ms=args.collect_latency_ms,
        backoff_initial_ms=args.backoff_initial_ms,
        backoff_max_ms=args.backoff_max_ms,
        security=link_security_from_args(args),
        push_interval_ms=args.push_interval_ms,
        push_refresh_ms=args.push_refresh_ms,
        engine_url=args.engine_url,
        engine_timeout_ms=args.engine_timeout_ms,
        engine_api_key=args.engine_api_key if args.engine_api_key is not None else env("ENGINE_API_KEY", ""),
        ranks_from_engine=from_engine,
        rediscover_interval_s=args.rediscover_interval_s,
        gpu=args.gpu,
        gpu_devices=args.gpu_devices,
        push_coalesce_ms=args.push_coalesce_ms,
        sglang_load_endpoint=args.sglang_load_endpoint,
        feed_silence_ms=args.feed_silence_ms,
        detail_interval_ms=args.detail_interval_ms,
        shm_path=args.shm_path,
        shm_watch_ms=args.shm_watch_ms,
        engine_stream=args.engine_stream,
        stream_silence_ms=args.stream_silence_ms,
    )


def fanout_from_args(args: argparse.Namespace) -> FanoutConfig:
    if args.resolve_all:
        split_target(args.aggregator)  # a bad target is a usage error now, not a crash later
    return FanoutConfig(resolve_all=args.resolve_all, resolve_interval_s=args.resolve_interval_s)


async def run_agent(config: AgentConfig, fanout: FanoutConfig | None = None) -> None:
    """Run until SIGTERM/SIGINT: one link, or (--resolve-all) one link per aggregator replica."""
    if fanout is not None and fanout.resolve_all:
        agent = AggregatorFanout(config, build_source(config), fanout)
    else:
        agent = SchedulerAgent(config, build_source(config))
    gc.freeze()  # start-up objects live for good: full collections need not walk them (as the aggregator does)
    task = asyncio.create_task(agent.run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        logging.getLogger(__name__).info("agent %s stopped", config.instance_id)


def main(argv: list[str] | None = None) -> None:
    try:
        args = parser().parse_args(argv)  # the defaults read LOADAGG_* variables: a bad one is a usage error
    except ValueError as error:
        sys.exit(f"scheduler-agent: error: bad environment variable: {error}")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        fanout = fanout_from_args(args)
        if config.security.uses_tls:
            config.security.credentials()  # unreadable certificate files: say so now, not at every reconnect
    except ValueError as error:
        parser().error(str(error))
    except ModuleNotFoundError as error:  # an engine source's or NVML's package: the `agent` extra
        sys.exit(missing_extra("scheduler-agent", error, "agent"))
    try:
        run(run_agent(config, fanout))
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] in ("loadagg", "scheduler_agent"):
            raise
        sys.exit(missing_extra("scheduler-agent", error, "agent"))


if __name__ == "__main__":
    main()
