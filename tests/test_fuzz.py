"""Fuzzing both services of a real `loadagg serve` process (hypothesis): random bytes and random-but-valid
messages. Every input gets a clear status (never UNKNOWN / INTERNAL), and afterwards the server still
answers correctly."""

from __future__ import annotations

import math
import time
from collections import Counter

import grpc
import pytest
from conftest import Processes, free_port
from figures import record
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadagg.server.sections import ALL_SECTIONS
from loadagg.server.validation import load_problem
from loadagg.v1 import loadagg_pb2 as pb

DP_SIZE = 4  # ranks 0-2 held by real agent processes; rank 3 left free for fuzzed agents
GET_LOADS = "/loadagg.v1.LoadAggregator/GetLoads"
CONNECT = "/loadagg.v1.AgentLink/Connect"
TRIED: Counter[str] = Counter()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def cluster():
    procs = Processes()
    port = free_port()
    server = procs.start("loadagg", "serve", "--host", "127.0.0.1", "--port", str(port), "--dp-size", str(DP_SIZE),
                         "--round-timeout-ms", "2000", "--hello-timeout-ms", "2000", "--log-level", "ERROR")
    for rank in range(3):
        procs.agent(port, [rank], DP_SIZE, "--instance-id", f"real-{rank}", "--log-level", "ERROR")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 40
        while True:
            try:
                raw = channel.unary_unary(GET_LOADS)(b"", timeout=5)
                if [l.dp_rank for l in pb.GetLoadsResponse.FromString(raw).loads] == [0, 1, 2]:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "cluster never came up"
            time.sleep(0.2)
        yield server, channel
    finally:
        channel.close()
        procs.cleanup()


def _status(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@FUZZ
@given(raw=st.binary(max_size=300))
def test_random_bytes_to_get_loads(cluster, raw):
    _, channel = cluster
    TRIED["get_loads_bytes"] += 1
    try:
        answer = channel.unary_unary(GET_LOADS)(raw, timeout=10)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (raw, error.code(), error.details())
        return
    assert pb.GetLoadsResponse.FromString(answer).dp_size == DP_SIZE


SECTION_NAMES = sorted(ALL_SECTIONS) + ["all", "core", "CORE", " memory", "", "bogus", "gpu,spec"]


@FUZZ
@given(
    dp_rank=st.none() | st.integers(-3, DP_SIZE + 3),
    include=st.lists(st.sampled_from(SECTION_NAMES), max_size=4),
    freshness=st.integers(0, 6),  # 4-6: enum values this server does not know (INVALID_ARGUMENT)
    max_staleness_ms=st.integers(0, 5000),
    allow_stale=st.booleans(),
)
def test_random_valid_get_loads_requests(cluster, dp_rank, include, freshness, max_staleness_ms, allow_stale):
    _, channel = cluster
    TRIED["get_loads_messages"] += 1
    request = pb.GetLoadsRequest(include=include, freshness=freshness, max_staleness_ms=max_staleness_ms,
                                 allow_stale=allow_stale)
    if dp_rank is not None:
        request.dp_rank = dp_rank
    names = {part.strip().lower() for item in include for part in item.split(",") if part.strip()}
    bad = (dp_rank is not None and not 0 <= dp_rank < DP_SIZE) or not names <= ALL_SECTIONS | {"all", "core"}
    bad = bad or freshness not in pb.Freshness.values()  # a future client's freshness is refused, not guessed
    bad = bad or (max_staleness_ms > 0 and freshness != pb.FRESHNESS_CACHED)  # a bound that would be ignored
    try:
        raw = channel.unary_unary(GET_LOADS)(request.SerializeToString(), timeout=10)
    except grpc.RpcError as error:
        assert bad and error.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, error.details())
        return
    assert not bad, request
    response = pb.GetLoadsResponse.FromString(raw)
    wanted = list(range(DP_SIZE)) if dp_rank is None else [dp_rank]
    fresh = [l.dp_rank for l in response.loads if not l.stale]
    assert sorted(fresh + list(response.missing_ranks)) == wanted
    assert all(l.dp_rank in response.missing_ranks for l in response.loads if l.stale)
    assert all(load_problem(l) in (None, "stale is set by the aggregator, not by agents") for l in response.loads)


def _converse(channel, frames: list[bytes]) -> tuple[grpc.StatusCode, list[pb.AggregatorMessage]]:
    """Send `frames` on AgentLink.Connect, half-close, and read everything the aggregator answers."""
    call = channel.stream_stream(CONNECT)(iter(frames), timeout=10)
    replies = []
    try:
        for raw in call:
            replies.append(pb.AggregatorMessage.FromString(raw))
    except grpc.RpcError as error:
        return error.code(), replies
    return call.code(), replies


@FUZZ
@given(frames=st.lists(st.binary(max_size=200), max_size=4))
def test_random_bytes_to_agent_link(cluster, frames):
    _, channel = cluster
    TRIED["agent_link_bytes"] += 1
    code, replies = _converse(channel, frames)
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS), code
    if code == grpc.StatusCode.OK:  # only a well-formed hello gets a welcome
        assert replies and replies[0].WhichOneof("kind") == "welcome"


numbers = st.floats(-1, 2) | st.sampled_from([math.nan, math.inf, -0.0, 0.5])
loads = st.builds(
    pb.RankLoad,
    dp_rank=st.sampled_from([3, 3, 3, 0, 9]),
    num_running_reqs=st.integers(-2, 500),
    num_waiting_reqs=st.integers(-2, 500),
    num_used_tokens=st.integers(-5, 1 << 40),
    token_usage=numbers,
    gen_throughput=st.floats(-10, 1e6) | st.just(math.nan),
    cache_hit_rate=numbers,
    memory=st.builds(pb.MemoryMetrics, kv_cache_gb=st.floats(-1, 100)),
    queues=st.builds(pb.QueueMetrics, waiting=st.integers(-1, 50)),
)  # `stale`, which only the aggregator may set, is set on one load by `agent_sets_stale` below


@FUZZ
@given(
    instance_id=st.text(max_size=20),
    ranks=st.just([3]) | st.just([3]) | st.lists(st.integers(-2, DP_SIZE + 1), max_size=3),  # [3]: the free rank
    dp_size=st.sampled_from([0, 0, DP_SIZE, 2, -1, 8]),
    reports=st.lists(st.lists(loads, max_size=3), max_size=3),
    agent_sets_stale=st.booleans(),
)
def test_random_valid_agent_messages(cluster, instance_id, ranks, dp_size, reports, agent_sets_stale):
    _, channel = cluster
    TRIED["agent_link_messages"] += 1
    hello = pb.AgentMessage(hello=pb.AgentHello(instance_id=f"fuzz-{instance_id}", dp_ranks=ranks, dp_size=dp_size))
    if agent_sets_stale and reports and reports[0]:
        reports[0][0].stale = True
    frames = [hello.SerializeToString()] + [
        pb.AgentMessage(report=pb.LoadReport(round_id=0, loads=batch)).SerializeToString() for batch in reports]
    code, replies = _converse(channel, frames)

    valid = (bool(ranks) and len(set(ranks)) == len(ranks) and all(0 <= r < DP_SIZE for r in ranks)
             and dp_size in (0, DP_SIZE) and len(hello.hello.instance_id.encode()) <= 256
             and not any(ord(c) < 0x20 or c == "\x7f" for c in instance_id))  # no control character
    if not valid:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (hello, code)
        return
    if set(ranks) & {0, 1, 2}:  # held by the real agents
        assert code == grpc.StatusCode.ALREADY_EXISTS, (hello, code)
        return
    deadline = time.monotonic() + 10
    while code == grpc.StatusCode.ALREADY_EXISTS and time.monotonic() < deadline:
        time.sleep(0.05)  # an earlier fuzzed agent's link on rank 3, not released yet: it will be
        code, replies = _converse(channel, frames)
    assert code == grpc.StatusCode.OK and replies[0].WhichOneof("kind") == "welcome", code
    TRIED["agent_links_welcomed"] += 1
    # Loads past the number of ranks its agent serves are refused unread (one rejection for them all).
    expected = sum((len(batch) > len(ranks)) + sum(1 for load in batch[:len(ranks)]
                                                   if load.dp_rank not in ranks or load_problem(load))
                   for batch in reports)
    rejected = [r for r in replies[1:] if r.WhichOneof("kind") == "rejected"]
    assert len(rejected) == expected


@FUZZ
@given(method=st.text(alphabet="abcXYZ./_-019", min_size=1, max_size=40))
def test_unknown_methods_are_unimplemented(cluster, method):
    _, channel = cluster
    TRIED["unknown_methods"] += 1
    path = f"/loadagg.v1.LoadAggregator/{method}" if "/" not in method else f"/{method.lstrip('/')}"
    if path in (GET_LOADS, "/loadagg.v1.LoadAggregator/WatchLoads", CONNECT):
        return
    code = _status(lambda: channel.unary_unary(path)(b"", timeout=10))
    assert code == grpc.StatusCode.UNIMPLEMENTED, (path, code)


def test_server_still_answers_correctly_after_fuzzing(cluster):
    server, channel = cluster
    assert server.poll() is None
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    deadline = time.monotonic() + 20
    while True:  # a fuzzed agent's link on rank 3 may take a moment to be released
        response = pb.GetLoadsResponse.FromString(channel.unary_unary(GET_LOADS)(b"", timeout=10))
        fresh = [l for l in response.loads if not l.stale]
        if [l.dp_rank for l in fresh] == [0, 1, 2] and list(response.missing_ranks) == [3]:
            break
        assert time.monotonic() < deadline, response
        time.sleep(0.2)
    assert all(load_problem(l) is None for l in fresh) and response.summary.num_ranks == 3
    if TRIED["agent_link_messages"]:  # (when the fuzz test ran before this one, as in a whole-file run)
        assert TRIED["agent_links_welcomed"] >= 20  # the valid-hello path (welcome, then rejections) really ran
    record("fuzz", inputs_tried=sum(TRIED.values()), **TRIED)

