"""`python -m skewed_agent SECONDS ARGS`: the real scheduler-agent CLI on a node whose wall clock is SECONDS off
(negative: behind). Only the wall clock moves (time.time, time.time_ns), as under libfaketime with
FAKETIME_DONT_FAKE_MONOTONIC=1: the agent's timers and gRPC run on the monotonic clock, as on such a node."""

from __future__ import annotations

import sys
import time

_SHIFT_S = float(sys.argv.pop(1))
_time, _time_ns = time.time, time.time_ns
time.time = lambda: _time() + _SHIFT_S
time.time_ns = lambda: _time_ns() + int(_SHIFT_S * 1_000_000_000)

from scheduler_agent.cli import main  # noqa: E402  (after the clock is shifted, as an agent on that node)

if __name__ == "__main__":
    main()
