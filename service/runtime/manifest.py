"""The artifact manifest: its schema (written by ``export/``), loading, checksum verification, lookup.

This module is the single definition of the manifest; ``export/build.py`` imports it to write one (the only
upward import from ``export/`` into ``service/``).

An artifact folder ``<root>/<name>/<version>/`` holds ONNX graphs, a tokenizer or labels, and
``manifest.json``, which lists every file with its sha256. The exporter writes ``manifest.json`` last, after
every parity and quality check passed, and only then renames the folder from ``.<version>.partial`` into
place, so a folder is either complete or not an artifact at all:

- ``find_artifact`` skips dot-folders and folders without a valid ``manifest.json`` whose parity passed;
- ``load_manifest`` refuses a manifest whose parity did not pass, any file it names that is not listed with
  a sha256, and any path that is absolute, has ``..`` or resolves (through a symlink) outside the folder;
- names and versions match ``NAME_PATTERN`` (they become folder names).

While the checks still run, the exporter loads the partial folder through its ``manifest.partial.json``,
named explicitly (``load_manifest(folder / PARTIAL_MANIFEST)``): nothing finds that file by itself.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from service.runtime.errors import ArtifactError

MANIFEST = "manifest.json"
PARTIAL_MANIFEST = "manifest.partial.json"  # the exporter's, while its checks run; never found by lookup
FORMAT = 2  # 2: manifest written last, every named file listed, quality gates recorded
PRECISIONS = ("fp32", "fp16", "int8")
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"  # model names and versions: they are folder names


def check_name(value: str, what: str = "name") -> str:
    if not isinstance(value, str) or not re.fullmatch(NAME_PATTERN, value):
        raise ArtifactError(f"invalid artifact {what} {value!r}: must match {NAME_PATTERN}")
    return value


def check_relative(path: str) -> str:
    """A file name inside the artifact folder: relative, POSIX, no ``..``, no empty or ``.`` parts."""
    p = PurePosixPath(path)
    if not path or "\\" in path or p.is_absolute() or any(part in ("", ".", "..") for part in path.split("/")):
        raise ValueError(f"file {path!r} is not a plain relative path inside the artifact folder")
    return path


class TensorInfo(BaseModel):
    name: str
    dtype: str  # numpy name: float32, float16, int64, bool
    shape: list[int | str]  # a str is a named dynamic axis (batch, src_len, tgt_len, past_len)


class GraphInfo(BaseModel):
    file: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]

    @field_validator("file")
    @classmethod
    def _inside(cls, v: str) -> str:
        return check_relative(v)


class FileInfo(BaseModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Manifest(BaseModel):
    format: int = 1
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=NAME_PATTERN)
    task: Literal["translation", "image-classification"]
    created: str  # ISO-8601 UTC
    opset: int
    exporter: dict[str, Any]
    source: dict[str, Any]  # checkpoint path, its sha256s, the training metrics it carried
    model: dict[str, Any]  # the architecture numbers the runtime needs (layers, heads, head_dim, ...)
    files: dict[str, FileInfo]  # relative path -> checksum
    graphs: dict[str, dict[str, GraphInfo]]  # precision -> graph name -> graph
    parity: dict[str, Any]  # "passed": true in every installed artifact
    quality: dict[str, Any]  # precision -> measured metric on the test split and its change vs fp32
    gates: dict[str, Any] | None = None  # precision -> allowed quality loss vs fp32, and the verdicts
    labels: list[str] | None = None
    preprocessing: dict[str, Any] | None = None
    tokenizer: str | None = None  # file name of the tokenizers JSON
    special_tokens: dict[str, int] | None = None

    @field_validator("files")
    @classmethod
    def _files_inside(cls, files: dict[str, FileInfo]) -> dict[str, FileInfo]:
        for rel in files:
            check_relative(rel)
        return files

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: int) -> int:
        if v > FORMAT:
            raise ValueError(f"format {v} is newer than this runtime reads ({FORMAT}): upgrade attnserve")
        return v

    @model_validator(mode="after")
    def _named_files_listed(self) -> Manifest:
        named = [g.file for graphs in self.graphs.values() for g in graphs.values()]
        if self.tokenizer is not None:
            named.append(check_relative(self.tokenizer))
        unlisted = sorted({f for f in named if f not in self.files})
        if unlisted:
            raise ValueError(f"files named but not listed with a sha256 under 'files': {unlisted}")
        return self

    @property
    def parity_passed(self) -> bool:
        return self.parity.get("passed") is True

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


def locate(location: Path) -> tuple[Path, Path]:
    """(artifact folder, manifest file) for an artifact folder or an explicitly named manifest file."""
    location = Path(location)
    if location.name in (MANIFEST, PARTIAL_MANIFEST) and not location.is_dir():
        return location.parent, location
    return location, location / MANIFEST


def load_manifest(location: Path, *, verify: bool = True) -> Manifest:
    """Parse an artifact's manifest and (by default) check every listed file's size and sha256.

    ``location`` is an artifact folder (its ``manifest.json``, which must record passed parity checks) or,
    for the exporter while its checks run, the path of a folder's ``manifest.partial.json``.
    """
    artifact_dir, path = locate(location)
    if not path.is_file():
        raise ArtifactError(f"no {path.name} in {artifact_dir}: run `attnserve export` to build the artifacts")
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as e:
        raise ArtifactError(f"{path} is not a valid manifest: {e}") from e
    if path.name == MANIFEST and not manifest.parity_passed:
        raise ArtifactError(
            f"{path}: the export's parity checks did not pass (parity.passed is not true); "
            "re-export with `attnserve export --force`"
        )
    if verify:
        verify_files(artifact_dir, manifest)
    return manifest


def verify_files(artifact_dir: Path, manifest: Manifest) -> None:
    """Raise one ArtifactError naming every missing, escaping or altered file."""
    problems = []
    inside = Path(artifact_dir).resolve()
    for rel, info in manifest.files.items():
        f = artifact_dir / rel
        if not f.resolve().is_relative_to(inside):
            problems.append(f"{rel}: resolves outside the artifact folder")
        elif not f.is_file():
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
    """``<root>/<name>/<version>``; with no version, the most recently created complete one.

    Complete: named by ``NAME_PATTERN`` (so never a dot-folder: an export in progress or one that failed),
    with a valid ``manifest.json`` whose parity passed. The runtime verifies the checksums when it loads it.
    """
    check_name(name, "name")
    base = Path(root) / name
    if version is not None:
        check_name(version, "version")
        d = base / version
        if not (d / MANIFEST).is_file():
            raise ArtifactError(f"no artifact {name}/{version} under {root} (run `attnserve export`)")
        load_manifest(d, verify=False)  # complete and passed; the runtime verifies the checksums
        return d
    candidates = []
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        if not re.fullmatch(NAME_PATTERN, d.name) or not d.is_dir() or not (d / MANIFEST).is_file():
            continue
        try:
            candidates.append((load_manifest(d, verify=False).created, d.name, d))
        except ArtifactError:
            continue  # incomplete or foreign: never picked by "newest"
    if not candidates:
        raise ArtifactError(f"no artifact for {name!r} under {root}: run `attnserve export`")
    return max(candidates)[2]
