"""The client library against real aggregator processes: typed answers, deadlines, retries across a restart."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import urllib.request

import grpc
import pytest
from conftest import ROOT, free_port
from smg_grpc_proto import sglang_scheduler_pb2 as sg
from smg_grpc_proto import sglang_scheduler_pb2_grpc as sg_grpc
from smg_grpc_proto import vllm_engine_pb2 as vl
from smg_grpc_proto import vllm_engine_pb2_grpc as vl_grpc

from loadagg.client.load_client import NO_RETRY, AsyncLoadClient, LoadClient, Loads, RetryPolicy

PATIENT = RetryPolicy(attempts=60, initial_backoff_s=0.05, max_backoff_s=0.5)


def _serve(processes, port: int, dp_size: int = 2):
    return processes.start("loadagg", "serve", "--host", "127.0.0.1", "--port", str(port), "--dp-size",
                           str(dp_size), "--grace-s", "1", "--log-level", "WARNING")


def _wait_complete(client: LoadClient, ranks: int, timeout: float = 30.0) -> Loads:
    deadline = time.monotonic() + timeout
    while True:
        loads = client.get_loads()
        if len(loads.loads) == ranks:
            return loads
        assert time.monotonic() < deadline, f"ranks never all answered: {loads.response}"
        time.sleep(0.1)


def _stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


def test_sync_client_retries_unavailable_across_an_aggregator_restart(processes):
    port = free_port()
    target = f"127.0.0.1:{port}"
    server = _serve(processes, port)
    processes.agent(port, [0, 1], 2, "--log-level", "WARNING")
    with LoadClient(target, timeout=60, retry=PATIENT) as client:
        before = _wait_complete(client, 2)
        assert before.source == "round" and before.complete and before.dp_size == 2

        _stop(server)
        with LoadClient(target, timeout=5, retry=NO_RETRY) as impatient:
            with pytest.raises(grpc.RpcError) as info:
                impatient.get_loads()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE

        retries = client.retries
        _serve(processes, port)  # the same port; the process takes a while to come up
        after = client.get_loads()  # fails UNAVAILABLE until the new aggregator listens, then answers
        assert client.retries > retries
        assert after.dp_size == 2
        # The agent process reconnects to the new aggregator by itself.
        assert _wait_complete(client, 2).complete


def test_retries_are_bounded_and_respect_the_deadline(processes):
    port = free_port()  # nothing listens here
    with LoadClient(f"127.0.0.1:{port}", timeout=30, retry=RetryPolicy(attempts=3, initial_backoff_s=0.01)) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.get_loads()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert client.retries == 2  # three attempts in all
    with LoadClient(f"127.0.0.1:{port}", timeout=0.3, retry=PATIENT) as client:
        with pytest.raises(grpc.RpcError):
            client.get_loads()
        assert client.retries < PATIENT.attempts - 1  # the deadline ended the retries first


async def test_async_watch_resubscribes_across_an_aggregator_restart(processes):
    port = free_port()
    target = f"127.0.0.1:{port}"
    server = _serve(processes, port, dp_size=1)
    processes.agent(port, [0], 1, "--log-level", "WARNING")
    async with AsyncLoadClient(target, timeout=60, retry=PATIENT) as client:
        feed = client.watch_loads(interval_ms=50)
        seen: list[int] = []
        restarted = False
        async with asyncio.timeout(60):
            async for loads in feed:
                seen.append(loads.round_id)
                if len(seen) == 3 and not restarted:
                    await asyncio.to_thread(_stop, server)
                    _serve(processes, port, dp_size=1)
                    restarted = True
                elif restarted and loads.round_id < seen[2]:  # a round of the new aggregator
                    break
        await feed.aclose()
    assert restarted and client.retries >= 1
    print(f"watch across restart: round ids {seen}, {client.retries} resubscriptions")


async def test_a_resubscribed_watch_never_hands_out_the_same_round_twice(start_aggregator, start_agents,
                                                                           channel_to):
    """A watch stream that ends while other watchers keep its interval's ticker going: the new stream starts
    with the ticker's current answer, which the consumer already had; the client skips it (async and blocking)."""
    from loadagg.v1 import loadagg_pb2 as pb
    from loadagg.v1 import loadagg_pb2_grpc as pb_grpc

    agg = await start_aggregator(dp_size=1)
    await start_agents(agg, [[0]])
    keeper = pb_grpc.LoadAggregatorStub(channel_to(agg.port)).WatchLoads(pb.WatchLoadsRequest(interval_ms=1500))
    await keeper.read()
    retry = RetryPolicy(attempts=5, initial_backoff_s=0.01, max_backoff_s=0.05)

    keeper_sub = agg.watch.subscriptions()[0]

    def end_the_client_stream() -> None:
        for sub in agg.watch.subscriptions():
            if sub is not keeper_sub:
                sub.close()  # the server ends that stream (status OK), as a lost link would end it

    async with AsyncLoadClient(f"127.0.0.1:{agg.port}", retry=retry) as client:
        feed = client.watch_loads(interval_ms=1500)
        first = await anext(feed)
        end_the_client_stream()
        second = await asyncio.wait_for(anext(feed), 10)
        await feed.aclose()
    assert client.retries == 1 and second.round_id > first.round_id

    def blocking() -> tuple[int, int, int]:
        with LoadClient(f"127.0.0.1:{agg.port}", retry=retry) as client:
            feed = client.watch_loads(interval_ms=1500)
            first = next(feed)
            agg_loop.call_soon_threadsafe(end_the_client_stream)
            second = next(feed)
            feed.close()
            return client.retries, first.round_id, second.round_id

    agg_loop = asyncio.get_running_loop()
    retries, first_id, second_id = await asyncio.wait_for(asyncio.to_thread(blocking), 20)
    assert retries == 1 and second_id > first_id
    keeper.cancel()


async def test_a_watch_out_of_attempts_after_a_clean_end_raises(start_aggregator, start_agents):
    """NO_RETRY: the aggregator ending the stream cleanly (its graceful shutdown) is raised as WatchEnded,
    never a silent end of the consumer's loop."""
    from loadagg.client import WatchEnded

    agg = await start_aggregator(dp_size=1)
    await start_agents(agg, [[0]])
    async with AsyncLoadClient(f"127.0.0.1:{agg.port}", retry=NO_RETRY) as client:
        feed = client.watch_loads(interval_ms=50)
        await anext(feed)
        for sub in agg.watch.subscriptions():
            sub.close()
        with pytest.raises(WatchEnded) as ended:
            async with asyncio.timeout(10):
                async for _ in feed:
                    pass
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and "no more attempts" in ended.value.details()


async def test_async_get_loads_typed_answer(start_aggregator, start_agents):
    agg = await start_aggregator(dp_size=3)
    await start_agents(agg, [[0], [2]])
    async with AsyncLoadClient(f"127.0.0.1:{agg.port}") as client:
        loads = await client.get_loads(include=["core"], allow_stale=False)
        assert isinstance(loads, Loads)
        assert loads.dp_size == 3 and loads.missing_ranks == (1,) and not loads.complete
        assert [load.dp_rank for load in loads.loads] == [0, 2] and loads.rank(1) is None
        assert loads.summary.num_ranks == 2 and loads.source == "round"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.get_loads(include=["nonsense"])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_loads_cli_uses_the_client_with_freshness(start_aggregator, start_agents):
    agg = await start_aggregator(dp_size=2)
    await start_agents(agg, [[0], [1]])

    async def loads(*args: str) -> dict:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadagg", "loads", "--target", f"127.0.0.1:{agg.port}", "--json", *args,
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        return json.loads(out)

    first = await loads("--freshness", "new_round")
    assert first["source"] == "ANSWER_SOURCE_ROUND" and len(first["loads"]) == 2
    cached = await loads("--max-staleness-ms", "600000")
    assert cached["source"] == "ANSWER_SOURCE_CACHE" and cached["round_id"] == first["round_id"]


def test_serve_flags_http_port_and_compat_switch(processes):
    port, http_port = free_port(), free_port()
    processes.start("loadagg", "serve", "--host", "127.0.0.1", "--port", str(port), "--dp-size", "1",
                    "--http-port", str(http_port), "--log-level", "WARNING",
                    env={"LOADAGG_SGLANG_COMPAT": "false"})
    with LoadClient(f"127.0.0.1:{port}", timeout=30, retry=PATIENT) as client:
        assert client.get_loads().dp_size == 1  # retried until the process listened
        spent = client.retries
        with pytest.raises(grpc.RpcError) as info:  # any status but UNAVAILABLE is raised at once
            client.get_loads(dp_rank=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "out of range" in info.value.details()
        assert client.retries == spent
    body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/loads", timeout=10).read())
    assert body["dp_rank_count"] == 0 and body["loads"] == []  # no agent yet: nothing to report
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode()
    assert "loadagg_rounds_started_total" in metrics
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            sg_grpc.SglangSchedulerStub(channel).GetLoads(sg.GetLoadsRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # switched off by LOADAGG_SGLANG_COMPAT
        vllm = vl_grpc.VllmEngineStub(channel).GetLoads(vl.GetLoadsRequest(), timeout=10)
        assert vllm.dp_rank_count == 1  # still on
