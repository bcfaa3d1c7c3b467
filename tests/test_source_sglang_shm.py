"""`--source sglang-shm`: sglang 0.5.23's own ShmLoadSnapshotWriter writes a real shared-memory file; the agent
watches it, in process and as a real process in front of a real aggregator."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import struct

import pytest
from agent_tasks import cached_until
from conftest import wait_for
from sglang_engine import Sglang0523Engine, ShmLoadSnapshotWriter, load_snapshot, snapshot

from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.sources.base import PartialRead, SourceError
from scheduler_agent.sources.sglang_shm import SglangShmSource, ShmFile, find_shm, refuse_several


@pytest.fixture
def shm_file(tmp_path):
    """Writers of a dp_size-2 file at a path of the test's own (other sessions' engines may share /dev/shm)."""
    path = str(tmp_path / "sglang_loads_test_0000.shm")
    writers = [ShmLoadSnapshotWriter(path, 2, r) for r in range(2)]
    for rank, writer in enumerate(writers):
        writer.write(snapshot(rank))
    yield path, writers
    for writer in writers:
        writer.close()


async def _source(path: str) -> SglangShmSource:
    source = SglangShmSource(path, watch_s=0.002)
    await source.discover()
    return source


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _slot(rank: int) -> int:
    return load_snapshot.slot_offset(rank)


async def test_a_written_change_is_held_and_pushed_within_a_tick(shm_file):
    path, writers = shm_file
    source = await _source(path)
    try:
        first = await source.read([0, 1])
        assert first[1].num_running_reqs == 3 and first[1].memory.kv_cache_gb == 40.0
        assert (first[1].num_active_tokens, first[1].queues.prealloc_ready, first[1].max_total_num_tokens) == \
               (4500, 2, 262144)
        assert not first[1].HasField("detail_age_ms")  # one read gives every figure
        changed = asyncio.Event()
        source.add_listener(changed.set)
        writers[1].write(snapshot(1, running=19, total_prefill_uncached_tokens=12_000, total_prefill_busy_us=2_500_000))
        await asyncio.wait_for(changed.wait(), 2)
        one = (await source.read([1]))[1]
        assert one.num_running_reqs == 19 and one.prefill_throughput == pytest.approx(4000.0)
        assert one.age_ms < 1000
    finally:
        await source.close()


def test_discovery_takes_the_one_file_and_names_several(tmp_path):
    with pytest.raises(SourceError, match="no sglang load snapshot file"):
        find_shm("", str(tmp_path))
    one = tmp_path / "sglang_loads_a_1.shm"
    one.write_bytes(b"")
    assert find_shm("", str(tmp_path)) == str(one)
    refuse_several(str(tmp_path))
    two = tmp_path / "sglang_loads_b_2.shm"
    two.write_bytes(b"")
    with pytest.raises(SourceError, match=f"2 sglang load snapshot files in {tmp_path}: {one}, {two}; give --shm-path"):
        find_shm("", str(tmp_path))
    with pytest.raises(ValueError, match="give --shm-path"):
        refuse_several(str(tmp_path))


@pytest.mark.parametrize("offset, data, message", [
    (0, b"XXXX", r"magic b'XXXX', not b'SLNS'"),
    (4, struct.pack("<H", 3), "snapshot layout version 3; this agent reads version 2"),
    (6, struct.pack("<H", 9), "dp_size 9 of 16384-byte slots needs"),
    (8, struct.pack("<I", 1 << 30), "1073741824-byte slots: not a layout sglang writes"),
])
def test_a_header_that_is_not_sglangs_is_refused_saying_what_was_found(shm_file, offset, data, message):
    path, _ = shm_file
    _patch(path, offset, data)
    with pytest.raises(SourceError, match=message):
        ShmFile(path)


def test_a_truncated_file_is_refused(shm_file):
    path, _ = shm_file
    os.truncate(path, 100)
    with pytest.raises(SourceError, match="100 bytes, but dp_size 2 of 16384-byte slots needs 32780: truncated"):
        ShmFile(path)


async def test_bad_slots_fail_their_rank_only_and_a_good_write_recovers(shm_file, caplog):
    path, writers = shm_file
    source = await _source(path)
    caplog.set_level(logging.INFO)
    try:
        _patch(path, _slot(1), struct.pack("<I", 20_000))  # longer than the slot
        await wait_for(lambda: "exceeds" in source.held.rank(1).problem, what="oversized slot noticed")
        with pytest.raises(PartialRead, match="rank 1: slot length 20000 exceeds the slot's 16380 bytes") as failed:
            await source.read([0, 1])
        assert list(failed.value.loads) == [0]  # rank 0 keeps serving
        _patch(path, _slot(1), struct.pack("<I", 6) + b"\xc1garbg")
        await wait_for(lambda: "not a LoadSnapshot" in source.held.rank(1).problem, what="garbage slot noticed")
        writers[1].write(snapshot(1, running=8))
        await wait_for(lambda: source.held.load(1) is not None, what="recovered")
        assert (await source.read([1]))[1].num_running_reqs == 8
        assert caplog.text.count("rank 1 slot length") == 1 and caplog.text.count("rank 1 recovered") == 1
    finally:
        await source.close()


async def test_a_slot_caught_mid_write_keeps_the_last_figures(shm_file):
    path, writers = shm_file
    source = await _source(path)
    try:
        _patch(path, _slot(0), struct.pack("<I", 0))  # between the writer's two length stores
        ticks = source.ticks
        await wait_for(lambda: source.ticks > ticks + 5, what="ticks")
        assert (await source.read([0]))[0].num_running_reqs == 3  # not failed, not a made-up figure
        with open(path, "rb") as held:  # a writer holding its exclusive lock: the watch waits, never blocks
            fcntl.flock(held, fcntl.LOCK_EX)
            busy = source.busy_ticks
            await wait_for(lambda: source.busy_ticks > busy + 3, what="busy ticks")
            fcntl.flock(held, fcntl.LOCK_UN)
        writers[0].write(snapshot(0, running=6))
        await wait_for(lambda: source.held.load(0).num_running_reqs == 6, what="next write read")
    finally:
        await source.close()


async def test_a_replaced_file_is_opened_again(shm_file):
    path, writers = shm_file
    source = await _source(path)
    try:
        os.unlink(path)  # the engine restarts: a new file at the same path
        fresh = [ShmLoadSnapshotWriter(path, 2, r) for r in range(2)]
        for rank, writer in enumerate(fresh):
            writer.write(snapshot(rank, running=30 + rank))
        await wait_for(lambda: (source.held.load(1) or pb.RankLoad()).num_running_reqs == 31, timeout=5,
                       what="the new file read")
        for writer in fresh:
            writer.close()
    finally:
        await source.close()


async def test_agent_process_carries_a_snapshot_change_to_a_cached_answer_without_round(
        tmp_path, start_aggregator, channel_to, processes):
    path = str(tmp_path / "sglang_loads_proc_0000.shm")
    engine = Sglang0523Engine(2, feed=False, shm_path=path)
    await engine.start()
    agg = await start_aggregator(dp_size=2, round_timeout_ms=1000)
    channel = channel_to(agg.port)
    processes.start("scheduler_agent", "--source", "sglang-shm", "--shm-path", path, "--no-gpu",
                    "--aggregator", f"127.0.0.1:{agg.port}", env={"LOADAGG_INSTANCE_ID": "shm-agent"})
    try:
        await wait_for(lambda: agg.registry.live_ranks() == {0, 1}, timeout=30, what="agent linked")
        await wait_for(lambda: all(agg.registry.snapshot(r) is not None for r in (0, 1)), timeout=10, what="pushes")
        rounds = agg.communicator.stats.rounds_started
        engine.set(0, num_running_reqs=55, num_prealloc_ready_tokens=99)
        answer = await cached_until(channel, 0, 55)
        assert answer.loads[0].num_running_reqs == 55 and answer.loads[0].num_prealloc_ready_tokens == 99
        assert agg.communicator.stats.rounds_started == rounds and sum(engine.hits.values()) == 0
        assert agg.registry.owner(0).source == "sglang-shm"
    finally:
        await engine.stop_all()


async def test_a_restarted_engines_new_file_is_followed_once_the_old_one_is_quiet(tmp_path, monkeypatch):
    """sglang names each launch's file afresh (`sglang_loads_<instance id>_<hash>.shm`) and never removes the
    last one: after a restart the old file stays, quiet, beside the new one. A discovering agent follows the
    file that appeared once its own has not changed for the quiet bound."""
    monkeypatch.setattr("scheduler_agent.sources.sglang_shm.QUIET_S", 0.3)
    monkeypatch.setattr("scheduler_agent.sources.sglang_shm.REOPEN_CHECK_S", 0.1)
    old = [ShmLoadSnapshotWriter(str(tmp_path / "sglang_loads_aaa_1.shm"), 2, r) for r in range(2)]
    for rank, writer in enumerate(old):
        writer.write(snapshot(rank))
    source = SglangShmSource("", watch_s=0.002, directory=str(tmp_path))
    await source.discover()
    try:
        assert (await source.read([1]))[1].num_running_reqs == 3
        new = [ShmLoadSnapshotWriter(str(tmp_path / "sglang_loads_bbb_2.shm"), 2, r) for r in range(2)]
        for rank, writer in enumerate(new):
            writer.write(snapshot(rank, running=40 + rank))
        await wait_for(lambda: (source.held.load(1) or pb.RankLoad()).num_running_reqs == 41, timeout=5,
                       what="the new file followed")
        assert source.file.path.endswith("sglang_loads_bbb_2.shm")
        for writer in new:
            writer.close()
    finally:
        for writer in old:
            writer.close()
        await source.close()


_CUT_UNDER_THE_MAP = """
import asyncio, os, sys
from sglang_engine import ShmLoadSnapshotWriter, snapshot
from conftest import wait_for
from scheduler_agent.sources.sglang_shm import SglangShmSource

async def main(path):
    writers = [ShmLoadSnapshotWriter(path, 2, r) for r in range(2)]
    for rank, writer in enumerate(writers):
        writer.write(snapshot(rank))
    source = SglangShmSource(path, 0.002)
    await source.discover()
    os.truncate(path, 100)  # cut short while mapped: a read past the end is SIGBUS
    await wait_for(lambda: "truncated" in source.held.rank(1).problem, what="the cut noticed")
    again = [ShmLoadSnapshotWriter(path, 2, r) for r in range(2)]  # written again, whole
    for rank, writer in enumerate(again):
        writer.write(snapshot(rank, running=7))
    await wait_for(lambda: (source.held.load(1) or snapshot(1, running=0)).num_running_reqs == 7, timeout=5,
                   what="recovered")
    print("served on")
    await source.close()

asyncio.run(main(sys.argv[1]))
"""


def test_a_file_cut_short_under_the_map_fails_its_ranks_and_never_kills_the_agent(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent
    done = subprocess.run([sys.executable, "-c", _CUT_UNDER_THE_MAP, str(tmp_path / "sglang_loads_cut_1.shm")],
                          cwd=tests, env={**os.environ, "PYTHONPATH": str(tests)}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "served on" in done.stdout, (done.returncode, done.stderr[-2000:])


async def test_opening_never_waits_on_a_lock_a_writer_keeps(shm_file):
    """The open takes its shared lock without waiting (it runs on the event loop): a lock a writer keeps
    is a SourceError, opened again later, never a loop stuck in flock."""
    path, _ = shm_file
    with open(path, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            with pytest.raises(SourceError, match="holds the file's lock"):
                await asyncio.wait_for(asyncio.to_thread(ShmFile, path), 2)
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
    ShmFile(path).close()


async def test_a_snapshot_an_hour_old_is_not_presented_as_fresh(shm_file):
    """The age is the scheduler's own stamp's (same host clock), however old: a dead engine's file found
    later is failed as past the age bound, never read as figures taken now. A stamp of 0 (the writer's
    first, empty snapshot) counts as taken now."""
    import time

    path, writers = shm_file
    writers[1].write(snapshot(1, timestamp=time.time() - 7200))
    writers[0].write(snapshot(0, timestamp=0.0))
    source = await _source(path)
    try:
        with pytest.raises(PartialRead, match=r"^rank 1: its last figures are over 3600 s old$") as old:
            await source.read([0, 1])
        assert old.value.loads[0].age_ms < 1000
    finally:
        await source.close()
