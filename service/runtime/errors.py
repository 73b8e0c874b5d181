"""Errors of the ONNX runtime layer. The service maps them to HTTP codes in one place (service/errors.py)."""

from __future__ import annotations


class RuntimeLayerError(Exception):
    """Base of every error raised by ``service.runtime``."""


class ArtifactError(RuntimeLayerError):
    """An artifact folder is missing, incomplete, or its files do not match the manifest's checksums."""


class DeviceError(RuntimeLayerError):
    """The requested device (e.g. ``cuda``) is not available to ONNX Runtime."""


class InputError(RuntimeLayerError, ValueError):
    """A caller passed values outside what the runtime accepts (wrong shape, beam size out of range, ...).

    ``field``: the request field it is about, when one is (e.g. ``attention_layers``), for the HTTP error."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
