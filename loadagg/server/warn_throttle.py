"""WarningThrottle: a warning at most once per interval, counting the ones it held back.

A peer stuck on the same fault repeats it every round or redial; one warning per interval, with the count of
the rest, tells the operator as much without flooding the log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class WarningThrottle:
    """When a warning was last given, and how many were held back since."""

    every_s: float
    warned_at: float = -math.inf
    held_back: int = 0

    def due(self, now: float) -> int | None:
        """None while the last warning is younger than `every_s` (this one is counted as held back); else how
        many were held back since the last warning, and the count starts again."""
        if now - self.warned_at < self.every_s:
            self.held_back += 1
            return None
        held_back, self.warned_at, self.held_back = self.held_back, now, 0
        return held_back
