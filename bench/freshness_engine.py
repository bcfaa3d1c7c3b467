"""Child: scheduler-side changes for the freshness scenario, and the engines' surfaces that carry them.

`--engines E --ranks-per-engine R` engines, each rank's figures changing every `--change-ms` on average (the
ranks in turn, each step drawn uniformly between half and one and a half of its mean, so changes never fall
in step with a poller's period: a fixed schedule beside a 50 ms poll would leave one router only a few
distinct ages). A change's wall-clock time (µs, mod 10^12) rides in its `num_used_tokens`, so whoever
sees the figures knows how old the change is (every process here shares the machine's clock).

Each engine serves sglang's `GET /v1/loads` (its ranks' entries, counted as engine requests) and, with
`--agents-to HOST:PORT`, runs one real SchedulerAgent per engine linked there:
* `--agent-source http`: the agent's sglang HTTP source reads that endpoint (a request per collect or push);
* `--agent-source published`: the engine hands each change to its agent in process (`agent.publish`, the
  PublishedSource an embedded scheduler uses: no request at all) and the agent pushes every
  `--push-interval-ms` what changed: today's push path.
* `--agent-source sglang-feed` / `sglang-shm`: one sglang 0.5.23 engine of every rank, run by sglang's own
  load publisher (its ZMQ load feed) or snapshot writer (shared memory), as the source tests drive them
  (tests/sglang_engine.py), and a real `scheduler-agent` process in front of it with that push source.
* `--agent-source smg-stream`: one sglang engine of every rank behind SMG's gRPC servicer (tests/smg_engine.py),
  each change a scheduler step whose KV-event batch carries the load record smg-grpc-servicer's own
  LoadRecorder stamps (engine_load_from), and a real `scheduler-agent` process subscribed to that stream. A
  record has no figure wide enough for a time stamp: a change's sequence number rides in the rank's
  `num_running_reqs` instead, and its time goes to `--stamps-file` (a line "sequence stamp_us" per change),
  where the load generator looks it up.
Prints {"ports", "pid"} (then {"ready"} once the agents linked); "stats": requests, changes, CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import subprocess
import sys
import tempfile
import time

from aiohttp import web

from bench.child import emit, own_usage, run, serve_until_quit
from bench.http_ranks import serve_v1_loads
from bench.procs import ROOT
from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.agent import SchedulerAgent
from scheduler_agent.config import AgentConfig
from scheduler_agent.sources.sglang_http import SglangHttpSource

TESTS = os.path.join(ROOT, "tests")
# Engines publishing through their own code (sglang's, smg-grpc-servicer's), a real agent process in front.
PUSH_SOURCES = ("sglang-feed", "sglang-shm", "smg-stream")
PUBLISH_EVERY_S = 0.002  # the stand-in scheduler's idle loop publishes this often (a changed stat goes out at once)
STAMP_MOD_US = 10**12  # the change time rides in num_used_tokens, µs modulo this (fits a count's bound)
MAX_TOKENS = 10**12


def stamp_us() -> int:
    return time.time_ns() // 1000 % STAMP_MOD_US


def age_us(stamp: int) -> int:
    """How long ago a stamp was taken (one wrap of the modulus, ~11.6 days, is allowed for)."""
    return (stamp_us() - stamp) % STAMP_MOD_US


class Engine:
    """One engine's ranks: their current figures and the sglang /v1/loads body that shows them."""

    def __init__(self, first_rank: int, ranks: int) -> None:
        self.ranks = list(range(first_rank, first_rank + ranks))
        self.figures = {rank: (0, stamp_us()) for rank in self.ranks}  # rank -> (running, change stamp)
        self.requests = 0
        self.agent: SchedulerAgent | None = None

    def change(self, rank: int) -> None:
        running, _ = self.figures[rank]
        self.figures[rank] = (running % 50 + 1, stamp_us())
        if self.agent is not None and self.agent.source.name == "inprocess":
            self.agent.publish(self.load(rank))

    def load(self, rank: int) -> pb.RankLoad:
        running, stamp = self.figures[rank]
        return pb.RankLoad(dp_rank=rank, timestamp_ms=time.time_ns() // 1_000_000, num_running_reqs=running,
                           num_waiting_reqs=0, num_used_tokens=stamp, max_total_num_tokens=MAX_TOKENS)

    async def v1_loads(self, request: web.Request) -> web.Response:
        self.requests += 1
        loads = [{"dp_rank": rank, "num_running_reqs": running, "num_waiting_reqs": 0, "num_used_tokens": stamp,
                  "max_total_num_tokens": MAX_TOKENS} for rank, (running, stamp) in self.figures.items()]
        return web.json_response({"timestamp": time.time(), "version": "bench", "loads": loads})


class SglangPushEngine:
    """One sglang 0.5.23 engine of all ranks publishing through sglang's own code (ZMQ feed or shared memory),
    with a real agent process in front of it: the freshness scenario's push-source rows."""

    def __init__(self, dp_size: int, kind: str, shm_dir: str) -> None:
        if TESTS not in sys.path:
            sys.path.insert(0, TESTS)
        from sglang_engine import Sglang0523Engine  # the engines' own publishing code (a tests/ stand-in)

        self.ranks = list(range(dp_size))
        self.shm_path = os.path.join(shm_dir, "sglang_loads_freshness_0000.shm") if kind == "sglang-shm" else None
        self.engine = Sglang0523Engine(dp_size, feed=kind == "sglang-feed", shm_path=self.shm_path,
                                       publish_every_s=PUBLISH_EVERY_S)
        self.running = dict.fromkeys(self.ranks, 0)
        self.agent: subprocess.Popen | None = None

    async def start(self, aggregator: str) -> int:
        port = await self.engine.start()
        source = (["--source", "sglang-shm", "--shm-path", self.shm_path] if self.shm_path
                  else ["--source", "sglang", "--engine-url", self.engine.url])
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "LOADAGG_INSTANCE_ID": "freshness-push"}
        self.agent = subprocess.Popen([sys.executable, "-m", "scheduler_agent", *source, "--no-gpu", "--log-level",
                                       "WARNING", "--aggregator", aggregator, "--dp-size", str(len(self.ranks))],
                                      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return port

    def change(self, rank: int) -> None:
        self.running[rank] = self.running[rank] % 50 + 1
        self.engine.set(rank, num_running_reqs=self.running[rank], num_used_tokens=stamp_us(),
                        max_total_num_tokens=MAX_TOKENS)

    @property
    def requests(self) -> int:
        return sum(self.engine.hits.values())

    async def stop(self) -> None:
        if self.agent is not None:
            self.agent.terminate()
            self.agent.wait(10)
        await self.engine.stop_all()


class SmgPushEngine:
    """One sglang engine of all ranks behind SMG's servicer, its SubscribeKvEvents batches carrying the records
    smg-grpc-servicer's LoadRecorder stamps, with a real agent process subscribed: the SMG freshness row."""

    def __init__(self, dp_size: int, stamps_file: str) -> None:
        if TESTS not in sys.path:
            sys.path.insert(0, TESTS)
        from smg_engine import SmgSglangEngine  # SMG's servicer base and load_record (a tests/ stand-in)

        self.ranks = list(range(dp_size))
        self.engine = SmgSglangEngine(dp_size, heartbeat_s=1.0, backoff_s=5.0, tick_s=0.1)
        self.stamps = open(stamps_file, "a", buffering=1)  # noqa: SIM115 (closed in stop)
        self.sequence = 0
        self.server = None
        self.agent: subprocess.Popen | None = None

    async def start(self, aggregator: str) -> int:
        from engines import serve_grpc

        self.server, port = await serve_grpc(self.engine)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "LOADAGG_INSTANCE_ID": "freshness-smg"}
        self.agent = subprocess.Popen([sys.executable, "-m", "scheduler_agent", "--source", "sglang", "--engine-url",
                                       f"grpc://127.0.0.1:{port}", "--no-gpu", "--log-level", "WARNING",
                                       "--aggregator", aggregator, "--dp-size", str(len(self.ranks))],
                                      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return port

    def change(self, rank: int) -> None:
        self.sequence += 1
        self.engine.running[rank] = self.sequence
        self.stamps.write(f"{self.sequence} {stamp_us()}\n")
        self.engine.step(rank)  # the step's batch goes out with the record of the figures just set

    @property
    def requests(self) -> int:
        return self.engine.calls  # GetLoads calls (the agent's discovery and detail reads)

    async def stop(self) -> None:
        if self.agent is not None:
            self.agent.terminate()
            self.agent.wait(10)
        if self.server is not None:
            await self.server.stop(0)
        self.stamps.close()


async def push_source_main(args: argparse.Namespace) -> None:
    """`--agent-source sglang-feed|sglang-shm|smg-stream`: the engine publishes, its agent pushes; the harness
    waits for the aggregator to hold every rank (it reads the aggregator's counters, not this child's)."""
    with tempfile.TemporaryDirectory() as shm_dir:
        dp_size = args.engines * args.ranks_per_engine
        engine = (SmgPushEngine(dp_size, args.stamps_file) if args.agent_source == "smg-stream"
                  else SglangPushEngine(dp_size, args.agent_source, shm_dir))
        port = await engine.start(args.agents_to)
        emit({"ports": [port], "pid": os.getpid()})
        emit({"ready": True})
        changes = [0]
        task = asyncio.create_task(change_loop([(engine, r) for r in engine.ranks], args, changes))
        try:
            await serve_until_quit({"stats": lambda: {"requests": engine.requests, "changes": changes[0],
                                                      **own_usage()}}, [task])
        finally:
            await engine.stop()


async def change_loop(every: list, args: argparse.Namespace, changes: list[int]) -> None:
    """Each (engine, rank) changes in turn, every `change_ms / len(every)` on average, the steps jittered."""
    step = args.change_ms / 1000 / len(every)
    rng = random.Random(args.seed)
    loop = asyncio.get_running_loop()
    due = loop.time()
    i = 0
    while True:
        engine, rank = every[i % len(every)]
        engine.change(rank)
        changes[0] += 1
        i += 1
        due += step * rng.uniform(0.5, 1.5)
        await asyncio.sleep(max(0.0, due - loop.time()))


async def main(args: argparse.Namespace) -> None:
    if args.agent_source in PUSH_SOURCES:
        await push_source_main(args)
        return
    engines = [Engine(i * args.ranks_per_engine, args.ranks_per_engine) for i in range(args.engines)]
    dp_size = args.engines * args.ranks_per_engine
    runners, ports = await serve_v1_loads([engine.v1_loads for engine in engines])
    emit({"ports": ports, "pid": os.getpid()})
    tasks = []
    if args.agents_to:
        for engine, port in zip(engines, ports, strict=True):
            source = SglangHttpSource(f"http://127.0.0.1:{port}") if args.agent_source == "http" else None
            config = AgentConfig(aggregator=args.agents_to, dp_ranks=tuple(engine.ranks), dp_size=dp_size,
                                 instance_id=f"engine-{engine.ranks[0]}", gpu="off",
                                 push_interval_ms=args.push_interval_ms, backoff_initial_ms=50, backoff_max_ms=500)
            engine.agent = SchedulerAgent(config, source)
            for rank in engine.ranks:
                if source is None:
                    engine.agent.publish(engine.load(rank))
            tasks.append(asyncio.create_task(engine.agent.run()))
        deadline = time.monotonic() + 60
        while not all(e.agent.connected.is_set() for e in engines):
            if time.monotonic() > deadline:
                emit({"ready": False, "error": "agents did not link within 60 s"})
                return
            await asyncio.sleep(0.02)
    emit({"ready": True})
    changes = [0]
    tasks.append(asyncio.create_task(change_loop([(e, r) for e in engines for r in e.ranks], args, changes)))

    def stats() -> dict:
        return {"requests": sum(e.requests for e in engines), "changes": changes[0],
                "agent_reads": sum(e.agent.source.reads if e.agent and hasattr(e.agent.source, "reads") else 0
                                   for e in engines),
                "pushes_sent": sum(e.agent.pushes_sent for e in engines if e.agent), **own_usage()}

    try:
        await serve_until_quit({"stats": stats}, tasks)
    finally:
        for runner in runners:
            await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--ranks-per-engine", type=int, default=4)
    parser.add_argument("--change-ms", type=float, default=1000.0, help="each rank changes this often")
    parser.add_argument("--agents-to", default="", help="link an agent per engine to this aggregator (or relay)")
    parser.add_argument("--agent-source", choices=("http", "published", *PUSH_SOURCES), default="http")
    parser.add_argument("--push-interval-ms", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stamps-file", default="", help="smg-stream: each change's 'sequence stamp_us' line")
    logging.basicConfig(level=logging.ERROR)
    run(main(parser.parse_args()))
