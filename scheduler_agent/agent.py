"""SchedulerAgent: dials the aggregator, says hello, answers collect rounds, reconnects with backoff.

The agent only shares the generated contract (loadagg.v1) with the aggregator, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from importlib.metadata import PackageNotFoundError, version

import grpc

from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc
from scheduler_agent.config import AgentConfig
from scheduler_agent.sources.base import LoadSource, SourceError

log = logging.getLogger(__name__)

# Refusals that will not go away by retrying quickly: back off to the maximum before trying again.
_REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.UNAUTHENTICATED,
             grpc.StatusCode.PERMISSION_DENIED}
_MAX_ANSWERS_IN_FLIGHT = 4


def _version() -> str:
    try:
        return version("loadagg")
    except PackageNotFoundError:
        return "dev"


class SchedulerAgent:
    """One agent process's link to one aggregator."""

    def __init__(self, config: AgentConfig, source: LoadSource) -> None:
        self.config = config
        self.source = source
        self.connected = asyncio.Event()
        self.collects_received = 0
        self.reports_sent = 0
        self.connects = 0
        self.last_refusal: grpc.aio.AioRpcError | None = None
        self._write_lock = asyncio.Lock()
        self._answers: dict[asyncio.Task, None] = {}  # insertion-ordered: oldest first

    def hello(self) -> pb.AgentMessage:
        return pb.AgentMessage(
            hello=pb.AgentHello(
                instance_id=self.config.instance_id,
                dp_ranks=list(self.config.dp_ranks),
                dp_size=self.config.dp_size,
                model=self.config.model,
                version=_version(),
                source=self.source.name,
            )
        )

    async def run(self) -> None:
        """Stay linked until cancelled: reconnect with exponential backoff and full jitter."""
        await self.source.start()
        failures = 0
        try:
            while True:
                linked_before = self.connects
                try:
                    await self._link()
                except grpc.aio.AioRpcError as error:
                    if self.connects != linked_before:
                        failures = 0  # the link was up: this is a fresh outage, not one more failed dial
                    failures += 1
                    if error.code() in _REFUSALS:
                        self.last_refusal = error
                        failures = max(failures, 64)
                        log.error("aggregator refused this agent: %s: %s", error.code().name, error.details())
                    else:
                        log.warning("link to %s lost: %s: %s", self.config.aggregator, error.code().name,
                                    error.details())
                else:
                    failures = 0  # the aggregator ended the link (shutdown, replaced): redial soon
                finally:
                    self.connected.clear()
                await asyncio.sleep(self.backoff_s(failures))
        finally:
            await self.source.close()

    def backoff_s(self, failures: int) -> float:
        """Full jitter: uniform in [0, min(max, initial * 2**failures)], so restarted fleets spread out."""
        ceiling = min(self.config.backoff_max_ms, self.config.backoff_initial_ms * 2 ** min(failures, 16))
        return random.uniform(0, ceiling) / 1000

    async def _link(self) -> None:
        security = self.config.security
        async with security.channel(self.config.aggregator) as channel:
            call = pb_grpc.AgentLinkStub(channel).Connect(metadata=security.metadata())
            await call.write(self.hello())
            try:
                while True:
                    message = await call.read()
                    if message is grpc.aio.EOF:  # (read() raises instead when the status is an error)
                        log.info("aggregator closed the link")
                        return
                    self._handle(call, message)
            finally:
                for task in list(self._answers):
                    task.cancel()
                call.cancel()

    def _handle(self, call, message: pb.AggregatorMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "collect":
            self.collects_received += 1
            if len(self._answers) >= _MAX_ANSWERS_IN_FLIGHT:  # the oldest answers are useless by now
                for task in list(self._answers)[: len(self._answers) - _MAX_ANSWERS_IN_FLIGHT + 1]:
                    task.cancel()
            task = asyncio.create_task(self._answer(call, message.collect.round_id))
            self._answers[task] = None
            task.add_done_callback(lambda done: self._answers.pop(done, None))
        elif kind == "welcome":
            self.connects += 1
            self.connected.set()
            log.info(
                "linked to aggregator %s (dp_size=%d) serving ranks %s",
                message.welcome.aggregator_id, message.welcome.dp_size, list(self.config.dp_ranks),
            )
        elif kind == "rejected":
            r = message.rejected
            log.warning("aggregator rejected rank %d of round %d: %s", r.dp_rank, r.round_id, r.reason)

    async def report(self, call, round_id: int) -> None:
        """Read the source and send one report for `round_id` (0: a push)."""
        ranks = self.config.dp_ranks
        try:
            loads = await self.source.read(ranks)
            error = ""
        except SourceError as exc:
            loads, error = {}, str(exc)
        except Exception as exc:  # a source bug must not take the agent down
            log.exception("source %s failed", self.source.name)
            loads, error = {}, f"{type(exc).__name__}: {exc}"
        report = pb.LoadReport(
            round_id=round_id,
            loads=[loads[r] for r in ranks if r in loads],
            failed_ranks=[r for r in ranks if r not in loads],
            error=error,
        )
        async with self._write_lock:
            await call.write(pb.AgentMessage(report=report))
        self.reports_sent += 1

    async def _answer(self, call, round_id: int) -> None:
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, grpc.aio.UsageError):
            await self.report(call, round_id)
