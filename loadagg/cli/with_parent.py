"""`python -m loadagg.cli.with_parent PID MODULE [ARGS...]`: run MODULE as `python -m` would, ending with PID.

The demo starts its agents through this, so that they end with it even when it is killed with SIGKILL and cannot
end them itself (an agent would otherwise retry its link forever). On Linux the kernel sends SIGTERM the moment
the parent goes (PR_SET_PDEATHSIG); elsewhere a thread polls the parent's pid.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_POLL_S = 0.5


def _parent_death_signal() -> bool:
    """Ask Linux to SIGTERM this process when its parent ends; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)


def end_with(parent: int) -> None:
    """SIGTERM this process once process `parent` has ended (at once if it already has)."""
    if not _parent_death_signal():
        threading.Thread(target=_watch, args=(parent,), name="end-with-parent", daemon=True).start()
    elif os.getppid() != parent:  # it ended before the kernel was asked to tell us
        sys.exit(0)


def main() -> None:
    if len(sys.argv) < 3 or not sys.argv[1].isdigit():
        sys.exit(f"usage: python -m loadagg.cli.with_parent PID MODULE [ARGS...], got {sys.argv[1:]}")
    end_with(int(sys.argv[1]))
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
