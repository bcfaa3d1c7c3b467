"""GuardInterceptor: what every loadagg RPC passes before it reaches a servicer.

In order: refuse new calls while the server drains (ShuttingDown), check the shared token
(Unauthenticated, see auth.py), cap the agent links open at once (ResourceExhausted), refuse a message
larger than its sender may send before parsing it (ResourceExhausted; a large agent message is walked and
parsed a load at a time, agent_wire.py), and decode requests strictly, so that malformed bytes get
InvalidRequest instead of gRPC's generic UNKNOWN.
Each refusal is an exception of errors.py, ended by its one helper (abort_with).
Health and reflection pass untouched (probes must work while draining and without a token).

Handlers behind the guard receive decoded messages as before; request-streaming handlers must
consume the request iterator (not `context.read()`), which is how AgentLink.Connect is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

import grpc

from loadagg.server.agent_wire import PIECE_BYTES, TooLarge, parse_agent_message
from loadagg.server.auth import AGENT_SERVICE, OPEN_SERVICES, TokenPolicy, service_of
from loadagg.server.errors import (
    InvalidRequest,
    LoadAggError,
    ResourceExhausted,
    ShuttingDown,
    Unauthenticated,
    abort_with,
)
from loadagg.server.warn_throttle import WarningThrottle

log = logging.getLogger(__name__)

_OVERSIZE_WARNING_INTERVAL_S = 10.0
# The most bytes a router's request (GetLoads, WatchLoads, the engines' GetLoads) may take, checked before it is
# parsed: a valid one takes well under 2 KB (`include` names at most MAX_INCLUDE_ITEMS sections in
# MAX_INCLUDE_CHARS), while one of --max-message-bytes packed with empty `include` entries would hold the event
# loop for the whole parse (docs/operations.md, Limits).
MAX_ROUTER_REQUEST_BYTES = 64 * 1024
_REFUSAL_READ_S = 1.0  # how long a refused agent link may take to send its hello before the refusal


def _shape(handler: grpc.RpcMethodHandler) -> tuple[bool, bool]:
    return handler.request_streaming, handler.response_streaming


def _behaviour(handler: grpc.RpcMethodHandler) -> Callable:
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def _make_handler(shape: tuple[bool, bool], behaviour: Callable, serializer) -> grpc.RpcMethodHandler:
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[shape]
    return factory(behaviour, request_deserializer=None, response_serializer=serializer)


async def _take_first_message(context) -> None:
    """Read what a request stream sends first (an agent's hello) before refusing it: ending the call while
    that message is still being sent can reach the caller as INTERNAL "Internal error from Core" instead of
    the refusal's status; once the hello is read, the refusal arrives as sent."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(context.read(), _REFUSAL_READ_S)


async def _relay(responses):
    """Yield what a handler's generator (async or not) yields; closing the relay closes the handler's generator
    at once (so its cleanup, e.g. releasing an agent's ranks, never waits for garbage collection)."""
    if not inspect.isasyncgen(responses):
        for response in responses:
            yield response
        return
    try:
        async for response in responses:
            yield response
    finally:
        await responses.aclose()


class GuardInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: TokenPolicy, max_agent_links: int) -> None:
        self.tokens = tokens
        self.max_agent_links = max_agent_links
        self.draining = False
        # The most bytes the next message of an AgentLink stream may take (its ServicerContext in, bytes out),
        # checked before the message is parsed; None: gRPC's own limit only.
        self.agent_message_limit: Callable[[object], int] | None = None
        # How many loads the next message of an AgentLink stream may name: a large message is walked and refused
        # past that, then parsed a load at a time (agent_wire.py); None: parsed whole.
        self.agent_message_loads: Callable[[object], int] | None = None
        self.agent_link_messages_refused = 0
        self._oversize_warnings = WarningThrottle(_OVERSIZE_WARNING_INTERVAL_S)
        self.agent_links = 0  # AgentLink streams open now
        self.refused: Counter[str] = Counter()  # calls refused, by status code name
        self._guarded: dict[str, tuple[str, grpc.RpcMethodHandler]] = {}
        self._refusals: dict[tuple, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        method = details.method
        known = self._guarded.get(method)
        if known is None:  # handlers are static: wrap each known method once
            service = service_of(method)
            if service in OPEN_SERVICES:
                return await continuation(details)
            real = await continuation(details)
            if real is None:
                return None  # unknown method (not cached: random names must not grow memory): UNIMPLEMENTED
            known = self._guarded[method] = (service, self._wrap(method, service, real))
        service, handler = known
        if self.draining:
            return self._refusal(handler, ShuttingDown())
        problem = self.tokens.problem(service, details.invocation_metadata)
        if problem is not None:
            log.debug("refused %s: %s", method, problem)
            return self._refusal(handler, Unauthenticated(problem))
        return handler

    def _refusal(self, handler: grpc.RpcMethodHandler, error: LoadAggError) -> grpc.RpcMethodHandler:
        """A handler of the same shape that only ends the call with `error` (request bytes never parsed)."""
        key = (_shape(handler), type(error), str(error))
        refusal = self._refusals.get(key)
        if refusal is None:
            refused = self.refused

            streaming_in = handler.request_streaming

            async def refuse(_request, context):
                refused[error.code.name] += 1
                if streaming_in:
                    await _take_first_message(context)
                await abort_with(context, error)

            refusal = self._refusals[key] = _make_handler(_shape(handler), refuse, None)
        return refusal

    def _wrap(self, method: str, service: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        parse = handler.request_deserializer
        inner = _behaviour(handler)
        streaming_in, streaming_out = _shape(handler)
        if parse is None:
            return handler
        decode_one = self._decoder(method, parse, None if streaming_in else MAX_ROUTER_REQUEST_BYTES)

        if not streaming_in and not streaming_out and inspect.iscoroutinefunction(inner):
            async def unary_unary(raw, context):
                if len(raw) > MAX_ROUTER_REQUEST_BYTES:
                    await decode_one(raw, context)  # aborts with RESOURCE_EXHAUSTED, unparsed
                try:
                    request = parse(raw)  # the hot path: no extra coroutine per call
                except Exception:
                    request = await decode_one(raw, context)  # aborts with INVALID_ARGUMENT
                return await inner(request, context)
            behaviour = unary_unary
        elif not streaming_in and not streaming_out:
            async def unary_unary_any(raw, context):  # a plain function (or one returning an awaitable)
                response = inner(await decode_one(raw, context), context)
                return await response if inspect.isawaitable(response) else response
            behaviour = unary_unary_any
        elif not streaming_in and inspect.iscoroutinefunction(inner):
            async def unary_stream_writer(raw, context):  # the handler writes with context.write()
                return await inner(await decode_one(raw, context), context)
            behaviour = unary_stream_writer
        elif not streaming_in:
            async def unary_stream(raw, context):  # the handler returns an (async) generator
                relay = _relay(inner(await decode_one(raw, context), context))
                try:
                    async for response in relay:
                        yield response
                finally:
                    await relay.aclose()  # `async for` does not close what it iterates when left early
            behaviour = unary_stream
        else:
            behaviour = self._wrap_streaming_in(method, service, parse, inner, streaming_out)
        return _make_handler((streaming_in, streaming_out), behaviour, handler.response_serializer)

    def _decoder(self, method: str, parse: Callable[[bytes], object], most: int | None) -> Callable:
        """A coroutine parsing one request, ending the call with the refusal when it is larger than `most`
        bytes (before parsing it) or malformed."""
        refused = self.refused

        async def decode_one(raw: bytes, context):
            if most is not None and len(raw) > most:
                refusal = ResourceExhausted(
                    f"a {method} request of {len(raw)} bytes, above the {most} a router's request may take (it "
                    "names a rank and at most a few sections in `include`); refused unparsed")
                refused[refusal.code.name] += 1
                await abort_with(context, refusal)
            try:
                return parse(raw)
            except Exception as error:  # DecodeError, or whatever a deserializer raises on garbage
                refusal = InvalidRequest(f"malformed {method} message ({len(raw)} bytes): {error}")
                refused[refusal.code.name] += 1
                await abort_with(context, refusal)

        return decode_one

    async def _refuse_oversized(self, context, size: int, most: int | None, what: str = "") -> None:
        """End an agent link whose message is larger than anything its hello allows, before parsing it: the parse
        alone would hold the event loop for as long as its entries take to read."""
        self.refused["RESOURCE_EXHAUSTED"] += 1
        self.agent_link_messages_refused += 1
        if self._oversize_warnings.due(time.monotonic()) is not None:  # a peer may redial and resend at once
            log.warning("agent link from %s sent a message of %d bytes holding %s: more than its ranks allow; link "
                        "closed (%d such messages in all; this warning at most every %g s)", context.peer(), size,
                        what or f"more than {most} bytes", self.agent_link_messages_refused,
                        _OVERSIZE_WARNING_INTERVAL_S)
        held = f"holding {what}: more than" if what else f"above the {most} bytes"
        await abort_with(context, ResourceExhausted(
            f"an AgentMessage of {size} bytes, {held} this link may send (a hello, or a report naming each served "
            "rank once within the limits of docs/operations.md)"))

    async def _parse_in_pieces(self, method: str, raw: bytes, most_loads: int, parse, context):
        """A large agent message parsed a load at a time (agent_wire.py); ended RESOURCE_EXHAUSTED when it holds
        more than its link may send, INVALID_ARGUMENT when malformed, neither parsed whole."""
        try:
            return await parse_agent_message(raw, most_loads, parse)
        except TooLarge as error:
            await self._refuse_oversized(context, len(raw), None, str(error))
        except Exception as error:
            refusal = InvalidRequest(f"malformed {method} message ({len(raw)} bytes): {error}")
            self.refused[refusal.code.name] += 1
            await abort_with(context, refusal)

    def _wrap_streaming_in(self, method, service, parse, inner, streaming_out) -> Callable:
        capped = service == AGENT_SERVICE
        decode_one = self._decoder(method, parse, None)

        def decoded(_raw_requests: AsyncIterator[bytes], context) -> _Decoded:
            limits = (self.agent_message_limit, self.agent_message_loads) if capped else None
            return _Decoded(self, method, context, parse, decode_one, limits)

        async def admit(context) -> None:
            if capped and self.agent_links >= self.max_agent_links:
                refusal = ResourceExhausted(f"{self.agent_links} agent links are open, the most this aggregator "
                                            f"accepts (--max-agent-links {self.max_agent_links}); retry later or "
                                            "raise the limit")
                self.refused[refusal.code.name] += 1
                await _take_first_message(context)
                await abort_with(context, refusal)
            if capped:
                self.agent_links += 1

        if streaming_out and not inspect.iscoroutinefunction(inner):
            async def stream_stream(raw_requests, context):
                """The handler returns an (async) generator; its responses are written here with
                context.write, which spares every collect a pass through two more generators."""
                await admit(context)
                responses = inner(decoded(raw_requests, context), context)
                asynchronous = inspect.isasyncgen(responses)
                try:
                    if asynchronous:
                        async for response in responses:
                            await context.write(response)
                    else:
                        for response in responses:
                            await context.write(response)
                finally:
                    try:
                        if asynchronous:
                            await responses.aclose()  # its cleanup (releasing an agent's ranks) runs now
                    finally:
                        if capped:
                            self.agent_links -= 1
            return stream_stream

        async def stream_coroutine(raw_requests, context):
            await admit(context)
            try:
                return await inner(decoded(raw_requests, context), context)
            finally:
                if capped:
                    self.agent_links -= 1
        return stream_coroutine


class _Decoded:
    """A streaming-in call's requests, parsed as they are read: what a handler iterates over.

    One stream message per agent report: read with context.read() (what gRPC's own request iterator wraps in two
    more layers) and parsed inline. A class, not an async generator: an async generator hands each item over by
    raising StopIteration, one exception object per agent message. The AgentLink handler (`limits` given: the
    bytes and loads its next message may hold) is given (message, the bytes it came as): its figures are checked on
    those bytes, not re-serialized.
    """

    __slots__ = ("guard", "method", "context", "parse", "decode_one", "limits")

    def __init__(self, guard: GuardInterceptor, method: str, context, parse, decode_one,
                 limits: tuple[Callable, Callable] | None) -> None:
        self.guard, self.method, self.context = guard, method, context
        self.parse, self.decode_one, self.limits = parse, decode_one, limits

    def __aiter__(self) -> _Decoded:
        return self

    async def __anext__(self):
        context = self.context
        raw = await context.read()
        if raw is grpc.aio.EOF:
            raise StopAsyncIteration
        if self.limits is not None:
            limit, loads = self.limits
            if len(raw) > (most := limit(context)):
                await self.guard._refuse_oversized(context, len(raw), most)
            if len(raw) > PIECE_BYTES:
                return await self.guard._parse_in_pieces(self.method, raw, loads(context), self.parse, context), raw
        try:
            message = self.parse(raw)
        except Exception:
            message = await self.decode_one(raw, context)  # aborts with INVALID_ARGUMENT
        return message if self.limits is None else (message, raw)


REFUSAL_CODES = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "UNAVAILABLE")


class GuardCollector:
    """Prometheus view of the guard: calls refused by status code, and agent links open now."""

    def __init__(self, guard: GuardInterceptor) -> None:
        self.guard = guard

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        refused = CounterMetricFamily("loadagg_calls_refused", "Calls refused before reaching a handler "
                                      "(draining, token, agent-link cap, malformed bytes).", labels=["code"])
        # Every code the guard refuses with is there from the start, at 0: a rate() or an alert sees the
        # first refusals (a series born at 5 would hide them).
        counts = {code: 0 for code in REFUSAL_CODES} | dict(self.guard.refused)
        for code, count in sorted(counts.items()):
            refused.add_metric([code], count)
        yield refused
        yield GaugeMetricFamily("loadagg_agent_links", "AgentLink streams open now (hello or not).",
                                value=self.guard.agent_links)
