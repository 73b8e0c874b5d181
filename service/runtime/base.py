"""What both runtimes share: a verified manifest, the device, and one ORT session per graph, made once."""

from __future__ import annotations

from pathlib import Path

from service.runtime.manifest import load_manifest, locate
from service.runtime.sessions import CUDA, make_session, resolve_device


class ArtifactRuntime:
    GRAPHS: tuple[str, ...] = ()  # the graphs a subclass runs, by manifest name

    def __init__(
        self, artifact_dir: Path, *, precision: str = "fp32", device: str = "auto", intra_op_threads: int = 1
    ) -> None:
        # An artifact folder, or (the exporter, while its checks run) a folder's manifest.partial.json.
        self.artifact_dir = locate(Path(artifact_dir))[0]
        self.manifest = load_manifest(artifact_dir)  # verifies every file's sha256
        self.name, self.version, self.precision = self.manifest.name, self.manifest.version, precision
        wanted = resolve_device(device)
        self.sessions = {
            g: make_session(
                self.artifact_dir / self.manifest.graph(precision, g).file,
                device=wanted,
                intra_op_threads=intra_op_threads,
            )
            for g in self.GRAPHS
        }
        # What the sessions actually run on (ORT falls back to CPU when a CUDA provider cannot load), not
        # what was asked for or installed: "cuda" only if every graph got the CUDA provider.
        on_cuda = all(s.get_providers()[0] == CUDA for s in self.sessions.values())
        self.device = "cuda" if on_cuda and self.sessions else "cpu"
