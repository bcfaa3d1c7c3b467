"""The benchmark suite still runs: every scenario at tiny size, in real processes over loopback.

This checks that `python -m bench all` works and reports its fields; it asserts nothing about speed
(the numbers at this size mean nothing). Real measurements: `python -m bench all` (see bench/README.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

SCENARIOS = ["storm", "throughput", "fanin", "routers", "watch", "cpu", "push", "freshness", "fleet"]


@pytest.mark.timeout(300)
def test_every_scenario_runs_at_tiny_size_and_reports(tmp_path) -> None:
    pytest.importorskip("aiohttp")
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "bench", "all", "--tiny", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    outcomes = {o["scenario"]: o for o in json.loads((tmp_path / "latest.json").read_text())}
    assert list(outcomes) == SCENARIOS
    for name, outcome in outcomes.items():
        assert outcome["targets"], f"{name} reported no targets"
        assert not outcome["skipped"], f"{name}: {outcome['skipped']}"
        assert outcome["rows"], f"{name} reported no rows"
        assert all(t["met"] in (True, False) for t in outcome["targets"]), name
    markdown = (tmp_path / "latest.md").read_text()
    for name in SCENARIOS:
        assert f"## {name}:" in markdown

    storm = outcomes["storm"]
    servers = {row["server"] for row in storm["rows"]}
    assert servers == {"watching", "queueing", "echo"}
    watching = [row for row in storm["rows"] if row["server"] == "watching"]
    assert all(row["rounds"] >= 1 and row["other_errors"] == 0 for row in watching)
    assert {"p50_ms", "p99_ms", "collects_per_agent", "timeouts"} <= set(storm["rows"][0])
    assert any("CPU per burst" in note for note in storm["notes"])  # what the biggest burst cost each process
    throughput = outcomes["throughput"]
    assert throughput["rows"][0]["server"].startswith("echo") and throughput["rows"][0]["calls_per_s"] > 0
    assert "ncalls" in throughput["details"]  # the aggregator's profile
    fanin = outcomes["fanin"]["rows"]
    assert all(row["rounds"] == 5 and row["peak_rss_mb"] > 0 and row["errors"] == 0 for row in fanin)
    routers = {row["routers poll via"]: row for row in outcomes["routers"]["rows"]}
    assert routers["HTTP /v1/loads x8 per poll"]["scheduler_hits"] > routers["GetLoads JOIN"]["scheduler_hits"] > 0
    # One router alone: one round per poll, so as many hits as polling every rank itself.
    alone = routers["GetLoads JOIN, 1 router alone"]
    assert alone["scheduler_hits"] == routers["HTTP /v1/loads x8 per poll, 1 router alone"]["scheduler_hits"] > 0
    cpu = outcomes["cpu"]["rows"][0]
    assert cpu["rounds"] > 0 and cpu["aggregator_cores"] > 0
    assert all(row["floor_cores"] > 0 for row in outcomes["cpu"]["rows"])  # the bare link floor ran beside each
    fresh = outcomes["freshness"]["rows"]
    ways = {row["way"].split(",")[0].split(" every")[0] for row in fresh}
    assert {"poll /v1/loads 50 ms", "poll /v1/loads 1 s", "WatchLoads 100 ms", "WatchLoads on change",
            "bare relay"} <= ways
    assert all(row["changes_seen"] > 0 and row["errors"] == 0 and row["age_p99_ms"] > 0 for row in fresh)
    assert any(row["way"] == "WatchLoads on change, SMG SubscribeKvEvents records" for row in fresh)
    polled = [row for row in fresh if row["way"].startswith("poll")]
    assert all(row["engine_req_per_s"] > 0 and row["server_cores"] == "-" for row in polled)
    assert all(row["server_cores"] > 0 for row in fresh if row not in polled)
    if importlib.util.find_spec("matplotlib"):  # the bench extra; `make test` installs the test extra only
        assert (tmp_path / "freshness_vs_watchers.png").stat().st_size > 0
    else:
        assert not (tmp_path / "freshness_vs_watchers.png").exists()
    fleet = outcomes["fleet"]["rows"][0]
    assert fleet["pushes_taken_per_s"] > 0 and fleet["aggregator_cores"] > 0 and fleet["errors"] == 0
    assert fleet["age_p99_ms"] > 0 and fleet["engines_per_core"] > 0


def test_failed_calls_are_errors_not_latencies_but_timeouts_stay_at_their_deadline() -> None:
    import grpc

    sys.path.insert(0, str(ROOT))
    from bench.clients import Tally

    class Failure(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode) -> None:
            self._code = code

        def code(self) -> grpc.StatusCode:
            return self._code

        def details(self) -> str:
            return self._code.name

    tally = Tally()
    tally.record(None, Failure(grpc.StatusCode.RESOURCE_EXHAUSTED), 0.0, 0.0)  # shed at once: no latency
    tally.record(None, Failure(grpc.StatusCode.DEADLINE_EXCEEDED), 0.0, 0.0)  # waited its whole deadline
    result = tally.result(1.0)
    assert result["errors"] == {"RESOURCE_EXHAUSTED": 1, "DEADLINE_EXCEEDED": 1}
    assert result["ok"] == 0 and len(tally.latencies) == len(tally.since_burst) == 1
