"""SglangShmSource: sglang's shared-memory load snapshots (`/dev/shm/sglang_loads_*.shm`), for an agent on the
engine's node.

Since 0.5.23 every scheduler writes a `LoadSnapshot` into one file that `/v1/loads` itself reads: a header
(`<4sHHI`: magic `SLNS`, version 2, dp_size, slot size), then one slot per rank (a 4-byte little-endian
length, then the msgpack snapshot). Writers hold an exclusive `flock` while they write; this source reads
under a shared one, as sglang's own reader does, and never waits for it: a slot caught mid-write is looked
at again on the next tick. It watches the slots every few milliseconds and pushes a rank as soon as its
bytes change, so a change costs the engine nothing (no request, no socket).

A header that is not sglang's (magic, version, a slot or file size that does not fit dp_size) is refused
with what was found; a slot whose length does not fit, or whose bytes are not a LoadSnapshot, fails that
rank with the reason until a good snapshot replaces it. A restarted engine writes a new file (sglang names
each launch's afresh and never removes the last): a discovering source follows the file that appeared once its
own has gone quiet, and a file replaced at the same path is opened again; the older figures are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import logging
import mmap
import os
import struct
import time
from collections.abc import Sequence

from loadagg.common import field_default
from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.config import AgentConfig
from scheduler_agent.sources.base import EngineRanks, SourceError
from scheduler_agent.sources.held import HeldLoads, HeldSource, now_s, stop_task
from scheduler_agent.sources.sglang_wire import PrefillRate, decode_snapshot, load_from_snapshot

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
SHM_PATTERN = "sglang_loads_*.shm"
MAGIC = b"SLNS"
VERSION = 2
HEADER = struct.Struct("<4sHHI")
SLOT_LEN = struct.Struct("<I")
MAX_SLOT_BYTES = 1 << 20  # sglang's slots are 16 KiB; past 1 MiB per rank it is not its file
MAX_DP_SIZE = 4096
LOCK_TRIES = 20  # 0.1 ms apart: an open never holds the event loop for more than ~2 ms waiting on a writer
REOPEN_CHECK_S = 1.0  # how often the path is checked for a new file (an engine restarted)
QUIET_S = 3.0  # a file unchanged this long, beside one that appeared after it, is a stopped engine's


def _several(candidates: list[str], directory: str) -> str:
    return (f"{len(candidates)} sglang load snapshot files in {directory}: {', '.join(candidates)}; "
            "give --shm-path to say which engine this agent serves")


def shm_candidates(directory: str = SHM_DIR) -> list[str]:
    """The sglang snapshot files in `directory`, sorted."""
    return sorted(glob.glob(os.path.join(directory, SHM_PATTERN)))


def find_shm(path: str = "", directory: str = SHM_DIR) -> str:
    """`path`, or the one sglang snapshot file in `directory`; SourceError naming what is there otherwise."""
    if path:
        return path
    candidates = shm_candidates(directory)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise SourceError(f"no sglang load snapshot file ({SHM_PATTERN}) in {directory}: is the engine (0.5.23 "
                          f"or newer) up, and does this container share its {directory}? Or give --shm-path")
    raise SourceError(_several(candidates, directory))


def refuse_several(directory: str = SHM_DIR) -> None:
    """ValueError (a usage error at start-up) when several engines' files are there and no path says which."""
    candidates = shm_candidates(directory)
    if len(candidates) > 1:
        raise ValueError(_several(candidates, directory))


class ShmFile:
    """One opened snapshot file: its header checked, mapped read-only."""

    def __init__(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as error:
            raise SourceError(f"{path}: cannot open ({error.strerror})") from None
        try:
            stat = os.fstat(fd)
            if stat.st_size < HEADER.size:
                raise SourceError(f"{path}: {stat.st_size} bytes, shorter than a header: not an sglang snapshot file")
            with _shared(fd, path):
                self.map = mmap.mmap(fd, stat.st_size, access=mmap.ACCESS_READ)
            magic, version, dp_size, slot_size = HEADER.unpack_from(self.map, 0)
            if magic != MAGIC:
                raise SourceError(f"{path}: magic {magic!r}, not {MAGIC!r}: not an sglang load snapshot file")
            if version != VERSION:
                raise SourceError(f"{path}: snapshot layout version {version}; this agent reads version {VERSION} "
                                  "(sglang 0.5.23)")
            if not 0 < dp_size <= MAX_DP_SIZE or not SLOT_LEN.size < slot_size <= MAX_SLOT_BYTES:
                raise SourceError(f"{path}: header says dp_size {dp_size} and {slot_size}-byte slots: not a layout "
                                  "sglang writes")
            needed = HEADER.size + dp_size * slot_size
            if stat.st_size < needed:
                raise SourceError(f"{path}: {stat.st_size} bytes, but dp_size {dp_size} of {slot_size}-byte slots "
                                  f"needs {needed}: truncated")
        except BaseException:
            with contextlib.suppress(Exception):
                self.map.close()
            os.close(fd)
            raise
        self.path, self.fd, self.inode = path, fd, stat.st_ino
        self.dp_size, self.slot_size, self.needed = dp_size, slot_size, needed

    def slots(self) -> list[bytes] | None:
        """Every slot's length prefix and payload, read under a shared lock; None while a writer holds it.
        SourceError when the file was cut short under the map (reading past its end would kill the process)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        try:
            size = os.fstat(self.fd).st_size
            if size < self.needed:
                raise SourceError(f"{self.path}: cut to {size} bytes while read (dp_size {self.dp_size} needs "
                                  f"{self.needed}): truncated")
            out = []
            for rank in range(self.dp_size):
                offset = HEADER.size + rank * self.slot_size
                (length,) = SLOT_LEN.unpack_from(self.map, offset)
                end = offset + SLOT_LEN.size + min(length, self.slot_size - SLOT_LEN.size)
                out.append(self.map[offset:end])
            return out
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


@contextlib.contextmanager
def _shared(fd: int, path: str):
    """The shared lock, taken without waiting on the event loop: a writer holds its lock for microseconds, so a
    few tries cover it; one kept longer is a SourceError (the file is opened again later)."""
    for _ in range(LOCK_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            time.sleep(0.0001)
    else:
        raise SourceError(f"{path}: a writer holds the file's lock: opened again shortly")
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


class SglangShmSource(HeldSource):
    """Watches one sglang snapshot file and holds each rank's newest snapshot."""

    name = "sglang-shm"
    pushes = True

    def __init__(self, path: str = "", watch_s: float = field_default(AgentConfig, "shm_watch_ms") / 1000,
                 directory: str = SHM_DIR) -> None:
        self.configured = path
        self.directory = directory
        self.watch_s = watch_s
        self.held = HeldLoads(self.name, ())
        self.rates = PrefillRate()
        self.file: ShmFile | None = None
        self.ticks = 0
        self.busy_ticks = 0  # ticks that found a writer holding the lock
        self._last: dict[int, bytes] = {}
        self._watcher: asyncio.Task | None = None
        self._checked = 0.0
        self._changed_at = 0.0  # when a slot of the open file last changed
        self._known: set[str] = set()  # the candidates there when it was opened
        self._followed = ""  # the file a restart was followed to: discovery would find two

    def _open(self) -> ShmFile:
        if self.file is None:
            followed = self._followed if self._followed and os.path.exists(self._followed) else ""
            self.file = ShmFile(followed or find_shm(self.configured, self.directory))
            self._known, self._changed_at = set(shm_candidates(self.directory)), now_s()
            log.info("sglang-shm: reading %s (dp_size %d, %d-byte slots) every %.1f ms", self.file.path,
                     self.file.dp_size, self.file.slot_size, self.watch_s * 1000)
        return self.file

    async def discover(self) -> EngineRanks:
        shm = self._open()
        if self._watcher is None:
            self._tick()
            self._watcher = asyncio.create_task(self._watch(), name="sglang-shm-watch")
        return EngineRanks(tuple(range(shm.dp_size)), shm.dp_size)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.watch_s)
            try:
                self._tick()
            except SourceError as error:  # the file went bad or away: every rank fails until it is back
                self._drop(str(error))
                await asyncio.sleep(REOPEN_CHECK_S)

    def _drop(self, problem: str) -> None:
        ranks = range(self.file.dp_size) if self.file is not None else list(self.held.ranks)
        if self.file is not None:
            self.file.close()
            self.file = None
        self._last.clear()
        for rank in ranks:
            self.held.forget(rank)
            self.rates.reset(rank)
            self.held.fail(rank, problem)

    def _tick(self) -> None:
        """Look at every slot once; a rank whose bytes changed gets its new figures (or its failure)."""
        self.ticks += 1
        now = now_s()
        if self.file is not None and now - self._checked >= REOPEN_CHECK_S:
            self._checked = now
            try:
                replaced = os.stat(self.file.path).st_ino != self.file.inode
            except OSError:
                replaced = True
            if replaced:
                log.info("sglang-shm: %s was replaced (the engine restarted): opening it again", self.file.path)
                self._drop("the snapshot file was replaced")
            elif not self.configured and now - self._changed_at >= QUIET_S:
                self._follow_restart()
        shm = self._open()
        slots = shm.slots()
        if slots is None:
            self.busy_ticks += 1
            return
        for rank, raw in enumerate(slots):
            if raw != self._last.get(rank):
                self._last[rank], self._changed_at = raw, now
                self._take(rank, raw, shm)

    def _follow_restart(self) -> None:
        """Our file is quiet: open the newest file that appeared since (a restarted engine's), if any."""
        assert self.file is not None
        appeared = []
        for path in set(shm_candidates(self.directory)) - self._known:
            with contextlib.suppress(OSError):
                appeared.append((os.stat(path).st_mtime, path))
        if not appeared:
            return
        newest = max(appeared)[1]
        log.info("sglang-shm: %s has not changed for %.0f s and %s appeared since (the engine restarted): "
                 "reading it", self.file.path, now_s() - self._changed_at, newest)
        self._drop("the engine restarted into another snapshot file")
        self._followed = newest
        self._open()

    def _take(self, rank: int, raw: bytes, shm: ShmFile) -> None:
        (length,) = SLOT_LEN.unpack_from(raw, 0)
        if length == 0:  # not written yet, or caught between a writer's two length stores: next tick
            return
        capacity = shm.slot_size - SLOT_LEN.size
        if length > capacity:
            self.held.fail(rank, f"slot length {length} exceeds the slot's {capacity} bytes (a torn or foreign file)")
            return
        self.held.take(rank, lambda: self._convert(rank, raw), "a LoadSnapshot")

    def _convert(self, rank: int, raw: bytes) -> tuple[pb.RankLoad, float | None]:
        snapshot = decode_snapshot(raw[SLOT_LEN.size:])
        if snapshot.dp_rank != rank:
            raise SourceError(f"slot {rank} holds a snapshot of dp_rank {snapshot.dp_rank}")
        # The scheduler's own stamp, same host clock, however old (a dead engine's file); 0 is the writer's
        # first, empty snapshot, and a stamp ahead a clock step: both count as taken now.
        lag = time.time() - snapshot.timestamp
        return (load_from_snapshot(snapshot, time.time_ns() // 1_000_000, self.rates),
                now_s() - lag if snapshot.timestamp > 0 and lag > 0 else None)

    async def read(self, ranks: Sequence[int]) -> dict[int, pb.RankLoad]:
        return self.held.read(ranks)

    async def close(self) -> None:
        await stop_task(self._watcher)
        self._watcher = None
        if self.file is not None:
            self.file.close()
            self.file = None
