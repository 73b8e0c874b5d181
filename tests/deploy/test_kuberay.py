"""deploy/kuberay: the RayService manifest is generated from deploy/serve_config.yaml and has what a cluster needs."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def ray_pin() -> str:
    serve = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    return next(re.fullmatch(r"ray\[serve\]==(\S+)", d).group(1) for d in serve if d.startswith("ray[serve]"))


def manifest() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())


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
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    cs = containers(doc)
    assert "nvidia.com/gpu" in cs["gpu"]["resources"]["limits"]
    assert "nvidia.com/gpu" not in cs["cpu"]["resources"]["limits"]


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
