"""What both runtimes share: a verified manifest, the device, and one ORT session per graph, made once."""

from __future__ import annotations

from pathlib import Path

from service.runtime.manifest import load_manifest, locate
from service.runtime.sessions import CudaOptions, make_session, require_device, resolve_device


class ArtifactRuntime:
    GRAPHS: tuple[str, ...] = ()  # the graphs a subclass runs, by manifest name

    def __init__(
        self, artifact_dir: Path, *, precision: str = "fp32", device: str = "auto", intra_op_threads: int = 1,
        cuda: CudaOptions | None = None,
    ) -> None:
        # An artifact folder, or (the exporter, while its checks run) a folder's manifest.partial.json.
        self.artifact_dir = locate(Path(artifact_dir))[0]
        self.manifest = load_manifest(artifact_dir)  # verifies every file's sha256
        self.name, self.version, self.precision = self.manifest.name, self.manifest.version, precision
        self.cuda_options = cuda  # also for sessions made later (service/runtime/reference.py)
        wanted = resolve_device(device)
        self.sessions = {
            g: make_session(
                self.artifact_dir / self.manifest.graph(precision, g).file,
                device=wanted,
                intra_op_threads=intra_op_threads,
                cuda=cuda,
            )
            for g in self.GRAPHS
        }
        # What the sessions actually run on, not what was asked for or installed: /v1/models, v2 metadata, the
        # metrics' model_info and the demo show this. Asking for cuda and not getting it fails here, at start.
        self.device = require_device(wanted, self.sessions)

    @property
    def providers(self) -> dict[str, list[str]]:
        """Each graph's execution providers, in ORT's order of preference (`session.get_providers()`)."""
        return {g: s.get_providers() for g, s in self.sessions.items()}
