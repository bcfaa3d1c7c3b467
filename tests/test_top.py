"""`loadagg top` as a real process against a real aggregator: its frames, captured."""

from __future__ import annotations

import asyncio
import sys

from conftest import ROOT


async def _top(port: int, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadagg", "top", "--target", f"127.0.0.1:{port}", "--width", "160", *args,
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
    code, out, err = await _top(agg.port, "--frames", "2", "--interval-ms", "100")
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


async def test_top_once_single_rank_and_errors(start_aggregator, start_agents):
    agg = await start_aggregator(dp_size=2)
    await start_agents(agg, [[0], [1]])
    code, out, _ = await _top(agg.port, "--once", "--dp-rank", "1", "--interval-ms", "100")
    assert code == 0 and out.count("loadagg top ") == 1
    assert "MISSING" not in out and "all ranks answered" in out
    code, _, err = await _top(agg.port, "--once", "--interval-ms", "1")
    assert code == 1 and "INVALID_ARGUMENT" in err and "minimum" in err
