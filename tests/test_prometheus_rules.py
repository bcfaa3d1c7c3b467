"""deploy/prometheus: `promtool check rules` and `promtool test rules` (Debian's promtool; see prometheus_server.py).

Every alert must have a unit-test case where it fires and one where it stays quiet, and the unit tests must be
able to fail: a threshold changed in a copy of the rules breaks them.
"""

from __future__ import annotations

import shutil
import subprocess

import yaml
from deploy_files import ROOT
from prometheus_server import binary

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "loadagg-rules.yaml"
UNIT_TESTS = PROMETHEUS_DIR / "tests" / "loadagg-rules.test.yaml"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary("promtool"), *args], capture_output=True, text=True, timeout=60)


def alert_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}


def test_promtool_checks_the_rules():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_pass():
    result = promtool("test", "rules", str(UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet():
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    fires = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert alert_names() == {"LoadaggDown", "LoadaggNoAgentLinked", "LoadaggRankMissing", "LoadaggRoundsTimingOut",
                             "LoadaggPushFeedStale", "LoadaggCallsRefused"}
    assert fires == alert_names(), f"never tested firing: {alert_names() - fires}"
    assert quiet == alert_names(), f"never tested quiet: {alert_names() - quiet}"


def test_the_unit_tests_catch_a_changed_threshold(tmp_path):
    """A test that cannot fail is a defect: raise the refused-calls threshold in a copy and promtool must fail."""
    (tmp_path / "tests").mkdir()
    shutil.copy(UNIT_TESTS, tmp_path / "tests")
    original = RULES.read_text()
    changed = original.replace("loadagg:calls_refused:rate2m > 1\n", "loadagg:calls_refused:rate2m > 10\n")
    assert changed != original
    (tmp_path / RULES.name).write_text(changed)
    result = promtool("test", "rules", str(tmp_path / "tests" / UNIT_TESTS.name))
    assert result.returncode != 0
    assert "LoadaggCallsRefused" in result.stdout + result.stderr
