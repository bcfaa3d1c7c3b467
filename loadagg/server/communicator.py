"""The watching communicator (one shared round for all concurrent callers) and its queueing twin.

Both fan a `collect{round_id}` out to every live agent and gather `report{round_id}` answers. They
differ only in how callers are scheduled:

* WatchingCommunicator: at most one round in flight; a caller arriving during a round joins it and
  sends nothing. This is sglang's fix for /v1/loads, plus a deadline and round ids.
* QueueingCommunicator: each caller runs its own round, one after another (sglang before the fix),
  kept for tests and benchmarks to compare against.

A caller that is cancelled, or whose own deadline comes first, never cancels the round for others:
every caller waits on a future of its own, which the round resolves when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from loadagg.server.errors import DeadlineTooShort
from loadagg.server.registry import AgentRegistry, AgentSession, Snapshot
from loadagg.server.rounds import Round, RoundResult
from loadagg.v1 import loadagg_pb2 as pb

log = logging.getLogger(__name__)


@dataclass
class CommunicatorStats:
    """Counters tests and benchmarks read to prove coalescing (rounds vs callers)."""

    rounds_started: int = 0
    rounds_timed_out: int = 0
    callers: int = 0
    collects_sent: int = 0
    reports_accepted: int = 0
    reports_dropped: int = 0  # answers for a round that is not (or no longer) in flight
    pushes_accepted: int = 0  # unsolicited reports (round_id 0): each is one engine read by its agent
    partial_answers: int = 0  # callers answered before their round ended, to meet their deadline
    max_rounds_in_flight: int = 0  # high-water mark: 1 in watching mode, whatever the load


class _Communicator:
    mode = "base"

    def __init__(self, registry: AgentRegistry, round_timeout: float, aggregator_id: str = "") -> None:
        self.registry = registry
        self.round_timeout = round_timeout
        self.aggregator_id = aggregator_id  # stamped on every answer: round ids count per process
        self.stats = CommunicatorStats()
        self.last_result: RoundResult | None = None
        self._rounds: dict[int, Round] = {}
        self._next_id = 1
        self._round_listeners: list[Callable[[RoundResult], None]] = []
        registry.on_disconnect(self._agent_left)
        registry.on_connect(self._agent_joined)

    def on_round_end(self, listener: Callable[[RoundResult], None]) -> None:
        """Called with every round's result as it ends (metrics)."""
        self._round_listeners.append(listener)

    # -- rounds -------------------------------------------------------------------------------

    @property
    def rounds_in_flight(self) -> int:
        return len(self._rounds)

    def _start_round(self) -> Round:
        live = self.registry.live_ranks()
        rnd = Round(self._next_id, self.registry.dp_size, live, self.round_timeout, self.aggregator_id)
        self._next_id += 1
        self._rounds[rnd.id] = rnd
        self.stats.rounds_started += 1
        self.stats.max_rounds_in_flight = max(self.stats.max_rounds_in_flight, len(self._rounds))
        message = _collect(rnd.id)
        for session in self.registry.sessions():
            session.send(message)
            self.stats.collects_sent += 1
        loop = asyncio.get_running_loop()
        if rnd.complete:  # nobody to wait for: end it once its leader (and whoever joins now) is counted
            rnd.timer = loop.call_soon(self._finish, rnd)
        else:
            rnd.timer = loop.call_later(self.round_timeout, self._finish, rnd, True)
        return rnd

    def _finish(self, rnd: Round, timed_out: bool = False) -> None:
        if rnd.done:
            return
        if rnd.timer is not None:
            rnd.timer.cancel()
        if timed_out:
            self.stats.rounds_timed_out += 1
            log.debug("round %d ended at its deadline; missing %s", rnd.id, sorted(rnd.waiting_for))
        self._rounds.pop(rnd.id, None)
        result = rnd.result(self.registry)
        self.last_result = result
        rnd.end(result)
        for listener in self._round_listeners:
            listener(result)

    def end_rounds(self) -> None:
        """End every round in flight now, as at its deadline (shutdown past its grace period)."""
        for rnd in list(self._rounds.values()):
            self._finish(rnd, timed_out=True)

    async def _await(self, rnd: Round, wait_timeout: float | None) -> RoundResult:
        """Join `rnd` as a caller (counted) and wait for its result."""
        rnd.callers += 1
        self.stats.callers += 1
        return await self._wait(rnd, wait_timeout)

    async def _wait(self, rnd: Round, wait_timeout: float | None) -> RoundResult:
        """`rnd`'s result when it ends; past `wait_timeout`, a partial one with what has arrived.

        Never cancels the round. This is every GetLoads call's hot path, so it costs one future, plus
        a timer only when the caller's deadline comes before the round's own (wait_for + shield cost
        several objects and callbacks per caller).
        """
        if rnd.done:
            return rnd.outcome
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        rnd.waiters.append(waiter)
        if wait_timeout is None or loop.time() + wait_timeout >= rnd.deadline:
            return await waiter
        timer = loop.call_later(wait_timeout, self._answer_early, rnd, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()

    def _answer_early(self, rnd: Round, waiter: asyncio.Future[RoundResult]) -> None:
        if not waiter.done():
            self.stats.partial_answers += 1
            waiter.set_result(rnd.result(self.registry, partial=True))

    # -- agent side ---------------------------------------------------------------------------

    def accept(self, session: AgentSession, round_id: int, loads: list[Snapshot], failed: Iterable[int]) -> bool:
        """Take a validated report. False when it answers a round not in flight: dropped from every round (never
        mixed in), its figures only refresh the ranks' last-known snapshots, as a push would (they are the
        agent's newest; an agent that skipped them in its pushes would otherwise never send them)."""
        if round_id == 0:  # unsolicited push: only refreshes last-known snapshots
            self.registry.store(loads, pushed=True)
            self.stats.reports_accepted += 1
            self.stats.pushes_accepted += 1
            return True
        rnd = self._rounds.get(round_id)
        if rnd is None:  # its round is over: never part of an answer, but the agent's latest figures
            self.stats.reports_dropped += 1
            self.registry.store(loads)  # refresh last-known snapshots, as a push does
            return False
        self.stats.reports_accepted += 1
        accepted = [load for load in loads if rnd.answer(load)]
        self.registry.store(accepted)
        rnd.give_up(r for r in failed if r in session.serves)
        if rnd.complete:
            self._finish(rnd)
        return True

    def _agent_left(self, session: AgentSession) -> None:
        unserved = [r for r in session.dp_ranks if self.registry.owner(r) is None]  # not those a re-link took
        for rnd in list(self._rounds.values()):
            rnd.give_up(unserved)
            if rnd.complete:
                self._finish(rnd)

    def _agent_joined(self, session: AgentSession) -> None:
        """A link that took over ranks a round in flight still waits for (an agent re-linking) is asked for them."""
        for rnd in self._rounds.values():
            if not rnd.waiting_for.isdisjoint(session.serves):
                session.send(_collect(rnd.id))
                self.stats.collects_sent += 1

    async def collect(self, *, started_after: float | None = None, wait_timeout: float | None = None) -> RoundResult:
        raise NotImplementedError


def _collect(round_id: int) -> pb.AggregatorMessage:
    return pb.AggregatorMessage(collect=pb.CollectRequest(round_id=round_id, include=["all"]))


class WatchingCommunicator(_Communicator):
    """At most one round in flight; concurrent callers join it."""

    mode = "watching"

    async def collect(self, *, started_after: float | None = None, wait_timeout: float | None = None) -> RoundResult:
        """The result of the round in flight (or a new one if none is, or if it started before `started_after`)."""
        deadline = None if wait_timeout is None else time.monotonic() + wait_timeout
        while True:
            rnd = next(iter(self._rounds.values()), None)
            if rnd is not None and started_after is not None and rnd.started < started_after:
                # Too old for this caller: wait for it to end, then join or lead the next one.
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                ended = await self._wait(rnd, remaining)
                if ended.partial:  # the caller's deadline came first, and that round is not one it accepts
                    raise DeadlineTooShort(
                        f"FRESHNESS_NEW_ROUND: the round in flight (#{rnd.id}) started before this call and "
                        "outlasted its deadline, so no newer round could end in time; give the call a longer "
                        "deadline or use FRESHNESS_JOIN")
                continue
            if rnd is None:
                rnd = self._start_round()
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            return await self._await(rnd, remaining)


class QueueingCommunicator(_Communicator):
    """One round per caller, callers served one at a time (the behaviour sglang replaced)."""

    mode = "queueing"

    def __init__(self, registry: AgentRegistry, round_timeout: float, aggregator_id: str = "") -> None:
        super().__init__(registry, round_timeout, aggregator_id)
        self._turn = asyncio.Lock()

    async def collect(self, *, started_after: float | None = None, wait_timeout: float | None = None) -> RoundResult:
        """A round of this caller's own, once the callers ahead have had theirs; the wait for the turn counts
        against the caller's deadline (DEADLINE_EXCEEDED when the turn does not come in time)."""
        deadline = None if wait_timeout is None else time.monotonic() + wait_timeout
        try:
            await asyncio.wait_for(self._turn.acquire(), wait_timeout)  # (None: as long as it takes)
        except TimeoutError:
            raise DeadlineTooShort(f"queueing mode: this call's turn did not come within its deadline "
                                   f"({wait_timeout * 1000:.0f} ms): the callers ahead each wait for a round "
                                   "of their own") from None
        try:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            return await self._await(self._start_round(), remaining)
        finally:
            self._turn.release()


Communicator = WatchingCommunicator | QueueingCommunicator
MODES = {"watching": WatchingCommunicator, "queueing": QueueingCommunicator}
