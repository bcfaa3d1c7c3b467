"""`loadagg top` as a real process against a real aggregator: its frames, captured."""

from __future__ import annotations

import asyncio
import signal
import sys

from conftest import ROOT, free_port, wait_for

from loadagg.cli.swarm import SwarmConfig, run_swarm


async def _top(port: int, *args: str, width: int = 160) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadagg", "top", "--target", f"127.0.0.1:{port}", "--width", str(width), *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out.decode(), err.decode()


async def test_top_renders_every_rank_with_missing_ones_highlighted(start_aggregator, start_agents):
    agg = await start_aggregator(dp_size=3)
    await start_agents(agg, [[0], [1]])  # rank 2 never answers
    code, out, err = await _top(agg.port, "--frames", "2", "--interval-ms", "100", "--watch", "interval")
    assert code == 0, err
    frames = [f for f in out.split("loadagg top ") if f.strip()]
    assert len(frames) == 2
    for frame in frames:
        assert f"127.0.0.1:{agg.port}" in frame and "dp_size 3" in frame and "missing: 2" in frame
        rows = {line.split("│")[1].strip(): line for line in frame.splitlines()
                if line.count("│") > 5 and line.split("│")[1].strip().isdigit()}
        assert set(rows) == {"0", "1", "2"}
        assert " ok " in rows["0"] and " ok " in rows["1"] and "MISSING" in rows["2"]
        assert "█" in rows["0"] or "░" in rows["0"]  # the token-usage bar
        assert "GiB" in rows["0"]  # GPU memory from the simulated NVML figures
        assert "total: 2 ranks" in frame
    round_ids = [int(f.split("round ")[1].split()[0]) for f in frames]
    assert round_ids[1] > round_ids[0]  # refreshed by WatchLoads
    assert agg.watch.stats.ticks >= 1


async def test_top_watches_on_change_by_default(start_aggregator, start_agents):
    """Its frames come from WatchLoads on change: the newest figures held (a round first fills what no agent
    pushed yet), then a frame per change or heartbeat, never a round per frame."""
    agg = await start_aggregator(dp_size=3)
    agents = await start_agents(agg, [[0], [1]])
    code, out, err = await _top(agg.port, "--frames", "2", "--interval-ms", "100")
    assert code == 0, err
    frames = [f for f in out.split("loadagg top ") if f.strip()]
    assert len(frames) == 2
    for frame in frames:
        assert "newest figures held (on change)" in frame and "missing: 2" in frame
        rows = {line.split("│")[1].strip(): line for line in frame.splitlines()
                if line.count("│") > 5 and line.split("│")[1].strip().isdigit()}
        assert " ok " in rows["0"] and " ok " in rows["1"] and "MISSING" in rows["2"]
    assert agg.watch.stats.ticks == 0 and agg.watch.stats.change_answers >= 1
    # Rounds: the one that filled the first frame, then at most one per heartbeat (these agents never push).
    assert 1 <= agg.communicator.stats.rounds_started <= 3
    assert all(a.collects_received == agg.communicator.stats.rounds_started for a in agents)


async def test_top_at_80_columns_keeps_every_rank_state_and_count(start_aggregator, start_agents):
    """A pipe is 80 columns: the full table (bars, rules) needs ~125, and rich used to squeeze rank, state
    and the request counts to nothing. The compact layout keeps them, with usage as a percentage."""
    agg = await start_aggregator(dp_size=3)
    await start_agents(agg, [[0], [1]])
    code, out, err = await _top(agg.port, "--once", "--interval-ms", "100", width=80)
    assert code == 0, err
    assert all(len(line) <= 80 for line in out.splitlines())
    lines = [line.split() for line in out.splitlines()]
    header = lines.index(["rank", "state", "run", "wait", "usage", "tokens", "tok/s", "hit", "gpu", "GiB", "age",
                          "ms"])
    rows = {words[0]: words for words in lines[header + 1:]
            if len(words) > 1 and words[1] in ("ok", "STALE", "MISSING")}
    assert set(rows) == {"0", "1", "2"}
    assert rows["0"][1] == rows["1"][1] == "ok" and rows["2"][1] == "MISSING"
    assert rows["0"][2].isdigit() and rows["0"][3].isdigit() and rows["0"][4].endswith("%")


async def test_top_once_single_rank_and_errors(start_aggregator, start_agents):
    agg = await start_aggregator(dp_size=2)
    await start_agents(agg, [[0], [1]])
    code, out, _ = await _top(agg.port, "--once", "--dp-rank", "1", "--interval-ms", "100")
    assert code == 0 and out.count("loadagg top ") == 1
    assert "MISSING" not in out and "all ranks answered" in out
    code, _, err = await _top(agg.port, "--once", "--interval-ms", "1")
    assert code == 1 and "INVALID_ARGUMENT" in err and "minimum" in err


async def test_live_top_rides_out_an_aggregator_restart(start_aggregator, start_agents):
    """Until Ctrl-C, `loadagg top` keeps resubscribing while the aggregator is away (2 s here) and shows
    frames again once it is back; it used to exit after ~0.75 s of retries."""
    port = free_port()
    agg = await start_aggregator(dp_size=1, port=port)
    await start_agents(agg, [[0]])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadagg", "top", "--target", f"127.0.0.1:{port}", "--width", "160",
        "--interval-ms", "100", cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    seen = bytearray()

    def frames() -> int:
        return seen.count(b"loadagg top ")

    async def pump() -> None:
        while chunk := await proc.stdout.read(4096):
            seen.extend(chunk)

    reader = asyncio.create_task(pump())
    try:
        await wait_for(lambda: frames() >= 2, timeout=20, what="frames before the restart")
        await agg.stop(0)
        await asyncio.sleep(2.0)
        before = frames()
        assert proc.returncode is None  # still waiting for the aggregator
        agg = await start_aggregator(dp_size=1, port=port)
        await start_agents(agg, [[0]])
        await wait_for(lambda: frames() >= before + 2, timeout=20, what="frames after the restart")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        reader.cancel()
    assert proc.returncode == 0



async def test_top_shows_the_coalescing_line_from_the_aggregators_metrics(start_aggregator, start_agents):
    agg = await start_aggregator(dp_size=2, http_port=0)
    await start_agents(agg, [[0], [1]], collect_latency_ms=20)
    stop = asyncio.Event()
    routers = asyncio.create_task(run_swarm(SwarmConfig(f"127.0.0.1:{agg.port}", routers=20, interval_ms=50), stop))
    metrics_url = f"http://127.0.0.1:{agg.http_port}/metrics"
    try:
        code, out, err = await _top(agg.port, "--frames", "3", "--interval-ms", "500", "--metrics-url", metrics_url)
    finally:
        stop.set()
        await routers
    assert code == 0, err
    frames = [f for f in out.split("loadagg top ") if f.strip()]
    lines = [next(line for line in frame.splitlines() if line.startswith("router calls ")) for frame in frames]
    assert "since start" in lines[0] and "router calls -" in lines[0]  # one reading: no rate yet
    callers = float(lines[-1].split("callers per round ")[1].split()[0])
    saved = float(lines[-1].split("engine reads saved ")[1].split(" %")[0])
    calls = float(lines[-1].split("router calls ")[1].split("/s")[0].replace(",", ""))
    assert calls > 0 and callers > 1 and saved > 50, lines[-1]
    assert "each of 2 engine(s)" in lines[-1]

    code, out, _ = await _top(agg.port, "--once", "--interval-ms", "100")  # no metrics URL: no line
    assert code == 0 and "router calls" not in out and "metrics" not in out
    unreachable = f"http://127.0.0.1:{free_port()}/metrics"
    code, out, _ = await _top(agg.port, "--once", "--interval-ms", "100", "--metrics-url", unreachable)
    assert code == 0 and f"metrics: cannot read {unreachable}" in out and "total: 2 ranks" in out
