"""AgentRegistry: which agent serves which dp ranks, connected or not, and each rank's last snapshot."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from loadagg.common import same_figures
from loadagg.server.errors import RankConflict
from loadagg.server.warn_throttle import WarningThrottle
from loadagg.v1 import loadagg_pb2 as pb

log = logging.getLogger(__name__)

MAX_PENDING_NOTICES = 64
# A link heard from this recently is healthy: a newer link of the same instance id taking its ranks over then
# means two agents share the id (they would take the ranks from each other in turn), not one agent re-linking.
HEALTHY_LINK_HEARD_S = 10.0
TAKEOVER_WARNING_INTERVAL_S = 10.0
REJECTION_WARNING_INTERVAL_S = 10.0  # one link's refused reports: a warning at most this often
DEFAULT_FORGET_RANK_AFTER_S = 300.0


@dataclass(eq=False)
class AgentSession:
    """One live AgentLink stream. The communicator writes to it through `send`, which never blocks.

    What waits to be written is bounded even when the agent stops reading (SIGSTOP, a stuck network):
    only the newest `collect` is kept (an older unanswered one belongs to a round that is over), and
    other notices are capped.
    """

    instance_id: str
    dp_ranks: tuple[int, ...]
    peer: str = ""
    model: str = ""
    version: str = ""
    source: str = ""
    connected_at: float = field(default_factory=time.monotonic)
    closed: bool = False
    replaced_by: str = ""  # the peer of the newer link of the same instance that took this one's ranks
    # its rejected reports: warned of at most every REJECTION_WARNING_INTERVAL_S, the rest logged at DEBUG only
    rejection_warnings: WarningThrottle = field(default_factory=lambda: WarningThrottle(REJECTION_WARNING_INTERVAL_S))
    last_heard: float = field(default_factory=time.monotonic)  # the hello, then every message received
    clock_ahead_noted: bool = False  # its timestamps ran ahead of our clock and that was logged
    max_message_bytes: int = 0  # the largest AgentMessage it may send (its ranks' reports), set after the hello
    serves: frozenset[int] = field(init=False)  # dp_ranks as a set, built once: reports are checked against it
    _collect: pb.AggregatorMessage | None = None
    _notices: deque[pb.AggregatorMessage] = field(default_factory=lambda: deque(maxlen=MAX_PENDING_NOTICES))
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.serves = frozenset(self.dp_ranks)

    def send(self, message: pb.AggregatorMessage) -> None:
        if self.closed:
            return
        if message.HasField("collect"):
            self._collect = message
        else:
            self._notices.append(message)
        self._wake.set()

    async def next_message(self) -> pb.AggregatorMessage | None:
        """The next message to write to the agent; None once the session is closed and its notices are out
        (a rejection queued just before the agent half-closed still reaches it; a collect does not)."""
        while True:
            if self._notices:
                return self._notices.popleft()
            if self.closed:
                return None
            if self._collect is not None:
                message, self._collect = self._collect, None
                return message
            self._wake.clear()
            await self._wake.wait()

    @property
    def pending(self) -> int:
        return len(self._notices) + (self._collect is not None)

    def close(self) -> None:
        """Ask the stream's writer to end the RPC (used when a reconnect replaces this session)."""
        self.closed = True
        self._wake.set()


@dataclass(eq=False, slots=True)
class Snapshot:
    """A rank's accepted load, when we received it, and when its figures were read: both on our monotonic
    clock (`taken` is `received` less the age the agent reported), so that no age depends on an agent's clock.
    `detail_taken` likewise for its figures outside the core when they came from a slower read (detail_age_ms).
    Never changed once made (not frozen: a frozen dataclass sets each field through object.__setattr__, and one
    is made per rank per push)."""

    load: pb.RankLoad
    received: float
    taken: float
    detail_taken: float | None = None

    def age_ms(self, now: float) -> int:
        return max(0, int((now - self.taken) * 1000))

    def aged(self, now: float) -> pb.RankLoad:
        """Its load with `age_ms` as of `now`, set on the load itself: only for the round it answers, at that
        round's end (the load is the aggregator's own, parsed from the agent's report). Any later answer takes
        `aged_copy`, so that a view of the round built later still shows the ages at the round's end."""
        self._set_ages(self.load, now)
        return self.load

    def aged_copy(self, now: float) -> pb.RankLoad:
        """A copy of its load with the ages as of `now`, for an answer of its own (cached, snapshots, stale)."""
        load = pb.RankLoad()
        load.CopyFrom(self.load)
        self._set_ages(load, now)
        return load

    def _set_ages(self, load: pb.RankLoad, now: float) -> None:
        load.age_ms = self.age_ms(now)
        if self.detail_taken is not None:
            load.detail_age_ms = max(0, int((now - self.detail_taken) * 1000))


class AgentRegistry:
    """Owns rank ownership rules: one live agent per rank; the same instance reconnecting replaces itself."""

    def __init__(self, dp_size: int, forget_rank_after_s: float = DEFAULT_FORGET_RANK_AFTER_S) -> None:
        self.dp_size = dp_size
        self.forget_rank_after_s = forget_rank_after_s  # a rank with no agent this long loses its snapshot
        self._unserved_since: dict[int, float] = {}  # ranks that had an agent and have none now
        self._next_forget = math.inf  # monotonic time of the earliest snapshot to drop
        self.healthy_takeovers = 0  # links replaced by a newer link of their instance id while healthy
        self._takeover_warnings = WarningThrottle(TAKEOVER_WARNING_INTERVAL_S)
        self._owner: dict[int, AgentSession] = {}
        self._last_owner_id: dict[int, str] = {}
        self._snapshots: dict[int, Snapshot] = {}
        self._sessions: set[AgentSession] = set()
        self._push_fed: set[int] = set()  # ranks whose current link has pushed figures unasked
        self._listeners: list[Callable[[AgentSession], None]] = []
        self._joined_listeners: list[Callable[[AgentSession], None]] = []
        self._change_listeners: list[Callable[[list[int]], None]] = []
        self.snapshot_version = 0  # every store
        self.links_version = 0  # every rank that starts or stops being served

    def on_change(self, listener: Callable[[list[int]], None]) -> None:
        """Called with the ranks whose figures changed (a store with other figures than those held) or whose
        agent linked or left. Figures are compared only while a listener wants them (on-change watchers)."""
        self._change_listeners.append(listener)

    def remove_change_listener(self, listener: Callable[[list[int]], None]) -> None:
        self._change_listeners.remove(listener)

    def _changed(self, ranks: list[int]) -> None:
        for listener in self._change_listeners:
            listener(ranks)

    def on_disconnect(self, listener: Callable[[AgentSession], None]) -> None:
        """Called with each session that leaves (the communicator stops waiting for the ranks nobody serves now)."""
        self._listeners.append(listener)

    def on_connect(self, listener: Callable[[AgentSession], None]) -> None:
        """Called with each session once it holds its ranks (a re-link is asked the round in flight again)."""
        self._joined_listeners.append(listener)

    def register(self, session: AgentSession) -> None:
        """Claim the session's ranks, replacing an older link of the same instance; RankConflict otherwise."""
        for rank in session.dp_ranks:
            holder = self._owner.get(rank)
            if holder is not None and holder.instance_id != session.instance_id:
                raise RankConflict(
                    f"dp rank {rank} is already served by live agent {holder.instance_id!r} "
                    f"({holder.peer or 'unknown peer'}); stop it or give this agent other ranks"
                )
        replaced = {self._owner[r] for r in session.dp_ranks if r in self._owner}
        replaced |= {s for s in self._sessions if s.instance_id == session.instance_id}
        # The new link holds its ranks before the old one leaves: a rank that changes link is never unserved,
        # so a round in flight keeps waiting for it rather than calling it missing.
        self._sessions.add(session)
        for rank in session.dp_ranks:
            self._owner[rank] = session
            self._last_owner_id[rank] = session.instance_id
            self._unserved_since.pop(rank, None)
        self.links_version += 1
        now = time.monotonic()
        for old in replaced:
            if not old.closed and now - old.last_heard < HEALTHY_LINK_HEARD_S:
                self._healthy_takeover(old, session)
            elif old.instance_id == session.instance_id and old.dp_ranks != session.dp_ranks:
                log.warning("agent %s linked again from %s serving ranks %s (its old link from %s served %s): "
                            "replacing the old link; if these are two agents, give each its own --instance-id",
                            session.instance_id, session.peer or "?", list(session.dp_ranks), old.peer or "?",
                            list(old.dp_ranks))
            else:
                log.info("agent %s reconnected; replacing its old link", old.instance_id)
            self.unregister(old)
            old.replaced_by = session.peer or "another link"
            old.close()
        for listener in self._joined_listeners:
            listener(session)
        self._changed(list(session.dp_ranks))

    def _healthy_takeover(self, old: AgentSession, new: AgentSession) -> None:
        """A warning (at most one every TAKEOVER_WARNING_INTERVAL_S, counting the rest) naming both peers."""
        self.healthy_takeovers += 1
        now = time.monotonic()
        held_back = self._takeover_warnings.due(now)
        if held_back is None:
            return
        more = f" ({held_back} more such takeovers since the last warning)" if held_back else ""
        log.warning("agent %s linked from %s serving ranks %s while its link from %s serving %s was healthy (heard "
                    "from %.1f s ago): replacing it (two agents sharing an id take the ranks from each other in turn); "
                    "if these are two agents, give each its own --instance-id%s", new.instance_id, new.peer or "?",
                    list(new.dp_ranks), old.peer or "?", list(old.dp_ranks), now - old.last_heard, more)

    def unregister(self, session: AgentSession) -> None:
        if session not in self._sessions:
            return
        self._sessions.discard(session)
        self._push_fed.difference_update(session.dp_ranks)  # a new link earns it again with its first push
        now = time.monotonic()
        left = [rank for rank in session.dp_ranks if self._owner.get(rank) is session]
        for rank in left:
            del self._owner[rank]
            self._unserved_since[rank] = now
            self._next_forget = min(self._next_forget, now + self.forget_rank_after_s)
        self.links_version += 1
        for listener in self._listeners:
            listener(session)
        if left:
            self._changed(left)

    def sessions(self) -> list[AgentSession]:
        return list(self._sessions)

    def owner(self, rank: int) -> AgentSession | None:
        return self._owner.get(rank)

    def live_ranks(self) -> frozenset[int]:
        return frozenset(self._owner)

    def known_ranks(self) -> dict[int, tuple[str, bool]]:
        """Every rank ever served: (instance id, connected now)."""
        return {r: (iid, r in self._owner) for r, iid in sorted(self._last_owner_id.items())}

    def store(self, snapshots: Iterable[Snapshot], pushed: bool = False) -> None:
        """Keep each snapshot as its rank's newest; tell change listeners which ranks' figures changed."""
        held = self._snapshots
        changed: list[int] | None = [] if self._change_listeners else None  # compared only while watched
        for snap in snapshots:
            rank = snap.load.dp_rank
            if changed is not None:
                before = held.get(rank)
                if before is None or not same_figures(snap.load, before.load):
                    changed.append(rank)
            held[rank] = snap
            if pushed:
                self._push_fed.add(rank)
        self.snapshot_version += 1
        if changed:
            self._changed(changed)

    def push_fed_ranks(self) -> frozenset[int]:
        """Ranks whose agent has pushed on its current link (the push-feed staleness alert watches these)."""
        return frozenset(self._push_fed)

    def _forget_unserved(self) -> None:
        """Drop the snapshots of ranks that have had no agent for forget_rank_after_s: a rank nobody serves
        any more must not ride in every allow_stale answer for ever."""
        now = time.monotonic()
        if now < self._next_forget:
            return
        gone = [r for r, since in self._unserved_since.items() if now - since >= self.forget_rank_after_s]
        for rank in gone:
            del self._unserved_since[rank]
            self._last_owner_id.pop(rank, None)
            if self._snapshots.pop(rank, None) is not None:
                log.info("dp rank %d has had no agent for %.0f s: its last-known load is dropped",
                         rank, self.forget_rank_after_s)
        self._next_forget = min(self._unserved_since.values(), default=math.inf) + self.forget_rank_after_s
        if gone:
            self.snapshot_version += 1

    def snapshot(self, rank: int) -> Snapshot | None:
        if self._unserved_since:
            self._forget_unserved()
        return self._snapshots.get(rank)

    def snapshots(self) -> dict[int, Snapshot]:
        if self._unserved_since:
            self._forget_unserved()
        return dict(self._snapshots)
