"""Manifest loading: checksums are verified, lookups find the right version, errors say what to do; nothing
half-exported, escaping its folder or unlisted is ever found or loaded."""

from __future__ import annotations

import json
import shutil

import pytest

from service.runtime import ArtifactError, ClassifierRuntime, find_artifact, load_manifest
from service.runtime.manifest import PARTIAL_MANIFEST


def copy_with(src, dest, **changes):
    """A copy of an artifact folder whose manifest.json has `changes` applied (None deletes a key)."""
    d = shutil.copytree(src, dest)
    m = json.loads((d / "manifest.json").read_text())
    for k, v in changes.items():
        if v is None:
            m.pop(k, None)
        else:
            m[k] = v
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def test_checksum_mismatch_raises(tiny_artifacts, tmp_path):
    d = shutil.copytree(tiny_artifacts["vit"], tmp_path / "vit-tiny" / "v1")
    load_manifest(d)
    data = bytearray((d / "vit.onnx").read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    (d / "vit.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"vit\.onnx: sha256"):
        load_manifest(d)
    with pytest.raises(ArtifactError, match="attnserve export --force"):
        ClassifierRuntime(d, device="cpu")
    (d / "vit_attn.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"vit_attn\.onnx: missing"):
        load_manifest(d)


def test_missing_and_invalid_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="attnserve export"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ArtifactError, match="not a valid manifest"):
        load_manifest(tmp_path)


def test_find_artifact_newest_and_named(tiny_artifacts, tmp_path):
    root = tmp_path / "artifacts"
    for version, created in (("old", "2020-01-01T00:00:00+00:00"), ("new", "2030-01-01T00:00:00+00:00")):
        copy_with(tiny_artifacts["vit"], root / "vit-tiny" / version, created=created)
    assert find_artifact(root, "vit-tiny").name == "new"
    assert find_artifact(root, "vit-tiny", "old").name == "old"
    with pytest.raises(ArtifactError):
        find_artifact(root, "vit-tiny", "nope")
    with pytest.raises(ArtifactError):
        find_artifact(root, "nothing")


def test_unknown_precision_is_explained(tiny_artifacts):
    with pytest.raises(ArtifactError, match="fp16"):
        ClassifierRuntime(tiny_artifacts["vit"], precision="fp16", device="cpu")


def test_partial_and_failed_exports_are_never_found(tiny_artifacts, tmp_path):
    root = tmp_path / "artifacts"
    base = root / "vit-tiny"
    copy_with(tiny_artifacts["vit"], base / "good", created="2020-01-01T00:00:00+00:00")
    newer = "2099-01-01T00:00:00+00:00"
    copy_with(tiny_artifacts["vit"], base / ".v2.partial", created=newer)  # an export still running
    failed = copy_with(tiny_artifacts["vit"], base / "v3", created=newer)  # checks ran, parity failed
    m = json.loads((failed / "manifest.json").read_text())
    (failed / "manifest.json").write_text(json.dumps({**m, "parity": {**m["parity"], "passed": False}}))
    unchecked = copy_with(tiny_artifacts["vit"], base / "v4", created=newer)  # only the exporter's file
    (unchecked / "manifest.json").rename(unchecked / PARTIAL_MANIFEST)
    copy_with(tiny_artifacts["vit"], base / "Not-A-Version", created=newer)

    assert find_artifact(root, "vit-tiny").name == "good"
    for version in ("v3", "v4"):
        with pytest.raises(ArtifactError):
            find_artifact(root, "vit-tiny", version)
    with pytest.raises(ArtifactError, match="parity checks did not pass"):
        load_manifest(failed)
    with pytest.raises(ArtifactError, match="parity checks did not pass"):
        ClassifierRuntime(failed, device="cpu")
    # The exporter loads an unfinished folder only by naming its partial manifest.
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_manifest(unchecked)
    assert ClassifierRuntime(unchecked / PARTIAL_MANIFEST, device="cpu").artifact_dir == unchecked


@pytest.mark.parametrize("bad", ["../vit.onnx", "/etc/passwd", "a/../../vit.onnx", "./vit.onnx", "a\\b", ""])
def test_paths_outside_the_folder_are_rejected(tiny_artifacts, tmp_path, bad):
    m = json.loads((tiny_artifacts["vit"] / "manifest.json").read_text())
    files = {**m["files"], bad: m["files"]["vit.onnx"]}
    d = copy_with(tiny_artifacts["vit"], tmp_path / "files", files=files)
    with pytest.raises(ArtifactError, match="not a plain relative path"):
        load_manifest(d)
    graphs = json.loads(json.dumps(m["graphs"]))
    graphs["fp32"]["vit"]["file"] = bad
    d = copy_with(tiny_artifacts["vit"], tmp_path / "graph", files={**m["files"], bad: m["files"]["vit.onnx"]},
                  graphs=graphs)
    with pytest.raises(ArtifactError, match="not a plain relative path"):
        load_manifest(d)


def test_symlink_escaping_the_folder_is_rejected(tiny_artifacts, tmp_path):
    d = copy_with(tiny_artifacts["vit"], tmp_path / "v1")
    outside = shutil.copy(d / "vit.onnx", tmp_path / "elsewhere.onnx")  # same bytes: only the place is wrong
    (d / "vit.onnx").unlink()
    (d / "vit.onnx").symlink_to(outside)
    with pytest.raises(ArtifactError, match=r"vit\.onnx: resolves outside the artifact folder"):
        load_manifest(d)


def test_named_files_must_be_listed(tiny_artifacts, tmp_path):
    m = json.loads((tiny_artifacts["translator"] / "manifest.json").read_text())
    files = {k: v for k, v in m["files"].items() if k != "tokenizer.json"}
    d = copy_with(tiny_artifacts["translator"], tmp_path / "tok", files=files)
    with pytest.raises(ArtifactError, match=r"not listed with a sha256.*tokenizer\.json"):
        load_manifest(d)
    files = {k: v for k, v in m["files"].items() if k != "decoder.int8.onnx"}
    d = copy_with(tiny_artifacts["translator"], tmp_path / "graph", files=files)
    with pytest.raises(ArtifactError, match=r"not listed with a sha256.*decoder\.int8\.onnx"):
        load_manifest(d)


@pytest.mark.parametrize("name", ["../vit-tiny", "Vit", ".hidden", "a/b", "x" * 65, ""])
def test_names_and_versions_are_validated(tiny_artifacts, tmp_path, name):
    shutil.copytree(tiny_artifacts["vit"], tmp_path / "vit-tiny" / "v1")
    with pytest.raises(ArtifactError, match="invalid artifact name"):
        find_artifact(tmp_path, name)
    with pytest.raises(ArtifactError, match="invalid artifact version"):
        find_artifact(tmp_path, "vit-tiny", name)
    d = copy_with(tiny_artifacts["vit"], tmp_path / "bad", name=name)
    with pytest.raises(ArtifactError, match="not a valid manifest"):
        load_manifest(d)


@pytest.mark.parametrize("field", ["name", "version"])
def test_serve_config_rejects_unsafe_names(field):
    from pydantic import ValidationError

    from service.config import ModelArgs

    ModelArgs(name="vit-fashion", version="a853db6bca74")
    with pytest.raises(ValidationError, match=field):
        ModelArgs(**{"name": "vit-fashion", field: "../../etc"})
