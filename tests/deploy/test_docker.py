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


def test_ray_image_matches_the_pinned_ray_version() -> None:
    assert args()["RAY_VERSION"] == ray_pin()
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT}" in TEXT


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
    a = args()
    assert a["EXTRA"] in extras and "gpu" in extras and "export" in extras
    assert "onnxruntime-gpu" in " ".join(extras["gpu"]) and "torch" not in " ".join(extras["serve"] + extras["gpu"])
    gen = (REPO / "deploy" / "gen_kuberay.py").read_text()
    artifacts = re.search(r'^ARTIFACTS_IN_IMAGE = "(.+?)"', gen, re.M).group(1)
    assert f"ENV ATTNSERVE_ARTIFACTS={artifacts}" in TEXT
    assert "--build-arg VARIANT=gpu --build-arg EXTRA=gpu" in TEXT  # the documented GPU build
