"""The Kubernetes manifests, rendered like ``kubectl apply -k`` would for each overlay, against
the real API schemas: RayJob against KubeRay's CRD (``k8s/crds``, vendored), core resources
against Kubernetes' own (kubernetes-validate, offline); plus the rules the project sets for
them (resources everywhere, nothing exposed, no plain-text secret)."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from sweep.cli import main
from sweep.k8s import dump, render_sweep
from tests.kustomize import build

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "k8s" / "crds"  # KubeRay v1.7's CRDs, vendored unchanged (k8s/crds/README.md)
K8S_VERSION = "1.37.0"
OVERLAYS = ["kind", "gpu"]


def strict(schema: dict) -> dict:
    """The schema with unknown fields refused, as ``kubectl apply`` does by default
    (``--validate=strict``), except where the CRD preserves unknown fields."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def crd_schema(kind: str) -> dict:
    crd = yaml.safe_load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: the API server's
    return schema


def validate(doc: dict) -> None:
    """Raises if ``doc`` is not a valid resource of its kind."""
    if doc["apiVersion"] == "ray.io/v1":
        jsonschema.validate(doc, crd_schema(doc["kind"]), cls=jsonschema.Draft7Validator)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def containers(doc: dict) -> list[dict]:
    """Every container spec in a resource (pods, pod templates, RayJob groups, autoscaler)."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    found.extend(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    autoscaler = doc.get("spec", {}).get("rayClusterSpec", {}).get("autoscalerOptions")
    if autoscaler:
        found.append({"name": "autoscaler", **autoscaler})
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_render_to_valid_resources(overlay):
    docs = build(ROOT / "k8s" / "overlays" / overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["Namespace", "Service", "StatefulSet", "Service",
                            "PersistentVolumeClaim", "Deployment", "PersistentVolumeClaim",
                            "ConfigMap", "RayJob"])
    for doc in docs:
        validate(doc)
        assert doc["kind"] != "Secret"  # credentials are never in the repository
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP"
        for c in containers(doc):
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part, {})), (doc["kind"], c["name"])
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["minReplicas"] == 0 < workers["maxReplicas"]
    for c in containers(job)[:-1]:
        if c["name"] == "ray-job-submitter":
            continue
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["NTK_SWEEP_STORAGE"].startswith("/mnt/ntk-sweep")
    worker = workers["template"]["spec"]["containers"][0]
    (mlflow,) = [d for d in docs if d["kind"] == "Deployment"]
    args = " ".join(mlflow["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--backend-store-uri=postgresql+psycopg2://" in args and "--serve-artifacts" in args
    storage = next(d for d in docs if d["metadata"]["name"] == "ntk-sweep-storage")
    if overlay == "gpu":
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert worker["image"] == "ntk-sweep:gpu"
        assert "sweep.resources.gpus=1" in spec["entrypoint"]
        assert storage["spec"]["accessModes"] == ["ReadWriteMany"]
    else:
        assert "nvidia.com/gpu" not in worker["resources"]["limits"]
        assert storage["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert all(d["metadata"].get("namespace") == "ntk-sweep" for d in docs
               if d["kind"] != "Namespace")


@pytest.mark.slow
def test_validation_is_real():
    """A RayJob with a worker group missing its name, and a Deployment with an unknown
    field, are refused by the same validators."""
    (job,) = [d for d in build(ROOT / "k8s" / "overlays" / "kind") if d["kind"] == "RayJob"]
    del job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError, match="groupName"):
        validate(job)
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"] = "w"
    job["spec"]["shutdownAfterJobFinishes"] = "yes"
    with pytest.raises(jsonschema.ValidationError):
        validate(job)
    job["spec"]["shutdownAfterJobFinishes"] = True
    validate(job)
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "resource"] = {}  # a misspelt field inside the pod template
    with pytest.raises(jsonschema.ValidationError, match="resource"):
        validate(job)
    (deployment,) = [d for d in build(ROOT / "k8s" / "base") if d["kind"] == "Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["cpuLimit"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


def test_base_rayjob_is_what_render_gives():
    text = (ROOT / "search_spaces" / "quickstart.yaml").read_text()
    shipped = (ROOT / "k8s" / "base" / "rayjob.yaml").read_text()
    assert shipped.split("\n", 1)[1] == dump(render_sweep("quickstart", text, "ntk-sweep:cpu"))


@pytest.mark.slow
def test_render_command_for_a_gpu_sweep(tmp_path, capsys):
    assert main(["k8s", "render", "paper-fixed-kernel", "--image", "reg.example/ntk:gpu",
                 "--max-workers", "16"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    config_map, job = docs
    for doc in docs:
        validate(doc)
    assert "paper-fixed-kernel.yaml" in config_map["data"]
    assert yaml.safe_load(config_map["data"]["paper-fixed-kernel.yaml"])["name"] == \
        "paper-fixed-kernel"
    (workers,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["maxReplicas"] == 16
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1  # the space asks for one GPU per trial
    assert job["spec"]["entrypoint"].startswith("ntk-sweep run /etc/ntk-sweep/")
    # A sweep file that does not validate is refused before anything is printed.
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nphase1: {lr: -1}\n")
    assert main(["k8s", "render", str(bad), "--image", "x"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "phase1.lr" in captured.err
