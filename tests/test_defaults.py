"""One source of defaults: flags, LOADAGG_* readers and config dataclasses agree, and the aggregator and the agent
read their shared settings with the same code (each test here failed on a copy that had drifted)."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys

import pytest

from loadagg.cli.flags import add_client_flags
from loadagg.common import VERSION_FALLBACK
from scheduler_agent.cli import add_link_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("add", [add_client_flags, add_link_flags], ids=["client", "agent"])
def test_a_typo_in_loadagg_tls_is_an_error_never_plaintext(monkeypatch, add):
    """LOADAGG_TLS=ture was an error for `loadagg loads` but silently plaintext for the agent."""
    monkeypatch.setenv("LOADAGG_TLS", "ture")
    with pytest.raises(ValueError, match="LOADAGG_TLS must be true or false, got 'ture'"):
        add(argparse.ArgumentParser())


def test_the_agent_command_refuses_a_typo_in_loadagg_tls():
    result = subprocess.run([sys.executable, "-m", "scheduler_agent"], capture_output=True, text=True, timeout=60,
                            cwd=ROOT, env={**os.environ, "LOADAGG_TLS": "ture"})
    assert result.returncode != 0 and "LOADAGG_TLS must be true or false" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_typo_in_loadagg_top_watch_is_an_error_never_interval_mode():
    """LOADAGG_TOP_WATCH was read as plain text: a typo ('chnage') silently meant interval mode."""
    result = subprocess.run([sys.executable, "-m", "loadagg", "top", "--once", "--target", "127.0.0.1:1"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env={**os.environ, "LOADAGG_TOP_WATCH": "chnage"})
    assert result.returncode != 0
    assert "LOADAGG_TOP_WATCH must be one of change, interval, got 'chnage'" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_binds_where_an_embedded_aggregator_binds(monkeypatch):
    """The bind host default was 127.0.0.1 in AggregatorConfig but 0.0.0.0 in `loadagg serve`."""
    from loadagg.cli.commands import parser
    from loadagg.cli.flags import aggregator_config_from_args
    from loadagg.server.config import AggregatorConfig

    for name in [n for n in os.environ if n.startswith("LOADAGG_")]:
        monkeypatch.delenv(name)
    args = parser().parse_args(["serve"])
    assert args.host == AggregatorConfig().host == "127.0.0.1"
    assert aggregator_config_from_args(args) == AggregatorConfig()  # every serve default is the dataclass's


async def test_the_aggregator_and_the_agent_fall_back_to_one_version(monkeypatch):
    """Without installed metadata the aggregator called itself "loadagg-0" and the agent said "dev"."""
    from loadagg.server.aggregator import Aggregator
    from loadagg.server.config import AggregatorConfig
    from scheduler_agent import AgentConfig, SchedulerAgent

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    aggregator = Aggregator(AggregatorConfig(port=0))
    hello = SchedulerAgent(AgentConfig()).hello().hello
    assert hello.version == VERSION_FALLBACK
    assert aggregator.compat.version == aggregator.http.version == f"loadagg-{VERSION_FALLBACK}"


def test_agent_flags_default_to_the_agent_config(monkeypatch):
    from scheduler_agent.cli import config_from_args, parser
    from scheduler_agent.config import AgentConfig

    for name in [n for n in os.environ if n.startswith("LOADAGG_")]:
        monkeypatch.delenv(name)
    config = config_from_args(parser().parse_args(["--instance-id", "a"]))
    assert config == AgentConfig(instance_id="a", seed=config.seed)
