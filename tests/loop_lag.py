"""How long something held the event loop, sampled while a block runs (the hardening and render tests)."""

from __future__ import annotations

import asyncio
import time


class LoopLag:
    """How late a 1 ms sleep wakes, sampled while the block runs: how long something held the event loop."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc) -> None:
        self._stop.set()
        await self._task

    async def _sample(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            await asyncio.sleep(0.001)
            self.lags.append(time.monotonic() - started - 0.001)

    @property
    def longest_ms(self) -> float:
        return round(max(self.lags, default=0.0) * 1000, 1)
