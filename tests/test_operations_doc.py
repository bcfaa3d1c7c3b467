"""docs/operations.md is the configuration reference: every flag and LOADAGG_* variable of every command is in it."""

from __future__ import annotations

import argparse
import re

import pytest
from deploy_files import ROOT

from loadagg.cli import commands as loadagg_cli
from scheduler_agent import cli as agent_cli

DOC = (ROOT / "docs" / "operations.md").read_text()


def _commands() -> dict[str, argparse.ArgumentParser]:
    commands = {"scheduler-agent": agent_cli.parser()}
    sub = next(a for a in loadagg_cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    commands.update({f"loadagg {name}": p for name, p in sub.choices.items()})
    return commands


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_flag_and_env_var_is_documented(command):
    parser = _commands()[command]
    section = DOC.split(f"### `{command}`", 1)
    assert len(section) == 2, f"docs/operations.md has no '### `{command}`' section"
    text = section[1].split("\n### ", 1)[0]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        for flag in action.option_strings:
            if flag.startswith("--"):
                assert f"`{flag}`" in text or f"`{flag}` (repeat)" in text, f"{command} {flag} is not documented"
        for variable in re.findall(r"LOADAGG_[A-Z_]+", action.help or ""):
            assert variable in text, f"{command}: {variable} is not documented"
