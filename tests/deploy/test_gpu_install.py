"""GPU deployment without a GPU: the install rules, the device decided at start, the Serve config for CUDA.

What needs a GPU lives in tests/gpu (marker `gpu`); these run everywhere. The CLI tests start the real
`attnserve serve` and check that it exits before Ray starts.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import onnxruntime as ort
import pytest
import yaml

from service.config import AppArgs
from service.launch import devices
from service.launch.local import shared_args
from service.runtime import ClassifierRuntime, DeviceError, find_artifact
from service.runtime.sessions import CUDA, CUDA_MAJOR, ORT_GPU_PIN, CudaOptions, installed_onnxruntimes

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "serve_config.yaml"
HAS_CUDA = CUDA in ort.get_available_providers()


def serve(*args: str, pythonpath: list[Path] = ()) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [*pythonpath, REPO]))}
    # --admission-front none: nothing to find or start; the checks come before Ray in any case.
    cmd = [sys.executable, "-m", "service.cli", "serve", "--admission-front", "none", "--no-export", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(HAS_CUDA, reason="ONNX Runtime here has the CUDA provider: tests/gpu covers serving on it")
def test_serve_device_cuda_without_cuda_exits_at_once_saying_what_to_install() -> None:
    r = serve("--device", "cuda")
    assert r.returncode != 0
    assert "device 'cuda'" in r.stderr and "make serve DEVICE=cuda" in r.stderr, r.stderr
    assert "onnxruntime-gpu[cuda,cudnn]==" in r.stderr and "CUDA 13" in r.stderr, r.stderr
    assert "ready" not in r.stdout and "Traceback" not in r.stderr, (r.stdout, r.stderr)


def fake_dist(root: Path, name: str, version: str) -> None:
    """A dist-info folder as pip leaves it: importlib.metadata finds the distribution, no code is installed."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_serve_refuses_an_environment_with_both_onnxruntime_builds(tmp_path: Path) -> None:
    present = {line.split()[0] for line in installed_onnxruntimes()}
    assert present, "no onnxruntime distribution found in this environment"
    missing = ({"onnxruntime", "onnxruntime-gpu"} - present) or {"onnxruntime-gpu"}
    for name in missing:
        fake_dist(tmp_path, name, "1.31.1")
    r = serve("--device", "cpu", pythonpath=[tmp_path])
    assert r.returncode != 0
    assert re.search(r"both onnxruntime [\d.]+ and onnxruntime-gpu [\d.]+ are installed", r.stderr), r.stderr
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in r.stderr and "make serve DEVICE=cuda" in r.stderr
    # The same environment without the fake is accepted by the check (a sanity check of the fixture itself).
    ok = subprocess.run([sys.executable, "-c", "from service.runtime.sessions import check_install; check_install()"],
                        cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0 or len(present) > 1, ok.stderr


@pytest.mark.skipif(HAS_CUDA, reason="ONNX Runtime here has the CUDA provider")
def test_a_replica_asked_for_cuda_without_it_fails_at_construction() -> None:
    root = REPO / "artifacts"
    try:
        path = find_artifact(root, "vit-fashion")
    except Exception as e:  # noqa: BLE001 - any missing artifact: nothing to construct
        pytest.skip(f"no exported vit-fashion under {root}: {e}")
    with pytest.raises(DeviceError, match=r"device 'cuda' asked for.*make serve DEVICE=cuda"):
        ClassifierRuntime(path, device="cuda")
    rt = ClassifierRuntime(path, device="auto")
    assert rt.device == "cpu" and all(p[0] == "CPUExecutionProvider" for p in rt.providers.values())


def test_gpu_extra_pins_onnxruntime_gpu_alone() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    gpu = extras["gpu"]
    assert ORT_GPU_PIN in gpu
    names = {re.split(r"[\[<>=~;! ]", d, maxsplit=1)[0] for d in gpu}
    assert "onnxruntime" not in names and not any(n.startswith("attnserve") for n in names), names
    assert not any("torch" in d for d in gpu)
    # The other serving extra is the CPU build; the GPU Dockerfile and Makefile install `.[gpu]` alone.
    assert any(d.startswith("onnxruntime>=") or d.startswith("onnxruntime==") for d in extras["serve"])
    makefile = (REPO / "Makefile").read_text()
    assert "$(GPU_BIN)/python -m pip install -q -c constraints.txt -e '.[gpu]'" in makefile


def test_cuda_provider_options_are_explicit() -> None:
    opts = CudaOptions(gpu_mem_limit_mib=2048).provider_options()
    assert opts == {"device_id": "0", "gpu_mem_limit": str(2048 * 2**20), "arena_extend_strategy": "kSameAsRequested",
                    "cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0"}
    args = AppArgs.model_validate({"translator": {"name": "t", "cuda": {"gpu_mem_limit_mib": 8192}}})
    assert args.translator.cuda.gpu_mem_limit_mib == 8192
    with pytest.raises(ValueError, match="cudnn_conv_algo_search"):
        AppArgs.model_validate({"translator": {"name": "t", "cuda": {"cudnn_conv_algo_search": "FAST"}}})


def shipped_config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_the_launcher_gives_cuda_replicas_their_gpu_share_and_an_explicit_device(device: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    from service.app import BuildArgs

    config = shipped_config()
    args = shared_args(config)
    devices.apply(config, {"translator": device, "classifier": device}, args)
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        BuildArgs.model_validate(app["args"])
        assert app["args"]["translator"]["device"] == app["args"]["classifier"]["device"] == device
        comp = app["args"]["component"]
        for dep in app["deployments"]:
            gpus = dep["ray_actor_options"].get("num_gpus", 0)
            if comp in devices.MODELS:
                assert gpus == (getattr(args, comp).gpu_share if device == "cuda" else 0), (comp, gpus)
            else:
                assert gpus == 0, comp
    if device == "cuda":  # the two models share one card
        shares = [getattr(args, m).gpu_share for m in devices.MODELS]
        assert sum(shares) <= 1.0


def test_decide_keeps_auto_for_the_probe_and_checks_cuda_at_once() -> None:
    args = shared_args(shipped_config())
    assert devices.decide(args, None) == {"translator": "auto", "classifier": "auto"}
    assert devices.decide(args, "cpu") == {"translator": "cpu", "classifier": "cpu"}
    if not HAS_CUDA:
        with pytest.raises(DeviceError, match="make serve DEVICE=cuda"):
            devices.decide(args, "cuda")
    # auto on a machine without the CUDA provider settles on cpu without starting anything.
    config = copy.deepcopy(shipped_config())
    if not HAS_CUDA:
        assert devices.settle(config, args, {"translator": "auto", "classifier": "auto"}) == {
            "translator": "cpu", "classifier": "cpu"}


@pytest.mark.skipif(HAS_CUDA, reason="ONNX Runtime here has the CUDA provider")
def test_the_cuda_probe_reports_a_cpu_fallback_and_cuda_then_fails_at_start() -> None:
    """The probe's child process asks for the CUDA provider on a real graph; ORT falls back to the CPU (a log line
    only), and the probe says so. Settling `cuda` on that is an error, `auto` becomes cpu."""
    args = shared_args(shipped_config())
    try:
        find_artifact(args.resolved_root(), args.classifier.name)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no exported classifier: {e}")
    assert devices.probe_cuda(args, "classifier") == (
        "the session got ['CPUExecutionProvider'], not CUDAExecutionProvider")
    with pytest.raises(DeviceError, match="device 'cuda' for the translator, but the CUDA provider does not start"):
        devices.settle(shipped_config(), args, {"translator": "cuda", "classifier": "cpu"})
    absent = args.model_copy(update={"classifier": args.classifier.model_copy(update={"version": "no-such-version"})})
    assert devices.probe_cuda(absent, "classifier").startswith("no graph to try it on: ")


@pytest.mark.slow
def test_the_gpu_extra_resolves_to_onnxruntime_gpu_with_cuda_13_libraries_and_no_cpu_onnxruntime(tmp_path) -> None:
    """pip's own resolver, as `make serve DEVICE=cuda` runs it (a dry run: metadata only, nothing installed)."""
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), "-c", "constraints.txt", ".[gpu]"],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    if r.returncode != 0 and re.search(r"(?i)connection|network|timed out|temporary failure", r.stderr):
        pytest.skip(f"the package index is not reachable: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert "onnxruntime" not in got, "the gpu extra must not bring the CPU onnxruntime"
    assert got["onnxruntime-gpu"] == ORT_GPU_PIN.split("==")[1]
    assert got["nvidia-cuda-runtime"].split(".")[0] == str(CUDA_MAJOR), got
    assert "nvidia-cudnn-cu13" in got and got["nvidia-cudnn-cu13"].startswith("9."), got
    assert not any(n.startswith("torch") for n in got)
