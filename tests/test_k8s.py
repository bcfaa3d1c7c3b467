"""deploy/k8s: each kustomization rendered (tests/kustomize_lite.py), every object validated against the real
Kubernetes JSON schemas (kubernetes-validate, strict: unknown fields fail), then the wiring checked; and the simulated
overlay's containers run natively (their command and env, DNS names rewritten to localhost)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import kubernetes_validate
import pytest
from conftest import free_port
from deploy_files import ROOT
from kustomize_lite import render

K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = ["base", "overlays/sglang", "overlays/simulated"]
# The oldest version with both native gRPC probes (GA 1.27) and the pod-index label (1.28), and the newest known.
K8S_VERSIONS = ["1.28.0", kubernetes_validate.utils.latest_version()]
IMAGE = "registry.example.com/loadagg:0.1.0"


def _by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def _env(container: dict) -> dict[str, dict | str]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_object_is_valid_kubernetes(kustomization):
    objects = render(K8S / kustomization)
    assert objects
    for version in K8S_VERSIONS:
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                raise AssertionError(f"{kustomization}: {obj['kind']}/{obj['metadata']['name']} "
                                     f"(Kubernetes {version}): {error.message} at {list(error.path)}") from None


def test_the_validator_rejects_a_bad_object():
    """A test that cannot fail is a defect: a misspelt probe field must be refused."""
    (deployment,) = _by_kind(render(K8S / "base"), "Deployment")
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["grpc"]["prot"] = probe["grpc"].pop("port")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def _aggregator(objects: list[dict]) -> tuple[dict, dict]:
    (deployment,) = [d for d in _by_kind(objects, "Deployment") if d["metadata"]["name"] == "loadagg-aggregator"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def test_aggregator_replicas_behind_a_cluster_ip_and_a_headless_service():
    objects = render(K8S / "base")
    assert all(o["metadata"].get("namespace") == "loadagg" for o in objects if o["kind"] != "Namespace")
    deployment, container = _aggregator(objects)
    assert deployment["spec"]["replicas"] >= 2
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    grpc_port = next(p for p in container["ports"] if p["name"] == "grpc")["containerPort"]
    assert str(grpc_port) == _env(container)["LOADAGG_PORT"]

    services = {s["metadata"]["name"]: s["spec"] for s in _by_kind(objects, "Service")}
    routers, agents = services["loadagg"], services["loadagg-agents"]
    assert routers.get("type", "ClusterIP") == "ClusterIP" and routers.get("clusterIP") != "None"
    assert agents["clusterIP"] == "None" and agents["publishNotReadyAddresses"] is True
    for spec in (routers, agents):
        assert spec["selector"].items() <= labels.items()
        assert any(p["port"] == grpc_port and p["targetPort"] == "grpc" for p in spec["ports"])

    # Native gRPC probes on the health service, on the gRPC port.
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port
    assert container["readinessProbe"]["grpc"]["service"] == "loadagg.v1.LoadAggregator"
    (pdb,) = _by_kind(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("kustomization", ["overlays/sglang", "overlays/simulated"])
def test_agents_link_to_every_replica_and_everything_is_bounded_and_non_root(kustomization):
    objects = render(K8S / kustomization)
    _, aggregator = _aggregator(objects)
    (statefulset,) = _by_kind(objects, "StatefulSet")
    pod = statefulset["spec"]["template"]["spec"]
    (agent,) = [c for c in pod["containers"] if c["command"] == ["scheduler-agent"]]
    env = _env(agent)
    assert env["LOADAGG_AGGREGATOR"] == "loadagg-agents:50051"  # the headless Service
    assert env["LOADAGG_RESOLVE_ALL"] == "true"
    assert env["LOADAGG_DP_SIZE"] == _env(aggregator)["LOADAGG_DP_SIZE"] == str(statefulset["spec"]["replicas"])
    pod_index = {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}
    if kustomization.endswith("sglang"):  # each engine numbers its one rank 0: the ordinal shifts it
        assert env["LOADAGG_RANK_OFFSET"] == pod_index and "LOADAGG_DP_RANKS" not in env
    else:  # simulated: the agent serves the ordinal's rank directly
        assert env["LOADAGG_DP_RANKS"] == pod_index and "LOADAGG_RANK_OFFSET" not in env
    assert statefulset["spec"]["serviceName"] in {s["metadata"]["name"] for s in _by_kind(objects, "Service")}
    if kustomization.endswith("sglang"):
        (engine,) = [c for c in pod["containers"] if c is not agent]
        assert env["LOADAGG_SOURCE"] == "sglang"
        engine_port = next(p["containerPort"] for p in engine["ports"] if p["name"] == "http")
        assert env["LOADAGG_ENGINE_URL"] == f"http://127.0.0.1:{engine_port}"  # beside it, in the same pod

    for obj in objects:
        spec = obj.get("spec", {}).get("template", {}).get("spec")
        if spec is None:
            continue
        # Service links would set LOADAGG_PORT=tcp://... (the Service `loadagg`) in every pod, and the loadagg
        # commands read that as their port: `loadagg health` in an agent pod exited 2.
        assert spec["enableServiceLinks"] is False, obj["metadata"]["name"]
        for container in spec["containers"]:
            resources = container["resources"]
            assert resources["requests"] and resources["limits"], container["name"]
            if container["image"].startswith("lmsysorg/sglang"):
                continue  # the engine's own image decides its user (the example only adds a GPU and limits)
            assert container["image"] == IMAGE
            context = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
            assert context["runAsNonRoot"] is True and context["runAsUser"] != 0
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]


def _resolve_field(value, pod_name: str, ordinal: int) -> str:
    if isinstance(value, str):
        return value
    path = value["fieldRef"]["fieldPath"]
    return {"metadata.name": pod_name, "metadata.labels['apps.kubernetes.io/pod-index']": str(ordinal)}[path]


def test_simulated_overlay_runs_natively(processes):
    """The aggregator container and the four agent pods' containers as local processes: same commands and env,
    with Service names rewritten to localhost (which DNS resolves to loopback) and the port to a free one."""
    objects = render(K8S / "overlays/simulated")
    _, aggregator = _aggregator(objects)
    (statefulset,) = _by_kind(objects, "StatefulSet")
    (agent,) = statefulset["spec"]["template"]["spec"]["containers"]
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LOADAGG_")}

    aggregator_env = {k: str(v) for k, v in _env(aggregator).items()}
    aggregator_env.update(LOADAGG_HOST="127.0.0.1", LOADAGG_PORT=str(port), LOADAGG_HTTP_PORT=str(free_port()))
    processes.start("loadagg", *aggregator["args"], env={**clean, **aggregator_env})
    for ordinal in range(statefulset["spec"]["replicas"]):
        env = {k: _resolve_field(v, f"simulated-agent-{ordinal}", ordinal) for k, v in _env(agent).items()}
        env["LOADAGG_AGGREGATOR"] = env["LOADAGG_AGGREGATOR"].replace("loadagg-agents:50051", f"localhost:{port}")
        env["LOADAGG_RESOLVE_INTERVAL_S"] = "1"
        processes.start("scheduler_agent", *agent["command"][1:], env={**clean, **env})

    probe = aggregator["readinessProbe"]["grpc"]
    deadline = time.monotonic() + 30
    while True:
        health = subprocess.run([sys.executable, "-m", "loadagg", "health", "--target", f"127.0.0.1:{port}",
                                 "--service", probe["service"]], capture_output=True, text=True, cwd=ROOT, timeout=30)
        loads = subprocess.run([sys.executable, "-m", "loadagg", "loads", "--target", f"127.0.0.1:{port}", "--json"],
                               capture_output=True, text=True, cwd=ROOT, timeout=30)
        ranks = [l.get("dp_rank", 0) for l in json.loads(loads.stdout).get("loads",
                                                                           [])] if loads.returncode == 0 else []
        if health.returncode == 0 and ranks == [0, 1, 2, 3]:
            break
        assert time.monotonic() < deadline, f"{health.stdout}{health.stderr} ranks={ranks} {loads.stderr}"
        time.sleep(0.3)


async def test_the_sglang_overlays_agent_env_serves_its_pod_ordinal(start_aggregator, processes):
    """The sidecar's env from the sglang overlay, as pod 2 would get it, run natively beside a one-rank sglang
    stand-in (each pod's engine numbers its only rank 0): it serves cluster rank 2 of the overlay's dp size."""
    from conftest import wait_for
    from engines import SglangHttpEngine

    objects = render(K8S / "overlays/sglang")
    (statefulset,) = _by_kind(objects, "StatefulSet")
    (agent,) = [c for c in statefulset["spec"]["template"]["spec"]["containers"]
                if c["command"] == ["scheduler-agent"]]
    downward = {"metadata.labels['apps.kubernetes.io/pod-index']": "2", "metadata.name": "sglang-engine-2"}
    env = {k: downward[v["fieldRef"]["fieldPath"]] if isinstance(v, dict) else v for k, v in _env(agent).items()}
    engine = SglangHttpEngine(dp_size=1)
    await engine.start()
    try:
        agg = await start_aggregator(dp_size=int(env["LOADAGG_DP_SIZE"]))
        # Loopback stand-ins for the headless Service and the engine container beside the agent.
        env.update(LOADAGG_AGGREGATOR=f"127.0.0.1:{agg.port}", LOADAGG_RESOLVE_ALL="false",
                   LOADAGG_ENGINE_URL=engine.url)
        processes.start("scheduler_agent", env=env)
        await wait_for(lambda: agg.registry.live_ranks() == {2}, timeout=30, what="pod 2's rank linked")
        assert agg.registry.owner(2).instance_id == "sglang-engine-2"
    finally:
        await engine.stop()
