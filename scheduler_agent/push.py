"""PushTracker: what the aggregator already holds of each rank, so a push carries only real changes."""

from __future__ import annotations

from collections.abc import Iterable

from loadagg.v1 import loadagg_pb2 as pb


def fingerprint(load: pb.RankLoad) -> bytes:
    """The load's figures without its timestamp: a new timestamp alone is not a change."""
    copy = pb.RankLoad()
    copy.CopyFrom(load)
    copy.ClearField("timestamp_ms")
    return copy.SerializeToString(deterministic=True)


class PushTracker:
    """Per rank, the fingerprint of the last load sent on this link (by a push or a collect answer)."""

    def __init__(self) -> None:
        self._sent: dict[int, bytes] = {}

    def reset(self) -> None:
        self._sent.clear()

    def changed(self, loads: Iterable[pb.RankLoad]) -> list[pb.RankLoad]:
        return [load for load in loads if self._sent.get(load.dp_rank) != fingerprint(load)]

    def sent(self, loads: Iterable[pb.RankLoad]) -> None:
        for load in loads:
            self._sent[load.dp_rank] = fingerprint(load)
