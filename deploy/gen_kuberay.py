"""Generate deploy/kuberay/rayservice.yaml from deploy/serve_config.yaml, the single source of truth.

    python deploy/gen_kuberay.py            # (re)write deploy/kuberay/rayservice.yaml
    python deploy/gen_kuberay.py --check    # exit 1 when the committed manifest is stale (run by the tests)

The Serve config is embedded unchanged as `serveConfigV2`, except for IN_CLUSTER_OVERRIDES below. Pod sizes,
images and autoscaler bounds live here, at the top, because the Serve config does not describe machines.
Plain PyYAML, no attnserve import: it runs anywhere the repository is checked out.
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
OUT = DEPLOY / "kuberay" / "rayservice.yaml"

RAY_VERSION = "2.60.0"
IMAGE_CPU = "attnserve:0.1.0-cpu"  # built by deploy/docker/Dockerfile; push to your registry and change here
IMAGE_GPU = "attnserve:0.1.0-gpu"
ARTIFACTS_IN_IMAGE = "/home/ray/attnserve/artifacts"  # where the Dockerfile puts the exported ONNX artifacts
METRICS_PORT = 8080  # Ray's metrics export port on every node, named `metrics` for the PodMonitor
SERVE_PORT = 8000
AGENT_PORT = 52365  # dashboard agent: /api/healthz (raylet + local GCS)
LABELS = {"app.kubernetes.io/name": "attnserve", "app.kubernetes.io/part-of": "attnserve"}

# The only differences from serve_config.yaml: inside a pod the proxy must listen on the pod IP (the local config
# binds loopback), on the port KubeRay's serve Service targets.
IN_CLUSTER_OVERRIDES = {"http_options": {"host": "0.0.0.0", "port": SERVE_PORT}}

# (name, requests, limits, min/max pods). Memory limit == request: Ray sizes its object store from the limit
# and an OOM-kill is clearer than slow swapping. Replicas ask 0.5 CPU each in the Serve config.
HEAD = {"cpu": "1", "memory": "4Gi"}
CPU_WORKER = {"cpu": "2", "memory": "4Gi"}
GPU_WORKER = {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
CPU_WORKERS = (1, 1, 4)  # replicas, minReplicas, maxReplicas
GPU_WORKERS = (0, 0, 2)  # scaled from zero only when a deployment asks for num_gpus


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


def _probe(path: str, port: int, *, period: int, failures: int, delay: int = 10) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "initialDelaySeconds": delay, "periodSeconds": period,
            "timeoutSeconds": 5, "failureThreshold": failures}


def _container(name: str, image: str, res: dict[str, str], *, head: bool) -> dict[str, Any]:
    ports = [{"name": "metrics", "containerPort": METRICS_PORT}, {"name": "serve", "containerPort": SERVE_PORT}]
    if head:
        ports = [{"name": "gcs-server", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
                 {"name": "client", "containerPort": 10001}, *ports]
    return {
        "name": name,
        "image": image,
        "env": [{"name": "ATTNSERVE_ARTIFACTS", "value": ARTIFACTS_IN_IMAGE}],
        "ports": ports,
        "resources": {"requests": dict(res), "limits": dict(res)},
        # Liveness: the node's raylet (and GCS on the head) answer. Readiness: this node's Serve proxy routes
        # traffic; KubeRay's serve Service only sends requests to ready pods.
        "livenessProbe": _probe("/api/healthz", AGENT_PORT, period=10, failures=6, delay=30),
        "readinessProbe": _probe("/-/healthz", SERVE_PORT, period=5, failures=3),
        # Let the proxy drain in-flight requests before the pod is killed (graceful_shutdown_timeout_s <= 30).
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop --grace-period 30"]}}},
    }


def _pod(container: dict[str, Any], *, gpu: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [container], "terminationGracePeriodSeconds": 60}
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


def rayservice(serve_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "attnserve", "labels": dict(LABELS)},
        "spec": {
            "serveConfigV2": dump(serve_config),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                # Serve autoscaling adds replicas; the in-tree autoscaler adds pods when replicas cannot be placed.
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 60},
                "headGroupSpec": {
                    # num-cpus 0: replicas run on workers, so a busy replica never starves the GCS.
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0",
                                       "metrics-export-port": str(METRICS_PORT)},
                    "template": _pod(_container("ray-head", IMAGE_CPU, HEAD, head=True)),
                },
                "workerGroupSpecs": [
                    _worker_group("cpu", IMAGE_CPU, CPU_WORKER, CPU_WORKERS),
                    _worker_group("gpu", IMAGE_GPU, GPU_WORKER, GPU_WORKERS),
                ],
            },
        },
    }


def render(path: Path = SERVE_CONFIG) -> str:
    header = ("# GENERATED by deploy/gen_kuberay.py from deploy/serve_config.yaml: do not edit; edit those and run\n"
              "#   python deploy/gen_kuberay.py\n")
    return header + dump(rayservice(serve_config_for_cluster(path)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare with the committed file instead of writing")
    p.add_argument("--config", type=Path, default=SERVE_CONFIG)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    text = render(a.config)
    if not a.check:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
        print(f"wrote {a.out}")
        return 0
    old = a.out.read_text() if a.out.exists() else ""
    if old == text:
        return 0
    sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True), str(a.out), "generated"))
    print(f"\n{a.out} is stale: run `python deploy/gen_kuberay.py`", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
