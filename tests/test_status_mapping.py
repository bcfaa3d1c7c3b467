"""Each refusal reaches a gRPC client and an HTTP client with the status errors.py maps it to (one table)."""

from __future__ import annotations

import ast
import asyncio
import json
from pathlib import Path

import aiohttp
import grpc
from conftest import wait_for
from raw_agent import RawAgent

from loadagg.server import errors
from loadagg.server.limits import LimitsConfig
from loadagg.server.security import SecurityConfig
from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
ROUTER_TOKEN = "router-secret"
GET_LOADS = "/loadagg.v1.LoadAggregator/GetLoads"


async def _grpc_code(call) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


async def _http(port: int, query: str = "", headers: dict | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/v1/loads{query}", headers=headers or {}) as reply:
            return reply.status, await reply.json()


def _same_refusal(grpc_seen: tuple[grpc.StatusCode, str], http_seen: tuple[int, dict], phrase: str) -> None:
    """The HTTP client got the table's status for the code the gRPC client got, that code's name, and the reason."""
    code, details = grpc_seen
    status, body = http_seen
    assert code != grpc.StatusCode.OK and phrase in details, grpc_seen
    assert status == errors.HTTP_STATUS[code] and body["code"] == code.name and phrase in body["error"], http_seen


def test_every_error_has_its_http_status():
    expected = {errors.InvalidRequest: 400, errors.Unauthenticated: 401, errors.RankConflict: 409,
                errors.ResourceExhausted: 429, errors.NotServed: 501, errors.ShuttingDown: 503, errors.AtCapacity: 503,
                errors.DeadlineTooShort: 504, errors.LinkReplaced: 500, errors.LoadAggError: 500}
    assert {kind: errors.http_status(kind("x")) for kind in expected} == expected
    assert errors.http_body(errors.ShuttingDown()) == {"error": errors.DRAINING, "code": "UNAVAILABLE"}


def test_only_the_errors_module_ends_a_call_with_a_status():
    """Every refusal goes through errors.abort_with: a status written anywhere else escapes the one mapping."""
    found = []
    for path in sorted([*(ROOT / "loadagg").rglob("*.py"), *(ROOT / "scheduler_agent").rglob("*.py")]):
        if path == ROOT / "loadagg/server/errors.py" or "_pb2" in path.name:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "abort":
                receiver = node.func.value
                if isinstance(receiver, ast.Attribute) and receiver.attr == "transport":
                    continue  # a socket reset (an HTTP answer never taken), no status
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


async def test_unauthenticated_and_invalid_reach_both_clients_mapped(start_aggregator, channel_to):
    agg = await start_aggregator(dp_size=2, http_port=0, security=SecurityConfig(router_token=ROUTER_TOKEN))
    channel = channel_to(agg.port)
    stub = pb_grpc.LoadAggregatorStub(channel)
    no_token = await _grpc_code(stub.GetLoads(pb.GetLoadsRequest(), timeout=5))
    _same_refusal(no_token, await _http(agg.http_port), "router token")

    bearer = (("authorization", f"Bearer {ROUTER_TOKEN}"),)
    headers = {"Authorization": f"Bearer {ROUTER_TOKEN}"}
    out_of_range = await _grpc_code(stub.GetLoads(pb.GetLoadsRequest(dp_rank=9), metadata=bearer, timeout=5))
    _same_refusal(out_of_range, await _http(agg.http_port, "?dp_rank=9", headers), "dp_rank")
    # Bytes that are no GetLoadsRequest: the guard's strict decode refuses them.
    raw = channel.unary_unary(GET_LOADS, request_serializer=None, response_deserializer=None)
    malformed = await _grpc_code(raw(b"\xff\xff\xff", metadata=bearer, timeout=5))
    assert malformed[0] == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in malformed[1], malformed
    _same_refusal(malformed, await _http(agg.http_port, "?dp_rank=abc", headers), "")
    assert agg.guard.refused["UNAUTHENTICATED"] == 1 and agg.guard.refused["INVALID_ARGUMENT"] == 1
    assert (await stub.GetLoads(pb.GetLoadsRequest(), metadata=bearer, timeout=5)).missing_ranks == [0, 1]


async def test_draining_reaches_both_clients_mapped(start_aggregator, start_agents, channel_to):
    agg = await start_aggregator(dp_size=1, http_port=0, round_timeout_ms=3000, grace_s=3.0)
    await start_agents(agg, [[0]], collect_latency_ms=800)
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    in_flight = asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(), timeout=10))  # holds the drain open
    await wait_for(lambda: agg.communicator.rounds_in_flight == 1, what="a round in flight")
    stopping = asyncio.ensure_future(agg.stop())
    await wait_for(lambda: agg.guard.draining, what="draining")
    refused = await _grpc_code(stub.GetLoads(pb.GetLoadsRequest(), timeout=5))
    _same_refusal(refused, await _http(agg.http_port), "shutting down")
    assert len((await in_flight).loads) == 1
    await stopping


async def test_agent_link_cap_reaches_the_agent_mapped(start_aggregator):
    """Only agents open links, so this refusal has no HTTP client; its code is the one the table maps to 429."""
    agg = await start_aggregator(dp_size=2, limits=LimitsConfig(max_agent_links=1))
    holder, refused = RawAgent(agg.port, "holder", [0]), None
    try:
        await holder.connect()
        refused = RawAgent(agg.port, "refused", [1])  # (its stream opens now: an open stream counts, hello or not)
        try:
            code, details = await _grpc_code(refused.connect())
        except asyncio.InvalidStateError:  # the server ended the call before the hello was written
            code, details = await refused.call.code(), await refused.call.details()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-agent-links 1" in details
        assert errors.HTTP_STATUS[code] == 429 and agg.guard.refused["RESOURCE_EXHAUSTED"] == 1
    finally:
        await holder.close()
        if refused is not None:
            await refused.close()


async def test_the_http_connection_cap_reaches_the_client_mapped(start_aggregator):
    """A connection past --http-max-connections is answered before aiohttp sees it: still by the one table."""
    agg = await start_aggregator(dp_size=1, http_port=0, limits=LimitsConfig(http_max_connections=1))
    held = await asyncio.open_connection("127.0.0.1", agg.http_port)
    try:
        await wait_for(lambda: agg.http.listener.open == 1, what="the first connection to be accepted")
        reader, writer = await asyncio.open_connection("127.0.0.1", agg.http_port)
        answer = await asyncio.wait_for(reader.read(), 10)  # answered and closed at once
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        status, refusal = int(head.split()[1]), json.loads(body)
        assert status == errors.HTTP_STATUS[grpc.StatusCode[refusal["code"]]], (status, refusal)
        assert "--http-max-connections" in refusal["error"] and agg.http.listener.refused == 1
    finally:
        held[1].close()
