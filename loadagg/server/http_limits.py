"""Descriptors for the HTTP gateway and for gRPC: raise the open-files limit, cap the gateway's connections.

Every open connection is a file descriptor, and gRPC (agent links, routers) needs them from the same
per-process limit. Idle or half-sent HTTP connections are closed after the idle timeout (aiohttp's own
default is about an hour), and the gateway never holds more than its cap: a connection beyond it gets
503 and is closed at once, so 500 idle HTTP clients can no longer leave a restarted agent or a new router
with "File descriptor limit reached". An answer its client does not take within the same timeout is dropped
and its connection aborted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections.abc import Callable
from http import HTTPStatus

from aiohttp import web

from loadagg.server.errors import AtCapacity, http_body, http_status

log = logging.getLogger(__name__)

# Soft limit to aim for when the hard limit is unlimited (Linux refuses RLIM_INFINITY above fs.nr_open).
_UNLIMITED_TARGET = 1 << 20


def raise_open_files_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (a process may, unprivileged); (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as error:
        log.warning("could not raise the open-files limit from %d to %d: %s", soft, target, error)
        return soft, soft
    return soft, target


def open_files_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _UNLIMITED_TARGET if soft == resource.RLIM_INFINITY else soft


def connection_cap(configured: int) -> int:
    """The gateway's connections: as configured, and at most half the open-files limit (the rest for gRPC)."""
    return max(1, min(configured, open_files_limit() // 2))


_FULL = AtCapacity("the HTTP gateway has as many connections open as it accepts (--http-max-connections); "
                   "retry, reuse a connection, or use gRPC")
_REFUSAL_BODY = json.dumps(http_body(_FULL)).encode()
_REFUSAL = (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (http_status(_FULL), HTTPStatus(http_status(_FULL)).phrase.encode(), len(_REFUSAL_BODY), _REFUSAL_BODY))


def send_within(timeout_s: float, on_timeout: Callable[[], None] = lambda: None):
    """aiohttp middleware: an answer its client has not taken within `timeout_s` is dropped and the connection
    aborted. aiohttp itself waits for a client's socket to drain without limit, so a client that asks for a
    large answer and never reads it would hold a connection (one of the capped ones) and the answer for ever."""

    @web.middleware
    async def send(request: web.Request, handler) -> web.StreamResponse:
        response = await handler(request)
        try:
            async with asyncio.timeout(timeout_s):
                await response.prepare(request)
                await response.write_eof()
        except TimeoutError:
            on_timeout()
            if request.transport is not None:
                request.transport.abort()  # close() would wait for the unsent bytes to drain
        except ConnectionError:
            pass  # the client left: aiohttp, finishing the response, sees it too and lets it go
        return response

    return send


class _Refused(asyncio.Protocol):
    """A connection over the cap: 503, closed at once (its descriptor is back before the next accept)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(_REFUSAL)
        transport.close()


class CappedListener:
    """A listening socket in front of an aiohttp AppRunner's server that holds at most `cap` connections."""

    def __init__(self, runner: web.AppRunner, cap: int) -> None:
        self.cap = cap
        self.open = 0  # connections handed to aiohttp and not yet lost
        self.refused = 0
        self._server = runner.server
        self._listener: asyncio.AbstractServer | None = None
        lost = self._server.connection_lost

        def connection_lost(handler, exc) -> None:  # aiohttp calls this as each connection ends
            self.open -= 1
            lost(handler, exc)

        self._server.connection_lost = connection_lost

    def _protocol(self) -> asyncio.BaseProtocol:
        if self.open >= self.cap:
            self.refused += 1
            return _Refused()
        self.open += 1
        return self._server()

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(self._protocol, host, port, reuse_address=True)
        return self._listener.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
