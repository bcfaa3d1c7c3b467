"""A real Prometheus scrapes a live aggregator; the series, the rules and the Grafana dashboard's queries are checked
through Prometheus' HTTP API.

One cluster and one Prometheus serve the whole module (Prometheus starts in about a second and scrapes every
second): an aggregator with its HTTP gateway, real agents (SchedulerAgent over real gRPC) whose figures the tests
set, and simulated routers asking all the while. The scrape jobs are made from the ServiceMonitor
(deploy/k8s/components/prometheus), the rules are deploy/prometheus's, the dashboard deploy/grafana/loadagg.json.
dp_size 4: ranks 0 and 1 come from one agent answering rounds, rank 2 from one that pushes, rank 3 has no agent.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading

import grpc
import pytest
import yaml
from deploy_files import ROOT
from prometheus_server import PrometheusServer, binary

from loadagg.cli.swarm import SwarmConfig, SwarmStats, run_swarm
from loadagg.client import AsyncLoadClient
from loadagg.server.aggregator import Aggregator
from loadagg.server.config import AggregatorConfig
from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.agent import SchedulerAgent
from scheduler_agent.config import AgentConfig
from scheduler_agent.sources.inprocess import CallbackSource

SERVICE_MONITOR = ROOT / "deploy" / "k8s" / "components" / "prometheus" / "servicemonitor.yaml"
RULES = ROOT / "deploy" / "prometheus" / "loadagg-rules.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "loadagg.json"
# Grafana's variables as the dashboard resolves them ("All" aggregators); $__rate_interval spans >= 4 scrapes.
DASHBOARD_VARIABLES = {"$__rate_interval": "10s", "$loads_job": "loadagg-loads", "$job": "loadagg", "$instance": ".*"}
FIGURES = {  # rank -> the figures its agent reports (tests change them)
    0: {"num_running_reqs": 5, "num_waiting_reqs": 2, "token_usage": 0.25},
    1: {"num_running_reqs": 7, "num_waiting_reqs": 0, "token_usage": 0.5},
    2: {"num_running_reqs": 3, "num_waiting_reqs": 4, "token_usage": 0.75},
}


async def _read(ranks) -> list[pb.RankLoad]:
    await asyncio.sleep(0.02)  # a scheduler takes a moment to answer: concurrent callers join the round
    return [pb.RankLoad(dp_rank=rank, **FIGURES[rank]) for rank in ranks]


class Cluster:
    """The aggregator, its agents and the routers on an event loop of their own thread, for the whole module."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="prometheus-test-cluster", daemon=True)
        self.thread.start()
        self.tasks: list[asyncio.Task] = []
        self.routers = SwarmStats()

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def start(self) -> None:
        self.aggregator = Aggregator(AggregatorConfig(host="127.0.0.1", port=0, dp_size=4, http_port=0))
        self.port = await self.aggregator.start()
        self.http_port = self.aggregator.http_port
        common = {"aggregator": f"127.0.0.1:{self.port}", "dp_size": 4, "backoff_initial_ms": 20,
                  "backoff_max_ms": 200}
        agents = [
            SchedulerAgent(AgentConfig(dp_ranks=(0, 1), instance_id="rounds-agent", **common), CallbackSource(_read)),
            SchedulerAgent(AgentConfig(dp_ranks=(2,), instance_id="push-agent", push_interval_ms=100,
                                       push_refresh_ms=500, **common), CallbackSource(_read)),
        ]
        self.tasks = [asyncio.create_task(agent.run()) for agent in agents]
        for _ in range(500):
            if self.aggregator.registry.live_ranks() == {0, 1, 2} and self.aggregator.registry.push_fed_ranks():
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("agents did not link and push within 10 s")
        self.stop_routers = asyncio.Event()
        self.tasks.append(asyncio.create_task(run_swarm(
            SwarmConfig(f"127.0.0.1:{self.port}", routers=20, interval_ms=100), self.stop_routers, self.routers)))

    async def stop(self) -> None:
        self.stop_routers.set()
        await asyncio.sleep(0.1)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.aggregator.stop(grace=0.5)

    def close(self) -> None:
        self.call(self.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def scrape_configs(http_port: int) -> list[dict]:
    """The ServiceMonitor's endpoints as prometheus-operator turns them into scrape jobs (job = the Service's name,
    then the endpoint's own relabelings), aimed at the live gateway and scraped every second."""
    monitor = yaml.safe_load(SERVICE_MONITOR.read_text())
    configs = []
    for index, endpoint in enumerate(monitor["spec"]["endpoints"]):
        relabel = [{"target_label": "job", "replacement": monitor["metadata"]["name"]}]
        for rule in endpoint.get("relabelings", []):
            assert set(rule) == {"action", "targetLabel", "replacement"}, f"not translated here: {rule}"
            relabel.append({"action": rule["action"], "target_label": rule["targetLabel"],
                            "replacement": rule["replacement"]})
        configs.append({"job_name": f"servicemonitor-endpoint-{index}", "metrics_path": endpoint["path"],
                        "params": endpoint.get("params", {}), "scrape_interval": "1s",
                        "static_configs": [{"targets": [f"127.0.0.1:{http_port}"]}], "relabel_configs": relabel})
    return configs


@pytest.fixture(scope="module")
def cluster():
    binary("prometheus")  # skip (or fail under CI) before starting anything
    cluster = Cluster()
    try:
        cluster.call(cluster.start())
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def prometheus(cluster, tmp_path_factory):
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"), scrape_configs(cluster.http_port), [RULES])
    server.start()
    try:
        # Every panel's rate() needs a few scrapes of both jobs inside its window.
        server.wait_for('count_over_time(up{job="loadagg-loads"}[1m]) >= 4', bool, timeout=30)
        yield server
    finally:
        server.stop()


def by_rank(prometheus: PrometheusServer, expr: str) -> dict[int, float]:
    return {int(rank): value for rank, value in prometheus.values(expr, "dp_rank").items()}


def test_both_scrape_jobs_are_up_with_the_services_job_names(cluster, prometheus):
    targets = {t["labels"]["job"]: t for t in prometheus.targets()}
    assert set(targets) == {"loadagg", "loadagg-loads"}
    assert all(t["health"] == "up" for t in targets.values()), [t["lastError"] for t in targets.values()]
    assert targets["loadagg-loads"]["scrapeUrl"].startswith(f"http://127.0.0.1:{cluster.http_port}/v1/loads?")
    assert prometheus.values("up", "job") == {"loadagg": 1.0, "loadagg-loads": 1.0}


def test_the_aggregators_own_series_arrive_with_their_labels_and_values(prometheus):
    assert prometheus.values('loadagg_dp_size{job="loadagg"}', "job") == {"loadagg": 4.0}
    assert prometheus.values("loadagg_connected_agents", "job") == {"loadagg": 2.0}
    assert prometheus.values("loadagg_live_ranks", "job") == {"loadagg": 3.0}
    assert by_rank(prometheus, "loadagg_rank_linked") == {0: 1, 1: 1, 2: 1, 3: 0}
    assert by_rank(prometheus, "loadagg_rank_missing") == {0: 0, 1: 0, 2: 0, 3: 1}
    assert prometheus.values("loadagg_missing_ranks", "job") == {"loadagg": 1.0}  # rank 3, in the last round
    assert by_rank(prometheus, "loadagg_rank_push_fed") == {0: 0, 1: 0, 2: 1, 3: 0}
    ages = by_rank(prometheus, "loadagg_rank_figures_age_seconds")
    assert set(ages) == {0, 1, 2}, "a rank never heard of has no age"
    assert ages[2] < 1.5, "pushed every 100 ms, re-sent unchanged every 500 ms"
    assert all(0 <= age < 10 for age in ages.values()), ages  # rounds every scrape (cached answers up to 5 s)
    codes = prometheus.values("loadagg_calls_refused_total", "code")
    assert set(codes) == {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "UNAVAILABLE"}


def test_rounds_and_callers_per_round_match_the_aggregators_counters(cluster, prometheus):
    stats = cluster.aggregator.communicator.stats

    async def burst() -> None:
        async with AsyncLoadClient(f"127.0.0.1:{cluster.port}") as client:
            await asyncio.gather(*(client.get_loads() for _ in range(60)))

    cluster.call(burst())
    rounds, callers = stats.rounds_started, stats.callers
    # Prometheus reaches the counters as they stood after the burst, and never passes what the aggregator has.
    prometheus.wait_for(f"loadagg_rounds_started_total >= {rounds}", bool)
    assert prometheus.values("loadagg_rounds_started_total", "job")["loadagg"] <= stats.rounds_started
    prometheus.wait_for(f"loadagg_round_callers_total >= {callers}", bool)
    assert prometheus.values("loadagg_callers_per_round_sum", "job")["loadagg"] <= stats.callers
    # The burst's 60 callers shared a few rounds: some round had more than 10 callers.
    shared = prometheus.values('loadagg_callers_per_round_count - ignoring(le) '
                               'loadagg_callers_per_round_bucket{le="10.0"}', "job")
    assert shared["loadagg"] >= 1
    mean = prometheus.values("loadagg:callers_per_round:mean5m", "job")["loadagg"]  # the recording rule
    assert mean > 1


def test_per_rank_load_arrives_from_v1_loads_and_follows_the_engines(prometheus):
    assert by_rank(prometheus, 'sglang_num_running_reqs{job="loadagg-loads"}') == {0: 5, 1: 7, 2: 3}
    assert by_rank(prometheus, 'sglang_num_waiting_reqs{job="loadagg-loads"}') == {0: 2, 1: 0, 2: 4}
    assert by_rank(prometheus, 'sglang_token_usage{job="loadagg-loads"}') == {0: 0.25, 1: 0.5, 2: 0.75}
    FIGURES[0]["num_running_reqs"] = 11  # answered in rounds: a scrape's cached answer is at most 5 s old
    FIGURES[2]["token_usage"] = 0.875  # pushed within 100 ms
    prometheus.wait_for('sglang_num_running_reqs{dp_rank="0"} == 11', bool)
    prometheus.wait_for('sglang_token_usage{dp_rank="2"} == 0.875', bool)


def test_refused_calls_arrive_by_code(cluster, prometheus):
    with grpc.insecure_channel(f"127.0.0.1:{cluster.port}") as channel:
        garbage = channel.unary_unary("/loadagg.v1.LoadAggregator/GetLoads")
        with pytest.raises(grpc.RpcError) as refused:
            garbage(b"\xff\xff\xff\xff", timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    prometheus.wait_for('loadagg_calls_refused_total{code="INVALID_ARGUMENT"} >= 1', bool)
    assert prometheus.values('loadagg_calls_refused_total{code="UNAUTHENTICATED"}', "code") == {"UNAUTHENTICATED": 0}


def test_the_rules_load_and_the_missing_rank_alert_is_pending_for_rank_3(prometheus):
    groups = prometheus.api("rules")["groups"]
    assert {g["name"] for g in groups} == {"loadagg.recording", "loadagg.alerts"}
    assert all(rule["health"] == "ok" for g in groups for rule in g["rules"]), groups
    alerts = prometheus.wait_for('ALERTS{alertname="LoadaggRankMissing"}', bool)
    assert [(a["metric"]["dp_rank"], a["metric"]["alertstate"]) for a in alerts] == [("3", "pending")]
    quiet = {"LoadaggDown", "LoadaggNoAgentLinked", "LoadaggPushFeedStale", "LoadaggCallsRefused"}
    assert not {a["metric"]["alertname"] for a in prometheus.query("ALERTS")} & quiet


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel (rows included), Grafana's variables resolved."""
    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    queries = []
    for panel in panels(json.loads(DASHBOARD.read_text())["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in DASHBOARD_VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{panel['title']}: unresolved variable in {expr}"
            queries.append((panel["title"], expr))
    return queries


def test_the_dashboard_covers_what_operators_need():
    titles = {title for title, _ in dashboard_queries()}
    assert len(titles) >= 10
    exprs = " ".join(expr for _, expr in dashboard_queries())
    for series in ("loadagg_callers_per_round", "loadagg_rounds_started_total", "loadagg_round_duration_seconds",
                   "loadagg_getloads_duration_seconds", "loadagg_rank_missing", "loadagg_rank_figures_age_seconds",
                   "sglang_num_running_reqs", "sglang_num_waiting_reqs", "sglang_token_usage"):
        assert series in exprs, f"no panel shows {series}"


def test_every_dashboard_query_parses_and_returns_data(prometheus):
    problems = []
    for title, expr in dashboard_queries():
        try:
            result = prometheus.query(expr)
        except AssertionError as error:  # PrometheusError: the query does not parse or fails
            problems.append(f"{title}: {error}")
            continue
        values = [float(sample["value"][1]) for sample in result]
        if not any(math.isfinite(value) for value in values):
            problems.append(f"{title}: {expr} returned {values or 'no series'}")
    assert not problems, "\n".join(problems)
    instances = prometheus.api("series", **{"match[]": 'loadagg_dp_size{job="loadagg"}'})  # the $instance variable
    assert [s["instance"] for s in instances] == [f"127.0.0.1:{prometheus_target_port(prometheus)}"]


def prometheus_target_port(prometheus: PrometheusServer) -> int:
    (target,) = [t for t in prometheus.targets() if t["labels"]["job"] == "loadagg"]
    return int(target["labels"]["instance"].rsplit(":", 1)[1])


def test_a_broken_query_is_reported(prometheus):
    """The dashboard check can fail: a query that does not parse is an error, one that matches nothing is empty."""
    with pytest.raises(AssertionError, match="parse error"):
        prometheus.query("sum by (instance (loadagg_dp_size)")
    assert prometheus.query('loadagg_no_such_series{job="loadagg"}') == []
