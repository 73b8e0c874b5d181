"""Torch-free inference over exported ONNX artifacts, shared by the service and `attnserve eval`."""

from service.runtime.classifier import ClassifierOutput, ClassifierRuntime
from service.runtime.errors import ArtifactError, DeviceError, InputError, RuntimeLayerError
from service.runtime.manifest import Manifest, find_artifact, load_manifest
from service.runtime.translator import TranslationResult, TranslatorRuntime

__all__ = [
    "ArtifactError",
    "ClassifierOutput",
    "ClassifierRuntime",
    "DeviceError",
    "InputError",
    "Manifest",
    "RuntimeLayerError",
    "TranslationResult",
    "TranslatorRuntime",
    "find_artifact",
    "load_manifest",
]
