"""The LoadSource interface every source (simulator, sglang, vLLM, NVML, in-process) implements."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from loadagg.v1 import loadagg_pb2 as pb


class SourceError(Exception):
    """The source could not be read this time (engine down, bad payload, timeout). The agent keeps running.

    Messages are stable for one kind of failure (no timings, no counters) because the agent logs a
    failure only when it changes, and compares messages to tell.
    """


class PartialRead(SourceError):
    """Some ranks were read, others were garbage: report `loads`, and `str(self)` says what was wrong."""

    def __init__(self, message: str, loads: dict[int, pb.RankLoad]) -> None:
        super().__init__(message)
        self.loads = loads


def not_applicable(field: str, value: object) -> bool:
    """sglang's marker for a figure that does not apply: `utilization` -1 on a PD-disaggregation prefill
    server (its scheduler sets it so). Such a figure stays unset, and the rank is still read."""
    return field == "utilization" and isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0


def set_figure(target, field: str, value, where: str) -> None:
    """`target.field = value`, or SourceError naming the figure when the proto field cannot hold it (3e9
    requests in an int32): one rank's impossible figure must fail that rank, not the whole read."""
    try:
        setattr(target, field, value)
    except (ValueError, TypeError) as error:
        raise SourceError(f"{where} = {value!r} does not fit a {field} ({error})") from None


def read_ranks(ranks, entries, convert, where: str) -> dict[int, pb.RankLoad]:
    """Convert the engine entries of the ranks asked for; a garbage entry fails only its own rank, and so does
    a rank listed twice (a gateway in front of several servers, each saying dp_rank 0: which entry is it?).

    `entries` yields (dp rank, raw entry); `convert(rank, entry)` returns a RankLoad or raises SourceError.
    """
    by_rank: dict[int, object] = {}
    repeated: set[int] = set()
    for rank, entry in entries:
        if rank in by_rank:
            repeated.add(rank)
        by_rank[rank] = entry
    loads: dict[int, pb.RankLoad] = {}
    problems: list[str] = []
    for rank in ranks:
        if rank in repeated:
            problems.append(f"{where}: dp rank {rank} appears more than once: which entry is it?")
        elif rank in by_rank:
            try:
                loads[rank] = convert(rank, by_rank[rank])
            except SourceError as error:
                problems.append(str(error))
            except (ValueError, TypeError, OverflowError) as error:  # a figure no RankLoad field can hold
                problems.append(f"rank {rank}: {type(error).__name__}: {error}")
    if problems:
        raise PartialRead("; ".join(problems), loads)
    return loads


@dataclass(frozen=True, slots=True)
class EngineRanks:
    """What an engine says about its data-parallel layout: the ranks it runs and its dp size."""

    dp_ranks: tuple[int, ...]
    dp_size: int


class LoadSource(abc.ABC):
    """Reads one RankLoad per dp rank. Fields the source does not know stay unset."""

    name: str = "source"
    # A push source holds the figures its engine publishes: a read is answered from memory (no engine
    # request) and its listeners are called when a figure changed, so the agent pushes it at once.
    pushes: bool = False

    def add_listener(self, listener: Callable[[], None]) -> None:  # noqa: B027 (only push sources call it)
        """Call `listener()` whenever held figures changed (push sources; others never call it)."""

    def remove_listener(self, listener: Callable[[], None]) -> None:  # noqa: B027 (only push sources call it)
        """Stop calling `listener`."""

    def held_ranks(self, ranks: Sequence[int]) -> list[int]:
        """Those of `ranks` a read answers from memory now, without an engine request (push sources)."""
        return list(ranks) if self.pushes else []

    async def start(self) -> None:  # noqa: B027 (an optional hook: most sources open nothing)
        """Open connections; called once before the first read."""

    @abc.abstractmethod
    async def read(self, ranks: Sequence[int]) -> dict[int, pb.RankLoad]:
        """Current loads of `ranks` (a rank left out is reported as failed). Raises SourceError."""

    async def discover(self) -> EngineRanks | None:
        """The engine's dp ranks and dp size, for an agent told to serve "whatever the engine runs".

        None: this source has no engine to ask (simulator, in-process). Raises SourceError while the
        engine is not reachable yet (the agent retries before saying hello).
        """
        return None

    def set_round_timeout(self, round_timeout_ms: int) -> None:  # noqa: B027 (an optional hook)
        """The aggregator's round deadline (from Welcome): a source should give up on the engine before it."""

    async def close(self) -> None:  # noqa: B027 (an optional hook)
        """Release what start() opened."""


class WrappedSource(LoadSource):
    """A source around another one (shared by several links, or with GPU figures added): pushes pass through."""

    inner: LoadSource

    @property
    def pushes(self) -> bool:  # type: ignore[override]
        return self.inner.pushes

    def add_listener(self, listener: Callable[[], None]) -> None:
        self.inner.add_listener(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        self.inner.remove_listener(listener)

    def held_ranks(self, ranks: Sequence[int]) -> list[int]:
        return self.inner.held_ranks(ranks)
