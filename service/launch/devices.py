"""Decide each model's device once, at start, before Ray starts; give its replicas their share of the GPU.

Ray hides the GPU from an actor that asks for none (CUDA_VISIBLE_DEVICES=""), so a replica must ask for its
share (ray_actor_options.num_gpus, from the model's `gpu_share`) exactly when it will run on CUDA, and
`device: auto` must be settled here, where the GPU is visible, not inside a replica that cannot see it. The
replicas then get an explicit `cpu` or `cuda`, and a replica asked for `cuda` that cannot start its CUDA
provider fails its start (service/runtime/base.py), never serving on CPU quietly.

deploy/gen_kuberay.py applies the same rule to make the GPU RayService (`cuda_variant` there; a test checks that
the two agree).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from service.config import REPO_ROOT, AppArgs
from service.runtime import ArtifactError, DeviceError, find_artifact, load_manifest
from service.runtime.sessions import CUDA, available, check_install, resolve_device

MODELS = ("translator", "classifier")  # AppArgs fields, Serve application names, `component` values


def decide(args: AppArgs, override: str | None) -> dict[str, str]:
    """{model: "auto" | "cpu" | "cuda"} after the install check and the provider check (no GPU touched yet)."""
    check_install()
    wanted = {m: override or getattr(args, m).device for m in MODELS}
    for m, device in wanted.items():
        if device != "auto":
            wanted[m] = resolve_device(device)  # "cuda" without the CUDA provider: DeviceError, saying what to do
    return wanted


_PROBE = """
import json, sys
from service.runtime.sessions import CudaOptions, device_of, make_session
path, opts = sys.argv[1], CudaOptions.model_validate_json(sys.argv[2])
s = make_session(path, device="cuda", cuda=opts)
print(json.dumps({"device": device_of([s]), "providers": s.get_providers()}))
"""


def probe_cuda(args: AppArgs, model: str) -> str | None:
    """Start the CUDA provider on one of the model's graphs, in a child process (the launcher keeps no CUDA
    context); None when it runs, else why not."""
    cfg = getattr(args, model)
    try:
        folder = find_artifact(args.resolved_root(), cfg.name, cfg.version)
        manifest = load_manifest(folder)
        graph = folder / manifest.graph(cfg.precision, next(iter(manifest.graphs.get(cfg.precision, {})), "")).file
    except ArtifactError as e:
        return f"no graph to try it on: {e}"
    r = subprocess.run([sys.executable, "-c", _PROBE, str(graph), cfg.cuda.model_dump_json()],
                       capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    if r.returncode != 0:
        return (r.stderr.strip().splitlines() or ["probe failed"])[-1]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    return None if got["device"] == "cuda" else f"the session got {got['providers']}, not {CUDA}"


def settle(config: dict[str, Any], args: AppArgs, wanted: dict[str, str]) -> dict[str, str]:
    """Resolve "auto" and check "cuda" for real (artifacts must exist), then write each model's device into every
    application's args and its replicas' num_gpus into the config. Returns {model: "cpu" | "cuda"}."""
    devices = {}
    for m, device in wanted.items():
        if device == "cpu":
            devices[m] = "cpu"
            continue
        why = probe_cuda(args, m) if CUDA in available() else "ONNX Runtime has no CUDA provider"
        if why is None:
            devices[m] = "cuda"
        elif device == "cuda":
            raise DeviceError(f"device 'cuda' for the {m}, but the CUDA provider does not start: {why}")
        else:
            print(f"attnserve serve: device auto -> cpu for the {m} ({why})", file=sys.stderr, flush=True)
            devices[m] = "cpu"
    apply(config, devices, args)
    return devices


def apply(config: dict[str, Any], devices: dict[str, str], args: AppArgs) -> None:
    """Every application's args name each model's device; a model on cuda asks Ray for its GPU share."""
    for app in config["applications"]:
        app_args = app.setdefault("args", {})
        for m, device in devices.items():
            given = app_args.get(m) or getattr(args, m).model_dump(mode="json")
            app_args[m] = {**given, "device": device}  # a copy: YAML merge keys share one dict between apps
        component = app_args.get("component")
        if component in devices:
            for dep in app.get("deployments", []):
                opts = dep.setdefault("ray_actor_options", {})
                opts["num_gpus"] = getattr(args, component).gpu_share if devices[component] == "cuda" else 0


def describe(devices: dict[str, str]) -> str:
    return ", ".join(f"{m} on {d}" for m, d in devices.items())

