"""loadagg.cli.with_parent: a child the demo starts ends with the demo, by either of its two means."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT

# Runs with_parent's fallback (the thread polling the parent's pid, as where prctl is missing), then sleeps.
POLLING_CHILD = ("import sys, time; import loadagg.cli.with_parent as w; w._parent_death_signal = lambda: False; "
                 "w.end_with(int(sys.argv[1])); time.sleep(60)")


def _ended(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has ended (its reaper is not us)
    except OSError:
        return True


def test_a_child_whose_parent_is_already_gone_ends_at_once():
    """Started for a parent that is not (or no longer) its parent: it ends before running the module."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "loadagg.cli.with_parent", "1", "http.server",
                             "--bind", "127.0.0.1", "0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "Serving HTTP" not in result.stdout, result
    assert time.monotonic() - started < 20


def test_the_polling_fallback_ends_the_child_once_its_parent_is_gone():
    # A shell starts the child (the shell is its parent), prints the child's pid and ends a second later.
    shell = subprocess.run(["sh", "-c", f'{sys.executable} -c "{POLLING_CHILD}" $$ >/dev/null 2>&1 & echo $!; sleep 1'],
                           cwd=ROOT, capture_output=True, text=True, timeout=30)
    child = int(shell.stdout.split()[0])
    try:
        deadline = time.monotonic() + 10
        while not _ended(child):
            assert time.monotonic() < deadline, "the child outlived its parent by 10 s"
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)  # only the child this test started, should it still run
