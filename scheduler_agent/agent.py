"""SchedulerAgent: dials the aggregator, says hello, answers collect rounds, pushes changes, reconnects.

The agent only shares the generated contract (loadagg.v1) with the aggregator, nothing else.
In front of an engine it first asks the engine which dp ranks it runs (retrying until the engine is
up), then says hello with them. A Python scheduler can embed it and `publish` its own figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Sequence

import grpc

from loadagg.common import package_version
from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc
from scheduler_agent.config import AgentConfig
from scheduler_agent.push import PushTracker, next_push_at
from scheduler_agent.rejections import RejectionLog
from scheduler_agent.source_health import SourceHealth
from scheduler_agent.sources.base import EngineRanks, LoadSource, PartialRead, SourceError
from scheduler_agent.sources.inprocess import PublishedSource

log = logging.getLogger(__name__)

# Refusals that will not go away by retrying quickly: back off to the maximum before trying again.
_REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.UNAUTHENTICATED,
             grpc.StatusCode.PERMISSION_DENIED}
_MAX_ANSWERS_IN_FLIGHT = 4
# A push source's unchanged ranks are pushed again after this long (unless --push-refresh-ms says otherwise).
PUSH_SOURCE_REFRESH_MS = 1000
# What a write on a link that is ending raises; the tasks writing on it end quietly.
_LINK_ENDED = (asyncio.CancelledError, grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError)


class SchedulerAgent:
    """One agent process's link to one aggregator."""

    def __init__(self, config: AgentConfig, source: LoadSource | None = None) -> None:
        self.config = config
        # No source: an embedded agent whose scheduler calls `publish`.
        self.source = source if source is not None else PublishedSource()
        # The ranks read from the source, and (shifted by rank_offset) the ones the hello claims; an agent in
        # front of an engine fills these from the engine (discover).
        self.source_ranks: tuple[int, ...] = tuple(config.dp_ranks)
        self.dp_ranks: tuple[int, ...] = tuple(r + config.rank_offset for r in config.dp_ranks)
        self.dp_size = config.dp_size
        self.engine: EngineRanks | None = None
        self.health = SourceHealth(self.source.name)
        # A push source's unchanged ranks are re-sent now and then, so the aggregator's ages stay those of
        # the engine's last word on them, not of their last change.
        self.pushes = PushTracker(config.push_refresh_ms)
        self.pushes_sent = 0
        self.pushes_skipped = 0
        self.rejections = 0
        self.rejection_log = RejectionLog()
        self.connected = asyncio.Event()
        self.collects_received = 0
        self.reports_sent = 0
        self.connects = 0
        self.last_refusal: grpc.aio.AioRpcError | None = None
        self._write_lock = asyncio.Lock()
        self._writer: asyncio.Task | None = None  # the task inside call.write: cancelling it would end the link
        self._engine_checked = 0.0  # monotonic time of the last question to the engine about its ranks
        self._answers: dict[asyncio.Task, None] = {}  # insertion-ordered: oldest first

    def hello(self) -> pb.AgentMessage:
        return pb.AgentMessage(
            hello=pb.AgentHello(
                instance_id=self.config.instance_id,
                dp_ranks=list(self.dp_ranks),
                dp_size=self.dp_size,
                model=self.config.model,
                version=package_version(),
                source=self.source.name,
            )
        )

    async def run(self) -> None:
        """Stay linked until cancelled: reconnect with exponential backoff and full jitter."""
        await self.source.start()
        failures = 0
        refused = False
        try:
            if self.config.ranks_from_engine:
                await self._discover_ranks()
            while True:
                if refused or self._engine_check_due():  # a refused hello may carry ranks the engine dropped
                    await self._recheck_engine()
                linked_before = self.connects
                refused = False
                try:
                    await self._link()
                except grpc.aio.AioRpcError as error:
                    if self.connects != linked_before and error.code() != grpc.StatusCode.ABORTED:
                        failures = 0  # the link was up: a fresh outage (ABORTED: replaced by a link of our id)
                    failures += 1
                    if error.code() in _REFUSALS:
                        self.last_refusal = error
                        refused = True
                        failures = max(failures, 64)
                        log.error("aggregator refused this agent: %s: %s", error.code().name, error.details())
                    else:
                        log.warning("link to %s lost: %s: %s", self.config.aggregator, error.code().name,
                                    error.details())
                except asyncio.CancelledError:
                    if asyncio.current_task().cancelling():
                        raise  # we are being stopped
                    failures += 1  # gRPC cancelled the call under us: a lost link, not a reason to stop
                    log.warning("link to %s was cancelled; linking again", self.config.aggregator)
                except Exception:  # a bug, or a certificate that became unreadable: say so, never stop silently
                    failures += 1
                    log.exception("link to %s failed", self.config.aggregator)
                else:
                    failures = 0  # the aggregator ended the link (shutdown, ranks changed): redial soon
                finally:
                    self.connected.clear()
                await asyncio.sleep(self.backoff_s(failures))
        finally:
            await self.source.close()

    def publish(self, *loads: pb.RankLoad) -> None:
        """An embedded scheduler's own figures, read by the next collect or push (no HTTP hop)."""
        if not isinstance(self.source, PublishedSource):
            raise TypeError(f"publish needs an agent built without a source (this one reads {self.source.name!r})")
        self.source.publish(*loads)

    async def _discover_ranks(self) -> None:
        """Ask the engine for its dp ranks before the first hello; retry (with backoff) until it answers."""
        failures = 0
        while True:
            try:
                self._engine_checked = time.monotonic()
                engine = await self.source.discover()
                if engine is None:  # a source without an engine: keep the configured ranks
                    if not self.source_ranks:
                        raise ValueError(f"source {self.source.name!r} cannot say which dp ranks to serve: "
                                         "give dp_ranks")
                    return
                self._adopt(engine)
                return
            except SourceError as error:
                failures += 1
                if failures == 1 or failures % 50 == 0:
                    log.warning("waiting for the engine (%s): %s", self.source.name, error)
            await asyncio.sleep(self.backoff_s(failures))

    def _adopt(self, engine: EngineRanks) -> None:
        """Serve the engine's ranks (those of them --dp-rank names, when given), shifted by rank_offset.

        The hello claims a dp_size only when one is configured: what an engine shows is no cluster size
        (vLLM's page names only its own engines' ranks, sglang counts the entries it returned, several
        engines may fill one cluster), and announcing it had the aggregator refuse the whole agent."""
        wanted = self.config.dp_ranks
        ranks = tuple(r for r in engine.dp_ranks if not wanted or r in wanted)
        absent = [r for r in wanted if r not in engine.dp_ranks]
        if absent:
            log.warning("the engine does not run dp ranks %s (it runs %s)", absent, list(engine.dp_ranks))
        if not ranks:
            raise SourceError(f"none of dp ranks {list(wanted)} runs on this engine (it runs {list(engine.dp_ranks)})")
        offset = self.config.rank_offset
        self.engine = engine
        self.source_ranks = ranks
        self.dp_ranks = tuple(r + offset for r in ranks)
        self.dp_size = self.config.dp_size  # 0: accept the aggregator's
        log.info("engine runs dp ranks %s of dp_size %d; serving %s%s", list(engine.dp_ranks), engine.dp_size,
                 list(self.dp_ranks), f" (engine rank + {offset})" if offset else "")

    def backoff_s(self, failures: int) -> float:
        """Full jitter: uniform in [0, min(max, initial * 2**failures)], so restarted fleets spread out."""
        ceiling = min(self.config.backoff_max_ms, self.config.backoff_initial_ms * 2 ** min(failures, 16))
        return random.uniform(0, ceiling) / 1000

    async def _link(self) -> None:
        security = self.config.security  # TLS / mutual TLS, the agent token, keepalive
        async with security.channel(self.config.aggregator) as channel:
            call = pb_grpc.AgentLinkStub(channel).Connect(metadata=security.metadata())
            self.pushes.reset()  # a new link (maybe a new aggregator): it holds nothing of ours yet
            await call.write(self.hello())
            pusher: asyncio.Task | None = None
            changes: asyncio.Task | None = None
            watcher = (asyncio.create_task(self._watch_engine(call), name="agent-engine-watch")
                       if self.engine is not None and self.config.rediscover_interval_s else None)
            try:
                while True:
                    message = await call.read()
                    if message is grpc.aio.EOF:  # (read() raises instead when the status is an error)
                        log.info("aggregator closed the link")
                        return
                    self._handle(call, message)
                    if changes is None and self.connected.is_set():
                        changes = asyncio.create_task(self._push_changes(call), name="agent-push-changes")
                        if self.config.push_interval_ms:
                            pusher = asyncio.create_task(self._push_loop(call), name="agent-push")
            finally:
                for task in list(self._answers):
                    task.cancel()
                for task in (pusher, changes, watcher):
                    if task is not None:
                        task.cancel()
                call.cancel()

    def _engine_check_due(self) -> bool:
        interval = self.config.rediscover_interval_s
        return self.engine is not None and bool(interval) and time.monotonic() - self._engine_checked >= interval

    async def _recheck_engine(self) -> bool:
        """Ask the engine once which ranks it runs and adopt them; True when what the hello claims changed.
        An engine that does not answer changes nothing (its ranks fail per round meanwhile)."""
        self._engine_checked = time.monotonic()
        before = (self.dp_ranks, self.dp_size)
        try:
            engine = await self.source.discover()
            if engine is None or engine == self.engine:
                return False
            self._adopt(engine)
        except SourceError as error:
            log.debug("engine rank check skipped: %s", error)
            return False
        if (self.dp_ranks, self.dp_size) == before:
            return False
        log.warning("the engine's dp ranks changed: serving %s of dp_size %d (was %s of %d)", list(self.dp_ranks),
                    self.dp_size, list(before[0]), before[1])
        return True

    async def _watch_engine(self, call) -> None:
        """While linked, every rediscover interval: when the engine's ranks changed, half-close the link. The
        aggregator releases the old ranks and ends the stream; the next link's hello claims the new ones."""
        with contextlib.suppress(*_LINK_ENDED):
            while True:
                await asyncio.sleep(max(0.0, self._engine_checked + self.config.rediscover_interval_s
                                        - time.monotonic()))
                if await self._recheck_engine():
                    await call.done_writing()
                    return

    async def _push_loop(self, call) -> None:
        """Every push interval: send the ranks whose load changed since the aggregator last heard of them.

        A scheduler that publishes its figures (PublishedSource) says when they change: its change is pushed
        at once if the last push is an interval old, else one interval after it (changes meanwhile coalesce
        into that push), so the interval bounds how often, not how late.
        """
        interval = self.config.push_interval_ms / 1000
        loop = asyncio.get_running_loop()
        published = self.source.changed if isinstance(self.source, PublishedSource) else None
        due = loop.time()
        pushed_at = -math.inf  # the last push that sent something (a tick with no change sends nothing)
        with contextlib.suppress(*_LINK_ENDED):
            while True:
                if published is not None:
                    published.clear()  # what is published from here on is in this push or wakes the next
                started, sent = loop.time(), self.pushes_sent
                await self.report(call, 0)
                if self.pushes_sent != sent:
                    pushed_at = started
                due = next_push_at(due, loop.time(), interval)
                if published is None:
                    await asyncio.sleep(due - loop.time())
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(published.wait(), max(0.0, due - loop.time()))
                if published.is_set():  # a change: push it now, or once an interval has passed since the last
                    await asyncio.sleep(max(0.0, pushed_at + interval - loop.time()))
                    due = loop.time()

    async def _push_changes(self, call) -> None:
        """While the source pushes (a feed, snapshot or stream it holds): push the ranks that changed as soon as
        it says so, gathering one coalescing window's changes into one report; re-send unchanged ranks every
        refresh. A change pushes only the ranks the source holds; the ranks it polls (a silent feed rank, a
        rank without records yet) are read at most once a refresh, never once per change of another rank. A
        source that does not push (now) is left to rounds and the push interval."""
        changed = asyncio.Event()
        self.source.add_listener(changed.set)
        window = self.config.push_coalesce_ms / 1000
        refresh = (self.config.push_refresh_ms or PUSH_SOURCE_REFRESH_MS) / 1000
        loop = asyncio.get_running_loop()
        every_rank_at = -refresh  # when a push last read every rank, the polled ones too
        try:
            with contextlib.suppress(*_LINK_ENDED):
                while True:
                    changed.clear()
                    if self.source.pushes:
                        self.pushes.refresh_s = refresh
                        if loop.time() - every_rank_at >= refresh:
                            every_rank_at = loop.time()
                            await self.report(call, 0)
                        else:
                            await self.report(call, 0, self.source.held_ranks(self.source_ranks))
                    else:
                        self.pushes.refresh_s = self.config.push_refresh_ms / 1000
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), refresh)
                    if window and changed.is_set():
                        await asyncio.sleep(window)
        finally:
            self.source.remove_listener(changed.set)

    def _handle(self, call, message: pb.AggregatorMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "collect":
            self.collects_received += 1
            if len(self._answers) >= _MAX_ANSWERS_IN_FLIGHT:  # the oldest answers are useless by now
                # ...but not one inside call.write: grpc.aio cancels the whole stream with it.
                stale = [task for task in self._answers if task is not self._writer]
                for task in stale[: len(self._answers) - _MAX_ANSWERS_IN_FLIGHT + 1]:
                    task.cancel()
            task = asyncio.create_task(self._answer(call, message.collect.round_id))
            self._answers[task] = None
            task.add_done_callback(lambda done: self._answers.pop(done, None))
        elif kind == "welcome":
            self.connects += 1
            self.source.set_round_timeout(message.welcome.round_timeout_ms)
            self.connected.set()
            welcome = message.welcome
            log.info("linked to aggregator %s (dp_size=%d) serving ranks %s", welcome.aggregator_id,
                     welcome.dp_size, list(self.dp_ranks))
            if self.engine is not None and not self.config.rank_offset and self.engine.dp_size != welcome.dp_size:
                log.warning("the engine shows dp_size %d, the aggregator serves %d: ranks this engine does not run "
                            "must come from other agents (several engines? see --rank-offset)",
                            self.engine.dp_size, welcome.dp_size)
        elif kind == "rejected":
            r = message.rejected
            self.rejections += 1
            self.rejection_log.note(r.dp_rank, r.round_id, r.reason)  # once per kind, then once a period

    async def report(self, call, round_id: int, ranks: Sequence[int] | None = None) -> None:
        """Read the source and send one report for `round_id` (0: a push, only of ranks that changed); `ranks`:
        a push of only these (the source's health is judged on reads of every rank)."""
        whole = ranks is None
        ranks = self.source_ranks if ranks is None else ranks
        if not ranks:
            return
        try:
            loads = await self.source.read(ranks)
            error = ""
        except PartialRead as exc:
            loads, error = exc.loads, str(exc)
        except SourceError as exc:
            loads, error = {}, str(exc)
        except Exception as exc:  # a source bug must not take the agent down
            loads, error = {}, f"{type(exc).__name__}: {exc}"
            if error != self.health.state[0]:  # with its traceback, once per kind of failure
                log.exception("source %s failed", self.source.name)
        failed = [r for r in ranks if r not in loads]
        if whole:
            self.health.observe(error, failed)
        answered = [loads[r] for r in ranks if r in loads]
        if round_id == 0:
            answered = self.pushes.changed(answered)
            if not answered:
                self.pushes_skipped += 1
                return
        message = pb.AgentMessage()  # built in place: LoadReport(...) then AgentMessage(report=...) copies twice
        report = message.report
        report.round_id = round_id
        report.loads.extend(answered)  # copies: shifting a rank below never touches what the source holds
        offset = self.config.rank_offset
        if offset:
            for load in report.loads:
                load.dp_rank += offset
            failed = [r + offset for r in failed]
        report.failed_ranks.extend(failed)
        report.error = error
        async with self._write_lock:
            self._writer = asyncio.current_task()
            try:
                await call.write(message)
            finally:
                self._writer = None
        if self.config.push_interval_ms or self.source.pushes:  # only pushes read what was sent (fingerprints cost)
            self.pushes.sent(answered)
        self.reports_sent += 1
        if round_id == 0:
            self.pushes_sent += 1

    async def _answer(self, call, round_id: int) -> None:
        with contextlib.suppress(*_LINK_ENDED):
            await self.report(call, round_id)
