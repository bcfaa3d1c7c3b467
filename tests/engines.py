"""Engine stand-ins on real loopback sockets: sglang and vLLM over HTTP (aiohttp.web), and engines in
gRPC mode built on smg-grpc-proto's servicer base classes. Each can be switched to failing and back:
"ok", "error" (HTTP 500 / gRPC UNAVAILABLE), "hang" (never answers), "garbage" (a body no engine
would send), and stopped / restarted on the same port (engine down)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import grpc
from aiohttp import web
from smg_grpc_proto import (
    sglang_scheduler_pb2,
    sglang_scheduler_pb2_grpc,
    tokenspeed_scheduler_pb2,
    tokenspeed_scheduler_pb2_grpc,
    vllm_engine_pb2,
    vllm_engine_pb2_grpc,
)

MODES = ("ok", "error", "hang", "garbage")


def sglang_entry(rank: int, running: int = 5, *, sections: bool = True) -> dict:
    """One `/v1/loads?include=all` entry as sglang serves it (sections only when the engine has them)."""
    entry = {
        "dp_rank": rank,
        "num_running_reqs": running,
        "num_waiting_reqs": 2 + rank,
        "num_total_reqs": running + 2 + rank,
        "num_used_tokens": 5000 + 1000 * rank,
        "num_total_tokens": 262144,
        "max_total_num_tokens": 262144,
        "num_waiting_uncached_tokens": 700,
        "token_usage": round((5000 + 1000 * rank) / 262144, 4),
        "gen_throughput": 120.5 + rank,
        "cache_hit_rate": 0.42,
        "utilization": 0.75,
        "max_running_requests": 256,
    }
    if sections:
        entry.update({
            "memory": {"weight_gb": 15.26, "kv_cache_gb": 40.5, "graph_gb": 1.62, "token_capacity": 262144},
            "speculative": {"accept_length": 2.8, "accept_rate": 0.6},
            "lora": {"slots_used": 1, "slots_total": 8, "utilization": 0.125},
            "disaggregation": {
                "mode": "decode", "prefill_prealloc_queue_reqs": 0, "prefill_inflight_queue_reqs": 0,
                "decode_prealloc_queue_reqs": 3, "decode_transfer_queue_reqs": 1,
                "decode_retracted_queue_reqs": 0, "kv_transfer_speed_gb_s": 12.5, "kv_transfer_latency_ms": 3.2,
            },
            "queues": {"waiting": 2 + rank, "grammar": 0, "paused": 0, "retracted": 1},
        })
    return entry


class HttpEngine:
    """A switchable HTTP engine on 127.0.0.1 (port 0 first, then the same port across restarts)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.api_key = ""  # as the engine's --api-key: every path but /health and /metrics wants the Bearer key
        self.hits: Counter[str] = Counter()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()

    def routes(self) -> list[web.RouteDef]:
        raise NotImplementedError

    def set_mode(self, mode: str) -> None:
        assert mode in MODES
        self.mode = mode
        if mode != "hang":
            self._release.set()
            self._release = asyncio.Event()

    async def _fail_or(self, path: str, body, content_type: str = "application/json") -> web.Response:
        self.hits[path] += 1
        if self.mode == "error":
            return web.Response(status=500, text="Internal Server Error")
        if self.mode == "hang":
            await self._release.wait()
            return web.Response(status=503)
        if self.mode == "garbage":
            return web.Response(text="<html>502 Bad Gateway</html>{{{", content_type="text/html")
        text = body if isinstance(body, str) else json.dumps(body)
        return web.Response(text=text, content_type=content_type)

    async def start(self) -> int:
        @web.middleware
        async def api_key(request: web.Request, handler):  # sglang's add_api_key_middleware, as it checks
            if self.api_key and request.path not in ("/health", "/metrics") \
                    and request.headers.get("Authorization") != f"Bearer {self.api_key}":
                return web.json_response({"error": "Unauthorized"}, status=401)
            return await handler(request)

        app = web.Application(middlewares=[api_key])
        app.add_routes(self.routes())
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class SglangHttpEngine(HttpEngine):
    """`GET /v1/loads` (or only the legacy `GET /get_load`) for `dp_size` ranks; `running[r]` is settable."""

    def __init__(self, dp_size: int, *, legacy_only: bool = False, bare_ranks: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.dp_size = dp_size
        self.legacy_only = legacy_only
        self.bare_ranks = bare_ranks  # ranks served without any section object
        self.running = {r: 5 + r for r in range(dp_size)}
        self.utilization: dict[int, float] = {}  # per rank, instead of sglang_entry's 0.75

    def v1_body(self, request: web.Request) -> dict:
        loads = [sglang_entry(r, self.running[r], sections=r not in self.bare_ranks) for r in range(self.dp_size)]
        for entry in loads:
            entry["utilization"] = self.utilization.get(entry["dp_rank"], entry["utilization"])
        if request.query.get("include") == "core":
            loads = [{k: v for k, v in e.items() if not isinstance(v, dict)} for e in loads]
        return {"timestamp": "2026-11-25T09:00:00.000000+00:00", "version": "0.5.6", "dp_rank_count": self.dp_size,
                "loads": loads,
                "aggregate": {"total_running_reqs": sum(e["num_running_reqs"] for e in loads)}}

    def routes(self) -> list[web.RouteDef]:
        async def v1_loads(request: web.Request) -> web.Response:
            return await self._fail_or("/v1/loads", self.v1_body(request))

        async def get_load(request: web.Request) -> web.Response:
            body = [{"dp_rank": r, "num_reqs": self.running[r] + 2, "num_waiting_reqs": 2, "num_tokens": 4096}
                    for r in range(self.dp_size)]
            return await self._fail_or("/get_load", body)

        routes = [web.get("/get_load", get_load)]
        if not self.legacy_only:
            routes.append(web.get("/v1/loads", v1_loads))
        return routes


# vLLM's front end sums num_gpu_blocks over its DP engines and prints that sum on every engine's
# cache_config_info: 32768 here is two engines of 16384 blocks each.
VLLM_PAGE = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12345.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-8B"} {running0}
vllm:num_requests_running{engine="1",model_name="Qwen/Qwen3-8B"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen3-8B"} 4.0
vllm:num_requests_waiting{engine="1",model_name="Qwen/Qwen3-8B"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen3-8B"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="Qwen/Qwen3-8B"} 0.0625
# HELP vllm:prefix_cache_queries Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="Qwen/Qwen3-8B"} {queries0}
vllm:prefix_cache_queries_created{engine="0",model_name="Qwen/Qwen3-8B"} 1.7640468e+09
vllm:prefix_cache_queries_total{engine="1",model_name="Qwen/Qwen3-8B"} 0.0
vllm:prefix_cache_queries_created{engine="1",model_name="Qwen/Qwen3-8B"} 1.7640468e+09
# HELP vllm:prefix_cache_hits Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="Qwen/Qwen3-8B"} {hits0}
vllm:prefix_cache_hits_created{engine="0",model_name="Qwen/Qwen3-8B"} 1.7640468e+09
vllm:prefix_cache_hits_total{engine="1",model_name="Qwen/Qwen3-8B"} 0.0
vllm:prefix_cache_hits_created{engine="1",model_name="Qwen/Qwen3-8B"} 1.7640468e+09
# HELP vllm:generation_tokens Number of generation tokens processed.
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="Qwen/Qwen3-8B"} {generated0}
vllm:generation_tokens_created{engine="0",model_name="Qwen/Qwen3-8B"} 1.7640468e+09
vllm:generation_tokens_total{engine="1",model_name="Qwen/Qwen3-8B"} 100.0
vllm:generation_tokens_created{engine="1",model_name="Qwen/Qwen3-8B"} 1.7640468e+09
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",engine="0",gpu_memory_utilization="0.9",num_cpu_blocks="None",num_gpu_blocks="32768",num_gpu_blocks_override="None"} 1.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",engine="1",gpu_memory_utilization="0.9",num_cpu_blocks="None",num_gpu_blocks="32768",num_gpu_blocks_override="None"} 1.0
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="Qwen/Qwen3-8B"} 2.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="Qwen/Qwen3-8B"} 9.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="Qwen/Qwen3-8B"} 9.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="Qwen/Qwen3-8B"} 14.2
"""


class VllmHttpEngine(HttpEngine):
    """`GET /metrics` of a 2-engine (DP=2) vLLM server; rank 0's counters are settable."""

    def __init__(self) -> None:
        super().__init__()
        self.running0 = 7
        self.generated0 = 1000.0
        self.queries0 = 1000.0
        self.hits0 = 250.0

    def page(self) -> str:
        return (VLLM_PAGE.replace("{running0}", f"{float(self.running0)}")
                .replace("{generated0}", f"{self.generated0}")
                .replace("{queries0}", f"{self.queries0}").replace("{hits0}", f"{self.hits0}"))

    def routes(self) -> list[web.RouteDef]:
        async def metrics(request: web.Request) -> web.Response:
            return await self._fail_or("/metrics", self.page(), "text/plain")

        return [web.get("/metrics", metrics)]


class _GrpcModes:
    """The switch shared by both gRPC stand-ins."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.calls = 0
        self.requests: list = []
        self.release = asyncio.Event()

    def set_mode(self, mode: str) -> None:
        assert mode in MODES
        self.mode = mode
        if mode != "hang":
            self.release.set()
            self.release = asyncio.Event()

    async def answer(self, request, context, build):
        self.calls += 1
        self.requests.append(request)
        if self.mode == "error":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scheduler is restarting")
        if self.mode == "hang":
            await self.release.wait()
        return build(garbage=self.mode == "garbage")


class SglangGrpcEngine(sglang_scheduler_pb2_grpc.SglangSchedulerServicer, _GrpcModes):
    def __init__(self, dp_size: int) -> None:
        _GrpcModes.__init__(self)
        self.dp_size = dp_size
        self.running = {r: 5 + r for r in range(dp_size)}

    def response(self, garbage: bool = False):
        m = sglang_scheduler_pb2
        loads = []
        for r in range(self.dp_size):
            load = m.SchedulerLoad(
                dp_rank=r, num_running_reqs=self.running[r], num_waiting_reqs=2, num_total_reqs=self.running[r] + 2,
                num_used_tokens=4096, max_total_num_tokens=262144, token_usage=0.015625, gen_throughput=0.0,
                cache_hit_rate=0.5, utilization=0.0, max_running_requests=256, num_waiting_uncached_tokens=0,
                queues=m.QueueMetrics(waiting=2, grammar=0, paused=0, retracted=0),
            )
            if r == 0:
                load.memory.CopyFrom(m.MemoryMetrics(weight_gb=15.3, kv_cache_gb=40.0, graph_gb=1.5,
                                                     token_capacity=262144))
                load.disaggregation.CopyFrom(m.DisaggregationMetrics(mode="prefill", prefill_inflight_queue_reqs=2))
            if garbage:
                load.num_running_reqs = -7
                load.token_usage = float("nan")
            loads.append(load)
        return m.GetLoadsResponse(timestamp="2026-11-25T09:00:00Z", version="0.5.6", dp_rank_count=self.dp_size,
                                  loads=loads)

    async def GetLoads(self, request, context):
        return await self.answer(request, context, self.response)


class VllmGrpcEngine(vllm_engine_pb2_grpc.VllmEngineServicer, _GrpcModes):
    def __init__(self, dp_size: int) -> None:
        _GrpcModes.__init__(self)
        self.dp_size = dp_size

    def response(self, garbage: bool = False):
        m = vllm_engine_pb2
        loads = [m.SchedulerLoad(dp_rank=r, num_running_reqs=3, num_waiting_reqs=0, num_total_reqs=3,
                                 num_used_tokens=0, max_total_num_tokens=0, token_usage=0.25, gen_throughput=0.0,
                                 cache_hit_rate=0.0, utilization=0.0)
                 for r in range(self.dp_size)]
        if garbage:
            loads[0].num_waiting_reqs = -1
        return m.GetLoadsResponse(timestamp="2026-11-25T09:00:00Z", version="0.11.0", dp_rank_count=self.dp_size,
                                  loads=loads)

    async def GetLoads(self, request, context):
        return await self.answer(request, context, self.response)


class TokenSpeedGrpcEngine(tokenspeed_scheduler_pb2_grpc.TokenSpeedSchedulerServicer, _GrpcModes):
    """TokenSpeed behind SMG's servicer: GetLoads with its optional active_token_usage, memory and queues."""

    def __init__(self, dp_size: int) -> None:
        _GrpcModes.__init__(self)
        self.dp_size = dp_size

    def response(self, garbage: bool = False):
        m = tokenspeed_scheduler_pb2
        loads = [m.SchedulerLoad(dp_rank=r, num_running_reqs=4 + r, num_waiting_reqs=1, num_total_reqs=5 + r,
                                 num_used_tokens=2048, max_total_num_tokens=65536, max_running_requests=128,
                                 num_waiting_uncached_tokens=0, token_usage=0.03125, active_token_usage=0.02,
                                 gen_throughput=55.0, cache_hit_rate=0.25, utilization=0.1,
                                 memory=m.MemoryMetrics(weight_gb=8.0, kv_cache_gb=20.0, graph_gb=0.5,
                                                        token_capacity=65536),
                                 queues=m.QueueMetrics(waiting=1, grammar=0, paused=0, retracted=0))
                 for r in range(self.dp_size)]
        return m.GetLoadsResponse(timestamp="2026-12-05T09:00:00Z", version="0.3.0", dp_rank_count=self.dp_size,
                                  loads=loads)

    async def GetLoads(self, request, context):
        return await self.answer(request, context, self.response)


async def serve_grpc(servicer, port: int = 0) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server on 127.0.0.1 with the stand-in registered through the package's own helper."""
    server = grpc.aio.server()
    if isinstance(servicer, SglangGrpcEngine):
        sglang_scheduler_pb2_grpc.add_SglangSchedulerServicer_to_server(servicer, server)
    elif isinstance(servicer, TokenSpeedGrpcEngine):
        tokenspeed_scheduler_pb2_grpc.add_TokenSpeedSchedulerServicer_to_server(servicer, server)
    else:
        vllm_engine_pb2_grpc.add_VllmEngineServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound
