"""Newest-only reading of a server stream: what a watcher that looked away should see when it looks back.

The aggregator keeps at most one undelivered WatchLoads answer per watcher, but what it has written
already waits in HTTP/2 flow-control windows and gRPC's buffers: tens of KiB, hundreds of small answers.
A consumer that stalls (a GC pause, a busy router) and then drains them would act on answers seconds old
before it reached a current one. These readers take every message off the stream as it arrives, so the
transport never backs up, and hand the consumer only the newest one not yet handed out.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


async def newest(stream: AsyncIterable[T]) -> AsyncIterator[T]:
    """Messages of `stream`, skipping those a newer one replaced before the consumer asked; its error at
    the end (after the last message), like iterating the stream itself."""
    latest: list[T] = []  # at most one message
    ended: list[Exception | None] = []
    ready = asyncio.Event()

    async def pump() -> None:
        try:
            async for message in stream:
                latest[:] = (message,)
                ready.set()
        except Exception as error:  # grpc.aio.AioRpcError: handed to the consumer after the last message
            ended.append(error)
        except asyncio.CancelledError as cancelled:  # the call cancelled (its channel closed), or this reader
            ended.append(cancelled)  # the consumer raises it, as iterating the call would
            raise
        else:
            ended.append(None)
        finally:
            ready.set()  # whatever ended the stream, the consumer wakes

    reader = asyncio.create_task(pump())
    try:
        while True:
            if latest:
                yield latest.pop()
            elif ended:
                if ended[0] is not None:
                    raise ended[0]
                return
            else:
                ready.clear()
                await ready.wait()
    finally:
        reader.cancel()


def newest_blocking(stream: Iterable[T]) -> Iterator[T]:
    """`newest` for a blocking stream, read on a daemon thread (ended by cancelling the stream's call)."""
    changed = threading.Condition()
    latest: list[T] = []
    ended: list[Exception | None] = []

    def pump() -> None:
        try:
            for message in stream:
                with changed:
                    latest[:] = (message,)
                    changed.notify()
        except Exception as error:  # grpc.RpcError: handed to the consumer after the last message
            outcome: Exception | None = error
        else:
            outcome = None
        with changed:
            ended.append(outcome)
            changed.notify()

    threading.Thread(target=pump, name="loadagg-watch-reader", daemon=True).start()
    while True:
        with changed:
            changed.wait_for(lambda: latest or ended)
            message = latest.pop() if latest else None
            outcome = ended[0] if message is None else None
        if message is not None:
            yield message
        elif outcome is not None:
            raise outcome
        else:
            return
