"""`attnserve bench step`: the translator's `decoder_step` graph alone, per precision, side by side.

The engine's step with everything around it removed: random inputs of the serving shape (``--rows`` live
rows, cache capacity ``--cache``, source capacity ``--source``, every row at a different position), IO-bound
host arrays, ``--threads`` intra-op threads. Each input gets the dtype the graph declares (fp16 caches for
an fp16 graph). Variants run in interleaved rounds so a busy neighbour slows them alike; the table gives the
median per round of CPU time and wall time per step, tokens per CPU-second (rows / CPU time) and the ratio
of CPU time to the first variant (the baseline: fp32 unless ``--only`` says otherwise).

    attnserve bench step                                   # every precision in the newest translator artifact
    attnserve bench step --extra /tmp/step.fused.onnx      # plus any other decoder_step file (experiments)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.runtime import find_artifact
from service.runtime.manifest import load_manifest

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(bool)": np.bool_}


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()  # as service.runtime.sessions.make_session sets them
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def feeds(sess: ort.InferenceSession, rows: int, cache: int, source: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the serving shape; rows at spread positions, sources of spread lengths."""
    rng = np.random.default_rng(seed)
    positions = np.linspace(1, cache - 1, rows).astype(np.int64)
    lengths = np.linspace(2, source, rows).astype(int)
    out: dict[str, np.ndarray] = {}
    for i in sess.get_inputs():
        dtype = ORT_TYPES[i.type]
        if i.name == "tokens":
            out[i.name] = rng.integers(4, 8000, rows).astype(np.int64)
        elif i.name == "positions":
            out[i.name] = positions
        elif i.name == "src_mask":
            out[i.name] = np.arange(source)[None, :] < lengths[:, None]
        elif i.name == "align_weights":
            w = np.zeros((rows, *i.shape[1:]), np.float32)
            w[::2, -1] = 1.0 / w.shape[-1]  # half the rows ask for the alignment, as in decode parity
            out[i.name] = w.astype(dtype)
        else:  # cache_*: (rows, nh, cache, hs), cross_*: (rows, nh, source, hs)
            length = cache if i.name.startswith("cache") else source
            out[i.name] = (rng.standard_normal((rows, i.shape[1], length, i.shape[3])) * 0.5).astype(dtype)
    return out


def time_steps(sess: ort.InferenceSession, inputs: dict[str, np.ndarray], steps: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per step over ``steps`` runs through IO binding, outputs preallocated by ORT."""
    io = sess.io_binding()
    for name, a in inputs.items():
        io.bind_cpu_input(name, a)
    for o in sess.get_outputs():
        io.bind_output(o.name, "cpu")
    sess.run_with_iobinding(io)  # warm-up: allocations, kernel choice
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        sess.run_with_iobinding(io)
    return (time.process_time() - c0) / steps, (time.perf_counter() - w0) / steps


def variants(artifact: Path | None, only: list[str] | None, extra: list[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    if artifact is None:
        artifact = find_artifact(Path("artifacts"), "translator-en-es")
    m = load_manifest(artifact, verify=False)
    for p in sorted(m.graphs, key=lambda p: (p != "fp32", p)):
        if "decoder_step" in m.graphs[p] and (not only or p in only):
            found[p] = Path(artifact) / m.graphs[p]["decoder_step"].file
    for f in extra:
        found[f.name.removesuffix(".onnx")] = f
    return found


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="attnserve bench step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, help="translator artifact folder (default: newest under artifacts/)")
    ap.add_argument("--only", nargs="*", help="precisions of the artifact to time (default: all)")
    ap.add_argument("--extra", nargs="*", type=Path, default=[], help="more decoder_step .onnx files to time")
    ap.add_argument("--rows", type=int, default=32, help="live rows (slots) per step (default 32)")
    ap.add_argument("--cache", type=int, default=128, help="self-attention cache capacity (default 128)")
    ap.add_argument("--source", type=int, default=32, help="source (cross keys/values) capacity (default 32)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1, as served)")
    ap.add_argument("--steps", type=int, default=50, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the variants (default 5)")
    args = ap.parse_args(argv)

    files = variants(args.artifact, args.only, args.extra)
    sessions = {k: session(f, args.threads) for k, f in files.items()}
    inputs = {k: feeds(s, args.rows, args.cache, args.source) for k, s in sessions.items()}
    cpu: dict[str, list[float]] = {k: [] for k in files}
    wall: dict[str, list[float]] = {k: [] for k in files}
    for _ in range(args.rounds):
        for k, s in sessions.items():
            c, w = time_steps(s, inputs[k], args.steps)
            cpu[k].append(c)
            wall[k].append(w)

    print(f"decoder_step alone: {args.rows} rows, cache {args.cache}, source {args.source}, {args.threads} thread(s),"
          f" {args.rounds} rounds x {args.steps} steps, medians; ORT {ort.__version__}")
    print(f"{'variant':<28} {'CPU ms/step':>12} {'wall ms/step':>13} {'tokens/CPU-s':>13} {'CPU vs first':>13}")
    base = statistics.median(cpu[next(iter(files))])
    for k in files:
        c, w = statistics.median(cpu[k]), statistics.median(wall[k])
        print(f"{k:<28} {c * 1e3:>12.2f} {w * 1e3:>13.2f} {args.rows / c:>13,.0f} {c / base:>12.2f}x")


if __name__ == "__main__":
    main()
