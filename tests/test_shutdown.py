"""SIGTERM on a real `loadagg serve` process: no new RPCs, the calls in flight are answered, agent streams are
closed cleanly (status OK), and the process exits 0."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import grpc
from conftest import free_port
from figures import record
from grpc_health.v1 import health_pb2, health_pb2_grpc
from raw_agent import RawAgent

from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc

IN_FLIGHT = 20


async def _start(processes, *flags: str) -> tuple[object, int, RawAgent]:
    """A serve process with a RawAgent on rank 0 (the test decides when rounds end); waits until it links."""
    port = free_port()
    server = processes.start("loadagg", "serve", "--host", "127.0.0.1", "--port", str(port), *flags)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 40
    while True:
        agent = RawAgent(port, "held", [0])
        try:
            await agent.connect()
            return server, port, agent
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await agent.close()
            assert server.poll() is None and loop.time() < deadline, "loadagg serve never came up"
            await asyncio.sleep(0.2)


async def _until_draining(port: int) -> None:
    """Health turns NOT_SERVING once SIGTERM is being handled (the port stays open while calls drain)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(400):
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                return
            await asyncio.sleep(0.05)
    raise AssertionError("the server never started draining")


async def test_sigterm_answers_calls_in_flight_and_refuses_new_ones(processes):
    server, port, held = await _start(processes, "--dp-size", "2", "--round-timeout-ms", "20000", "--grace-s", "15")
    agent = processes.agent(port, [1], 2, "--instance-id", "real-agent")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.LoadAggregatorStub(channel)
    try:
        # Wait until the real agent process serves rank 1 (the RawAgent answers these warm-up rounds).
        for _ in range(200):
            call = asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(), timeout=20))
            collect = await held.next_collect(timeout=20)
            await held.report(collect.round_id, [pb.RankLoad(dp_rank=0, num_running_reqs=1)])
            if not (await call).missing_ranks:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the agent process never linked")

        calls = [asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(), timeout=30)) for _ in range(IN_FLIGHT)]
        collect = await held.next_collect(timeout=20)  # the round is in flight and held by rank 0
        await asyncio.sleep(1.0)  # let every call reach the server and join that round
        server.send_signal(signal.SIGTERM)
        await _until_draining(port)

        # New calls are refused at once, with a status that says why.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as fresh:
            try:
                await pb_grpc.LoadAggregatorStub(fresh).GetLoads(pb.GetLoadsRequest(), timeout=10)
                raise AssertionError("a call started after SIGTERM was accepted")
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in error.details()
        assert not any(call.done() for call in calls)  # ... while the calls in flight still wait
        # `loadagg health` (the container probe) says so too, instead of "connection refused".
        probe = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "loadagg", "health", "--target",
                                        f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=30)
        assert probe.returncode == 1 and "NOT_SERVING" in probe.stdout + probe.stderr, probe

        await held.report(collect.round_id, [pb.RankLoad(dp_rank=0, num_running_reqs=42)])
        responses = await asyncio.gather(*calls)
        assert {r.round_id for r in responses} == {collect.round_id}
        for response in responses:
            assert not response.missing_ranks
            assert [(l.dp_rank, l.num_running_reqs if l.dp_rank == 0 else None) for l in response.loads] == [
                (0, 42), (1, None)]
        # Then the agent streams are closed cleanly and the process exits 0.
        try:
            while True:
                await held.read(timeout=20)
        except EOFError as closed:
            assert "status OK" in str(closed)
        assert await asyncio.to_thread(server.wait, 30) == 0
        out = server.stdout.read()
        assert "aggregator stopped" in out
        agent.terminate()
        agent_log = (await asyncio.to_thread(agent.communicate, timeout=20))[0]
        assert "aggregator closed the link" in agent_log
        record("shutdown_sigterm", calls_in_flight=IN_FLIGHT, answered=len(responses), refused_after_sigterm=1)
    finally:
        await held.close()
        await channel.close()


async def test_calls_outlasting_the_grace_period_still_get_an_answer(processes):
    """Rounds longer than the grace period end early: the caller gets its answer with the rank missing."""
    server, port, held = await _start(processes, "--dp-size", "1", "--round-timeout-ms", "30000", "--grace-s", "1")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        calls = [asyncio.ensure_future(pb_grpc.LoadAggregatorStub(channel).GetLoads(
            pb.GetLoadsRequest(allow_stale=True), timeout=30)) for _ in range(5)]
        await held.next_collect(timeout=20)  # never answered
        await asyncio.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        responses = await asyncio.gather(*calls)
        assert all(list(r.missing_ranks) == [0] and not r.loads for r in responses)
        assert await asyncio.to_thread(server.wait, 30) == 0
        assert "ending their rounds now" in server.stdout.read()
    finally:
        await held.close()
        await channel.close()
