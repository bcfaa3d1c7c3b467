"""The `loadagg` command serves with gRPC's classic TCP listener; an operator's GRPC_EXPERIMENTS wins."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT

from loadagg.cli.grpc_core import CLASSIC_LISTENER, use_classic_listener

_PROBE = "import loadagg.cli, os; print(os.environ.get('GRPC_EXPERIMENTS'))"


def _probe(**env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    return subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**base, **env})


def test_the_loadagg_command_asks_for_the_classic_listener_before_grpc_loads():
    result = _probe()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == CLASSIC_LISTENER
    # gRPC read it at import and knew it: a grpcio that dropped the experiment says so on stderr, and then
    # loadagg/grpc_core.py (and the bench `cpu` figures behind it) need another look.
    assert "Unknown experiment" not in result.stderr, result.stderr


def test_an_operators_grpc_experiments_win():
    result = _probe(GRPC_EXPERIMENTS="event_engine_listener")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "event_engine_listener"


def test_a_child_environment_gets_it_unless_it_has_its_own():
    env: dict[str, str] = {}
    assert use_classic_listener(env) is True
    assert env == {"GRPC_EXPERIMENTS": CLASSIC_LISTENER}
    own = {"GRPC_EXPERIMENTS": ""}  # set, even empty: gRPC's own defaults, on purpose
    assert use_classic_listener(own) is False
    assert own == {"GRPC_EXPERIMENTS": ""}


def test_too_late_for_this_process_it_changes_nothing(monkeypatch):
    import grpc  # noqa: F401  (loaded already: gRPC has read its experiments)

    monkeypatch.delenv("GRPC_EXPERIMENTS", raising=False)
    assert use_classic_listener() is False
    assert "GRPC_EXPERIMENTS" not in os.environ
