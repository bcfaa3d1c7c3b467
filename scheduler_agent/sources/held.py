"""HeldLoads: the newest figures a push source holds per rank, answered from memory with their ages.

A push source (sglang's load feed, its shared-memory snapshots, SMG's load records) learns a rank's figures
when the engine publishes them, not when a collect asks. It keeps, per rank, the core figures and the time
they were taken, and optionally the detail figures (the rest) from a slower read with their own time. A read
answers from memory: `age_ms` is how old the core is now, `detail_age_ms` how old the detail is when it came
from another read. A rank in trouble (garbage, silence, a broken stream) is failed with the reason, logged
once per change of state; its old figures are never presented as current.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

from loadagg.common import MAX_REPORTED_AGE_MS, same_figures
from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.sources.base import LoadSource, PartialRead, SourceError

log = logging.getLogger("scheduler_agent.source")


def now_s() -> float:
    return time.monotonic()


class RankHeld:
    """One rank: core figures and their time, detail figures and theirs, and what is wrong (if anything)."""

    __slots__ = ("core", "core_at", "detail", "detail_at", "problem")

    def __init__(self) -> None:
        self.core: pb.RankLoad | None = None
        self.core_at = 0.0
        self.detail: pb.RankLoad | None = None
        self.detail_at = 0.0
        self.problem = ""


def merged(core: pb.RankLoad, detail: pb.RankLoad | None, core_fields: frozenset[str]) -> pb.RankLoad:
    """`detail` with `core`'s figures on top: a figure the core read carries always wins; the detail read
    gives the rest (the core's own fields it left unset stay unset rather than take an older value)."""
    out = pb.RankLoad()
    if detail is not None:
        out.CopyFrom(detail)
        for name in core_fields:
            out.ClearField(name)
    out.MergeFrom(core)
    return out


class HeldLoads:
    """Per-rank held figures of one push source, plus the listeners told when any of them changed."""

    def __init__(self, source_name: str, core_fields: Iterable[str]) -> None:
        self.source_name = source_name
        self.core_fields = frozenset(core_fields)
        self.ranks: dict[int, RankHeld] = {}
        self._listeners: list[Callable[[], None]] = []

    def rank(self, rank: int) -> RankHeld:
        held = self.ranks.get(rank)
        if held is None:
            held = self.ranks[rank] = RankHeld()
        return held

    def add_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def notify(self) -> None:
        for listener in list(self._listeners):
            listener()

    def set_core(self, rank: int, core: pb.RankLoad, taken_at: float | None = None) -> None:
        """New core figures for `rank`, taken at `taken_at` (monotonic; default now); clears a problem. The
        listeners hear of it only when a figure changed (a re-sent or re-written unchanged one just renews the
        age, which the agent's periodic re-send carries)."""
        held = self.rank(rank)
        changed = held.problem != "" or held.core is None or not same_figures(core, held.core)
        held.core, held.core_at = core, now_s() if taken_at is None else taken_at
        self.fine(rank)
        if changed:
            self.notify()

    def set_detail(self, rank: int, detail: pb.RankLoad, taken_at: float | None = None) -> None:
        held = self.rank(rank)
        held.detail, held.detail_at = detail, now_s() if taken_at is None else taken_at
        if held.core is not None:
            self.notify()

    def take(self, rank: int, convert: Callable[[], tuple[pb.RankLoad, float | None]], what: str) -> None:
        """`convert()`'s (figures, monotonic time taken) as the rank's new core; a SourceError it raises, or a
        figure no RankLoad field can hold, fails the rank with the reason instead."""
        try:
            load, taken_at = convert()
        except SourceError as error:
            self.fail(rank, str(error))
        except (ValueError, TypeError, OverflowError) as error:
            self.fail(rank, f"{what} figure no RankLoad holds ({type(error).__name__})")
        else:
            self.set_core(rank, load, taken_at)

    def fail(self, rank: int, problem: str) -> None:
        """`rank` cannot be read now, for `problem` (stable text): logged when the rank's state changes."""
        held = self.rank(rank)
        if held.problem != problem:
            log.warning("source %s: rank %d %s; reported failed until it recovers", self.source_name, rank, problem)
            held.problem = problem
            self.notify()

    def fine(self, rank: int) -> None:
        held = self.rank(rank)
        if held.problem:
            log.info("source %s: rank %d recovered (%s no more)", self.source_name, rank, held.problem)
            held.problem = ""

    def forget(self, rank: int) -> None:
        """Drop the rank's figures (an engine restart): nothing from before it may be presented again."""
        held = self.rank(rank)
        held.core = held.detail = None

    def load(self, rank: int, now: float | None = None) -> pb.RankLoad | None:
        """The rank's figures as held now, with their ages; None when failed or never read. Detail figures
        older than MAX_REPORTED_AGE_MS (their read failing for an hour) are left out: the core is still news."""
        held = self.ranks.get(rank)
        if held is None or held.problem or held.core is None:
            return None
        now = now_s() if now is None else now
        detail, detail_age_ms = held.detail, max(0, int((now - held.detail_at) * 1000))
        if detail_age_ms > MAX_REPORTED_AGE_MS:  # the aggregator would refuse the whole load, fresh core and all
            detail = None
        load = merged(held.core, detail, self.core_fields)
        load.dp_rank = rank
        load.age_ms = max(0, int((now - held.core_at) * 1000))
        if detail is not None and held.detail_at != held.core_at:  # (one read: one age)
            load.detail_age_ms = detail_age_ms
        return load

    def read(self, ranks: Sequence[int]) -> dict[int, pb.RankLoad]:
        """Every asked rank held and healthy; PartialRead naming the others' problems. A rank whose core is past
        the age bound the aggregator takes (quiet that long) is failed with one stable reason, not sent to be
        refused at every push."""
        now = now_s()
        loads: dict[int, pb.RankLoad] = {}
        problems: list[str] = []
        for rank in ranks:
            load = self.load(rank, now)
            if load is not None and load.age_ms > MAX_REPORTED_AGE_MS:
                problems.append(f"rank {rank}: its last figures are over {MAX_REPORTED_AGE_MS // 1000} s old")
                continue
            if load is not None:
                loads[rank] = load
                continue
            held = self.ranks.get(rank)
            problems.append(f"rank {rank}: {held.problem if held is not None and held.problem else 'no figures yet'}")
        if problems:
            raise PartialRead("; ".join(problems), loads)
        return loads


async def read_held_or_polled(held: HeldLoads, ranks: Sequence[int], from_memory: Callable[[int], bool],
                              poll: Callable[[Sequence[int]], Awaitable[dict[int, pb.RankLoad]]]
                              ) -> dict[int, pb.RankLoad]:
    """`ranks` from `held` where `from_memory(rank)`, the others with one `poll`; both reads' problems in one
    PartialRead (a push source whose feed does not cover a rank reads it as a polling source would)."""
    pushed = [r for r in ranks if from_memory(r)]
    polled = [r for r in ranks if r not in pushed]
    loads: dict[int, pb.RankLoad] = {}
    problems: list[str] = []
    if pushed:
        try:
            loads.update(held.read(pushed))
        except PartialRead as partial:
            loads.update(partial.loads)
            problems.append(str(partial))
    if polled:
        try:
            loads.update(await poll(polled))
        except PartialRead as partial:
            loads.update(partial.loads)
            problems.append(str(partial))
        except SourceError as error:
            problems.append(str(error))
    if problems:
        raise PartialRead("; ".join(problems), loads)
    return loads


class HeldSource(LoadSource):
    """A push source: what it holds lives in `held`, whose changes its listeners hear of."""

    held: HeldLoads

    def add_listener(self, listener: Callable[[], None]) -> None:
        self.held.add_listener(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        self.held.remove_listener(listener)


async def stop_task(task: asyncio.Task | None) -> None:
    """Cancel a source's background task and wait for it to end (its own failure is not the closer's)."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
