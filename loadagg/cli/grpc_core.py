"""gRPC C-core settings for loadagg's own processes. They are read once, when `grpc` is first imported.

The aggregator serves with gRPC's classic (iomgr) TCP listener rather than the EventEngine listener that
grpcio turns on by default: under many agent streams that each send a small message every 50 ms, the
EventEngine path costs more server CPU per message (bench `cpu`; the figures are in bench/README.md).

An operator's own GRPC_EXPERIMENTS always wins (`GRPC_EXPERIMENTS=event_engine_listener` brings the
EventEngine listener back). Only entry points call this: importing loadagg as a library changes nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

CLASSIC_LISTENER = "-event_engine_listener"


def use_classic_listener(environ: MutableMapping[str, str] | None = None) -> bool:
    """Ask gRPC for its classic TCP listener unless GRPC_EXPERIMENTS is set already; True when it was set.

    `environ`: a child process's environment (the bench starts its servers so). Without it, this process's
    own, and only before it first imports `grpc`: later it would reach child processes alone, and a process
    whose children serve differently from itself is harder to reason about.
    """
    if environ is None:
        if "grpc" in sys.modules:
            return False
        environ = os.environ
    if "GRPC_EXPERIMENTS" in environ:
        return False
    environ["GRPC_EXPERIMENTS"] = CLASSIC_LISTENER
    return True
