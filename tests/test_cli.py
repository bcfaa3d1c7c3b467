"""The console entry points as separate processes: `loadagg serve`, `scheduler-agent`, `loadagg loads`, demo."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import ROOT, free_port


def _loads(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loadagg", "loads", "--target", f"127.0.0.1:{port}", *args],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)


def _wait_for_ranks(port: int, ranks: int, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        result = _loads(port, "--json")
        if result.returncode == 0:
            body = json.loads(result.stdout)
            if len(body.get("loads", [])) == ranks:
                return body
        if time.monotonic() > deadline:
            raise AssertionError(f"ranks never all answered: {result.stdout} {result.stderr}")
        time.sleep(0.2)


def test_serve_agent_and_loads_as_separate_processes(processes):
    port = free_port()
    server = processes.start("loadagg", "serve", "--host", "127.0.0.1", "--port", str(port), "--dp-size", "3")
    processes.agent(port, [0, 1], 3, "--seed", "1")
    # Configured through the environment only, as in a container.
    processes.start("scheduler_agent", env={"LOADAGG_AGGREGATOR": f"127.0.0.1:{port}", "LOADAGG_DP_RANKS": "2",
                                            "LOADAGG_DP_SIZE": "3", "LOADAGG_COLLECT_LATENCY_MS": "5"})
    body = _wait_for_ranks(port, 3)
    assert [load.get("dp_rank", 0) for load in body["loads"]] == [0, 1, 2]  # JSON omits dp_rank 0
    assert body["summary"]["num_ranks"] == 3

    one = _loads(port, "--dp-rank", "2", "--include", "core,memory", "--json")
    (load,) = json.loads(one.stdout)["loads"]
    assert load["dp_rank"] == 2 and "memory" in load and "gpu" not in load

    table = _loads(port)
    assert table.returncode == 0 and "total: 3 ranks" in table.stdout

    bad = _loads(port, "--dp-rank", "7")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "out of range" in bad.stderr

    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=15) == 0
    assert "aggregator stopped" in server.stdout.read()


def test_demo_shows_a_live_cluster_and_its_routers_coalescing():
    result = subprocess.run(
        [sys.executable, "-m", "loadagg", "demo", "--dp-size", "4", "--agents", "2", "--duration", "8",
         "--interval", "0.5", "--routers", "40", "--log-level", "WARNING"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    frames = [f for f in result.stdout.split("loadagg demo:") if f.strip()]
    assert len(frames) >= 3
    # Agent processes take a moment to start (longer on a loaded machine): some frame shows them all.
    linked = [f for f in frames if "4/4 ranks linked from 2 agent processes" in f]
    assert linked, frames[-1]
    assert "total: 4 ranks" in linked[-1]
    round_ids = [int(f.split("\nround ")[1].split()[0]) for f in frames]
    assert round_ids == sorted(round_ids) and len(set(round_ids)) == len(round_ids)  # refreshing
    # The 40 routers' calls shared rounds: the line above the ranks says how many, and what the engines saved.
    assert "40 simulated routers asking every 50 ms" in frames[-1]
    line = next(text for text in frames[-1].splitlines() if text.startswith("router calls "))
    calls = float(line.split("router calls ")[1].split("/s")[0].replace(",", ""))
    callers = float(line.split("callers per round ")[1].split()[0].replace(",", ""))
    saved = float(line.split("engine reads saved ")[1].split(" %")[0])
    assert calls > 0 and callers > 1 and saved > 50, line
    assert "with every router asking each of 2 engine(s)" in line


def _processes() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/PID/stat after the command: state, ppid, pgid, ...) of every process now."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    yield int(entry), f.read().rsplit(")", 1)[1].split()
            except OSError:  # it ended meanwhile
                continue


def _children(pid: int) -> list[int]:
    return [child for child, fields in _processes() if int(fields[1]) == pid]


def _wait_for_children(pid: int, count: int) -> list[int]:
    deadline = time.monotonic() + 30
    while len(children := _children(pid)) < count:
        assert time.monotonic() < deadline, f"demo started {len(children)} of its {count} processes"
        time.sleep(0.1)
    return children


def test_demo_stopped_by_sigterm_ends_its_agent_and_router_processes(processes):
    demo = processes.start("loadagg", "demo", "--dp-size", "2", "--interval", "0.2", "--routers", "10",
                           "--log-level", "WARNING")
    children = _wait_for_children(demo.pid, 3)  # 2 agents and the routers
    demo.send_signal(signal.SIGTERM)
    assert demo.wait(timeout=20) == 0
    time.sleep(0.2)
    assert not [pid for pid in children if os.path.exists(f"/proc/{pid}")], "processes outlived the demo"


def _commands(pids: list[int]) -> dict[int, str]:
    commands = {}
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            commands[pid] = f.read().replace(b"\0", b" ").decode(errors="replace")
    return commands


@pytest.mark.parametrize("after_s", [0.0, 1.0])  # while the children still start up; once they are busy
def test_demo_killed_with_sigkill_leaves_no_child_running(processes, after_s):
    """SIGKILL gives the demo no chance to end its children: they must notice and end themselves."""
    demo = processes.start("loadagg", "demo", "--dp-size", "2", "--interval", "0.2", "--routers", "10",
                           "--log-level", "WARNING", stdout=subprocess.DEVNULL)
    children = _wait_for_children(demo.pid, 3)  # 2 agents and the routers
    time.sleep(after_s)
    demo.kill()
    demo.wait(timeout=10)
    deadline = time.monotonic() + 10
    try:
        while left := [pid for pid in children if os.path.exists(f"/proc/{pid}")]:
            assert time.monotonic() < deadline, f"still running after the demo was killed: {_commands(left)}"
            time.sleep(0.1)
    finally:
        for pid in children:  # only the demo's own children, should they have outlived it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _in_group(pgid: int) -> list[int]:
    return [pid for pid, fields in _processes() if int(fields[2]) == pgid]


def test_ctrl_c_on_the_demo_leaves_nothing_running(processes):
    """Ctrl-C sends SIGINT to the terminal's whole foreground process group: the demo, its agents and its routers.
    Afterwards no process of that group is left (nor a zombie)."""
    demo = processes.start("loadagg", "demo", "--dp-size", "2", "--interval", "0.2", "--routers", "10",
                           "--log-level", "WARNING", start_new_session=True)  # a group of its own, as a shell's job
    _wait_for_children(demo.pid, 3)
    time.sleep(1.0)  # the routers and agents are busy
    os.killpg(demo.pid, signal.SIGINT)
    assert demo.wait(timeout=20) == 0
    deadline = time.monotonic() + 10
    while left := _in_group(demo.pid):
        assert time.monotonic() < deadline, f"still running after Ctrl-C: {left}"
        time.sleep(0.1)


def test_a_bad_environment_variable_is_a_usage_error_naming_it():
    env = {**os.environ, "LOADAGG_PORT": "abc"}
    result = subprocess.run([sys.executable, "-m", "loadagg", "serve"], capture_output=True, text=True, timeout=30,
                            cwd=ROOT, env=env)
    assert result.returncode == 2 and "LOADAGG_PORT must be an integer, got 'abc'" in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "loadagg", "loads"], capture_output=True, text=True, timeout=30,
                            cwd=ROOT, env={**os.environ, "LOADAGG_LOG_LEVEL": "verbose"})
    assert result.returncode == 2 and "LOADAGG_LOG_LEVEL must be one of DEBUG" in result.stderr
    assert "Traceback" not in result.stderr
    for name, value, said in (("LOADAGG_GPU", "maybe", "LOADAGG_GPU='maybe'"),
                              ("LOADAGG_PUSH_INTERVAL_MS", "x", "LOADAGG_PUSH_INTERVAL_MS must be an integer, got 'x'"),
                              ("LOADAGG_SOURCE", "bogus",
                               "LOADAGG_SOURCE must be one of simulator, sglang, sglang-shm, vllm, tokenspeed"),
                              ("LOADAGG_LOG_LEVEL", "verbose", "LOADAGG_LOG_LEVEL must be one of DEBUG")):
        result = subprocess.run([sys.executable, "-m", "scheduler_agent"], capture_output=True, text=True,
                                timeout=30, cwd=ROOT, env={**os.environ, name: value})
        assert result.returncode in (1, 2) and said in result.stderr and "Traceback" not in result.stderr


def test_help_shows_each_default_once_and_never_none():
    """argparse appended "(default: None)" to help that already said what the default is ("join the round in
    flight (default)", "one per rank")."""
    import re

    from loadagg.cli.commands import parser as loadagg_parser
    from scheduler_agent.cli import parser as agent_parser

    commands = loadagg_parser()._subparsers._group_actions[0].choices
    for text in [agent_parser().format_help(), *(command.format_help() for command in commands.values())]:
        flat = " ".join(text.split())
        assert "(default: None)" not in flat and "(default: )" not in flat
        for option in re.split(r" (?=--[a-z])", flat):
            assert option.count("default") <= 1, option


def test_settings_that_could_never_work_are_usage_errors():
    for args, said in ((["serve", "--port", "0", "--hello-timeout-ms", "0"], "hello_timeout_ms must be >= 1, got 0"),
                       (["serve", "--port", "0", "--grace-s", "-1"], "grace_s must be >= 0, got -1"),
                       (["loads", "--max-staleness-ms", "-1"], "argument --max-staleness-ms: must be >= 0, got -1"),
                       (["top", "--interval-ms", "-5"], "argument --interval-ms: must be >= 0, got -5")):
        result = subprocess.run([sys.executable, "-m", "loadagg", *args],
                                capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert result.returncode == 2 and said in result.stderr and "Traceback" not in result.stderr


async def test_loads_into_a_pipe_its_reader_closed_ends_quietly(start_aggregator, start_agents):
    """`loadagg loads | head -1`: the reader has gone when the table is written; exit 1, nothing on stderr."""
    import asyncio

    agg = await start_aggregator(dp_size=2)
    await start_agents(agg, [[0, 1]])
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadagg", "loads", "--target", f"127.0.0.1:{agg.port}", cwd=ROOT,
            stdout=write_end, stderr=asyncio.subprocess.PIPE)
    finally:
        os.close(write_end)
    _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1 and stderr.decode() == ""


async def test_a_second_aggregator_on_a_taken_port_fails_with_one_line(start_aggregator):
    """gRPC sets SO_REUSEPORT by default: a second `serve` on the same port used to start silently, and the
    kernel split agents and routers between two aggregators (half the answers had every rank missing)."""
    import asyncio

    agg = await start_aggregator(dp_size=1, http_port=0)
    for flags, said in ((["--port", str(agg.port)], f"could not bind 127.0.0.1:{agg.port}"),
                        (["--port", "0", "--http-port", str(agg.http_port)],
                         f"could not bind the HTTP gateway to 127.0.0.1:{agg.http_port}")):
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "loadagg", "serve", "--host", "127.0.0.1", *flags],
            capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert result.returncode == 1 and said in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
