"""A real Prometheus for tests: Debian's `prometheus` package (scripts/install_prometheus.sh, run by `make test`).

`PrometheusServer` runs the server on a free loopback port with a temporary data directory and a config written
at test time, and queries it through its HTTP API. Where the binaries are missing the tests that need them skip
with the reason, except under CI=true, where they fail: CI must run them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import free_port

INSTALL_HINT = "run scripts/install_prometheus.sh (make test does), or apt-get install prometheus"


def binary(name: str) -> str:
    """The path of `prometheus` or `promtool`; skips the test (fails it under CI=true) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed: {INSTALL_HINT}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the Prometheus-backed tests, but {reason}")
        pytest.skip(reason)
    return path


class PrometheusError(AssertionError):
    pass


class PrometheusServer:
    """One Prometheus process; `scrape_configs` and `rule_files` as in prometheus.yml, intervals of 1 s."""

    def __init__(self, workdir: Path, scrape_configs: list[dict], rule_files: list[Path] = ()) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
            "scrape_configs": scrape_configs,
            "rule_files": [str(path) for path in rule_files],
        }
        self.config_file = workdir / "prometheus.yml"
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [binary("prometheus"), f"--config.file={self.config_file}",
                 f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as answer:
                    if answer.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise PrometheusError(f"prometheus not ready after {timeout} s: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def api(self, path: str, **params) -> dict | list:
        """GET /api/v1/<path>; the `data` of a success, PrometheusError (with Prometheus' own error) otherwise."""
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as answer:
                body = json.load(answer)
        except urllib.error.HTTPError as error:  # 400 for a query that does not parse, 422 for one that fails
            body = json.load(error)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query's vector (a scalar comes back as one sample without labels)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def values(self, expr: str, label: str) -> dict[str, float]:
        """{series' `label` value: sample value} of an instant query."""
        return {sample["metric"].get(label, ""): float(sample["value"][1]) for sample in self.query(expr)}

    def wait_for(self, expr: str, check: Callable[[list[dict]], bool], timeout: float = 20.0) -> list[dict]:
        """Query `expr` until `check(result)` holds; AssertionError with the last result after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if check(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"after {timeout} s, {expr} = {result}")
            time.sleep(0.25)

    def targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]
