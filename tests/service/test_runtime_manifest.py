"""Manifest loading: checksums are verified, lookups find the right version, errors say what to do."""

from __future__ import annotations

import json
import shutil

import pytest

from service.runtime import ArtifactError, ClassifierRuntime, find_artifact, load_manifest


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
        d = shutil.copytree(tiny_artifacts["vit"], root / "vit-tiny" / version)
        m = json.loads((d / "manifest.json").read_text())
        (d / "manifest.json").write_text(json.dumps({**m, "created": created}))
    assert find_artifact(root, "vit-tiny").name == "new"
    assert find_artifact(root, "vit-tiny", "old").name == "old"
    with pytest.raises(ArtifactError):
        find_artifact(root, "vit-tiny", "nope")
    with pytest.raises(ArtifactError):
        find_artifact(root, "nothing")


def test_unknown_precision_is_explained(tiny_artifacts):
    with pytest.raises(ArtifactError, match="fp16"):
        ClassifierRuntime(tiny_artifacts["vit"], precision="fp16", device="cpu")
