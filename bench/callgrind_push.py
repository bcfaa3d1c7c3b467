"""Instructions per pushed report, counted by valgrind's callgrind: the same whatever else the box is doing.

`python -m bench.callgrind_push aggregator|floor [--agents 10 --ranks-per-agent 4 --seconds 10]` runs the
aggregator (bench.agg_proc) or the bare AgentLink floor (bench.link_floor_proc) under callgrind, links real
agents pushing at 10 Hz, counts instructions over the window only, and prints the total per push received.
`callgrind_annotate --inclusive=yes /tmp/callgrind.<which>.1` shows where they go, gRPC's C core and protobuf's
upb included. On a 2-core shared box CPU seconds swing ±15 % from minute to minute; instruction counts do not
(they leave out the kernel's share, which is most of the floor's cost: read them as a change's size, not as
the CPU ratio the `cpu` scenario measures).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

from bench.procs import Child, _link_agents


class CallgrindChild(Child):
    """A bench child under callgrind, instrumentation off until `callgrind("--instr=on")`."""

    def __init__(self, module: str, *args: str, out: str) -> None:
        super().__init__(module, *args, wrapper=("valgrind", "--tool=callgrind", "--instr-atstart=no",
                                                 f"--callgrind-out-file={out}"))

    def callgrind(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.pid)], check=True, capture_output=True, timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=("aggregator", "floor"))
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--ranks-per-agent", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    dp_size = args.agents * args.ranks_per_agent
    out = f"/tmp/callgrind.{args.which}"
    for old in [p for p in os.listdir("/tmp") if p.startswith(f"callgrind.{args.which}")]:
        os.remove(f"/tmp/{old}")  # an earlier run's dumps
    if args.which == "floor":
        server = CallgrindChild("bench.link_floor_proc", "--dp-size", str(dp_size), "--collect-interval-ms", "0",
                                out=out)
    else:
        server = CallgrindChild("bench.agg_proc", "--dp-size", str(dp_size), out=out)
    cluster = _link_agents(server, dp_size, processes=1, ranks_per_agent=args.ranks_per_agent, push_interval_ms=100)
    try:
        time.sleep(3)  # past the links' first pushes
        before = cluster.agent_stats()["pushes_sent"]
        server.callgrind("--instr=on")
        time.sleep(args.seconds)
        server.callgrind("--instr=off")
        pushes = cluster.agent_stats()["pushes_sent"] - before
        server.callgrind("--dump")
    finally:
        cluster.close()
    dumps = sorted(p for p in os.listdir("/tmp") if p.startswith(f"callgrind.{args.which}."))
    totals = subprocess.run(["callgrind_annotate", f"/tmp/{dumps[-1]}"], capture_output=True, text=True).stdout
    total = next(int(line.split()[0].replace(",", "")) for line in totals.splitlines() if "PROGRAM TOTALS" in line)
    print(f"{args.which}: {pushes} pushes of {args.ranks_per_agent} ranks, {total:,} instructions, "
          f"{total / max(pushes, 1):,.0f} per push (/tmp/{dumps[-1]})")


if __name__ == "__main__":
    main()
