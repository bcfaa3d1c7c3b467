"""What operators and grpcurl users see: health, reflection, and the grpcurl examples of the README."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


async def test_health_reports_serving(start_aggregator, channel_to):
    agg = await start_aggregator(dp_size=2)
    stub = health_pb2_grpc.HealthStub(channel_to(agg.port))
    for service in ("", "loadagg.v1.LoadAggregator", "loadagg.v1.AgentLink"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(start_aggregator, channel_to):
    agg = await start_aggregator(dp_size=2)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel_to(agg.port))

    async def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = []
    async for reply in stub.ServerReflectionInfo(requests(), timeout=5):
        names = [s.name for s in reply.list_services_response.service]
    assert {"loadagg.v1.LoadAggregator", "loadagg.v1.AgentLink", "grpc.health.v1.Health"} <= set(names)


async def _grpcurl(*args: str) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(subprocess.run, [GRPCURL, *args], capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(not Path(GRPCURL).exists(), reason="grpcurl binary not installed")
async def test_grpcurl_examples_from_the_readme(start_aggregator, start_agents):
    agg = await start_aggregator(dp_size=4)
    await start_agents(agg, [[0, 1], [2, 3]])
    target = f"127.0.0.1:{agg.port}"

    listed = await _grpcurl("-plaintext", target, "list")
    assert listed.returncode == 0, listed.stderr
    assert "loadagg.v1.LoadAggregator" in listed.stdout.split()

    one = await _grpcurl("-plaintext", "-d", '{"dp_rank": 3}', target, "loadagg.v1.LoadAggregator/GetLoads")
    assert one.returncode == 0, one.stderr
    body = json.loads(one.stdout)
    assert [load["dp_rank"] for load in body["loads"]] == [3]
    assert body["dp_size"] == 4 and int(body["round_id"]) > 0  # uint64 prints as a string

    trimmed = await _grpcurl("-plaintext", "-d", '{"include": ["memory"], "dp_rank": 1}', target,
                             "loadagg.v1.LoadAggregator/GetLoads")
    load = json.loads(trimmed.stdout)["loads"][0]
    assert "memory" in load and "gpu" not in load

    bad = await _grpcurl("-plaintext", "-d", '{"dp_rank": 9}', target, "loadagg.v1.LoadAggregator/GetLoads")
    assert bad.returncode != 0
    assert "InvalidArgument" in bad.stderr and "out of range" in bad.stderr

    health = await _grpcurl("-plaintext", target, "grpc.health.v1.Health/Check")
    assert json.loads(health.stdout)["status"] == "SERVING"
