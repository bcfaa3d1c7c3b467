"""AgentRegistry: which agent serves which dp ranks, connected or not, and each rank's last snapshot."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from loadagg.server.errors import RankConflict
from loadagg.v1 import loadagg_pb2 as pb

log = logging.getLogger(__name__)

MAX_PENDING_NOTICES = 64


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
    warned_at: float = -math.inf  # when a rejected report of this link was last logged as a warning
    unwarned: int = 0  # rejected reports since then, logged at DEBUG only
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


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A rank's last accepted load and when we received it (monotonic, for ages)."""

    load: pb.RankLoad
    received: float

    def age_ms(self, now: float) -> int:
        return max(0, int((now - self.received) * 1000))


class AgentRegistry:
    """Owns rank ownership rules: one live agent per rank; the same instance reconnecting replaces itself."""

    def __init__(self, dp_size: int) -> None:
        self.dp_size = dp_size
        self._owner: dict[int, AgentSession] = {}
        self._last_owner_id: dict[int, str] = {}
        self._snapshots: dict[int, Snapshot] = {}
        self._sessions: set[AgentSession] = set()
        self._push_fed: set[int] = set()  # ranks whose current link has pushed figures unasked
        self._listeners: list[Callable[[AgentSession], None]] = []
        self._joined_listeners: list[Callable[[AgentSession], None]] = []
        self.snapshot_version = 0

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
        for old in replaced:
            if old.instance_id == session.instance_id and old.dp_ranks != session.dp_ranks:
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

    def unregister(self, session: AgentSession) -> None:
        if session not in self._sessions:
            return
        self._sessions.discard(session)
        self._push_fed.difference_update(session.dp_ranks)  # a new link earns it again with its first push
        for rank in session.dp_ranks:
            if self._owner.get(rank) is session:
                del self._owner[rank]
        for listener in self._listeners:
            listener(session)

    def sessions(self) -> list[AgentSession]:
        return list(self._sessions)

    def owner(self, rank: int) -> AgentSession | None:
        return self._owner.get(rank)

    def live_ranks(self) -> frozenset[int]:
        return frozenset(self._owner)

    def known_ranks(self) -> dict[int, tuple[str, bool]]:
        """Every rank ever served: (instance id, connected now)."""
        return {r: (iid, r in self._owner) for r, iid in sorted(self._last_owner_id.items())}

    def store(self, loads: Iterable[pb.RankLoad], now: float | None = None, pushed: bool = False) -> None:
        now = time.monotonic() if now is None else now
        for load in loads:
            self._snapshots[load.dp_rank] = Snapshot(load, now)
            if pushed:
                self._push_fed.add(load.dp_rank)
        self.snapshot_version += 1

    def push_fed_ranks(self) -> frozenset[int]:
        """Ranks whose agent has pushed on its current link (the push-feed staleness alert watches these)."""
        return frozenset(self._push_fed)

    def snapshot(self, rank: int) -> Snapshot | None:
        return self._snapshots.get(rank)

    def snapshots(self) -> dict[int, Snapshot]:
        return dict(self._snapshots)
