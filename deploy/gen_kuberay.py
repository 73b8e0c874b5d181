"""Generate deploy/kuberay/ from deploy/serve_config.yaml, the single source of truth.

    python deploy/gen_kuberay.py            # (re)write the files in OUTPUTS
    python deploy/gen_kuberay.py --check    # exit 1 when a committed file is stale (run by the tests)

Writes the RayService (`rayservice.yaml`, CPU; `rayservice-gpu.yaml`, its GPU variant), the NetworkPolicies
that fence its pods (`networkpolicies.yaml`) and the template of the Secret that holds the Ray auth token
(`auth-secret.yaml`, no token in it).
The Serve config is embedded unchanged as `serveConfigV2`, except for IN_CLUSTER_OVERRIDES below. Pod sizes,
images, autoscaler bounds and who may reach which port live here, at the top, because the Serve config does not
describe machines or networks. Plain PyYAML, no attnserve import: it runs anywhere the repository is checked out.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import sys
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
SERVE_CONFIG = DEPLOY / "serve_config.yaml"
OUT_DIR = DEPLOY / "kuberay"

RAY_VERSION = "2.60.0"
IMAGE_CPU = "attnserve:0.1.0-cpu"  # built by deploy/docker/Dockerfile; push to your registry and change here
IMAGE_GPU = "attnserve:0.1.0-gpu"
ARTIFACTS_IN_IMAGE = "/home/ray/attnserve/artifacts"  # where the Dockerfile puts the exported ONNX artifacts
METRICS_PORT = 8080  # Ray's metrics export port on every node, named `metrics` for the PodMonitor
SERVE_PORT = 8000
AGENT_PORT = 52365  # dashboard agent: /api/healthz (raylet + local GCS)
DASHBOARD_PORT = 8265
GCS_PORT = 6379
LABELS = {"app.kubernetes.io/name": "attnserve", "app.kubernetes.io/part-of": "attnserve"}
HEAD_ONLY = {"ray.io/node-type": "head"}  # set by KubeRay on the head pod

# --- Security: deploy/README.md#security ---------------------------------------------------------------------
# Ray token auth through KubeRay's `authOptions` (KubeRay >= 1.6.0 for `secretName`; Ray >= 2.52). The operator
# reads the token from this Secret to call the dashboard (it deploys serveConfigV2 through it), and the same
# Secret is wired into every Ray container below. The Secret is created by hand, never committed.
AUTH_SECRET = "attnserve-ray-auth"
AUTH_SECRET_KEY = "auth_token"  # the key KubeRay and the Ray containers read
# User `ray` of the rayproject/ray image, made explicit (numeric) by deploy/docker/Dockerfile's USER line.
RUN_AS_USER, RUN_AS_GROUP = 1000, 100
# Who may connect (NetworkPolicies; every other ingress to the Ray pods is denied). Namespaces are matched by the
# label Kubernetes sets on every namespace, kubernetes.io/metadata.name; change these to your cluster's.
OPERATOR_NAMESPACE = {"kubernetes.io/metadata.name": "kuberay-system"}  # helm install ... -n kuberay-system
OPERATOR_PODS = {"app.kubernetes.io/name": "kuberay-operator"}  # the kuberay-operator Helm chart's pod label
GATEWAY_NAMESPACE = {"kubernetes.io/metadata.name": "ingress-nginx"}  # whatever sends user traffic to :8000
GATEWAY_PODS = {"app.kubernetes.io/name": "ingress-nginx"}
PROMETHEUS_NAMESPACE = {"kubernetes.io/metadata.name": "monitoring"}  # kube-prometheus-stack's namespace

# The only differences from serve_config.yaml: inside a pod the proxy must listen on the pod IP (the local config
# binds loopback), on the port KubeRay's serve Service targets.
IN_CLUSTER_OVERRIDES = {"http_options": {"host": "0.0.0.0", "port": SERVE_PORT}}
# Serve's ingress, as `attnserve serve` starts it by default (service/launch/local.py: INGRESS["throughput"];
# docs/BENCHMARKS.md "Ingress"): direct ingress (each ingress replica also serves HTTP on a port in 30000-31000 of
# its pod IP) and gRPC between proxy and replicas. Those ports are reached only from pods of this RayService
# (attnserve-ray-internal below); user traffic still enters through the proxy on SERVE_PORT.
RAY_CONTAINER_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}

# (name, requests, limits, min/max pods). Memory limit == request: Ray sizes its object store from the limit
# and an OOM-kill is clearer than slow swapping. Replicas ask 0.5 CPU each in the Serve config.
HEAD = {"cpu": "1", "memory": "4Gi"}
CPU_WORKER = {"cpu": "2", "memory": "4Gi"}
GPU_WORKER = {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
CPU_WORKERS = (1, 1, 4)  # replicas, minReplicas, maxReplicas
GPU_WORKERS = (1, 1, 2)  # the GPU variant: one card holds a translator and a classifier replica (gpu_share 0.5)
MODELS = ("translator", "classifier")  # AppArgs fields = Serve application names = `component` values
AUTOSCALER = {"cpu": "500m", "memory": "512Mi"}  # KubeRay's defaults for its sidecar, written out

# Every container: no root, no privilege escalation, no capabilities, the runtime's default seccomp profile.
# Set per container (not only per pod) because KubeRay copies the Ray container's securityContext into the
# `wait-gcs-ready` init container it injects into worker pods.
CONTAINER_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS_USER,
    "runAsGroup": RUN_AS_GROUP,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS_USER,
    "runAsGroup": RUN_AS_GROUP,
    "fsGroup": RUN_AS_GROUP,
    "seccompProfile": {"type": "RuntimeDefault"},
}
# No Ray container talks to the Kubernetes API, so no pod gets a service-account token automatically. Only the
# autoscaler sidecar (it patches the RayCluster's replica counts) gets one, mounted where it reads it; 3607 s is
# what the automatic mount uses (the API server extends such tokens for clients that do not reload them).
KUBE_API_VOLUME = {
    "name": "autoscaler-kube-api",
    "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace",
                                    "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
    ]},
}
KUBE_API_MOUNT = {"name": "autoscaler-kube-api", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                  "readOnly": True}


class _NoAliasDumper(yaml.SafeDumper):
    """Block style for multi-line strings; no &anchors (the merge keys of serve_config.yaml are expanded)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, s: str) -> yaml.ScalarNode:
    style = "|" if "\n" in s else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)


_NoAliasDumper.add_representer(str, _str)


def dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_NoAliasDumper, sort_keys=False, width=120, default_flow_style=False)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def serve_config_for_cluster(path: Path = SERVE_CONFIG) -> dict[str, Any]:
    return _merge(yaml.safe_load(path.read_text()), IN_CLUSTER_OVERRIDES)


def cuda_variant(serve_config: dict[str, Any]) -> dict[str, Any]:
    """The Serve config for GPU pods: both models on `device: cuda`, each model deployment asking Ray for its
    model's `gpu_share` of a GPU. The same rule `attnserve serve --device cuda` applies (service/launch/devices.py:
    apply; tests/deploy/test_kuberay.py checks they agree)."""
    out = copy.deepcopy(serve_config)
    for app in out["applications"]:
        args = app["args"]
        for m in MODELS:
            args[m] = {**args[m], "device": "cuda"}
        if args.get("component") in MODELS:
            share = args[args["component"]]["gpu_share"]  # written out in serve_config.yaml
            for dep in app["deployments"]:
                dep["ray_actor_options"] = {**dep.get("ray_actor_options", {}), "num_gpus": share}
    return out


def _probe(path: str, port: int, *, period: int, failures: int, delay: int = 10) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "initialDelaySeconds": delay, "periodSeconds": period,
            "timeoutSeconds": 5, "failureThreshold": failures}


def _container(name: str, image: str, res: dict[str, str], *, head: bool) -> dict[str, Any]:
    ports = [{"name": "metrics", "containerPort": METRICS_PORT}, {"name": "serve", "containerPort": SERVE_PORT}]
    if head:
        ports = [{"name": "gcs-server", "containerPort": GCS_PORT},
                 {"name": "dashboard", "containerPort": DASHBOARD_PORT},
                 {"name": "client", "containerPort": 10001}, *ports]
    return {
        "name": name,
        "image": image,
        "env": [
            {"name": "ATTNSERVE_ARTIFACTS", "value": ARTIFACTS_IN_IMAGE},
            # What authOptions makes KubeRay inject, written out: it then shows in this file, and a cluster whose
            # operator predates authOptions (and drops the field) still starts with auth on, failing closed.
            {"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": AUTH_SECRET, "key": AUTH_SECRET_KEY}}},
            *({"name": k, "value": v} for k, v in RAY_CONTAINER_ENV.items()),
        ],
        "ports": ports,
        "resources": {"requests": dict(res), "limits": dict(res)},
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        # Liveness: the node's raylet (and GCS on the head) answer. Readiness: this node's Serve proxy routes
        # traffic; KubeRay's serve Service only sends requests to ready pods.
        "livenessProbe": _probe("/api/healthz", AGENT_PORT, period=10, failures=6, delay=30),
        "readinessProbe": _probe("/-/healthz", SERVE_PORT, period=5, failures=3),
        # Let the proxy drain in-flight requests before the pod is killed (graceful_shutdown_timeout_s <= 30).
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop --grace-period 30"]}}},
    }


def _pod(container: dict[str, Any], *, gpu: bool = False, head: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": copy.deepcopy(POD_SECURITY),
        "containers": [container],
        "terminationGracePeriodSeconds": 60,
    }
    if head:
        spec["volumes"] = [copy.deepcopy(KUBE_API_VOLUME)]  # mounted into the autoscaler sidecar only
    if gpu:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": dict(LABELS)}, "spec": spec}


def _worker_group(name: str, image: str, res: dict[str, str], sizes: tuple[int, int, int]) -> dict[str, Any]:
    replicas, lo, hi = sizes
    return {
        "groupName": name,
        "replicas": replicas,
        "minReplicas": lo,
        "maxReplicas": hi,
        "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
        "template": _pod(_container("ray-worker", image, res, head=False), gpu="nvidia.com/gpu" in res),
    }


def rayservice(serve_config: dict[str, Any], *, gpu: bool = False) -> dict[str, Any]:
    """CPU: a CPU image everywhere, CPU workers. GPU (`gpu=True`, with `cuda_variant`'s config): the CUDA image on
    every pod (Ray needs one Python across the cluster), GPU workers with `nvidia.com/gpu` limits and tolerations."""
    head_image = IMAGE_GPU if gpu else IMAGE_CPU
    workers = ([_worker_group("gpu", IMAGE_GPU, GPU_WORKER, GPU_WORKERS)] if gpu
               else [_worker_group("cpu", IMAGE_CPU, CPU_WORKER, CPU_WORKERS)])
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "attnserve", "labels": dict(LABELS)},  # either variant: the same RayService
        "spec": {
            "serveConfigV2": dump(serve_config),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                # Serve autoscaling adds replicas; the in-tree autoscaler adds pods when replicas cannot be placed.
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": 60,
                    "resources": {"requests": dict(AUTOSCALER), "limits": dict(AUTOSCALER)},
                    "securityContext": copy.deepcopy(CONTAINER_SECURITY),
                    "volumeMounts": [dict(KUBE_API_MOUNT)],
                },
                # KubeRay sets RAY_AUTH_MODE/RAY_AUTH_TOKEN on the containers it adds (autoscaler, wait-gcs-ready)
                # and sends the token when it calls the dashboard.
                "authOptions": {"mode": "token", "secretName": AUTH_SECRET},
                "headGroupSpec": {
                    # num-cpus 0: replicas run on workers, so a busy replica never starves the GCS.
                    # dashboard-host 0.0.0.0: the operator and the workers reach it; the token and the
                    # NetworkPolicies decide who gets in.
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0",
                                       "metrics-export-port": str(METRICS_PORT)},
                    "template": _pod(_container("ray-head", head_image, HEAD, head=True), head=True),
                },
                "workerGroupSpecs": workers,
            },
        },
    }


def _policy(name: str, ingress: list[dict[str, Any]], pods: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "labels": dict(LABELS)},
        "spec": {"podSelector": {"matchLabels": {**LABELS, **(pods or {})}}, "policyTypes": ["Ingress"],
                 "ingress": ingress},
    }


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": p} for p in ports]


def network_policies() -> list[dict[str, Any]]:
    """Ingress to the Ray pods: nothing, except what each policy below allows (policies add up).

    Kubelet probes and `kubectl port-forward` come from the node and are not subject to these policies.
    """
    ray_pods = {"podSelector": {"matchLabels": dict(LABELS)}}
    return [
        _policy("attnserve-default-deny", []),
        # GCS (6379), raylets, object managers and worker processes (ports Ray picks, 10002-19999 by default),
        # proxies and replicas (inter-deployment gRPC, direct-ingress HTTP 30000-31000) talk to each other: every
        # port, but only between pods of this RayService (old and new cluster during an upgrade carry the same
        # labels).
        _policy("attnserve-ray-internal", [{"from": [ray_pods]}]),
        # The operator deploys serveConfigV2 and reads Serve's status through the head's dashboard.
        _policy("attnserve-dashboard-from-operator", [{
            "from": [{"namespaceSelector": {"matchLabels": dict(OPERATOR_NAMESPACE)},
                      "podSelector": {"matchLabels": dict(OPERATOR_PODS)}}],
            "ports": _tcp(DASHBOARD_PORT),
        }], pods=HEAD_ONLY),
        # User traffic: Serve's proxy runs on every node (proxy_location: EveryNode).
        _policy("attnserve-serve-from-gateway", [{
            "from": [{"namespaceSelector": {"matchLabels": dict(GATEWAY_NAMESPACE)},
                      "podSelector": {"matchLabels": dict(GATEWAY_PODS)}}],
            "ports": _tcp(SERVE_PORT),
        }]),
        _policy("attnserve-metrics-from-prometheus", [{
            "from": [{"namespaceSelector": {"matchLabels": dict(PROMETHEUS_NAMESPACE)}}],
            "ports": _tcp(METRICS_PORT),
        }]),
    ]


def auth_secret() -> dict[str, Any]:
    """The Secret's shape, without data: applied as is, KubeRay finds no token and starts nothing (fails closed)."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": AUTH_SECRET, "labels": dict(LABELS)}}


HEADER = ("# GENERATED by deploy/gen_kuberay.py from deploy/serve_config.yaml: do not edit; edit those and run\n"
          "#   python deploy/gen_kuberay.py\n")
SECRET_HEADER = f"""\
# The Ray auth token for the attnserve RayService. Never put a token in this file or in git. Create the Secret
# with a random token in the RayService's namespace (before applying rayservice.yaml):
#   kubectl create secret generic {AUTH_SECRET} --from-literal={AUTH_SECRET_KEY}="$(openssl rand -hex 32)"
# This template (no data) is for tools that fill Secrets in (sealed-secrets, external-secrets, SOPS). Applied as
# is it holds no `{AUTH_SECRET_KEY}`, and KubeRay refuses to start the cluster rather than run it without auth.
"""


def render_all(path: Path = SERVE_CONFIG) -> dict[str, str]:
    """{file name under deploy/kuberay/: text} for every generated file."""
    cluster = serve_config_for_cluster(path)
    return {
        "rayservice.yaml": HEADER + dump(rayservice(cluster)),
        "rayservice-gpu.yaml": HEADER + dump(rayservice(cuda_variant(cluster), gpu=True)),
        "networkpolicies.yaml": HEADER + "---\n".join(dump(p) for p in network_policies()),
        "auth-secret.yaml": HEADER + SECRET_HEADER + dump(auth_secret()),
    }


def render(path: Path = SERVE_CONFIG) -> str:
    return render_all(path)["rayservice.yaml"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    p.add_argument("--config", type=Path, default=SERVE_CONFIG)
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    a = p.parse_args(argv)
    stale = []
    for name, text in render_all(a.config).items():
        out = a.out_dir / name
        if not a.check:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
            print(f"wrote {out}")
            continue
        old = out.read_text() if out.exists() else ""
        if old != text:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True), str(out),
                                                       "generated"))
            stale.append(str(out))
    if stale:
        print(f"\nstale: {', '.join(stale)}: run `python deploy/gen_kuberay.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
