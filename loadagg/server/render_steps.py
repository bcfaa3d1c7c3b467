"""Rendering a large answer a few ranks at a time, so that no render holds the event loop.

With every field set, sglang's JSON, its Prometheus text and the engines' gRPC compat messages cost 40-50 us a
rank to build: one render of a 4,096-rank answer held the loop for 180-215 ms, and any router's call could start
one. A render is a generator that yields after each step of RENDER_STEP_RANKS ranks and returns its bytes;
`run_steps` lets the loop run whenever RENDER_SLICE_S has passed since it last did (a worker thread was measured
too: the GIL and json.dumps' single C call still held the loop 20-80 ms, and the render took longer).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator
from typing import TypeVar

RENDER_STEP_RANKS = 16  # ranks a render handles between yields (well under a millisecond fully set)
RENDER_SLICE_S = 0.002  # the longest a render runs before the event loop runs again

T = TypeVar("T")
RenderSteps = Generator[None, None, bytes]


async def run_steps(steps: Generator[None, None, T], slice_s: float = RENDER_SLICE_S) -> T:
    """A render run to its end, letting the event loop run every `slice_s`."""
    clock = time.perf_counter
    until = clock() + slice_s
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        if clock() >= until:
            await asyncio.sleep(0)
            until = clock() + slice_s
