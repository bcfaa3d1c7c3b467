"""HTTP side of the aggregator (`loadagg serve --http-port P`): sglang's `GET /v1/loads`, its stream
`GET /v1/loads/watch` (Server-Sent Events, http_stream.py), and `/metrics`.

`/v1/loads?dp_rank=&include=a,b&format=json|prometheus` answers with sglang's own body, so a router that
polls an sglang server's /v1/loads can be pointed at the aggregator unchanged; the calls share rounds
with every gRPC caller through the same watching communicator. loadagg's extras stay out of the body
(it is sglang's shape, field for field) and travel in headers: X-Loadagg-Round-Id, X-Loadagg-Source,
X-Loadagg-Missing-Ranks. `max_staleness_ms=N` (loadagg's extension) accepts a cached answer that young.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

from loadagg.server.answers import shared_view_stepped
from loadagg.server.auth import TokenPolicy, http_middleware
from loadagg.server.errors import InvalidRequest, LoadAggError, ShuttingDown, http_body, http_status, quoted
from loadagg.server.http_limits import CappedListener, connection_cap, send_within
from loadagg.server.http_query import known_params, single_params, uint32_param, view_params
from loadagg.server.http_stream import HttpStreams
from loadagg.server.limits import LimitsConfig
from loadagg.server.metrics import CONTENT_TYPE, AggregatorMetrics
from loadagg.server.render_steps import RenderSteps
from loadagg.server.rounds import RoundResult
from loadagg.server.sections import parse_include
from loadagg.server.service import LoadAggregatorService
from loadagg.server.sglang_shape import json_body_steps, prometheus_steps
from loadagg.v1 import loadagg_pb2 as pb

log = logging.getLogger(__name__)

_FORMATS = ("json", "prometheus")
_PARAMS = frozenset({"dp_rank", "include", "format", "max_staleness_ms"})
_SINGLE = ("dp_rank", "format", "max_staleness_ms")  # `include` may repeat: its values add up
def parse_query(query, dp_size: int) -> pb.GetLoadsRequest:
    """The GetLoadsRequest a /v1/loads query stands for; InvalidRequest (HTTP 400) saying what is wrong."""
    known_params(query, _PARAMS)
    single_params(query, _SINGLE)
    fmt = query.get("format", "json") or "json"
    if fmt not in _FORMATS:
        raise InvalidRequest(f"format must be one of {list(_FORMATS)}, got {quoted(fmt)}")
    request = pb.GetLoadsRequest()
    view_params(query, dp_size, request)
    staleness = uint32_param(query, "max_staleness_ms")
    if staleness is not None:
        request.freshness = pb.FRESHNESS_CACHED
        request.max_staleness_ms = staleness
    return request


class HttpGateway:
    def __init__(self, service: LoadAggregatorService, metrics: AggregatorMetrics, version: str,
                 tokens: TokenPolicy | None = None, *, limits: LimitsConfig | None = None) -> None:
        limits = limits or LimitsConfig()
        self.max_connections = limits.http_max_connections
        self.idle_timeout_s = limits.http_idle_timeout_s
        self.listener: CappedListener | None = None
        self.tokens = tokens  # with a router token set, /v1/loads needs `Authorization: Bearer <token>`
        self.service = service
        self.metrics = metrics
        self.version = version
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.sends_timed_out = 0  # answers not taken by their client within idle_timeout_s (connection aborted)
        self._draining = False
        self.streams = HttpStreams(service, limits, self._json_steps)

    @property
    def draining(self) -> bool:
        """Set by the aggregator's graceful shutdown: new /v1/loads calls and streams get 503."""
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = self.streams.draining = value

    def app(self) -> web.Application:
        middlewares = [send_within(self.idle_timeout_s, self._send_timed_out)]  # outermost: every answer
        if self.tokens and self.tokens.enabled:
            middlewares.append(http_middleware(self.tokens))
        app = web.Application(middlewares=middlewares)
        app.router.add_get("/v1/loads", self.loads)
        app.router.add_get("/v1/loads/watch", self.streams.watch)
        app.router.add_get("/metrics", self.metrics_page)
        return app

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 picks a port, returned). A connection without a complete request for
        idle_timeout_s is closed (aiohttp's keep-alive timer runs from the connection's start and from each
        answer, so it bounds half-sent requests too), and so is one whose answer is not taken within it;
        connections past the cap get 503. A client that disconnects cancels its handler: a watch stream
        leaves at once (not at its next event), and a GET waiting for a round stops waiting (the round goes on
        for the others)."""
        self.runner = web.AppRunner(self.app(), access_log=None, keepalive_timeout=self.idle_timeout_s,
                                    handler_cancellation=True)
        await self.runner.setup()
        self.listener = CappedListener(self.runner, connection_cap(self.max_connections))
        try:
            self.port = await self.listener.start(host, port)
        except OSError:
            await self.runner.cleanup()
            self.runner = None
            raise
        return self.port

    def _send_timed_out(self) -> None:
        self.sends_timed_out += 1

    async def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def loads(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        status = 200
        try:
            if self.draining:
                raise ShuttingDown()
            grpc_request = parse_query(request.query, self.service.dp_size)
            with self.service.tracked():
                result = await self.service.result_for(grpc_request, None, time.monotonic())
            dp_rank = grpc_request.dp_rank if grpc_request.HasField("dp_rank") else None
            fmt = request.query.get("format") or "json"
            body = await self._body(result, dp_rank, parse_include(grpc_request.include), fmt)
            headers = {
                "Content-Type": "application/json" if fmt == "json" else CONTENT_TYPE,
                "X-Loadagg-Round-Id": str(result.round_id),
                "X-Loadagg-Source": pb.AnswerSource.Name(result.source),
                "X-Loadagg-Aggregator-Id": result.aggregator_id,
                "X-Loadagg-Missing-Ranks": ",".join(
                    str(r) for r in result.missing if dp_rank is None or r == dp_rank
                ),
            }
            return web.Response(body=body, headers=headers)
        except LoadAggError as error:
            status = http_status(error)
            return web.json_response(http_body(error), status=status)
        except Exception as error:  # a bug: 500 saying what it was, and a traceback in the log
            log.exception("GET /v1/loads failed")
            bug = LoadAggError(f"the aggregator failed to answer: {error!r}")
            status = http_status(bug)
            return web.json_response(http_body(bug), status=status)
        finally:
            self.metrics.observe_call("http", str(status), time.perf_counter() - started)

    async def _body(self, result: RoundResult, dp_rank: int | None, sections: frozenset[str], fmt: str) -> bytes:
        """sglang's body for this view, built once per round per view and shared, in steps (the loop runs)."""
        if fmt == "json":
            return await shared_view_stepped(result, dp_rank, sections, False, self._json_steps, "http-json")
        return await shared_view_stepped(result, dp_rank, sections, False, _prometheus_steps, "http-prometheus")

    def _json_steps(self, result: RoundResult, loads: list[pb.RankLoad]) -> RenderSteps:
        return json_body_steps(result.timestamp_ms, loads, self.version)


def _prometheus_steps(result: RoundResult, loads: list[pb.RankLoad]) -> RenderSteps:
    return prometheus_steps(loads)
