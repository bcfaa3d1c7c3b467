"""What every bench child process shares: uvloop, a JSON-lines control channel on stdin/stdout, process accounting.

A child prints one JSON line when ready, then answers one JSON line per command read from stdin
("stats", "quit", ...). The harness (bench.procs) drives it. Results travel as JSON, never as logs.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
from collections.abc import Awaitable, Callable

from loadagg.common import run  # asyncio.run on uvloop: every bench server and client runs on uvloop

Handler = Callable[[], Awaitable[dict] | dict]

__all__ = ["Handler", "control_loop", "emit", "own_usage", "run", "serve_until_quit"]


def emit(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def own_usage() -> dict:
    """CPU seconds (user+system) and peak RSS of this process, from its own accounting."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": ru.ru_utime + ru.ru_stime, "vmhwm_kb": proc_status_kb(os.getpid(), "VmHWM"),
            "rss_kb": proc_status_kb(os.getpid(), "VmRSS")}


def proc_status_kb(pid: int, key: str) -> int:
    """A `VmXXX:` line of /proc/PID/status in kB (0 where /proc is not there)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


async def control_loop(handlers: dict[str, Handler]) -> None:
    """Answer commands from stdin until "quit" (or stdin closes: the harness died)."""
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        command = line.strip()
        if not line or command == "quit":
            return
        handler = handlers.get(command)
        if handler is None:
            emit({"error": f"unknown command {command!r}"})
            continue
        result = handler()
        if asyncio.iscoroutine(result):
            result = await result
        emit(result)


async def serve_until_quit(handlers: dict[str, Handler], tasks: list[asyncio.Task]) -> None:
    """The control loop until "quit", then cancel `tasks` (the child's own work) and wait for them."""
    try:
        await control_loop(handlers)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
