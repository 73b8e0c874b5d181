"""The artifact manifest: its schema (written by ``export/``), loading, checksum verification, lookup.

An artifact folder ``<root>/<name>/<version>/`` holds ONNX graphs, a tokenizer or labels, and
``manifest.json``, which lists every file with its sha256. Loading verifies every checksum, so a partly
copied or edited artifact fails at start-up with a message naming the file, not later with wrong outputs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from service.runtime.errors import ArtifactError

MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")


class TensorInfo(BaseModel):
    name: str
    dtype: str  # numpy name: float32, float16, int64, bool
    shape: list[int | str]  # a str is a named dynamic axis (batch, src_len, tgt_len, past_len)


class GraphInfo(BaseModel):
    file: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]


class FileInfo(BaseModel):
    sha256: str
    bytes: int


class Manifest(BaseModel):
    format: int = 1
    name: str
    version: str
    task: Literal["translation", "image-classification"]
    created: str  # ISO-8601 UTC
    opset: int
    exporter: dict[str, Any]
    source: dict[str, Any]  # checkpoint path, its sha256s, the training metrics it carried
    model: dict[str, Any]  # the architecture numbers the runtime needs (layers, heads, head_dim, ...)
    files: dict[str, FileInfo]  # relative path -> checksum
    graphs: dict[str, dict[str, GraphInfo]]  # precision -> graph name -> graph
    parity: dict[str, Any]
    quality: dict[str, Any]  # precision -> measured metric on the test split and its change vs fp32
    labels: list[str] | None = None
    preprocessing: dict[str, Any] | None = None
    tokenizer: str | None = None  # file name of the tokenizers JSON
    special_tokens: dict[str, int] | None = None

    def graph(self, precision: str, name: str) -> GraphInfo:
        if precision not in self.graphs:
            raise ArtifactError(
                f"{self.name}/{self.version} has no {precision!r} graphs; available: {sorted(self.graphs)}"
                f" (build them with `attnserve export --precision {precision}`)"
            )
        if name not in self.graphs[precision]:
            raise ArtifactError(f"{self.name}/{self.version} has no {precision} graph {name!r}")
        return self.graphs[precision][name]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(artifact_dir: Path, *, verify: bool = True) -> Manifest:
    """Parse ``manifest.json`` and (by default) check every listed file's size and sha256."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"no {MANIFEST} in {artifact_dir}: run `attnserve export` to build the artifacts")
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as e:
        raise ArtifactError(f"{path} is not a valid manifest: {e}") from e
    if verify:
        verify_files(artifact_dir, manifest)
    return manifest


def verify_files(artifact_dir: Path, manifest: Manifest) -> None:
    """Raise one ArtifactError naming every missing or altered file."""
    problems = []
    for rel, info in manifest.files.items():
        f = artifact_dir / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
        elif f.stat().st_size != info.bytes:
            problems.append(f"{rel}: {f.stat().st_size} bytes, manifest says {info.bytes}")
        elif (digest := sha256_file(f)) != info.sha256:
            problems.append(f"{rel}: sha256 {digest[:12]}…, manifest says {info.sha256[:12]}…")
    if problems:
        raise ArtifactError(
            f"artifact {artifact_dir} does not match its manifest ({'; '.join(problems)}); "
            "re-export with `attnserve export --force`"
        )


def find_artifact(root: Path, name: str, version: str | None = None) -> Path:
    """``<root>/<name>/<version>``; with no version, the most recently created one that has a manifest."""
    base = Path(root) / name
    if version is not None:
        d = base / version
        if not (d / MANIFEST).is_file():
            raise ArtifactError(f"no artifact {name}/{version} under {root} (run `attnserve export`)")
        return d
    candidates = [d for d in base.glob("*") if (d / MANIFEST).is_file()] if base.is_dir() else []
    if not candidates:
        raise ArtifactError(f"no artifact for {name!r} under {root}: run `attnserve export`")
    return max(candidates, key=lambda d: (json.loads((d / MANIFEST).read_text()).get("created", ""), d.name))
