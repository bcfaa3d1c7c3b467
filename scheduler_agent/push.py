"""PushTracker: what the aggregator already holds of each rank, so a push carries only real changes.

A rank is pushed when its figures differ from the last ones sent on this link (by a push or by a
collect answer); a new timestamp alone is no change. With a refresh interval, a rank unchanged for
that long is sent again, so the aggregator's snapshot age says "confirmed this recently" rather
than "changed this long ago" (off by default).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from loadagg.v1 import loadagg_pb2 as pb


def next_push_at(due: float, now: float, interval: float) -> float:
    """When the push after the one due at `due` is due. Pushes keep to the interval's schedule, so the time a
    push takes (reading the engine, writing) does not stretch the period; a push that ran past the next
    tick(s) skips them rather than sending pushes back to back."""
    due += interval
    if due <= now:
        due += ((now - due) // interval + 1) * interval
    return due


def fingerprint(load: pb.RankLoad) -> bytes:
    """The load's figures without its timestamp and ages (a push source's held figures age between reads)."""
    copy = pb.RankLoad()
    copy.CopyFrom(load)
    copy.ClearField("timestamp_ms")
    copy.ClearField("age_ms")
    copy.ClearField("detail_age_ms")
    return copy.SerializeToString(deterministic=True)


class PushTracker:
    """Per rank, the fingerprint of the last load sent on this link and when it was sent."""

    def __init__(self, refresh_ms: int = 0) -> None:
        self.refresh_s = refresh_ms / 1000
        self._sent: dict[int, tuple[bytes, float]] = {}

    def reset(self) -> None:
        self._sent.clear()

    def changed(self, loads: Iterable[pb.RankLoad]) -> list[pb.RankLoad]:
        now = time.monotonic()
        out = []
        for load in loads:
            held = self._sent.get(load.dp_rank)
            if held is None or held[0] != fingerprint(load) or (self.refresh_s and now - held[1] >= self.refresh_s):
                out.append(load)
        return out

    def sent(self, loads: Iterable[pb.RankLoad]) -> None:
        now = time.monotonic()
        for load in loads:
            self._sent[load.dp_rank] = (fingerprint(load), now)
