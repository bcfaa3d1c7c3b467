"""A tiny kustomize for tests (kustomize itself is not installed here): renders a kustomization directory.

It implements only the fields deploy/k8s uses, with kustomize's meaning: `resources` (files, multi-document, and
directories holding a kustomization.yaml, rendered recursively), `components` (directories holding a
`kind: Component` kustomization, whose objects join the including one's before its namespace and images apply),
`namespace` (set on every namespaced object) and `images` (name -> newName/newTag). Any other field fails loudly,
so a manifest change this loader cannot render never passes silently.
"""

from __future__ import annotations

from pathlib import Path

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "components", "namespace", "images"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass",
                  "StorageClass", "PersistentVolume"}


def render(directory: Path, kind: str = "Kustomization") -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED
    assert not unknown, f"{directory}: kustomize_lite cannot render {sorted(unknown)}"
    assert kustomization["kind"] == kind, f"{directory}: a {kind} was expected, it is a {kustomization['kind']}"
    objects: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            objects += render(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for component in kustomization.get("components", []):
        objects += render((directory / component).resolve(), kind="Component")
    namespace = kustomization.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = namespace
    for image in kustomization.get("images", []):
        for container in _containers(objects):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    return objects


def _containers(objects: list[dict]) -> list[dict]:
    found = []
    for obj in objects:
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        found += spec.get("containers", []) + spec.get("initContainers", [])
    return found
