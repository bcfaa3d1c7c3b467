"""AgentLink servicer: one bidirectional stream per agent (hello, then collects out and reports in)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc

from loadagg.server.communicator import Communicator
from loadagg.server.errors import InvalidRequest, LinkReplaced, LoadAggError, abort_with, listed, quoted
from loadagg.server.registry import AgentRegistry, AgentSession, Snapshot
from loadagg.server.rounds import unix_ms
from loadagg.server.validation import (
    MAX_RANK_LOAD_BYTES,
    figures_of,
    load_problem,
    max_hello_bytes,
    max_report_bytes,
    report_figures,
    validate_hello,
)
from loadagg.v1 import loadagg_pb2 as pb

log = logging.getLogger(__name__)
AgentFrame = tuple[pb.AgentMessage, bytes]  # what the guard hands this servicer: a message, the bytes it came as
# An agent's wall clock this far ahead of ours is noted (a warning per link, a metric). Its timestamp_ms is only
# for reference: ages are measured on the aggregator's clock, so a clock ahead never makes figures look fresh.
CLOCK_AHEAD_NOTED_MS = 5_000
# What an answer holds besides its ranks' loads: the envelope, the summary, and per rank a missing-rank entry
# and the stale/age_ms fields the aggregator adds.
_ANSWER_ENVELOPE_BYTES = 1024
_ANSWER_BYTES_PER_RANK = 32
_SMALL_RANK_SHARE = 2048


def rank_share_bytes(max_answer_bytes: int, dp_size: int) -> int:
    """The most bytes one rank's load may take so that an answer of every rank fits `max_answer_bytes`."""
    share = (max_answer_bytes - _ANSWER_ENVELOPE_BYTES) // dp_size - _ANSWER_BYTES_PER_RANK
    return min(MAX_RANK_LOAD_BYTES, share)


class AgentLinkService:
    def __init__(
        self,
        registry: AgentRegistry,
        communicator: Communicator,
        *,
        aggregator_id: str,
        round_timeout_ms: int,
        hello_timeout_s: float,
        max_answer_bytes: int,
    ) -> None:
        self.registry = registry
        self.communicator = communicator
        self.welcome = pb.AggregatorMessage(
            welcome=pb.Welcome(
                aggregator_id=aggregator_id, dp_size=registry.dp_size, round_timeout_ms=round_timeout_ms
            )
        )
        self.hello_timeout_s = hello_timeout_s
        self.reports_rejected = 0
        self.clock_ahead_loads = 0  # loads whose agent timestamp was CLOCK_AHEAD_NOTED_MS or more ahead of ours
        self.rank_share = rank_share_bytes(max_answer_bytes, registry.dp_size)
        if self.rank_share < _SMALL_RANK_SHARE:
            share = f"max_answer_bytes {max_answer_bytes} leaves {max(self.rank_share, 0)} bytes per rank for " \
                    f"dp_size={registry.dp_size}"
            if self.rank_share < _SMALL_RANK_SHARE // 8:
                raise ValueError(f"{share}: too little for any load; raise --max-answer-bytes")
            log.warning("%s: a rank with GPU telemetry takes about 1 KB; a larger load is refused (raise "
                        "--max-answer-bytes, and routers' receive limit, if ranks report many GPUs)", share)
        self._hello_bytes = max_hello_bytes(registry.dp_size)
        self._links: dict[object, AgentSession] = {}  # ServicerContext -> its session, once it said hello

    def message_limit(self, context) -> int:
        """How many bytes the next AgentMessage of this stream may take, checked before it is parsed: a hello
        before the session exists, then a report of each served rank at its share of an answer."""
        session = self._links.get(context)
        if session is None:
            return self._hello_bytes
        return session.max_message_bytes

    def message_loads(self, context) -> int:
        """How many loads the next AgentMessage of this stream may name: one per served rank (before the hello,
        every rank, which bounds what the hello itself may list)."""
        session = self._links.get(context)
        return self.registry.dp_size if session is None else len(session.dp_ranks)

    async def _hello(self, requests: AsyncIterator[AgentFrame], context) -> AgentSession:
        try:
            first, _ = await asyncio.wait_for(anext(requests), self.hello_timeout_s)
        except TimeoutError:
            raise InvalidRequest(f"no hello within {self.hello_timeout_s:g} s of connecting") from None
        except StopAsyncIteration:
            raise InvalidRequest("stream ended before hello") from None
        if first.WhichOneof("kind") != "hello":
            raise InvalidRequest("the first AgentMessage must be a hello (instance_id, dp_ranks, dp_size)")
        hello = first.hello
        ranks = validate_hello(hello, self.registry.dp_size)
        return AgentSession(
            instance_id=hello.instance_id,
            dp_ranks=ranks,
            peer=context.peer(),
            model=hello.model,
            version=hello.version,
            source=hello.source,
        )

    async def connect(
        self, requests: AsyncIterator[AgentFrame], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AggregatorMessage]:
        try:
            session = await self._hello(requests, context)
            session.max_message_bytes = max_report_bytes(len(session.dp_ranks), self.rank_share)
            self.registry.register(session)
            self._links[context] = session
        except LoadAggError as error:
            log.warning("refused agent from %s: %s", context.peer(), error)
            await abort_with(context, error)
            return
        log.info("agent %s joined from %s serving ranks %s", session.instance_id, session.peer, list(session.dp_ranks))
        reader = asyncio.create_task(self._read(session, requests), name=f"agent-reader-{session.instance_id}")
        try:
            yield self.welcome
            while (message := await session.next_message()) is not None:
                yield message
            if session.replaced_by:  # a status the old agent backs off on (two agents sharing an id would flap)
                await abort_with(context, LinkReplaced(
                    f"a newer link of instance {quoted(session.instance_id)} (from {session.replaced_by}) took "
                    f"over ranks {listed(session.dp_ranks)}; if that is another agent, give each agent its own "
                    "--instance-id"))
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # never skip the unregister below
                await reader
            self._links.pop(context, None)
            self.registry.unregister(session)
            session.close()
            log.info("agent %s left (ranks %s)", session.instance_id, list(session.dp_ranks))

    async def _read(self, session: AgentSession, requests: AsyncIterator[AgentFrame]) -> None:
        try:
            async for message, raw in requests:
                session.last_heard = time.monotonic()
                kind = message.WhichOneof("kind")
                if kind == "report":
                    self._report(session, message.report, raw)
                elif kind == "hello":
                    session.send(self._rejection(0, -1, "hello may only be sent once per stream; ignored"))
                else:
                    session.send(self._rejection(0, -1, "an AgentMessage after the hello must carry a report; "
                                                        "this one carried nothing and was ignored"))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.AbortError) as error:
            log.debug("agent %s stream read ended: %s", session.instance_id, error)
        except Exception:  # a bug here must end this link, not leave its ranks held by a dead reader
            log.exception("agent %s: report handling failed; closing the link", session.instance_id)
        finally:
            session.close()

    def _rejection(self, round_id: int, rank: int, reason: str) -> pb.AggregatorMessage:
        self.reports_rejected += 1
        return pb.AggregatorMessage(rejected=pb.ReportRejected(round_id=round_id, dp_rank=rank, reason=reason))

    def _report(self, session: AgentSession, report: pb.LoadReport, raw: bytes = b"") -> None:
        """Take a report's loads: `raw`, the AgentMessage's bytes as received, spares the common case a check of
        each load (report_figures: one C pass over the whole report); a report it does not vouch for is checked
        load by load."""
        served = session.serves  # a set: an agent may serve 128 ranks
        loads, failed_ranks = report.loads, report.failed_ranks
        if len(loads) > len(served) or len(failed_ranks) > len(served):
            # A report names each rank its agent serves at most once: what is past that count is refused unread.
            problem = (f"a report of {len(loads)} loads and {len(failed_ranks)} failed ranks from an agent serving "
                       f"{len(served)} ranks {listed(session.dp_ranks)}: those past the first {len(served)} of each "
                       "were refused unread; name each served rank at most once")
            _log_rejection(session, -1, problem)
            session.send(self._rejection(report.round_id, -1, problem))
            loads, failed_ranks = loads[:len(served)], failed_ranks[:len(served)]
        accepted: list[Snapshot] = []
        failed = [r for r in failed_ranks if r in served] if failed_ranks else []
        received = session.last_heard  # this message's arrival, on our clock (_read set it)
        now = unix_ms()
        share = self.rank_share
        figures = report_figures(raw, share) if raw else None
        checked = figures is None or len(figures) != len(loads)  # (a count apart: fields the parser dropped)
        # (no strict= keyword: a call with one costs more than the rest of a 1-rank report's loop; both sides have
        # one entry per load)
        pairs = zip(loads, map(figures_of, loads) if checked else figures)  # noqa: B905
        for load, (rank, stamp, age_ms, detail_age_ms) in pairs:
            if rank not in served:
                problem = f"dp rank {rank} is not served by this agent (it serves {listed(session.dp_ranks)})"
            elif not checked:
                problem = None
            elif (size := len(serialized := load.SerializeToString())) > share:
                problem = (f"dp rank {rank}'s load is {size} bytes, above its share of an answer ({share} "
                           f"bytes = --max-answer-bytes over dp_size {self.registry.dp_size}, at most "
                           f"{MAX_RANK_LOAD_BYTES}); send fewer GPU devices or shorter names, or raise "
                           "--max-answer-bytes (and routers' receive limit)")
            else:
                problem = load_problem(load, serialized)
            if problem:
                _log_rejection(session, rank, problem)
                session.send(self._rejection(report.round_id, rank, problem))
                failed.append(rank)
                continue
            if not stamp:
                load.timestamp_ms = now
            elif stamp > now + CLOCK_AHEAD_NOTED_MS:
                self._clock_ahead(session, stamp - now)
            # Its figures were read age_ms before the agent sent them: on our clock, that long before now.
            accepted.append(Snapshot(load, received, received - age_ms / 1000,
                                     None if detail_age_ms is None else received - detail_age_ms / 1000))
        self.communicator.accept(session, report.round_id, accepted, failed)

    def _clock_ahead(self, session: AgentSession, ahead_ms: int) -> None:
        """Note an agent whose timestamps are ahead of our clock: a warning once per link, and a metric."""
        self.clock_ahead_loads += 1
        if not session.clock_ahead_noted:
            session.clock_ahead_noted = True
            log.warning("agent %s (%s) stamps its loads %.1f s ahead of this aggregator's clock; ages are measured "
                        "on the aggregator's clock, so this does not change them, but check NTP on that node",
                        session.instance_id, session.peer or "?", ahead_ms / 1000)


def _log_rejection(session: AgentSession, rank: int, problem: str) -> None:
    """A warning at most once per link every REJECTION_WARNING_INTERVAL_S, saying how many it left out: a
    source stuck on an impossible figure is refused every round (the agent is told each time, by message)."""
    held_back = session.rejection_warnings.due(time.monotonic())
    if held_back is None:
        log.debug("rejected report of rank %d from %s: %s", rank, session.instance_id, problem)
        return
    more = f" (and {held_back} more refused since the last warning)" if held_back else ""
    log.warning("rejected report of rank %d from %s: %s%s", rank, session.instance_id, problem, more)
