"""The exceptions of loadagg, and the one place they become gRPC status codes."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

# What a status message may quote of the caller's own input: gRPC carries the message in a trailer of at
# most 16 KiB, and past that the caller would get RESOURCE_EXHAUSTED instead of the error meant for it.
QUOTE_CHARS = 64
QUOTE_ITEMS = 10
DRAINING = "the aggregator is shutting down and takes no new calls; retry shortly (or on another replica)"


def quoted(value: str) -> str:
    """`value` as repr() shows it, cut to QUOTE_CHARS characters (saying how long it was)."""
    if len(value) <= QUOTE_CHARS:
        return repr(value)
    return f"{value[:QUOTE_CHARS]!r}... ({len(value)} characters)"


def listed(items: Sequence) -> str:
    """`items` as a list, the first QUOTE_ITEMS of them (saying how many more there were)."""
    shown = ", ".join(quoted(i) if isinstance(i, str) else str(i) for i in items[:QUOTE_ITEMS])
    more = f", ... (+{len(items) - QUOTE_ITEMS} more)" if len(items) > QUOTE_ITEMS else ""
    return f"[{shown}{more}]"


class LoadAggError(Exception):
    """Base of every error loadagg raises on purpose; `code` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequest(LoadAggError):
    """The caller sent something we cannot answer (unknown section, rank out of range...)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class RankConflict(LoadAggError):
    """Another live agent already serves a dp rank that a new agent claims."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Unauthenticated(LoadAggError):
    """Missing or wrong shared token (the guard and the HTTP gateway's token check raise it)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class DeadlineTooShort(LoadAggError):
    """The caller's own deadline leaves no time to answer at all."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class LinkReplaced(LoadAggError):
    """An agent link ended because a newer link of the same instance id took its ranks over."""

    code = grpc.StatusCode.ABORTED


class ShuttingDown(LoadAggError):
    """The server is draining and takes no new work."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str = DRAINING) -> None:
        super().__init__(message)


class ResourceExhausted(LoadAggError):
    """A limit of the aggregator is reached (agent links open at once); retry later or raise the limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class AtCapacity(LoadAggError):
    """The aggregator holds as many connections as it accepts (the HTTP gateway's cap); retry shortly."""

    code = grpc.StatusCode.UNAVAILABLE


class NotServed(LoadAggError):
    """An RPC of a peer contract (sglang, vLLM) that the aggregator does not answer."""

    code = grpc.StatusCode.UNIMPLEMENTED


# The one gRPC -> HTTP table (the HTTP gateway and its token check); any other status: 500.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(error: LoadAggError) -> int:
    return HTTP_STATUS.get(error.code, 500)


def http_body(error: LoadAggError) -> dict[str, str]:
    """The JSON body of an HTTP error: the message a person can act on, and the gRPC status name."""
    return {"error": str(error), "code": error.code.name}


async def abort_with(context: grpc.aio.ServicerContext, error: LoadAggError) -> None:
    """End an RPC with the status `error` maps to; never returns."""
    await context.abort(error.code, str(error))
