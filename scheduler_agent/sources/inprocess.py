"""In-process sources: a scheduler written in Python embeds the agent and hands it its own figures.

* `PublishedSource`: the scheduler calls `agent.publish(RankLoad(...))` (or `source.publish`) whenever
  its figures change; collects and pushes read the latest published load of each rank. A rank never
  published, or not published for `stale_after_ms`, is reported missing rather than frozen.
* `CallbackSource`: the agent calls the scheduler's function (sync or async) on every read.
No HTTP hop either way: the figures go straight from the scheduler's objects onto the agent's stream.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.sources.base import LoadSource, SourceError

_Loads = Mapping[int, pb.RankLoad] | Sequence[pb.RankLoad]
LoadCallback = Callable[[Sequence[int]], _Loads | Awaitable[_Loads]]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class PublishedSource(LoadSource):
    """Holds the last load each rank published."""

    name = "inprocess"

    def __init__(self, stale_after_ms: int | None = None) -> None:
        self.stale_after_ms = stale_after_ms
        self._latest: dict[int, tuple[pb.RankLoad, float]] = {}
        self.published = 0
        self.changed = asyncio.Event()  # set by publish: a pushing agent sends it without waiting out its interval

    def publish(self, *loads: pb.RankLoad) -> None:
        """Store copies (the caller may keep mutating its messages). Safe to call from the event loop."""
        now = time.monotonic()
        for load in loads:
            if not isinstance(load, pb.RankLoad):
                raise TypeError(f"publish takes loadagg.v1 RankLoad messages, not {type(load).__name__}")
            if load.dp_rank < 0:
                raise ValueError(f"dp_rank must be >= 0, got {load.dp_rank}")
            copy = pb.RankLoad()
            copy.CopyFrom(load)
            if not copy.timestamp_ms:
                copy.timestamp_ms = _now_ms()
            self._latest[copy.dp_rank] = (copy, now)
            self.published += 1
        self.changed.set()

    def forget(self, *ranks: int) -> None:
        """The scheduler stopped serving these ranks: report them missing from now on."""
        for rank in ranks:
            self._latest.pop(rank, None)

    async def read(self, ranks: Sequence[int]) -> dict[int, pb.RankLoad]:
        now = time.monotonic()
        out = {}
        for rank in ranks:
            held = self._latest.get(rank)
            if held is None:
                continue
            load, at = held
            if self.stale_after_ms is not None and (now - at) * 1000 > self.stale_after_ms:
                continue
            copy = pb.RankLoad()
            copy.CopyFrom(load)
            # Held since it was published: its age grows (the aggregator measures ages from the one reported).
            copy.age_ms = load.age_ms + max(0, int((now - at) * 1000))
            out[rank] = copy
        return out


class CallbackSource(LoadSource):
    """Calls `callback(ranks)` on each read; it returns {rank: RankLoad} or a list of RankLoad."""

    name = "inprocess"

    def __init__(self, callback: LoadCallback) -> None:
        self.callback = callback

    async def read(self, ranks: Sequence[int]) -> dict[int, pb.RankLoad]:
        result = self.callback(tuple(ranks))
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, Mapping):
            loads = list(result.values())
        elif isinstance(result, Sequence):
            loads = list(result)
        else:
            raise SourceError(f"load callback returned {type(result).__name__}, not a mapping or list of RankLoad")
        out = {}
        now_ms = _now_ms()
        for load in loads:
            if not isinstance(load, pb.RankLoad):
                raise SourceError(f"load callback returned a {type(load).__name__}, not a RankLoad")
            if load.dp_rank in ranks:  # a copy, stamped now: the scheduler's message is its own (it may
                copy = pb.RankLoad()  # update it in place between reads, and a stamp on it would stick)
                copy.CopyFrom(load)
                if not copy.timestamp_ms:
                    copy.timestamp_ms = now_ms
                out[load.dp_rank] = copy
        return out
