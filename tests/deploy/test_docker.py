"""deploy/docker: no Docker engine runs here, so check the Dockerfile against the repository it builds from."""

from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

from test_kuberay import ray_pin

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
TEXT = (DOCKER / "Dockerfile").read_text()


def args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", TEXT, re.M))


def stages() -> dict[str, str]:
    """{stage name: its text} for every `FROM ... AS name` stage."""
    parts = re.split(r"^(?=FROM )", TEXT, flags=re.M)[1:]
    return {re.match(r"FROM \S+ AS (\S+)", p).group(1): p for p in parts}


def test_ray_image_matches_the_pinned_ray_version() -> None:
    assert args()["RAY_VERSION"] == ray_pin()
    assert stages()["serve-cpu"].startswith("FROM rayproject/ray:${RAY_VERSION}-py311-cpu AS serve-cpu")


def test_serving_images_hold_artifacts_not_models_or_the_exporter_and_have_a_healthcheck() -> None:
    s = stages()
    assert set(s) == {"export", "serve-gpu", "serve-cpu"}
    assert list(s)[-1] == "serve-cpu", "the default target (the last stage) is the CPU image"
    for name in ("serve-cpu", "serve-gpu"):
        copies = re.findall(r"^COPY (.+)$", s[name], re.M)
        sources = {w for line in copies if "--from=" not in line
                   for w in [x for x in line.split() if not x.startswith("--")][:-1]}
        assert not {"models", "export", "bench", "tests"} & sources, (name, sources)
        assert any("--from=export" in line and "/artifacts artifacts" in line for line in copies), name
        health = re.search(r"^HEALTHCHECK (.+\n)+?\s+CMD (.+)$", s[name], re.M)
        assert health and "/readyz" in health.group(0), name
        assert "USER 1000:100" in s[name], name


def test_gpu_image_is_the_pinned_wheels_cuda_major_and_checks_the_cuda_provider() -> None:
    from service.runtime.sessions import CUDA_MAJOR, ORT_GPU_PIN

    gpu = stages()["serve-gpu"]
    image = args()["CUDA_IMAGE"]
    pattern = rf"nvidia/cuda:{CUDA_MAJOR}\.\d+\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d+\.\d+"
    assert re.fullmatch(pattern, image), image
    assert gpu.startswith("FROM ${CUDA_IMAGE} AS serve-gpu")
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert ORT_GPU_PIN in pins
    installs = re.findall(r"pip install (.+)", gpu)
    assert installs == ['-c constraints.txt ".[gpu]"'], installs
    # The build checks the CUDA provider: no CPU onnxruntime beside it, listed, its libraries load.
    check = re.search(r'^RUN python -c "(.+?)"$', gpu, re.M | re.S).group(1)
    for step in ("check_install()", "CUDA in ort.get_available_providers()", "ort.preload_dlls()",
                 "libonnxruntime_providers_cuda.so"):
        assert step in check, step
    cmd = re.search(r"^CMD (.+)$", gpu, re.M).group(1)
    assert '"--device", "cuda"' in cmd and '"--no-export"' in cmd


def test_copied_paths_exist_and_are_not_ignored() -> None:
    ignored = [line for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
               if line and not line.startswith("#")]
    sources = []
    for line in re.findall(r"^COPY (.+)$", TEXT, re.M):
        words = [w for w in line.split() if not w.startswith("--")]
        if "--from=" not in line:
            sources += words[:-1]
    assert sources, "no COPY found"
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
        assert not any(fnmatch(src, pat) for pat in ignored), f"COPY {src} is excluded by the .dockerignore"


def test_extras_and_artifact_path_agree_with_the_package_and_the_manifest() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "serve" in extras and "gpu" in extras and "export" in extras
    assert "onnxruntime-gpu" in " ".join(extras["gpu"]) and "torch" not in " ".join(extras["serve"] + extras["gpu"])
    gen = (REPO / "deploy" / "gen_kuberay.py").read_text()
    artifacts = re.search(r'^ARTIFACTS_IN_IMAGE = "(.+?)"', gen, re.M).group(1)
    for name in ("serve-cpu", "serve-gpu"):
        assert f"ENV ATTNSERVE_ARTIFACTS={artifacts}" in stages()[name], name
        assert f"--target {name}" in TEXT, f"the documented build of {name}"
