"""`pip install loadagg` (no extra) is the router library: grpcio and protobuf only, and LoadClient works with it.

A fresh virtualenv gets the package's wheel with its declared dependencies (pip resolves them, from its cache here);
a router in it asks a live aggregator, and the commands that need an extra say which one.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOT_FOR_ROUTERS = ("aiohttp", "rich", "prometheus-client", "nvidia-ml-py", "smg-grpc-proto", "grpcio-health-checking",
                   "grpcio-reflection", "uvloop")

ROUTER = """
import json, sys
from loadagg.client import LoadClient
with LoadClient(sys.argv[1], timeout=10) as client:
    loads = client.get_loads()
print(json.dumps({"ranks": [load.dp_rank for load in loads.response.loads], "missing": list(loads.missing_ranks)}))
"""


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("bare")
    built = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                 "--wheel-dir", str(where / "wheels"), str(ROOT))
    assert built.returncode == 0, built.stderr
    (wheel,) = (where / "wheels").glob("loadagg-*.whl")
    venv = where / "venv"
    made = _run(sys.executable, "-m", "venv", str(venv))
    assert made.returncode == 0, made.stderr
    installed = _run(str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel))
    if installed.returncode != 0 and "No matching distribution" in installed.stderr:
        pytest.skip(f"pip cannot reach grpcio/protobuf from here: {installed.stderr.strip()[-300:]}")
    assert installed.returncode == 0, installed.stderr
    return venv


def test_the_bare_package_brings_only_grpcio_and_protobuf(bare_venv):
    listed = _run(str(bare_venv / "bin" / "python"), "-m", "pip", "list", "--format", "json")
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert {"loadagg", "grpcio", "protobuf"} <= names
    assert not names & set(NOT_FOR_ROUTERS), names & set(NOT_FOR_ROUTERS)


async def test_a_router_with_the_bare_package_reads_a_live_aggregator(bare_venv, start_aggregator, start_agents):
    agg = await start_aggregator(dp_size=3)
    await start_agents(agg, [[0, 1], [2]])
    python = str(bare_venv / "bin" / "python")
    # Outside the checkout, so that the installed wheel (not ./loadagg) is what runs.
    proc = await asyncio.create_subprocess_exec(python, "-c", ROUTER, f"127.0.0.1:{agg.port}", cwd=str(bare_venv),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out) == {"ranks": [0, 1, 2], "missing": []}

    loads = await asyncio.create_subprocess_exec(str(bare_venv / "bin" / "loadagg"), "loads", "--json", "--target",
                                                 f"127.0.0.1:{agg.port}", cwd=str(bare_venv),
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(loads.communicate(), 60)
    assert loads.returncode == 0, err.decode()
    assert [load.get("dp_rank", 0) for load in json.loads(out)["loads"]] == [0, 1, 2]  # proto names; 0 unset


@pytest.mark.parametrize("command, extra", [
    (["loadagg", "serve", "--port", "0"], "server"),
    (["loadagg", "health"], "server"),
    (["loadagg", "top", "--once"], "top"),
    (["loadagg", "demo", "--duration", "1"], "server,agent"),
    (["scheduler-agent", "--source", "vllm"], "agent"),
])
def test_a_command_without_its_extra_says_which_to_install(bare_venv, command, extra):
    result = subprocess.run([str(bare_venv / "bin" / command[0]), *command[1:]], capture_output=True, text=True,
                            timeout=60, cwd=str(bare_venv))
    assert result.returncode != 0
    assert f"pip install 'loadagg[{extra}]'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
