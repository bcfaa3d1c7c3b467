"""The HTTP gateway's descriptors (issue 19): idle or half-sent connections are closed after the idle timeout,
and however many an HTTP client opens, a new router's GetLoads and a restarted agent's link still work, under
an open-files limit as low as 256 (the aggregator a real process, the connections real sockets)."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import time

import grpc
from conftest import free_port, wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc
from raw_agent import RawAgent

from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc

NOFILE = 256
IDLE_CONNECTIONS = 300  # more than the aggregator's whole descriptor limit


def _open_files_limit(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


async def _get_loads(port: int, timeout: float = 5.0) -> pb.GetLoadsResponse:
    """A new router: a connection of its own (no subchannel shared with earlier calls)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        return await pb_grpc.LoadAggregatorStub(ch).GetLoads(pb.GetLoadsRequest(), timeout=timeout)


async def _serving(port: int) -> bool:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.aio.AioRpcError:
            return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING


async def _until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.1)


async def test_idle_http_connections_never_starve_grpc(processes):
    port, http_port = free_port(), free_port()
    aggregator = processes.start("loadagg", "serve", "--host", "127.0.0.1", "--port", str(port), "--http-port",
                                 str(http_port), "--dp-size", "1", "--http-idle-timeout-s", "120",
                                 preexec_fn=_open_files_limit(NOFILE))
    await _until(lambda: _serving(port), 40, "the aggregator to serve")
    agent = processes.agent(port, [0], 1, "--instance-id", "first")

    async def linked() -> bool:
        with contextlib.suppress(grpc.aio.AioRpcError):
            return not (await _get_loads(port)).missing_ranks
        return False

    await _until(linked, 40, "the agent to link")
    sockets = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            sockets.append(socket.create_connection(("127.0.0.1", http_port), timeout=5))
        # Past the cap (half the descriptors), connections are answered 503 and closed at once.
        sockets[-1].settimeout(10)
        assert sockets[-1].recv(4096).startswith(b"HTTP/1.1 503"), "the last connection was not refused"
        answer = await _get_loads(port)  # DEADLINE_EXCEEDED before: no descriptor left to accept it
        assert [load.dp_rank for load in answer.loads] == [0]
        agent.kill()
        agent.wait(10)
        processes.agent(port, [0], 1, "--instance-id", "second")  # "File descriptor limit reached" before
        await _until(linked, 40, "the restarted agent to link again")
    finally:
        for sock in sockets:
            sock.close()
    assert aggregator.poll() is None
    aggregator.terminate()
    output = aggregator.communicate(timeout=20)[0]
    assert f"open-files limit: {NOFILE}" in output and "at most 128 connections" in output, output[-2000:]


async def test_idle_and_half_sent_http_connections_are_closed(start_aggregator):
    from loadagg.server.limits import LimitsConfig

    agg = await start_aggregator(dp_size=1, http_port=0, limits=LimitsConfig(http_idle_timeout_s=0.5))
    idle = socket.create_connection(("127.0.0.1", agg.http_port), timeout=5)
    half = socket.create_connection(("127.0.0.1", agg.http_port), timeout=5)
    half.sendall(b"GET /v1/loads HTTP/1.1\r\nHost: x\r\n")  # the headers never end
    try:
        for sock in (idle, half):
            sock.setblocking(False)
        closed: dict[str, float] = {}
        started = time.monotonic()

        def check() -> bool:
            for name, sock in (("idle", idle), ("half", half)):
                with contextlib.suppress(BlockingIOError):
                    if sock.recv(1) == b"" and name not in closed:
                        closed[name] = time.monotonic() - started
            return len(closed) == 2

        await wait_for(check, 10, "the idle and the half-sent connection to be closed")
        assert all(0.3 < after < 5 for after in closed.values()), closed
    finally:
        idle.close()
        half.close()


def _largest_load(rank: int, share: int) -> pb.RankLoad:
    """Every figure set, and the strings as long as the rank's share of an answer allows (a big JSON entry)."""
    load = pb.RankLoad(dp_rank=rank)
    for section in ("", "memory", "spec", "lora", "disagg", "queues"):
        message = getattr(load, section) if section else load
        message.SetInParent()
        for field in message.DESCRIPTOR.fields:
            if field.type in (field.TYPE_DOUBLE, field.TYPE_FLOAT):
                setattr(message, field.name, 0.123456789012345)
            elif field.type in (field.TYPE_INT32, field.TYPE_INT64) and field.name != "dp_rank":
                setattr(message, field.name, 2**31 - 1)
    for chars in range(256, 0, -1):
        load.disagg.mode, load.accelerator = "m" * chars, f"{rank:05d}" + "a" * (chars - 5)
        if load.ByteSize() <= share:
            return load
    raise AssertionError("no load fits the share")


async def test_an_answer_its_client_never_reads_is_dropped(start_aggregator):
    """A client asks for a multi-megabyte answer and never reads it: once the idle timeout has passed, the
    connection is aborted and its slot and the answer's bytes are back (aiohttp alone waited for ever)."""
    from loadagg.server.limits import LimitsConfig

    dp_size = 4096
    agg = await start_aggregator(dp_size=dp_size, http_port=0, limits=LimitsConfig(http_idle_timeout_s=0.5))
    agent = RawAgent(agg.port, "wide", list(range(dp_size)), own_connection=True)
    sock = socket.socket()
    try:
        await agent.connect()
        await agent.report(0, [_largest_load(rank, agg.agents.rank_share) for rank in range(dp_size)])
        await wait_for(lambda: len(agg.registry.snapshots()) == dp_size, 10, "every rank's pushed load")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", agg.http_port))
        sock.sendall(b"GET /v1/loads?max_staleness_ms=60000 HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_for(lambda: agg.http.listener.open == 1, 10, "the gateway to take the request")
        await wait_for(lambda: agg.http.listener.open == 0, 10, "the unread answer's connection to be aborted")
        assert agg.http.sends_timed_out == 1
    finally:
        sock.close()
        await agent.close()
