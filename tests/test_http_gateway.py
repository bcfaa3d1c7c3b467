"""The HTTP gateway over real HTTP on loopback: sglang's /v1/loads body field by field, errors, /metrics."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime

import aiohttp
import grpc
import pytest
from conftest import wait_for
from prometheus_client.parser import text_string_to_metric_families
from raw_agent import RawAgent

from loadagg.server.sglang_shape import CORE_FIELDS
from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc

TOP_KEYS = {"timestamp", "version", "dp_rank_count", "loads", "aggregate"}
AGGREGATE_KEYS = {"total_running_reqs", "total_waiting_reqs", "total_reqs", "total_used_tokens", "total_tokens",
                  "avg_token_usage", "avg_throughput", "avg_utilization"}
SECTION_KEYS = {
    "memory": {"weight_gb", "kv_cache_gb", "graph_gb", "token_capacity"},
    "speculative": {"accept_length", "accept_rate"},
    "lora": {"slots_used", "slots_total", "utilization"},
    "disaggregation": {"mode", "prefill_prealloc_queue_reqs", "prefill_inflight_queue_reqs",
                       "decode_prealloc_queue_reqs", "decode_transfer_queue_reqs", "decode_retracted_queue_reqs",
                       "kv_transfer_speed_gb_s", "kv_transfer_latency_ms"},
    "queues": {"waiting", "grammar", "paused", "retracted"},
}
LOAD_KEYS = {"dp_rank", "num_total_reqs", *CORE_FIELDS, *SECTION_KEYS}
OURS_TO_SGLANG = {"memory": "memory", "spec": "speculative", "lora": "lora", "disagg": "disaggregation",
                  "queues": "queues"}


async def _get(port: int, query: str = "") -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/v1/loads{query}") as response:
            return response.status, dict(response.headers), await response.read()


async def test_json_matches_sglangs_shape_field_by_field(start_aggregator, start_agents):
    agg = await start_aggregator(dp_size=3, http_port=0)
    await start_agents(agg, [[0], [1]])  # rank 2 has no agent
    status, headers, body = await _get(agg.http_port)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    doc = json.loads(body)
    assert set(doc) == TOP_KEYS
    assert datetime.fromisoformat(doc["timestamp"]).tzinfo is not None
    assert doc["version"].startswith("loadagg-")
    assert doc["dp_rank_count"] == len(doc["loads"]) == 2  # as sglang counts: the ranks returned
    assert set(doc["aggregate"]) == AGGREGATE_KEYS
    assert headers["X-Loadagg-Missing-Ranks"] == "2" and headers["X-Loadagg-Source"] == "ANSWER_SOURCE_ROUND"
    assert headers["X-Loadagg-Aggregator-Id"] == agg.aggregator_id

    # Every figure equals what the round collected, under sglang's names.
    result = agg.communicator.last_result
    assert int(headers["X-Loadagg-Round-Id"]) == result.round_id
    assert [load["dp_rank"] for load in doc["loads"]] == [0, 1]
    for load in doc["loads"]:
        assert set(load) <= LOAD_KEYS and {"dp_rank", "num_running_reqs", "num_waiting_reqs"} <= set(load)
        ours = result.fresh[load["dp_rank"]]
        for name in CORE_FIELDS:
            assert (name in load) == ours.HasField(name), name
            if name in load:
                assert load[name] == pytest.approx(getattr(ours, name)), name
        assert load["num_total_reqs"] == load["num_running_reqs"] + load["num_waiting_reqs"]
        for section, key in OURS_TO_SGLANG.items():
            assert (key in load) == ours.HasField(section), key
            if key in load:
                assert set(load[key]) <= SECTION_KEYS[key]
                for field, value in load[key].items():
                    assert value == pytest.approx(getattr(getattr(ours, section), field))
        assert "gpu" not in load and "stale" not in load and "timestamp" not in load  # not in sglang's shape

    agg_doc, loads = doc["aggregate"], doc["loads"]
    assert agg_doc["total_running_reqs"] == sum(x["num_running_reqs"] for x in loads)
    assert agg_doc["total_waiting_reqs"] == sum(x["num_waiting_reqs"] for x in loads)
    assert agg_doc["total_reqs"] == agg_doc["total_running_reqs"] + agg_doc["total_waiting_reqs"]
    assert agg_doc["total_used_tokens"] == sum(x["num_used_tokens"] for x in loads)
    assert agg_doc["total_tokens"] == sum(x["num_total_tokens"] for x in loads)
    assert agg_doc["avg_token_usage"] == round(sum(x["token_usage"] for x in loads) / 2, 4)
    assert agg_doc["avg_throughput"] == round(sum(x["gen_throughput"] for x in loads) / 2, 2)
    assert agg_doc["avg_utilization"] == round(sum(x["utilization"] for x in loads) / 2, 4)


async def test_dp_rank_and_include_filters(start_aggregator, start_agents):
    agg = await start_aggregator(dp_size=2, http_port=0)
    await start_agents(agg, [[0, 1]])
    status, _, body = await _get(agg.http_port, "?dp_rank=1&include=core,memory")
    doc = json.loads(body)
    assert status == 200 and doc["dp_rank_count"] == 1
    (load,) = doc["loads"]
    assert load["dp_rank"] == 1 and "memory" in load
    assert not {"speculative", "lora", "disaggregation", "queues"} & set(load)
    _, _, body = await _get(agg.http_port, "?include=core")
    assert all(not set(SECTION_KEYS) & set(load) for load in json.loads(body)["loads"])
    _, _, body = await _get(agg.http_port,
                            "?include=memory&include=queues")  # repeated, as most HTTP clients send lists
    assert all({"memory", "queues"} <= set(load) and "lora" not in load for load in json.loads(body)["loads"])


async def test_prometheus_format(start_aggregator, start_agents):
    agg = await start_aggregator(dp_size=2, http_port=0)
    await start_agents(agg, [[0], [1]])
    status, headers, body = await _get(agg.http_port, "?format=prometheus&include=core,memory")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert {"sglang_num_running_reqs", "sglang_token_usage", "sglang_memory_kv_cache_gb"} <= set(families)
    assert not any(name.startswith(("sglang_spec_", "sglang_lora_", "sglang_queues_")) for name in families)
    running = families["sglang_num_running_reqs"]
    assert running.type == "gauge"
    result = agg.communicator.last_result
    assert {s.labels["dp_rank"]: s.value for s in running.samples} == {
        str(r): float(result.fresh[r].num_running_reqs) for r in (0, 1)
    }


async def test_a_figure_no_rank_reports_is_left_out_not_made_up(start_aggregator):
    """A source with only some figures (here num_total_reqs and token_usage): the rank's num_total_reqs is the
    source's, and the aggregate has the totals and means of what was reported, nothing else (no made-up 0s);
    with no rank answering, the aggregate is empty."""
    agg = await start_aggregator(dp_size=2, http_port=0, round_timeout_ms=2000)
    agent = RawAgent(agg.port, "sparse", [0, 1], 2)
    try:
        await agent.connect()
        answered = asyncio.ensure_future(_get(agg.http_port))
        collect = await agent.next_collect()
        await agent.report(collect.round_id, [pb.RankLoad(dp_rank=r, num_total_reqs=7 + 2 * r, token_usage=0.5)
                                              for r in (0, 1)])
        status, _, body = await answered
        doc = json.loads(body)
        assert status == 200 and [load["num_total_reqs"] for load in doc["loads"]] == [7, 9]
        assert all(set(load) == {"dp_rank", "num_total_reqs", "token_usage"} for load in doc["loads"])
        assert doc["aggregate"] == {"total_reqs": 16, "avg_token_usage": 0.5}
        status, _, body = await _get(agg.http_port, "?format=prometheus&max_staleness_ms=60000")
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        assert {s.value for s in families["sglang_num_total_reqs"].samples} == {7.0, 9.0}
        assert "sglang_num_running_reqs" not in families
    finally:
        await agent.close()
    await wait_for(lambda: not agg.registry.live_ranks(), what="the agent gone")
    status, _, body = await _get(agg.http_port)
    assert status == 200 and json.loads(body)["aggregate"] == {} and json.loads(body)["loads"] == []


@pytest.mark.parametrize("query, words", [
    ("?dp_rank=abc", "dp_rank must be an integer"),
    ("?dp_rank=0_1", "dp_rank must be an integer, got '0_1'"),  # int() would read these as other ranks
    ("?dp_rank=%D9%A3", "dp_rank must be an integer"),  # an Arabic-Indic 3
    ("?dp_rank=%20%2B1%20", "dp_rank must be an integer"),
    ("?max_staleness_ms=1_000", "max_staleness_ms must be an integer"),
    ("?dp_rank=5", "out of range"),
    ("?dp_rank=-1", "out of range"),
    ("?include=core,bogus", "unknown section 'bogus'"),
    ("?format=xml", "format must be one of"),
    ("?rank=1", "unknown query parameter"),
    ("?max_staleness_ms=-5", "max_staleness_ms must be in 0..4294967295"),
    ("?max_staleness_ms=4294967296", "max_staleness_ms must be in 0..4294967295"),  # past the proto's uint32
    ("?include=memory&include=bogus", "unknown section 'bogus'"),  # every repeat is checked
    ("?dp_rank=1&dp_rank=0", "given more than once"),
    ("?format=json&format=prometheus", "given more than once"),
])
async def test_bad_queries_get_400_with_a_clear_message(start_aggregator, query, words):
    agg = await start_aggregator(dp_size=2, http_port=0)
    status, _, body = await _get(agg.http_port, query)
    assert status == 400
    doc = json.loads(body)
    assert words in doc["error"] and doc["code"] == "INVALID_ARGUMENT"
    assert (await _get(agg.http_port))[0] == 200  # and it keeps serving


async def test_http_and_grpc_callers_share_one_round(start_aggregator, start_agents, channel_to):
    agg = await start_aggregator(dp_size=2, http_port=0, round_timeout_ms=5000)
    await start_agents(agg, [[0], [1]], collect_latency_ms=300)
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    grpc_call = asyncio.ensure_future(stub.GetLoads(pb.GetLoadsRequest(), timeout=10))
    await wait_for(lambda: agg.communicator.rounds_in_flight == 1, what="a round in flight")
    answers = await asyncio.gather(*(_get(agg.http_port) for _ in range(20)))
    grpc_answer = await grpc_call
    assert {int(headers["X-Loadagg-Round-Id"]) for _, headers, _ in answers} == {grpc_answer.round_id}
    assert agg.communicator.stats.rounds_started == 1
    assert len({body for _, _, body in answers}) == 1  # one body per view per round, shared


async def _metrics(port: int) -> dict[str, list]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            text = await response.text()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(metrics: dict, family: str, sample: str | None = None, **labels) -> float:
    for s in metrics[family]:
        if (sample is None or s.name == sample) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError(f"{family} {sample} {labels}")


async def test_metrics_of_the_aggregator(start_aggregator, start_agents, channel_to):
    agg = await start_aggregator(dp_size=3, http_port=0)
    other = await start_aggregator(dp_size=1, http_port=0)  # its own registry: nothing shared
    await start_agents(agg, [[0], [1]])
    stub = pb_grpc.LoadAggregatorStub(channel_to(agg.port))
    await asyncio.gather(*(stub.GetLoads(pb.GetLoadsRequest(), timeout=10) for _ in range(30)))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetLoads(pb.GetLoadsRequest(dp_rank=9), timeout=10)
    await _get(agg.http_port, "?format=xml")

    # gRPC sends an aborted call's status before the handler's wrapper records it: wait (bounded) for the record.
    for _ in range(100):
        m = await _metrics(agg.http_port)
        if any(s.labels.get("code") == "INVALID_ARGUMENT" for s in m["loadagg_getloads_duration_seconds"]):
            break
        await asyncio.sleep(0.02)
    rounds = agg.communicator.stats.rounds_started
    assert _value(m, "loadagg_rounds_started") == rounds
    assert _value(m, "loadagg_callers_per_round", "loadagg_callers_per_round_count") == rounds
    assert _value(m, "loadagg_callers_per_round", "loadagg_callers_per_round_sum") == 30
    assert _value(m, "loadagg_round_duration_seconds", "loadagg_round_duration_seconds_count") == rounds
    assert _value(m, "loadagg_connected_agents") == 2
    assert _value(m, "loadagg_missing_ranks") == 1  # rank 2
    assert _value(m, "loadagg_getloads_duration_seconds", "loadagg_getloads_duration_seconds_count",
                  api="loadagg", code="OK") == 30
    assert _value(m, "loadagg_getloads_duration_seconds", "loadagg_getloads_duration_seconds_count",
                  api="loadagg", code="INVALID_ARGUMENT") == 1
    assert _value(m, "loadagg_getloads_duration_seconds", "loadagg_getloads_duration_seconds_count",
                  api="http", code="400") == 1

    o = await _metrics(other.http_port)
    assert _value(o, "loadagg_rounds_started") == 0 and _value(o, "loadagg_connected_agents") == 0


async def test_a_draining_aggregator_refuses_new_http_calls_and_answers_those_in_flight(start_aggregator,
                                                                                        start_agents):
    agg = await start_aggregator(dp_size=1, http_port=0, round_timeout_ms=3000, grace_s=3.0)
    await start_agents(agg, [[0]], collect_latency_ms=800)
    in_flight = asyncio.ensure_future(_get(agg.http_port))
    await wait_for(lambda: agg.communicator.rounds_in_flight == 1, what="a round in flight")
    stopping = asyncio.ensure_future(agg.stop())
    await wait_for(lambda: agg.http.draining, what="draining")
    status, _, body = await _get(agg.http_port)
    assert status == 503 and json.loads(body)["code"] == "UNAVAILABLE" and "shutting down" in json.loads(body)["error"]
    status, _, body = await in_flight
    assert status == 200 and len(json.loads(body)["loads"]) == 1  # the call in flight got its answer
    await stopping
