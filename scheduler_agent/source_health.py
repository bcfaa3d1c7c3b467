"""SourceHealth: log a source's failures once per change of state, not once per round.

A state is (error message, ranks the source could not read). The first round of a new state logs a
warning (or, back to healthy, one info line); further rounds in the same state log nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

log = logging.getLogger("scheduler_agent.source")


class SourceHealth:
    def __init__(self, source_name: str) -> None:
        self.source_name = source_name
        self.state: tuple[str, tuple[int, ...]] = ("", ())
        self.changes = 0

    @property
    def healthy(self) -> bool:
        return self.state == ("", ())

    def observe(self, error: str, failed: Sequence[int]) -> None:
        state = (error, tuple(failed))
        if state == self.state:
            return
        self.state = state
        self.changes += 1
        if self.healthy:
            log.info("source %s recovered: every rank read", self.source_name)
        elif error:
            log.warning("source %s failed: %s; ranks %s reported missing until it recovers",
                        self.source_name, error, list(failed))
        else:
            log.warning("source %s has no load for ranks %s; reported missing until it does",
                        self.source_name, list(failed))
