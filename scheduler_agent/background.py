"""BackgroundAgent: an embedded agent on its own thread and event loop.

Many Python schedulers run a blocking loop of their own (sglang's and vLLM's do). They cannot await
`SchedulerAgent.run()`, so this runs it beside them: `start()` once, `publish(RankLoad...)` from the
scheduler's thread whenever its figures change, `stop()` on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.agent import SchedulerAgent
from scheduler_agent.config import AgentConfig
from scheduler_agent.sources.base import LoadSource


class BackgroundAgent:
    def __init__(self, config: AgentConfig, source: LoadSource | None = None) -> None:
        self.agent = SchedulerAgent(config, source)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def start(self) -> BackgroundAgent:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="loadagg-agent", daemon=True)
            self._thread.start()
            self._ready.wait()
        return self

    def _main(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            self._task = loop.create_task(self.agent.run())
            self._ready.set()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(self._task)
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def publish(self, *loads: pb.RankLoad) -> None:
        """Safe from any thread: the agent keeps a copy of each load and swaps it in whole."""
        self.agent.publish(*loads)

    @property
    def connected(self) -> bool:
        return self.agent.connected.is_set()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None or self._loop is None or self._task is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already ended
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> BackgroundAgent:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
