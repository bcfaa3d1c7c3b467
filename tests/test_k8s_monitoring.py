"""deploy/k8s/components/prometheus: the optional ServiceMonitor and PrometheusRule, rendered into an overlay.

The built-in objects are validated as in test_k8s.py (Kubernetes' JSON schemas, strict). The two
prometheus-operator objects have no built-in schema: they are validated against the operator's own CRD schemas
(the generated models of PyPI cloudcoil.models.prometheus-operator: types, patterns, required fields), strictly
(a field the schema does not know fails), then wired: the ServiceMonitor selects the aggregator's Service and
its `http` port, and the PrometheusRule carries exactly the groups of deploy/prometheus/loadagg-rules.yaml.
test_prometheus.py scrapes a live aggregator with the scrape jobs this ServiceMonitor makes.
"""

from __future__ import annotations

import importlib.util
import os

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator import v1 as operator
from deploy_files import ROOT
from kustomize_lite import render

K8S = ROOT / "deploy" / "k8s"
COMPONENT = K8S / "components" / "prometheus"
RULES = ROOT / "deploy" / "prometheus" / "loadagg-rules.yaml"
CRD_MODELS = {"ServiceMonitor": operator.ServiceMonitor, "PrometheusRule": operator.PrometheusRule}


def render_with_component(tmp_path, overlay: str = "overlays/simulated") -> list[dict]:
    """An overlay plus the component, as a user's overlay would include it (in the overlays' namespace)."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "loadagg",
        "resources": [os.path.relpath(K8S / overlay, tmp_path)],
        "components": [os.path.relpath(COMPONENT, tmp_path)],
    }))
    return render(tmp_path)


def validate_custom(obj: dict) -> None:
    """Validate against the operator's CRD schema; ValueError naming any field the schema does not know."""
    model = CRD_MODELS[obj["kind"]].model_validate(obj)  # pydantic.ValidationError: types, patterns, required
    known = model.model_dump(mode="json", by_alias=True, exclude_unset=True)
    unknown = _unknown_fields(obj, known, obj["kind"])
    if unknown:
        raise ValueError(f"{obj['kind']}/{obj['metadata']['name']}: fields the CRD does not define: {unknown}")


def _unknown_fields(given, known, path: str) -> list[str]:
    """Paths present in `given` but dropped by the model (pydantic ignores unknown fields)."""
    if isinstance(given, dict):
        if not isinstance(known, dict):
            return [path]
        found = []
        for key, value in given.items():
            found += [f"{path}.{key}"] if key not in known else _unknown_fields(value, known[key], f"{path}.{key}")
        return found
    if isinstance(given, list) and isinstance(known, list):
        pairs = enumerate(zip(given, known, strict=True))
        return [p for i, (g, k) in pairs for p in _unknown_fields(g, k, f"{path}[{i}]")]
    return []


def _one(objects: list[dict], kind: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


@pytest.mark.parametrize("overlay", ["overlays/simulated", "overlays/sglang"])
def test_the_component_renders_valid_objects_in_the_overlays_namespace(tmp_path, overlay):
    objects = render_with_component(tmp_path, overlay)
    assert {"ServiceMonitor", "PrometheusRule"} <= {o["kind"] for o in objects}
    for obj in objects:
        if obj["kind"] in CRD_MODELS:
            validate_custom(obj)
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        else:
            kubernetes_validate.validate(obj, kubernetes_validate.utils.latest_version(), strict=True)
        assert obj["kind"] == "Namespace" or obj["metadata"]["namespace"] == "loadagg"
    assert "ServiceMonitor" not in {o["kind"] for o in render(K8S / overlay)}  # optional: not without it


def test_the_crd_validation_rejects_bad_objects(tmp_path):
    """A test that cannot fail is a defect: a misspelt field, a bad duration and a missing selector are refused."""
    monitor = _one(render_with_component(tmp_path), "ServiceMonitor")
    misspelt = yaml.safe_load(yaml.safe_dump(monitor))
    misspelt["spec"]["endpoints"][0]["pth"] = misspelt["spec"]["endpoints"][0].pop("path")
    with pytest.raises(ValueError, match=r"endpoints\[0\]\.pth"):
        validate_custom(misspelt)
    bad_interval = yaml.safe_load(yaml.safe_dump(monitor))
    bad_interval["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(ValueError, match="interval"):
        validate_custom(bad_interval)
    no_selector = yaml.safe_load(yaml.safe_dump(monitor))
    del no_selector["spec"]["selector"]
    with pytest.raises(ValueError, match="selector"):
        validate_custom(no_selector)


def test_the_service_monitor_scrapes_the_aggregators_http_port(tmp_path):
    objects = render_with_component(tmp_path)
    monitor = _one(objects, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    selected = [s for s in objects
                if s["kind"] == "Service" and selector.items() <= s["metadata"].get("labels", {}).items()]
    with_port = [s["metadata"]["name"] for s in selected if ports <= {p["name"] for p in s["spec"]["ports"]}]
    assert with_port == ["loadagg"], "exactly the routers' Service exposes the scraped port (one target per pod)"
    (deployment,) = [d for d in objects if d["kind"] == "Deployment" and d["metadata"]["name"] == "loadagg-aggregator"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (service,) = [s for s in selected if s["metadata"]["name"] == "loadagg"]
    (http,) = [p for p in service["spec"]["ports"] if p["name"] == "http"]
    assert any(p["name"] == http["targetPort"] for p in container["ports"])
    paths = {e["path"]: e for e in monitor["spec"]["endpoints"]}
    assert set(paths) == {"/metrics", "/v1/loads"}
    assert paths["/v1/loads"]["params"]["format"] == ["prometheus"]
    # The rules and the dashboard select job="loadagg" (the Service's name) and job="loadagg-loads".
    assert "jobLabel" not in monitor["spec"]
    assert paths["/v1/loads"]["relabelings"] == [{"action": "replace", "targetLabel": "job",
                                                   "replacement": "loadagg-loads"}]


def test_the_prometheus_rule_carries_exactly_the_rule_files_groups(tmp_path):
    rule = _one(render_with_component(tmp_path), "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_the_prometheus_rule_is_what_the_script_generates_now():
    spec = importlib.util.spec_from_file_location("gen_prometheus_rule", ROOT / "scripts" / "gen_prometheus_rule.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert generator.TARGET.read_text() == generator.render(), (
        "deploy/k8s/components/prometheus/prometheusrule.yaml is out of date with deploy/prometheus/loadagg-rules.yaml:"
        " run `python scripts/gen_prometheus_rule.py`")
