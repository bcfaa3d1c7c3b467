"""Harness side of the child processes: start them, talk JSON lines, end only what we started."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from loadagg.cli.grpc_core import use_classic_listener

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ChildError(RuntimeError):
    pass


class Child:
    """A `python -m MODULE ...` child: JSON lines on its stdout, commands on its stdin."""

    def __init__(self, module: str, *args: str, name: str = "", wrapper: Sequence[str] = ()) -> None:
        """`wrapper`: a command the child runs under (valgrind ..., bench.callgrind_push)."""
        self.name = name or module
        python_path = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path}
        use_classic_listener(env)  # every server child (aggregator, echo, link floor) as `loadagg serve` runs
        self.proc = subprocess.Popen([*wrapper, sys.executable, "-m", module, *args], cwd=ROOT, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._pump_stdout, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()

    def _pump_stdout(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)  # the child exited

    def _pump_stderr(self) -> None:
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read(self, timeout: float = 60.0) -> dict:
        """The next JSON line the child prints (non-JSON lines are skipped)."""
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise ChildError(f"{self.name}: no answer within {timeout:.0f} s; "
                                 f"stderr: {self.stderr_tail()}") from None
            if line is None:
                raise ChildError(f"{self.name} exited ({self.proc.wait()}); stderr: {self.stderr_tail()}")
            with contextlib.suppress(json.JSONDecodeError):
                payload = json.loads(line)
                if isinstance(payload, dict):
                    return payload

    def ask(self, command: str, timeout: float = 30.0) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def stderr_tail(self, lines: int = 15) -> str:
        return "".join(line for line in self._stderr[-lines:] if line)

    def close(self, timeout: float = 10.0) -> None:
        """Ask it to quit; kill it (only this child) if it does not."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)


def run_client(spec: dict, timeout: float = 300.0, on_start: Callable[[], None] | None = None) -> dict:
    """Run the load generator (bench.clients) in its own process with `spec`; its JSON result.

    `on_start` (periodic mode) is called once the client is connected and about to poll, so a CPU window
    can start there rather than at the client's start-up."""
    if on_start is not None:
        spec = {**spec, "announce_start": True}
    child = Child("bench.clients", json.dumps(spec), name=f"client[{spec.get('mode')}]")
    try:
        result = child.read(timeout)
        if on_start is not None and "error" not in result:
            on_start()
            result = child.read(timeout)
    finally:
        child.close()
    if "error" in result:
        raise ChildError(f"client failed: {result['error']}")
    return result


@dataclass
class Cluster:
    """An aggregator child (or the bare link floor) and its agent-host children."""

    aggregator: Child
    port: int
    agent_hosts: list[Child] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stats(self) -> dict:
        return self.aggregator.ask("stats")

    def agent_stats(self) -> dict:
        totals: dict[str, float] = {}
        for host in self.agent_hosts:
            for key, value in host.ask("stats").items():
                totals[key] = totals.get(key, 0) + value
        return totals

    def close(self) -> None:
        for child in [*self.agent_hosts, self.aggregator]:
            child.close()


def start_cluster(dp_size: int, *, mode: str = "watching", processes: int = 1, agents_per_process: int | None = None,
                  ranks_per_agent: int = 1, collect_latency_ms: float = 0.0, source: str = "simulator",
                  round_timeout_ms: int = 500, profile: str = "", push_interval_ms: int = 0) -> Cluster:
    """An aggregator serving `dp_size` ranks, all of them linked by agents spread over `processes` children."""
    args = ["--dp-size", str(dp_size), "--mode", mode, "--round-timeout-ms", str(round_timeout_ms)]
    aggregator = Child("bench.agg_proc", *args, *(["--profile", profile] if profile else []),
                       name=f"aggregator[{mode}]")
    cluster = _link_agents(aggregator, dp_size, processes=processes, agents_per_process=agents_per_process,
                           ranks_per_agent=ranks_per_agent, collect_latency_ms=collect_latency_ms, source=source,
                           push_interval_ms=push_interval_ms)
    live = cluster.stats()["live_ranks"]
    if live != dp_size:
        cluster.close()
        raise ChildError(f"only {live} of {dp_size} ranks linked")
    return cluster


def start_link_floor(dp_size: int, *, collect_interval_ms: int, processes: int, ranks_per_agent: int = 1,
                     push_interval_ms: int = 0) -> Cluster:
    """The same agents linked to bench.link_floor_proc (bare grpc.aio streams) instead of an aggregator."""
    floor = Child("bench.link_floor_proc", "--dp-size", str(dp_size), "--collect-interval-ms",
                  str(collect_interval_ms), name="link-floor")
    return _link_agents(floor, dp_size, processes=processes, ranks_per_agent=ranks_per_agent,
                        push_interval_ms=push_interval_ms)


def _link_agents(server: Child, dp_size: int, *, processes: int, agents_per_process: int | None = None,
                 ranks_per_agent: int = 1, collect_latency_ms: float = 0.0, source: str = "simulator",
                 push_interval_ms: int = 0) -> Cluster:
    """`server` (a child printing its port) and agent hosts linking `dp_size` ranks to it, all linked."""
    cluster = Cluster(server, 0)
    try:
        if dp_size % ranks_per_agent:
            raise ValueError(f"dp_size {dp_size} is not a multiple of ranks_per_agent {ranks_per_agent}")
        cluster.port = server.read(60)["port"]
        agents = dp_size // ranks_per_agent
        per_process = agents_per_process or -(-agents // processes)
        first = 0
        while first < dp_size:
            count = min(per_process, (dp_size - first) // ranks_per_agent)
            cluster.agent_hosts.append(Child(
                "bench.agent_host", "--aggregator", cluster.target, "--dp-size", str(dp_size),
                "--first-rank", str(first), "--agents", str(count), "--ranks-per-agent", str(ranks_per_agent),
                "--collect-latency-ms", str(collect_latency_ms), "--source", source,
                "--push-interval-ms", str(push_interval_ms), name=f"agents[{first}]"))
            first += count * ranks_per_agent
        for host in cluster.agent_hosts:
            if not host.read(90).get("ready"):
                raise ChildError(f"{host.name} did not link: {host.stderr_tail()}")
    except BaseException:
        cluster.close()
        raise
    return cluster


def start_echo(payload: bytes, path: str) -> tuple[Child, int]:
    with open(path, "wb") as f:
        f.write(payload)
    echo = Child("bench.echo_proc", "--payload", path, name="echo")
    try:
        return echo, echo.read(60)["port"]
    except BaseException:
        echo.close()
        raise
