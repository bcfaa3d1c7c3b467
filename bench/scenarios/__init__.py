"""One module per scenario; each exposes `run(tiny: bool) -> Outcome`."""

from __future__ import annotations

from bench.scenarios import cpu, fanin, fleet, freshness, push, routers, storm, throughput, watch

SCENARIOS = {
    "storm": storm.run,
    "throughput": throughput.run,
    "fanin": fanin.run,
    "routers": routers.run,
    "watch": watch.run,
    "cpu": cpu.run,
    "push": push.run,
    "freshness": freshness.run,
    "fleet": fleet.run,
}
