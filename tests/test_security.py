"""Shared-token auth (separate agent and router tokens), TLS and mutual TLS with certificates made at test
time, and the limits (message size, streams per connection, agent links)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import grpc
import pytest
from certs import make_pki
from conftest import ROOT, free_port, wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from raw_agent import RawAgent

from loadagg.cli.health_check import check_health
from loadagg.client.channels import ChannelSecurity, aio_channel
from loadagg.client.load_client import AsyncLoadClient, LoadClient
from loadagg.server.limits import LimitsConfig
from loadagg.server.security import SecurityConfig
from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc
from scheduler_agent.agent import SchedulerAgent
from scheduler_agent.channel import LinkSecurity
from scheduler_agent.config import AgentConfig
from scheduler_agent.sources.simulator import SimulatedSource

AGENT_TOKEN, ROUTER_TOKEN = "agent-secret-1", "router-secret-2"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def _code(awaitable) -> tuple[grpc.StatusCode, str]:
    try:
        await awaitable
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


async def _link_code(agent: RawAgent) -> tuple[grpc.StatusCode, str]:
    """The status a RawAgent's connect ends with (the server may end the call before the hello is written)."""
    try:
        return await _code(agent.connect())
    except asyncio.InvalidStateError:
        return await agent.call.code(), await agent.call.details()


async def _run_agent(config: AgentConfig) -> tuple[SchedulerAgent, asyncio.Task]:
    agent = SchedulerAgent(config, SimulatedSource(seed=1))
    return agent, asyncio.create_task(agent.run())


async def _stop(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_router_and_agent_tokens_are_separate_and_required(start_aggregator, channel_to):
    agg = await start_aggregator(dp_size=1, security=SecurityConfig(agent_token=AGENT_TOKEN, router_token=ROUTER_TOKEN))
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    request = pb.GetLoadsRequest()
    for metadata, reason in [
        ((), "requires the router token"),
        ((), "LoadClient(..., security=ChannelSecurity(token=...))"),  # an API that exists
        (_bearer("guess"), "router token presented for loadagg.v1.LoadAggregator is not valid"),
        (_bearer(AGENT_TOKEN), "is not valid"),  # an agent's token does not open the router service
        ((("authorization", f"Basic {ROUTER_TOKEN}"),), "must be 'Bearer <token>'"),
    ]:
        code, details = await _code(stub.GetLoads(request, metadata=metadata, timeout=5))
        assert code == grpc.StatusCode.UNAUTHENTICATED and reason in details, (metadata, details)
    ok = await stub.GetLoads(request, metadata=_bearer(ROUTER_TOKEN), timeout=5)
    assert ok.dp_size == 1
    # Every router-facing service needs the router token: WatchLoads, and the sglang / vLLM GetLoads twins.
    channel = channel_to(agg.port)
    for method, streaming in (("/loadagg.v1.LoadAggregator/WatchLoads", True),
                              ("/sglang.grpc.scheduler.SglangScheduler/GetLoads", False),
                              ("/vllm.grpc.engine.VllmEngine/GetLoads", False)):
        call = (channel.unary_stream if streaming else channel.unary_unary)(method)(b"", timeout=5)
        code, details = await _code(call.read() if streaming else call)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "router token" in details, method
        with_token = (channel.unary_stream if streaming else channel.unary_unary)(method)(
            b"", metadata=_bearer(ROUTER_TOKEN), timeout=5)
        code, _ = await _code(with_token.read() if streaming else with_token)
        assert code == grpc.StatusCode.OK, method
        with_token.cancel()

    for metadata in ((), _bearer(ROUTER_TOKEN)):  # a router's token does not let anyone claim ranks
        intruder = RawAgent(agg.port, "intruder", [0], metadata=metadata)
        try:
            code, details = await _link_code(intruder)
        finally:
            await intruder.close()
        assert code == grpc.StatusCode.UNAUTHENTICATED and "agent token" in details
    assert not agg.registry.live_ranks()

    # The real agent with the right token links; the client library sends the router token by itself.
    linked, task = await _run_agent(AgentConfig(aggregator=f"127.0.0.1:{agg.port}", instance_id="ok",
                                                security=LinkSecurity(token=AGENT_TOKEN)))
    try:
        await wait_for(lambda: 0 in agg.registry.live_ranks(), what="the agent with the right token")
        async with AsyncLoadClient(f"127.0.0.1:{agg.port}", security=ChannelSecurity(token=ROUTER_TOKEN)) as client:
            assert [l.dp_rank for l in (await client.get_loads()).loads] == [0]
        with LoadClient(f"127.0.0.1:{agg.port}", security=ChannelSecurity(token=ROUTER_TOKEN)) as client:
            response = await asyncio.to_thread(client.get_loads)
            assert [l.dp_rank for l in response.loads] == [0]
        async with AsyncLoadClient(f"127.0.0.1:{agg.port}", security=ChannelSecurity(token=ROUTER_TOKEN)) as client:
            feed = client.watch_loads(interval_ms=50)
            first = await asyncio.wait_for(anext(feed), 10)
            await feed.aclose()
            assert [l.dp_rank for l in first.loads] == [0]
    finally:
        await _stop(task)
    assert agg.guard.refused["UNAUTHENTICATED"] == 10


async def test_agent_with_a_wrong_token_is_refused_and_backs_off(start_aggregator):
    agg = await start_aggregator(dp_size=1, security=SecurityConfig(agent_token=AGENT_TOKEN))
    agent, task = await _run_agent(AgentConfig(aggregator=f"127.0.0.1:{agg.port}", instance_id="wrong",
                                               security=LinkSecurity(token="nope")))
    try:
        await wait_for(lambda: agent.last_refusal is not None, what="the refusal")
        assert agent.last_refusal.code() == grpc.StatusCode.UNAUTHENTICATED
        refused = agg.guard.refused["UNAUTHENTICATED"]
        await asyncio.sleep(1.5)  # a refusal backs off to the maximum (5 s, full jitter): a retry or two at most
        assert agg.guard.refused["UNAUTHENTICATED"] - refused <= 3
        assert not agg.registry.live_ranks() and agent.connects == 0
    finally:
        await _stop(task)


async def test_health_and_reflection_stay_open_without_a_token(start_aggregator, channel_to):
    agg = await start_aggregator(dp_size=1, security=SecurityConfig(agent_token=AGENT_TOKEN, router_token=ROUTER_TOKEN))
    health = health_pb2_grpc.HealthStub(channel_to(agg.port))
    reply = await health.Check(health_pb2.HealthCheckRequest(service="loadagg.v1.LoadAggregator"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING

    async def list_services():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel_to(agg.port))
    names = [s.name async for reply in reflection.ServerReflectionInfo(list_services(), timeout=5)
             for s in reply.list_services_response.service]
    assert "loadagg.v1.LoadAggregator" in names and not agg.guard.refused


async def test_tls_server_with_a_trusted_ca(start_aggregator, pki):
    agg = await start_aggregator(dp_size=1, security=SecurityConfig(tls_cert=pki.server.cert, tls_key=pki.server.key))
    target = f"127.0.0.1:{agg.port}"
    linked, task = await _run_agent(AgentConfig(aggregator=target, instance_id="tls",
                                                security=LinkSecurity(tls_ca=pki.ca)))
    try:
        await wait_for(lambda: 0 in agg.registry.live_ranks(), what="the agent over TLS")
        async with AsyncLoadClient(target, security=ChannelSecurity(tls_ca=pki.ca)) as client:
            assert not (await client.get_loads()).missing_ranks
        assert (await asyncio.to_thread(check_health, target, security=ChannelSecurity(tls_ca=pki.ca))).serving
        assert not (await asyncio.to_thread(check_health, target)).serving  # plaintext probe on a TLS port
        # Plaintext to a TLS port, or TLS trusting another CA: the handshake fails, the call is refused.
        for security in (ChannelSecurity(), ChannelSecurity(tls_ca=pki.rogue_ca)):
            async with AsyncLoadClient(target, security=security, timeout=5) as client:
                code, _ = await _code(client.get_loads())
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        await _stop(task)


async def test_mutual_tls_requires_a_client_certificate_from_the_ca(start_aggregator, pki):
    agg = await start_aggregator(dp_size=1, security=SecurityConfig(
        tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca, agent_token=AGENT_TOKEN))
    target = f"127.0.0.1:{agg.port}"
    for security in (ChannelSecurity(tls_ca=pki.ca),  # no client certificate
                     ChannelSecurity(tls_ca=pki.ca, tls_cert=pki.rogue_client.cert, tls_key=pki.rogue_client.key)):
        async with AsyncLoadClient(target, security=security, timeout=5) as client:
            code, _ = await _code(client.get_loads())
        assert code == grpc.StatusCode.UNAVAILABLE
    link = LinkSecurity(tls_ca=pki.ca, tls_cert=pki.client.cert, tls_key=pki.client.key, token=AGENT_TOKEN)
    linked, task = await _run_agent(AgentConfig(aggregator=target, instance_id="mtls", security=link))
    try:
        await wait_for(lambda: 0 in agg.registry.live_ranks(), what="the agent over mutual TLS")
        good = ChannelSecurity(tls_ca=pki.ca, tls_cert=pki.client.cert, tls_key=pki.client.key)
        async with AsyncLoadClient(target, security=good) as client:
            response = await client.get_loads()
        assert (await asyncio.to_thread(check_health, target, security=good)).serving
        assert [l.dp_rank for l in response.loads] == [0] and not response.missing_ranks
    finally:
        await _stop(task)


async def test_processes_over_mutual_tls_with_tokens(processes, pki):
    """`loadagg serve`, `scheduler-agent` and `loadagg loads` as processes, every TLS and token flag in use."""
    port = free_port()
    processes.start("loadagg", "serve", "--host", "127.0.0.1", "--port", str(port), "--dp-size", "2",
                    "--tls-cert", pki.server.cert, "--tls-key", pki.server.key, "--tls-client-ca", pki.ca,
                    env={"LOADAGG_AGENT_TOKEN": AGENT_TOKEN, "LOADAGG_ROUTER_TOKEN": ROUTER_TOKEN})
    tls = ["--tls-ca", pki.ca, "--tls-cert", pki.client.cert, "--tls-key", pki.client.key]
    processes.agent(port, [0, 1], 2, *tls, "--token", AGENT_TOKEN)

    def loads(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "loadagg", "loads", "--target", f"127.0.0.1:{port}", "--json",
                               *extra], capture_output=True, text=True, timeout=30, cwd=ROOT)

    deadline = asyncio.get_running_loop().time() + 40
    while True:
        result = await asyncio.to_thread(loads, *tls, "--token", ROUTER_TOKEN)
        if result.returncode == 0 and len(json.loads(result.stdout).get("loads", [])) == 2:
            break
        assert asyncio.get_running_loop().time() < deadline, result.stderr
        await asyncio.sleep(0.3)
    no_token = await asyncio.to_thread(loads, *tls)
    assert no_token.returncode == 1 and "UNAUTHENTICATED" in no_token.stderr


async def test_message_size_limit(start_aggregator, channel_to):
    agg = await start_aggregator(dp_size=2, round_timeout_ms=300, limits=LimitsConfig(max_message_bytes=2048))
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    code, details = await _code(stub.GetLoads(pb.GetLoadsRequest(include=["memory"] * 500), timeout=5))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # An agent sending an oversized report loses its link (and its ranks); others are unaffected.
    big = RawAgent(agg.port, "big", [0])
    try:
        await big.connect()
        gpus = pb.GpuMetrics(devices=[pb.GpuDevice(index=i, name="x" * 64) for i in range(64)])
        await big.report(0, [pb.RankLoad(dp_rank=0, gpu=gpus)])
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await big.read()
        assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await big.close()
    await wait_for(lambda: not agg.registry.live_ranks(), what="the oversized agent's ranks to be released")
    response = await stub.GetLoads(pb.GetLoadsRequest(), timeout=5)
    assert list(response.missing_ranks) == [0, 1]


async def test_concurrent_streams_per_connection_are_capped(start_aggregator):
    agg = await start_aggregator(dp_size=1, round_timeout_ms=5000, limits=LimitsConfig(max_concurrent_streams=2))
    agent = RawAgent(agg.port, "holder", [0])
    await agent.connect()
    # A connection of its own (channels to one target otherwise share one, the agent's stream included).
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{agg.port}", options=[("grpc.use_local_subchannel_pool", 1)])
    stub = pb_grpc.LoadAggregatorStub(channel)
    # Let the server's SETTINGS (with its stream limit) arrive first: streams opened before that are refused
    # by the server (RST_STREAM REFUSED_STREAM, seen as UNAVAILABLE) instead of queued by the client.
    health = health_pb2_grpc.HealthStub(channel)
    await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    calls = [asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(), timeout=20)) for _ in range(6)]
    try:
        first = await agent.next_collect()  # the agent holds the round: the calls stay in flight
        await wait_for(lambda: agg.loads.in_flight == 2, what="two calls in flight")
        for _ in range(20):  # the other four wait on the client side, not in the server
            await asyncio.sleep(0.01)
            assert agg.loads.in_flight == 2
        await agent.report(first.round_id, [pb.RankLoad(dp_rank=0, num_running_reqs=1)])

        async def keep_answering():
            while True:
                collect = await agent.next_collect(timeout=30)
                await agent.report(collect.round_id, [pb.RankLoad(dp_rank=0, num_running_reqs=1)])

        answering = asyncio.create_task(keep_answering())
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        # gRPC's client queues streams beyond the limit, but a stream opened in the instant a slot frees up
        # can still be refused by the server (RST_STREAM REFUSED_STREAM -> UNAVAILABLE, safe to retry).
        answered = [o for o in outcomes if isinstance(o, pb.GetLoadsResponse)]
        refused = [o for o in outcomes if not isinstance(o, pb.GetLoadsResponse)]
        assert all(isinstance(o, grpc.aio.AioRpcError) and o.code() == grpc.StatusCode.UNAVAILABLE for o in refused)
        assert len(answered) >= 2 and all(not r.missing_ranks for r in answered)
        assert not (await stub.GetLoads(pb.GetLoadsRequest(), timeout=20)).missing_ranks  # still serving
        answering.cancel()
    finally:
        await agent.close()
        await channel.close()


async def test_agent_links_are_capped(start_aggregator):
    agg = await start_aggregator(dp_size=3, limits=LimitsConfig(max_agent_links=2))
    a, b = RawAgent(agg.port, "agent-0", [0]), RawAgent(agg.port, "agent-1", [1])
    c = None
    try:
        await a.connect()
        await b.connect()
        c = RawAgent(agg.port, "agent-2", [2])  # (its stream opens now: an open stream counts, hello or not)
        code, details = await _link_code(c)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-agent-links 2" in details
        await a.close()
        await wait_for(lambda: agg.guard.agent_links == 1, what="a link to close")
        c2 = RawAgent(agg.port, "agent-2", [2])
        try:
            assert (await c2.connect()).WhichOneof("kind") == "welcome"
            assert agg.registry.live_ranks() == {1, 2}
        finally:
            await c2.close()
    finally:
        for agent in (a, b, c):
            if agent is not None:
                await agent.close()
    await wait_for(lambda: agg.guard.agent_links == 0, what="every link closed")


@pytest.mark.parametrize(("refusal", "code"), [("link cap", "RESOURCE_EXHAUSTED"), ("wrong token", "UNAUTHENTICATED")])
async def test_a_refused_agent_sees_the_refusal_not_an_internal_error(start_aggregator, processes, refusal, code):
    """A real agent process retrying against an aggregator that refuses it (links full, or a wrong token): every
    refusal it logs carries the refusal's status. Ending the call while the agent's hello was still on its way
    reached it as INTERNAL "Internal error from Core" about one time in twenty; the guard now takes the hello
    before it refuses."""
    if refusal == "link cap":
        agg = await start_aggregator(dp_size=2, limits=LimitsConfig(max_agent_links=1))
        holder, token = RawAgent(agg.port, "holder", [0], 2), []
    else:
        agg = await start_aggregator(dp_size=2, security=SecurityConfig(agent_token=AGENT_TOKEN))
        holder, token = None, ["--token", "not-the-agent-token"]
    try:
        if holder is not None:
            await holder.connect()
        agent = processes.agent(agg.port, [1], 2, "--instance-id", "refused", "--backoff-initial-ms", "10",
                                "--backoff-max-ms", "60", *token)
        seen: list[str] = []

        def read_log() -> None:
            for line in agent.stdout:  # bounded: the agent is killed once 60 refusals are in
                for said in ("lost: ", "refused this agent: "):
                    if said in line:
                        seen.append(line.split(said, 1)[1].split(":", 1)[0])
                if len(seen) == 60:
                    return

        await asyncio.wait_for(asyncio.to_thread(read_log), 60)
        agent.kill()
    finally:
        if holder is not None:
            await holder.close()
    assert seen == [code] * 60, sorted(set(seen))


async def test_security_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="go together"):
        SecurityConfig(tls_cert="x.crt")
    with pytest.raises(ValueError, match="needs --tls-cert"):
        SecurityConfig(tls_client_ca="ca.crt")
    (tmp_path / "server.key").write_text("key")
    with pytest.raises(ValueError, match="cannot read --tls-cert .*missing.crt"):
        SecurityConfig(tls_cert=str(tmp_path / "missing.crt"),
                       tls_key=str(tmp_path / "server.key")).server_credentials()
    assert "secret" not in repr(SecurityConfig(agent_token="secret", router_token="secret"))
    assert "secret" not in repr(ChannelSecurity(token="secret")) and "secret" not in repr(LinkSecurity(token="secret"))
    aio_channel("127.0.0.1:1", ChannelSecurity(token="t"))  # builds without connecting


async def test_http_loads_needs_the_router_token_metrics_stay_open(start_aggregator):
    import aiohttp

    agg = await start_aggregator(dp_size=1, http_port=0, security=SecurityConfig(router_token=ROUTER_TOKEN))
    base = f"http://127.0.0.1:{agg.http_port}"
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": "Bearer guess"}, {"Authorization": f"Bearer {AGENT_TOKEN}"}):
            async with session.get(f"{base}/v1/loads", headers=headers) as reply:
                assert reply.status == 401 and (await reply.json())["code"] == "UNAUTHENTICATED"
                assert reply.headers["WWW-Authenticate"].startswith("Bearer")
        async with session.get(f"{base}/v1/loads", headers={"Authorization": f"Bearer {ROUTER_TOKEN}"}) as reply:
            assert reply.status == 200
        async with session.get(f"{base}/metrics") as reply:
            text = await reply.text()
            assert reply.status == 200 and "loadagg_dp_size" in text
            assert "loadagg_agent_links 0.0" in text and "loadagg_calls_refused_total" in text
