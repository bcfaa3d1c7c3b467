"""The LoadSource interface every source (simulator, sglang, vLLM, NVML, in-process) implements."""

from __future__ import annotations

import abc
from collections.abc import Sequence

from loadagg.v1 import loadagg_pb2 as pb


class SourceError(Exception):
    """The source could not be read this time (engine down, bad payload, timeout). The agent keeps running."""


class LoadSource(abc.ABC):
    """Reads one RankLoad per dp rank. Fields the source does not know stay unset."""

    name: str = "source"

    async def start(self) -> None:
        """Open connections; called once before the first read."""

    @abc.abstractmethod
    async def read(self, ranks: Sequence[int]) -> dict[int, pb.RankLoad]:
        """Current loads of `ranks` (a rank left out is reported as failed). Raises SourceError."""

    async def close(self) -> None:
        """Release what start() opened."""
