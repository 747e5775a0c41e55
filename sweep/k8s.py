"""Kubernetes manifests for running a sweep on a KubeRay cluster (``ntk-sweep k8s render``).

``render_sweep`` gives, for one search space, a ConfigMap holding the sweep file and a RayJob
(``ray.io/v1``) whose cluster has a CPU head and an autoscaling worker group (GPU workers when
the space asks for GPUs). The head runs ``ntk-sweep run`` on the mounted file; every pod mounts
the shared volume ``ntk-sweep-storage`` (ReadWriteMany) at ``/mnt/ntk-sweep``, where trials
keep their trajectories and Ray Tune its experiment (``NTK_SWEEP_STORAGE``), and logs to the
in-cluster MLflow server (``http://mlflow:5000``, PostgreSQL-backed, see ``k8s/base``).

Security (``k8s/base`` holds the namespace's NetworkPolicies, which select these pods by label):

- Ray token authentication: ``authOptions.mode: token`` with the token of the Secret
  ``ntk-sweep-ray-auth`` (key ``auth_token``, created by hand like the PostgreSQL one), and
  ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN`` set from it on every container (head, workers,
  autoscaler, job submitter), so the pods are authenticated even before KubeRay injects them.
- Ray pods carry ``RAY_POD_LABELS`` (the NetworkPolicies let them reach each other on any
  port, MLflow on 5000), the job submitter ``SUBMITTER_POD_LABELS`` (the head's 8265 only).
- Every container runs as the image's user ``ray`` (uid 1000) without privilege escalation or
  capabilities, under the runtime's default seccomp profile, on a read-only root filesystem
  (``/tmp`` is an emptyDir; KubeRay mounts ``/dev/shm`` and ``/tmp/ray`` itself).
- The head's services stay ClusterIP: the dashboard and job API are reached from inside the
  namespace or through ``kubectl port-forward``, with the token.

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
RAY_AUTH_SECRET = "ntk-sweep-ray-auth"
RAY_AUTH_KEY = "auth_token"  # the key KubeRay reads from an authOptions Secret
RAY_POD_LABELS = {"app.kubernetes.io/part-of": "ntk-sweep", "app.kubernetes.io/component": "ray"}
SUBMITTER_POD_LABELS = {"app.kubernetes.io/part-of": "ntk-sweep",
                        "app.kubernetes.io/component": "ray-job-submitter"}
RAY_UID = 1000  # the user `ray` of Ray's images


def _name(text: str) -> str:
    """A DNS-1123 label from ``text`` (lower case, digits and dashes, at most 40 chars)."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:40].strip("-")
    return label or "sweep"


def auth_env() -> list[dict[str, Any]]:
    """Ray 2.60's token authentication: the mode, and the token from the Secret (never a
    literal value in the manifest)."""
    return [{"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {
                "name": RAY_AUTH_SECRET, "key": RAY_AUTH_KEY}}}]


def _env(gpu: bool) -> list[dict[str, Any]]:
    env = [
        *auth_env(),
        {"name": "MLFLOW_TRACKING_URI", "value": TRACKING_URI},
        {"name": "NTK_SWEEP_STORAGE", "value": f"{MOUNT}/ray"},
        # Trials that share a node (or a GPU) must not preallocate each other's memory.
        {"name": "XLA_PYTHON_CLIENT_PREALLOCATE", "value": "false"},
        {"name": "TF_CPP_MIN_LOG_LEVEL", "value": "3"},
        # The root filesystem is read-only: caches and matplotlib's config under /tmp.
        {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
        {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
    ]
    if gpu:
        env.append({"name": "XLA_PYTHON_CLIENT_MEM_FRACTION", "value": "0.9"})
    return env


def security_context() -> dict[str, Any]:
    """A container's: non-root, no privilege escalation, no capabilities, the runtime's
    default seccomp profile, a read-only root filesystem."""
    return {"runAsNonRoot": True, "runAsUser": RAY_UID, "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def _pod_security() -> dict[str, Any]:
    # fsGroup: the shared volume is writable by `ray`.
    return {"runAsNonRoot": True, "fsGroup": RAY_UID, "seccompProfile": {"type": "RuntimeDefault"}}


def _tmp_mount() -> dict[str, Any]:
    return {"name": "tmp", "mountPath": "/tmp"}


def _container(name: str, image: str, resources: dict[str, Any], gpu: bool,
               mounts: list[dict[str, Any]], ports: list[dict[str, Any]] | None = None
               ) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name, "image": image, "imagePullPolicy": "IfNotPresent",
        "env": _env(gpu), "resources": resources, "volumeMounts": [*mounts, _tmp_mount()],
        "securityContext": security_context(),
    }
    if ports:
        container["ports"] = ports
    return container


def _resources(cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    return {"requests": dict(limits), "limits": limits}


def _pod(labels: dict[str, str], spec: dict[str, Any]) -> dict[str, Any]:
    """A pod template: ``labels``, the pod security context, ``spec``, and the /tmp volume."""
    volumes = [*spec.pop("volumes", []), {"name": "tmp", "emptyDir": {}}]
    return {"metadata": {"labels": dict(labels)},
            "spec": {"securityContext": _pod_security(), **spec, "volumes": volumes}}


def render_sweep(space_name: str, space_text: str, image: str, *, gpus_per_worker: int = 0,
                 max_workers: int = 4, worker_cpus: int = 4, worker_memory: str = "16Gi",
                 deadline_s: int = ONE_WEEK_S) -> list[dict[str, Any]]:
    """[ConfigMap, RayJob] running the sweep ``space_text`` (named ``space_name``)."""
    name = _name(space_name)
    gpu = gpus_per_worker > 0

    def storage() -> dict[str, Any]:
        return {"name": "storage", "persistentVolumeClaim": {"claimName": STORAGE_CLAIM}}

    def mounts() -> list[dict[str, Any]]:
        return [{"name": "storage", "mountPath": MOUNT}]

    space = {"name": "space", "configMap": {"name": f"ntk-sweep-space-{name}"}}
    head_mounts = [*mounts(), {"name": "space", "mountPath": SPACE_DIR, "readOnly": True}]
    head_ports = [{"containerPort": 6379, "name": "gcs"},
                  {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}]
    worker_spec: dict[str, Any] = {
        "containers": [_container(
            "ray-worker", image, _resources(str(worker_cpus), worker_memory, gpus_per_worker),
            gpu, mounts())],
        "volumes": [storage()],
    }
    if gpu:
        worker_spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    worker_group: dict[str, Any] = {
        "groupName": "gpu-workers" if gpu else "cpu-workers",
        "replicas": 0, "minReplicas": 0, "maxReplicas": max_workers,
        "rayStartParams": {},
        "template": _pod(RAY_POD_LABELS, worker_spec),
    }
    # File and directory names from the sanitised name: nothing to quote in the entrypoint.
    entrypoint = f"ntk-sweep run {SPACE_DIR}/{name}.yaml --out {MOUNT}/runs/{name}"
    config_map = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": f"ntk-sweep-space-{name}",
                     "labels": {"app.kubernetes.io/name": "ntk-sweep"}},
        "data": {f"{name}.yaml": space_text},
    }
    submitter = {"restartPolicy": "Never", "containers": [{
        "name": "ray-job-submitter", "image": image, "env": auth_env(),
        "resources": _resources("200m", "512Mi"), "volumeMounts": [_tmp_mount()],
        "securityContext": security_context(),
    }]}
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
            "submitterPodTemplate": _pod(SUBMITTER_POD_LABELS, submitter),
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                # KubeRay puts the Secret's token into every Ray container it builds.
                "authOptions": {"mode": "token", "secretName": RAY_AUTH_SECRET},
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 300,
                                      "resources": _resources("500m", "512Mi"),
                                      "env": auth_env(), "volumeMounts": [_tmp_mount()],
                                      "securityContext": security_context()},
                "headGroupSpec": {
                    "serviceType": "ClusterIP",  # the dashboard stays inside the cluster
                    # The head schedules trials but runs none: all trials go to workers.
                    # The dashboard listens on the pod's address for the job submitter
                    # (the NetworkPolicies decide who reaches it; the token, who gets in).
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": _pod(RAY_POD_LABELS, {
                        "containers": [_container("ray-head", image, _resources("2", "8Gi"),
                                                  False, head_mounts, head_ports)],
                        "volumes": [storage(), space],
                    }),
                },
                "workerGroupSpecs": [worker_group],
            },
        },
    }
    return [config_map, rayjob]


def dump(documents: list[dict[str, Any]]) -> str:
    """Multi-document YAML, keys in the order written."""
    return "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in documents)

