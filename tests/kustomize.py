"""A small, strict subset of ``kustomize build`` for offline tests: ``resources`` (files and
directories with a kustomization), ``namespace``, ``images`` (newName/newTag) and ``patches``
given as JSON 6902 operation lists with a ``target`` (kind and name). Anything else in a
kustomization raises, so the tests never validate something other than what kubectl builds."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "namespace", "resources", "patches", "images"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass"}


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def apply_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """JSON 6902 ``add``, ``replace`` and ``remove`` on a copy of ``doc``."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        kind = op["op"]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(index, op["value"])
            elif kind == "replace":
                node[index] = op["value"]
            elif kind == "remove":
                del node[index]
            else:
                raise ValueError(f"unsupported op {kind}")
        else:
            if kind in ("replace", "remove") and last not in node:
                raise KeyError(f"{op['path']}: nothing to {kind}")
            if kind in ("add", "replace"):
                node[last] = op["value"]
            elif kind == "remove":
                del node[last]
            else:
                raise ValueError(f"unsupported op {kind}")
    return doc


def _images(doc: Any, images: list[dict[str, str]]) -> Any:
    if isinstance(doc, dict):
        out = {}
        for k, v in doc.items():
            if k == "image" and isinstance(v, str):
                for img in images:
                    if v == img["name"] or v.split(":")[0] == img["name"]:
                        v = f"{img.get('newName', v.split(':')[0])}:{img.get('newTag', 'latest')}"
            out[k] = _images(v, images)
        return out
    if isinstance(doc, list):
        return [_images(v, images) for v in doc]
    return doc


def build(directory: Path) -> list[dict[str, Any]]:
    """The resources the kustomization in ``directory`` renders to."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise ValueError(f"{directory}: unsupported kustomization keys {sorted(unknown)}")
    docs: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            docs += build(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in spec.get("patches", []):
        target = patch["target"]
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        hits = [i for i, d in enumerate(docs) if d["kind"] == target["kind"]
                and d["metadata"]["name"] == target["name"]]
        if len(hits) != 1:
            raise ValueError(f"{directory}: patch target {target} matches {len(hits)} resources")
        docs[hits[0]] = apply_patch(docs[hits[0]], ops)
    if "images" in spec:
        docs = [_images(d, spec["images"]) for d in docs]
    if "namespace" in spec:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d["metadata"]["namespace"] = spec["namespace"]
    return docs
