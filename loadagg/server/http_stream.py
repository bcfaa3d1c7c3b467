"""`GET /v1/loads/watch`: WatchLoads for HTTP routers and dashboards, as Server-Sent Events.

Each event is `data: <the JSON body GET /v1/loads answers>`, sent on every change of a wanted rank (at most
once per `min_interval_ms`, and again after `heartbeat_ms` of quiet) or, with `interval_ms`, once per
interval (one shared round per tick). It is fed by the same watch hub as gRPC's WatchLoads, so each
distinct view is built and serialized once per answer however many streams (gRPC or HTTP) want it.

Bounds: at most `max_http_streams` open at once (429 RESOURCE_EXHAUSTED beyond, with Retry-After); each
stream holds one undelivered event (latest wins) above what its socket buffers (capped); a client that
reads nothing for `http_stream_send_timeout_s` is dropped rather than buffered for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web

from loadagg.server.answers import StepRender, shared_view_stepped
from loadagg.server.errors import InvalidRequest, ResourceExhausted, ShuttingDown, http_body, http_status
from loadagg.server.http_query import known_params, single_params, uint32_param, view_params
from loadagg.server.limits import LimitsConfig
from loadagg.server.render_steps import RenderSteps
from loadagg.server.rounds import RoundResult
from loadagg.server.service import LoadAggregatorService
from loadagg.v1 import loadagg_pb2 as pb

log = logging.getLogger(__name__)

WATCH_PARAMS = frozenset({"dp_rank", "include", "interval_ms", "min_interval_ms", "heartbeat_ms"})
# Kernel send buffer of a stream's socket: with the transport's own 64 KiB, what a stalled client can pin.
STREAM_SNDBUF_BYTES = 128 * 1024


def parse_watch_query(query, dp_size: int) -> pb.WatchLoadsRequest:
    """The WatchLoadsRequest a /v1/loads/watch query stands for: on change unless `interval_ms` is given."""
    known_params(query, WATCH_PARAMS)
    single_params(query, ("dp_rank", "interval_ms", "min_interval_ms", "heartbeat_ms"))
    request = pb.WatchLoadsRequest()
    view_params(query, dp_size, request)
    periods = {}
    for name in ("interval_ms", "min_interval_ms", "heartbeat_ms"):
        value = uint32_param(query, name)
        if value is not None:
            periods[name] = value
    request.on_change = "interval_ms" not in periods
    for name, value in periods.items():
        setattr(request, name, value)
    return request


class HttpStreams:
    """The SSE endpoint of one HTTP gateway: its open streams, counted and bounded."""

    def __init__(self, service: LoadAggregatorService, limits: LimitsConfig,
                 json_steps: StepRender) -> None:
        self.service = service
        self.limits = limits
        self.json_steps = json_steps  # the gateway's sglang JSON body of a view, in steps
        self.open = 0
        self.refused = 0
        self.dropped = 0  # clients that stopped reading
        self.draining = False

    def _render(self, dp_rank: int | None, sections: frozenset[str]) -> Callable[[RoundResult], Awaitable[bytes]]:
        def event(result: RoundResult, loads: list[pb.RankLoad]) -> RenderSteps:
            return b"data: " + (yield from self.json_steps(result, loads)) + b"\n\n"

        async def render(result: RoundResult) -> bytes:  # one event per distinct view per answer, shared
            return await shared_view_stepped(result, dp_rank, sections, False, event, "sse")

        return render

    async def watch(self, request: web.Request) -> web.StreamResponse:
        try:
            if self.draining:
                raise ShuttingDown("the aggregator is shutting down and takes no new streams; retry shortly "
                                   "(or on another replica)")
            watch_request = parse_watch_query(request.query, self.service.dp_size)
            dp_rank, sections = self.service.view_of(watch_request)
            mode = self.service.watch.mode_for(watch_request)
            if self.open >= self.limits.max_http_streams:
                self.refused += 1
                raise ResourceExhausted(f"this aggregator already serves {self.open} HTTP watch streams, its limit "
                                     "(--max-http-streams); retry later, share a stream, or use gRPC WatchLoads")
        except (InvalidRequest, ShuttingDown, ResourceExhausted) as error:
            headers = {"Retry-After": "1"} if isinstance(error, ResourceExhausted | ShuttingDown) else None
            return web.json_response(http_body(error), status=http_status(error), headers=headers)
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
            "X-Loadagg-Aggregator-Id": self.service.communicator.aggregator_id,
        })
        await response.prepare(request)
        _cap_send_buffer(request)
        self.open += 1
        subscription = self.service.watch.subscribe(mode, dp_rank, sections, allow_stale=False,
                                                    render=self._render(dp_rank, sections))
        try:
            while (event := await subscription.next()) is not None:
                try:
                    await asyncio.wait_for(response.write(event), self.limits.http_stream_send_timeout_s)
                except TimeoutError:
                    self.dropped += 1
                    log.info("dropped an HTTP watch stream to %s: it read nothing for %.1f s", request.remote,
                             self.limits.http_stream_send_timeout_s)
                    if request.transport is not None:
                        request.transport.abort()  # close() would wait for the unsent bytes to drain
                    return response
            with contextlib.suppress(ConnectionError):
                await response.write_eof()  # the aggregator is shutting down: the stream ends cleanly
        except ConnectionError:  # the client went away
            pass
        finally:
            self.open -= 1
            self.service.watch.unsubscribe(subscription)
        return response


def _cap_send_buffer(request: web.Request) -> None:
    """Bound what the kernel holds for a stream whose client stalls (autotuning could grow it to MiBs)."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF_BYTES)
