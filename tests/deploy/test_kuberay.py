"""deploy/kuberay: the RayService manifest is generated from deploy/serve_config.yaml and has what a cluster needs."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def ray_pin() -> str:
    serve = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    return next(re.fullmatch(r"ray\[serve\]==(\S+)", d).group(1) for d in serve if d.startswith("ray[serve]"))


VARIANTS = ("rayservice.yaml", "rayservice-gpu.yaml")  # CPU and GPU: every test here checks both
_variant = {"file": VARIANTS[0]}


@pytest.fixture(autouse=True, params=VARIANTS)
def variant(request: pytest.FixtureRequest) -> str:
    _variant["file"] = request.param
    return request.param


def manifest() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "kuberay" / _variant["file"]).read_text())


def is_gpu() -> bool:
    return _variant["file"] == "rayservice-gpu.yaml"


def gen() -> Any:
    sys.path.insert(0, str(DEPLOY))
    try:
        import gen_kuberay
    finally:
        sys.path.remove(str(DEPLOY))
    return gen_kuberay


def containers(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = doc["spec"]["rayClusterConfig"]
    groups = {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}
    return {name: g["template"]["spec"]["containers"][0] for name, g in groups.items()}


def test_committed_manifest_is_what_the_generator_writes() -> None:
    r = subprocess.run([sys.executable, str(DEPLOY / "gen_kuberay.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"


def test_serve_config_is_embedded_unchanged_except_the_bind_address() -> None:
    embedded = yaml.safe_load(manifest()["spec"]["serveConfigV2"])
    local = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    if is_gpu():  # the GPU variant: the same config, put on cuda (checked on its own below)
        local = gen().cuda_variant(local)
    assert embedded["http_options"] == {**local["http_options"], "host": "0.0.0.0", "port": 8000}
    assert {k: v for k, v in embedded.items() if k != "http_options"} == {
        k: v for k, v in local.items() if k != "http_options"}


def test_embedded_config_validates_with_serve_and_the_app_args() -> None:
    from ray.serve.schema import ServeDeploySchema

    from service.app import BuildArgs

    schema = ServeDeploySchema.model_validate(yaml.safe_load(manifest()["spec"]["serveConfigV2"]))
    assert {a.import_path for a in schema.applications} == {"service.app:build_app"}
    for app in schema.applications:
        BuildArgs.model_validate(app.args)


def test_cluster_shape() -> None:
    doc = manifest()
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    spec = doc["spec"]["rayClusterConfig"]
    assert spec["rayVersion"] == ray_pin()
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == ({"gpu"} if is_gpu() else {"cpu"})
    for g in groups.values():
        assert 1 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    cs = containers(doc)
    pods = pod_specs()
    images = {c["image"] for c in cs.values()}
    if is_gpu():
        assert cs["gpu"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert cs["gpu"]["resources"]["requests"]["nvidia.com/gpu"] == "1"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pods["gpu"]["tolerations"]
        assert "nvidia.com/gpu" not in cs["head"]["resources"]["limits"]
        assert images == {"attnserve:0.1.0-gpu"}, "one image (one Python) across the cluster: the CUDA one"
    else:
        assert not any("nvidia.com/gpu" in c["resources"]["limits"] for c in cs.values())
        assert not any("tolerations" in p for p in pods.values())
        assert images == {"attnserve:0.1.0-cpu"}


def test_gpu_variant_puts_both_models_on_cuda_with_their_share_of_one_card() -> None:
    serve = yaml.safe_load(manifest()["spec"]["serveConfigV2"])
    local = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    shares = {m: local["applications"][0]["args"][m]["gpu_share"] for m in ("translator", "classifier")}
    assert 0 < sum(shares.values()) <= 1, "translator and classifier replicas share one card"
    for app in serve["applications"]:
        args = app["args"]
        assert {args[m]["device"] for m in shares} == ({"cuda"} if is_gpu() else {"auto"})
        for dep in app["deployments"]:
            gpus = dep["ray_actor_options"].get("num_gpus", 0)
            expected = shares[args["component"]] if is_gpu() and args["component"] in shares else 0
            assert gpus == expected, (app["name"], dep["name"], gpus)


def test_gpu_variant_is_what_the_launcher_deploys_on_cuda() -> None:
    """deploy/gen_kuberay.py cannot import attnserve: check its cuda_variant against service/launch/devices.py."""
    from service.launch import devices
    from service.launch.local import shared_args

    local = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    launched = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    devices.apply(launched, {"translator": "cuda", "classifier": "cuda"}, shared_args(launched))
    assert gen().cuda_variant(local) == launched


def test_every_pod_has_resources_probes_and_a_named_metrics_port() -> None:
    doc = manifest()
    spec = doc["spec"]["rayClusterConfig"]
    start_params = [spec["headGroupSpec"]["rayStartParams"], *(g["rayStartParams"] for g in spec["workerGroupSpecs"])]
    for (name, c), params in zip(containers(doc).items(), start_params, strict=True):
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and c["resources"]["limits"], name
        assert "httpGet" in c["livenessProbe"] and "httpGet" in c["readinessProbe"], name
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["metrics"] == int(params["metrics-export-port"]), name
        assert {"name": "ATTNSERVE_ARTIFACTS", "value": "/home/ray/attnserve/artifacts"} in c["env"], name


def test_podmonitor_selects_the_pods_and_scrapes_the_metrics_port() -> None:
    pm = yaml.safe_load((DEPLOY / "kuberay" / "podmonitor.yaml").read_text())
    assert (pm["apiVersion"], pm["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    doc = manifest()
    spec = doc["spec"]["rayClusterConfig"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        labels = group["template"]["metadata"]["labels"]
        assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["metrics"]


# --- security: deploy/README.md#security --------------------------------------------------------------------------

SECRET = "attnserve-ray-auth"
HARDENED = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def cluster_spec() -> dict[str, Any]:
    return manifest()["spec"]["rayClusterConfig"]


def pod_specs() -> dict[str, dict[str, Any]]:
    spec = cluster_spec()
    groups = {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}
    return {name: g["template"]["spec"] for name, g in groups.items()}


def policies() -> dict[str, dict[str, Any]]:
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay" / "networkpolicies.yaml").read_text()))
    assert all((d["apiVersion"], d["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy") for d in docs)
    return {d["metadata"]["name"]: d["spec"] for d in docs}


def dockerfile_user() -> tuple[int, int]:
    users = re.findall(r"^USER (\d+):(\d+)$", (DEPLOY / "docker" / "Dockerfile").read_text(), re.M)
    assert users, "the serving image must name its user by number (runAsNonRoot can only check a numeric user)"
    uid, gid = users[-1]
    return int(uid), int(gid)


def mebibytes(q: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(q[:-2]) * units[q[-2:]] if q[-2:] in units else float(q) / 2**20


def test_ray_token_auth_through_kuberay_and_on_every_ray_container() -> None:
    spec = cluster_spec()
    assert spec["authOptions"] == {"mode": "token", "secretName": SECRET}
    assert tuple(map(int, spec["rayVersion"].split(".")[:2])) >= (2, 52), "Ray token auth needs Ray >= 2.52"
    for name, c in containers(manifest()).items():
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}, name
        assert env["RAY_AUTH_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": SECRET, "key": "auth_token"}}, name
        assert "value" not in env["RAY_AUTH_TOKEN"], name


def test_auth_secret_is_a_template_without_a_token() -> None:
    text = (DEPLOY / "kuberay" / "auth-secret.yaml").read_text()
    secret = yaml.safe_load(text)
    assert (secret["apiVersion"], secret["kind"], secret["metadata"]["name"]) == ("v1", "Secret", SECRET)
    assert "data" not in secret and "stringData" not in secret
    assert f'kubectl create secret generic {SECRET} --from-literal=auth_token="$(openssl rand -hex 32)"' in text
    assert "auth_token:" not in text and "RAY_AUTH_TOKEN=" not in (DEPLOY / "kuberay" / "rayservice.yaml").read_text()


def test_every_container_runs_unprivileged_as_the_image_user() -> None:
    uid, gid = dockerfile_user()
    assert uid != 0
    contexts = {n: c["securityContext"] for n, c in containers(manifest()).items()}
    contexts["autoscaler"] = cluster_spec()["autoscalerOptions"]["securityContext"]
    for name, sc in contexts.items():
        assert HARDENED.items() <= sc.items(), name
        assert (sc["runAsUser"], sc["runAsGroup"]) == (uid, gid), name
    for name, pod in pod_specs().items():
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and (sc["runAsUser"], sc["runAsGroup"]) == (uid, gid), name
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in pod["containers"]:
            assert not c.get("securityContext", {}).get("privileged"), name
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), name


def test_only_the_autoscaler_gets_a_service_account_token() -> None:
    mounts = cluster_spec()["autoscalerOptions"]["volumeMounts"]
    for name, pod in pod_specs().items():
        assert pod["automountServiceAccountToken"] is False, name
        token_volumes = {v["name"] for v in pod.get("volumes", [])
                         if any("serviceAccountToken" in s for s in v.get("projected", {}).get("sources", []))}
        for c in pod["containers"]:
            assert not token_volumes & {m["name"] for m in c.get("volumeMounts", [])}, name
        if name == "head":  # the autoscaler sidecar runs in the head pod and patches the RayCluster
            assert [(m["name"], m["mountPath"]) for m in mounts] == [
                (v, "/var/run/secrets/kubernetes.io/serviceaccount") for v in token_volumes]
        else:
            assert not token_volumes, name


def test_memory_requested_and_capped_for_pods_and_replicas() -> None:
    autoscaler = cluster_spec()["autoscalerOptions"]["resources"]
    for name, res in [*((n, c["resources"]) for n, c in containers(manifest()).items()), ("autoscaler", autoscaler)]:
        assert res["requests"]["memory"] == res["limits"]["memory"], name
    cs = containers(manifest())
    worker = cs["gpu" if is_gpu() else "cpu"]
    worker_cpu, worker_mem = float(worker["resources"]["requests"]["cpu"]), worker["resources"]["requests"]
    worker_mib = mebibytes(worker_mem["memory"])
    serve = yaml.safe_load(manifest()["spec"]["serveConfigV2"])
    for app in serve["applications"]:
        for dep in app["deployments"]:
            opts = dep["ray_actor_options"]
            mib = opts["memory"] / 2**20
            assert mib > 0, dep["name"]
            # As many replicas as fit a CPU worker by CPU must fit by memory too. Ray gives replicas what the pod
            # has after the object store (30% by default) and its own processes: count on 60% of the pod.
            per_pod = int(worker_cpu // opts["num_cpus"]) if opts["num_cpus"] else 1
            assert per_pod * mib <= 0.6 * worker_mib, (dep["name"], per_pod, mib, worker_mib)


def test_network_policies_deny_by_default_and_open_one_port_per_peer() -> None:
    ps = policies()
    pod_labels = [g["template"]["metadata"]["labels"] for g in
                  [cluster_spec()["headGroupSpec"], *cluster_spec()["workerGroupSpecs"]]]
    ours = {"app.kubernetes.io/name": "attnserve", "app.kubernetes.io/part-of": "attnserve"}
    for name, p in ps.items():
        assert p["policyTypes"] == ["Ingress"], name
        selected = {k: v for k, v in p["podSelector"]["matchLabels"].items() if not k.startswith("ray.io/")}
        assert selected == ours and all(ours.items() <= labels.items() for labels in pod_labels), name
        for rule in p["ingress"]:
            assert rule.get("from"), f"{name}: a rule without `from` admits every source"
    assert ps["attnserve-default-deny"]["ingress"] == []
    # Ray's own ports (GCS 6379, dashboard 8265, raylets, workers): any port, only from pods of this RayService,
    # in this namespace (a peer with no namespaceSelector).
    assert ps["attnserve-ray-internal"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": ours}}]}]
    # Every rule that admits pods from elsewhere names exactly one port.
    outside = {}
    for name, p in ps.items():
        for rule in p["ingress"]:
            if any("namespaceSelector" in peer for peer in rule["from"]):
                assert [port["protocol"] for port in rule["ports"]] == ["TCP"], name
                outside[name] = (rule["ports"][0]["port"], rule["from"], p["podSelector"]["matchLabels"])
    assert set(outside) == {"attnserve-dashboard-from-operator", "attnserve-serve-from-gateway",
                            "attnserve-metrics-from-prometheus"}
    port, peers, selects = outside["attnserve-dashboard-from-operator"]
    assert port == 8265 and selects.get("ray.io/node-type") == "head"
    assert peers == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
                      "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]
    port, peers, _ = outside["attnserve-serve-from-gateway"]
    assert port == 8000 and len(peers) == 1 and peers[0]["namespaceSelector"]["matchLabels"]
    assert peers[0]["podSelector"]["matchLabels"], "the gateway is named by namespace AND pod labels"
    port, peers, _ = outside["attnserve-metrics-from-prometheus"]
    assert port == 8080 and peers == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}]
    # The ports named here are the container ports the pods declare.
    declared = {p["containerPort"] for c in containers(manifest()).values() for p in c["ports"]}
    assert {8265, 8000, 8080} <= declared
    assert 8080 == int(cluster_spec()["headGroupSpec"]["rayStartParams"]["metrics-export-port"])
    pm = yaml.safe_load((DEPLOY / "kuberay" / "podmonitor.yaml").read_text())
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["metrics"]
