"""Kubernetes manifests for running a sweep on a KubeRay cluster (``ntk-sweep k8s render``).

``render_sweep`` gives, for one search space, a ConfigMap holding the sweep file and a RayJob
(``ray.io/v1``) whose cluster has a CPU head and an autoscaling worker group (GPU workers when
the space asks for GPUs). The head runs ``ntk-sweep run`` on the mounted file; every pod mounts
the shared volume ``ntk-sweep-storage`` (ReadWriteMany) at ``/mnt/ntk-sweep``, where trials
keep their trajectories and Ray Tune its experiment (``NTK_SWEEP_STORAGE``), and logs to the
in-cluster MLflow server (``http://mlflow:5000``, PostgreSQL-backed, see ``k8s/base``). The
Ray dashboard is reached only through the head's ClusterIP service (job submission).

``k8s/base/rayjob.yaml`` is this module's output for ``quickstart``; a test keeps them equal.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

RAY_VERSION = "2.60.0"
STORAGE_CLAIM = "ntk-sweep-storage"
MOUNT = "/mnt/ntk-sweep"
SPACE_DIR = "/etc/ntk-sweep"
TRACKING_URI = "http://mlflow:5000"
ONE_WEEK_S = 7 * 24 * 3600


def _name(text: str) -> str:
    """A DNS-1123 label from ``text`` (lower case, digits and dashes, at most 40 chars)."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:40].strip("-")
    return label or "sweep"


def _env(gpu: bool) -> list[dict[str, Any]]:
    env = [
        {"name": "MLFLOW_TRACKING_URI", "value": TRACKING_URI},
        {"name": "NTK_SWEEP_STORAGE", "value": f"{MOUNT}/ray"},
        # Trials that share a node (or a GPU) must not preallocate each other's memory.
        {"name": "XLA_PYTHON_CLIENT_PREALLOCATE", "value": "false"},
        {"name": "TF_CPP_MIN_LOG_LEVEL", "value": "3"},
    ]
    if gpu:
        env.append({"name": "XLA_PYTHON_CLIENT_MEM_FRACTION", "value": "0.9"})
    return env


def _container(name: str, image: str, resources: dict[str, Any], gpu: bool,
               mounts: list[dict[str, Any]], ports: list[dict[str, Any]] | None = None
               ) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name, "image": image, "imagePullPolicy": "IfNotPresent",
        "env": _env(gpu), "resources": resources, "volumeMounts": mounts,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000,
                            "allowPrivilegeEscalation": False},
    }
    if ports:
        container["ports"] = ports
    return container


def _resources(cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    return {"requests": dict(limits), "limits": limits}


def render_sweep(space_name: str, space_text: str, image: str, *, gpus_per_worker: int = 0,
                 max_workers: int = 4, worker_cpus: int = 4, worker_memory: str = "16Gi",
                 deadline_s: int = ONE_WEEK_S) -> list[dict[str, Any]]:
    """[ConfigMap, RayJob] running the sweep ``space_text`` (named ``space_name``)."""
    name = _name(space_name)
    gpu = gpus_per_worker > 0
    storage = {"name": "storage", "persistentVolumeClaim": {"claimName": STORAGE_CLAIM}}
    space = {"name": "space", "configMap": {"name": f"ntk-sweep-space-{name}"}}
    mounts = [{"name": "storage", "mountPath": MOUNT}]
    head_mounts = [*mounts, {"name": "space", "mountPath": SPACE_DIR, "readOnly": True}]
    head_ports = [{"containerPort": 6379, "name": "gcs"},
                  {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}]
    worker_group: dict[str, Any] = {
        "groupName": "gpu-workers" if gpu else "cpu-workers",
        "replicas": 0, "minReplicas": 0, "maxReplicas": max_workers,
        "rayStartParams": {},
        "template": {"spec": {
            "securityContext": {"fsGroup": 1000},  # the shared volume is writable by `ray`
            "containers": [_container(
                "ray-worker", image, _resources(str(worker_cpus), worker_memory,
                                                gpus_per_worker), gpu, mounts)],
            "volumes": [storage],
        }},
    }
    if gpu:
        worker_group["template"]["spec"]["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # File and directory names from the sanitised name: nothing to quote in the entrypoint.
    entrypoint = f"ntk-sweep run {SPACE_DIR}/{name}.yaml --out {MOUNT}/runs/{name}"
    config_map = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": f"ntk-sweep-space-{name}",
                     "labels": {"app.kubernetes.io/name": "ntk-sweep"}},
        "data": {f"{name}.yaml": space_text},
    }
    rayjob = {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": f"ntk-sweep-{name}",
                     "labels": {"app.kubernetes.io/name": "ntk-sweep"}},
        "spec": {
            "entrypoint": entrypoint,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "activeDeadlineSeconds": deadline_s,
            "backoffLimit": 0,  # resume a failed sweep with 'ntk-sweep resume' instead
            "submitterPodTemplate": {"spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "ray-job-submitter", "image": image,
                    "resources": _resources("200m", "512Mi"),
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000,
                                        "allowPrivilegeEscalation": False},
                }],
            }},
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 300,
                                      "resources": _resources("500m", "512Mi")},
                "headGroupSpec": {
                    "serviceType": "ClusterIP",  # the dashboard stays inside the cluster
                    # The head schedules trials but runs none: all trials go to workers.
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": {"spec": {
                        "securityContext": {"fsGroup": 1000},
                        "containers": [_container("ray-head", image, _resources("2", "8Gi"),
                                                  False, head_mounts, head_ports)],
                        "volumes": [storage, space],
                    }},
                },
                "workerGroupSpecs": [worker_group],
            },
        },
    }
    return [config_map, rayjob]


def dump(documents: list[dict[str, Any]]) -> str:
    """Multi-document YAML, keys in the order written."""
    return "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in documents)

