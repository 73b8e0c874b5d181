"""ViT classification over ONNX Runtime: normalisation, batched probabilities, optional attentions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.runtime import attention, reference
from service.runtime.base import ArtifactRuntime
from service.runtime.errors import InputError
from service.runtime.sessions import CudaOptions


@dataclass
class ClassifierOutput:
    probs: np.ndarray  # (N, C) float32
    attentions: np.ndarray | None  # (L, N, nh, T, T) float32 when asked


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class ClassifierRuntime(ArtifactRuntime):
    """``predict``: uint8 images in, probabilities (and a 7x7 map: the rollout or the CLS attention of chosen
    layers and heads) out, all computed in the graph: what the service runs. ``classify``: normalised pixels in,
    every layer's attention maps out (tools, raw maps)."""

    GRAPHS = ("classify", "classify_rollout", "classify_cls")  # what serving runs, loaded at start
    REFERENCE_GRAPHS = ("vit", "vit_attn")  # `classify`'s (tools, eval, bench): loaded on first use

    def __init__(
        self, artifact_dir: Path, *, precision: str = "fp32", device: str = "auto", intra_op_threads: int = 1,
        cuda: CudaOptions | None = None,
    ) -> None:
        super().__init__(artifact_dir, precision=precision, device=device, intra_op_threads=intra_op_threads,
                         cuda=cuda)
        self.sessions = reference.LazySessions(self, self.REFERENCE_GRAPHS, intra_op_threads)
        self.labels: list[str] = list(self.manifest.labels or [])
        pre = self.manifest.preprocessing or {}
        self.scale = float(pre.get("scale", 1 / 255))
        self.mean, self.std = float(pre.get("mean", 0.0)), float(pre.get("std", 1.0))
        self.image_size = int(self.manifest.model["image_size"])
        self.grid = int(self.manifest.model["grid"])
        self.classes = int(self.manifest.model["classes"])
        self.layers, self.heads = int(self.manifest.model["layers"]), int(self.manifest.model["heads"])

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W) -> float32 (N, 1, H, W): x * scale (1/255), then (x - mean)/std as in training."""
        images = np.asarray(images)
        if images.ndim != 3 or images.shape[1:] != (self.image_size, self.image_size):
            raise InputError(f"images must be (N, {self.image_size}, {self.image_size}) uint8, got {images.shape}")
        x = images.astype(np.float32)[:, None] / np.float32(1.0 / self.scale)  # divide, as training does
        return ((x - self.mean) / self.std).astype(np.float32)

    def classify(self, pixels: np.ndarray, *, return_attention: bool = False) -> ClassifierOutput:
        """pixels: normalised float32 (N, 1, H, W) -> class probabilities (and attentions)."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1:] != (1, self.image_size, self.image_size):
            raise InputError(f"pixels must be (N, 1, {self.image_size}, {self.image_size}), got {pixels.shape}")
        if return_attention:
            logits, attn = self.sessions["vit_attn"].run(["logits", "attentions"], {"pixels": pixels})
            return ClassifierOutput(softmax(logits), attn)
        (logits,) = self.sessions["vit"].run(["logits"], {"pixels": pixels})
        return ClassifierOutput(softmax(logits), None)

    def rollout(self, attentions: np.ndarray) -> np.ndarray:
        return attention.rollout(attentions, self.grid)

    def cls_attention(self, attentions: np.ndarray) -> np.ndarray:
        return attention.cls_attention(attentions, self.grid)

    def cls_choice(self, layers: list[int] | None = None, heads: list[int] | None = None) -> attention.Choice:
        """The CLS map's layers and heads (None: all layers, all heads), as weights for ``predict``.

        All layers by default: their mean beats random patch order at finding the evidence, the last layer
        alone does not (`attnserve bench explain`, docs/BENCHMARKS.md)."""
        return attention.choose(list(range(self.layers)) if layers is None else layers, heads, self.layers,
                                self.heads)

    def predict(self, images: np.ndarray, *, rollout: bool = False,
                cls_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 (N, H, W) -> probabilities (N, C) and, when asked, a map (N, grid, grid) summing to 1: the
        rollout, or with ``cls_weights`` ((L, nh) for every image or (N, L, nh) per image; ``cls_choice``)
        the CLS token's attention over the patches averaged with those weights over layers x heads.

        Bound with ONNX Runtime IO binding: the graph reads the images in place and writes into arrays made
        here, so only bytes go in and probabilities (and 49 weights per image) come out.
        """
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.ndim != 3 or images.shape[1:] != (self.image_size, self.image_size):
            raise InputError(f"images must be (N, {self.image_size}, {self.image_size}) uint8, got {images.shape}")
        if rollout and cls_weights is not None:
            raise InputError("one map per call: rollout or cls_weights, not both")
        n = len(images)
        inputs = {"images": images}
        outputs = {"probs": np.empty((n, len(self.labels) or self.classes), np.float32)}
        graph = "classify"
        if rollout:
            graph, outputs["rollout"] = "classify_rollout", np.empty((n, self.grid, self.grid), np.float32)
        elif cls_weights is not None:
            w = np.asarray(cls_weights, np.float32)
            if w.shape not in ((self.layers, self.heads), (n, self.layers, self.heads)):
                raise InputError(f"cls_weights must be ({self.layers}, {self.heads}) or (N, {self.layers}, "
                                 f"{self.heads}), got {w.shape}")
            inputs["cls_weights"] = np.ascontiguousarray(np.broadcast_to(w, (n, self.layers, self.heads)))
            graph, outputs["cls_attention"] = "classify_cls", np.empty((n, self.grid, self.grid), np.float32)
        session = self.sessions[graph]
        io = session.io_binding()
        for name, a in inputs.items():
            io.bind_input(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        for name, a in outputs.items():
            io.bind_output(name, "cpu", 0, np.float32, list(a.shape), a.ctypes.data)
        session.run_with_iobinding(io)
        return outputs["probs"], outputs.get("rollout", outputs.get("cls_attention"))

