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
from loadagg.server.registry import AgentRegistry, AgentSession
from loadagg.server.rounds import unix_ms
from loadagg.server.validation import load_problem, validate_hello
from loadagg.v1 import loadagg_pb2 as pb

log = logging.getLogger(__name__)
REJECTION_WARNING_INTERVAL_S = 10.0


class AgentLinkService:
    def __init__(
        self,
        registry: AgentRegistry,
        communicator: Communicator,
        *,
        aggregator_id: str,
        round_timeout_ms: int,
        hello_timeout_s: float,
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

    async def _hello(self, requests: AsyncIterator[pb.AgentMessage], context) -> AgentSession:
        try:
            first = await asyncio.wait_for(anext(requests), self.hello_timeout_s)
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
        self, requests: AsyncIterator[pb.AgentMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AggregatorMessage]:
        try:
            session = await self._hello(requests, context)
            self.registry.register(session)
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
            self.registry.unregister(session)
            session.close()
            log.info("agent %s left (ranks %s)", session.instance_id, list(session.dp_ranks))

    async def _read(self, session: AgentSession, requests: AsyncIterator[pb.AgentMessage]) -> None:
        try:
            async for message in requests:
                kind = message.WhichOneof("kind")
                if kind == "report":
                    self._report(session, message.report)
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

    def _report(self, session: AgentSession, report: pb.LoadReport) -> None:
        accepted: list[pb.RankLoad] = []
        served = session.serves  # a set: an agent may serve 128 ranks
        failed = [r for r in report.failed_ranks if r in served]
        now = unix_ms()
        for load in report.loads:
            if load.dp_rank not in served:
                problem = f"dp rank {load.dp_rank} is not served by this agent (it serves {listed(session.dp_ranks)})"
            else:
                problem = load_problem(load)
            if problem:
                _log_rejection(session, load.dp_rank, problem)
                session.send(self._rejection(report.round_id, load.dp_rank, problem))
                failed.append(load.dp_rank)
                continue
            if not load.timestamp_ms:
                load.timestamp_ms = now
            accepted.append(load)
        self.communicator.accept(session, report.round_id, accepted, failed)


def _log_rejection(session: AgentSession, rank: int, problem: str) -> None:
    """A warning at most once per link every REJECTION_WARNING_INTERVAL_S, saying how many it left out: a
    source stuck on an impossible figure is refused every round (the agent is told each time, by message)."""
    now = time.monotonic()
    if now - session.warned_at < REJECTION_WARNING_INTERVAL_S:
        session.unwarned += 1
        log.debug("rejected report of rank %d from %s: %s", rank, session.instance_id, problem)
        return
    more = f" (and {session.unwarned} more refused since the last warning)" if session.unwarned else ""
    session.warned_at, session.unwarned = now, 0
    log.warning("rejected report of rank %d from %s: %s%s", rank, session.instance_id, problem, more)
