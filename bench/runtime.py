"""`attnserve bench runtime`: ONNX Runtime vs PyTorch eager vs CTranslate2 on the same weights, one table.

Each backend runs in its own subprocess, one after the other, with the same thread count. The weights are a
snapshot of the checkpoint whose sha256 the ONNX artifacts' manifests name, so all three run the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from service.runtime import find_artifact, load_manifest
from service.runtime.manifest import sha256_file

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench-runtime:begin -->", "<!-- bench-runtime:end -->"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} logical CPUs{load}, Python {platform.python_version()}"


def snapshot(artifact: Path, into: Path) -> Path:
    """Copy the checkpoint the artifact was exported from, refusing if it has changed since (training)."""
    m = load_manifest(artifact, verify=False)
    ckpt = (
        REPO / m.source["checkpoint"]
        if not Path(m.source["checkpoint"]).is_absolute()
        else Path(m.source["checkpoint"])
    )
    into.mkdir(parents=True)
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        if (ckpt / f).exists():
            shutil.copy2(ckpt / f, into / f)
    if sha256_file(into / "model.safetensors") != m.source["sha256"]:
        raise SystemExit(f"{ckpt} changed since {artifact} was exported: run `attnserve export` first (same weights)")
    return into


def workload(tmp: Path, n_texts: int) -> tuple[Path, Path]:
    from models.data import data_root, fashion_mnist, spa_eng_splits

    if not (data_root() / "spa-eng" / "spa.txt").exists():
        raise SystemExit(f"the benchmark translates test sentences: no data under {data_root()}")
    test = spa_eng_splits()["test"]
    idx = np.linspace(0, len(test) - 1, n_texts).astype(int)
    rng = np.random.default_rng(0)
    texts = [test[i][0] for i in rng.permutation(idx)]  # mixed lengths in every batch, like live traffic
    images = fashion_mnist("test")[0][:1024]
    np.savez(tmp / "images.npz", images=images)
    (tmp / "texts.json").write_text(json.dumps(texts))
    return tmp / "images.npz", tmp / "texts.json"


def run_worker(backend: str, spec_path: Path, threads: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "bench.runtime_workers", backend, str(spec_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"{backend} worker failed:\n{out.stderr[-3000:]}")
    print(f"  {backend}: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    """One line per (model, precision, decoding, attention, batch); backends side by side.

    Throughput is per CPU-second of the backend's process (one compute thread each), which the other load
    on a shared machine disturbs far less than wall time; the ORT wall-clock rate is shown for reference.
    PyTorch runs fp32 only (its int8 path is a different quantiser); CTranslate2 has no ViT.
    """
    by = {(r["backend"], r["model"], r["precision"], r["decoding"], r["attention"], r["batch"]): r for r in rows}
    head = (
        "| model | precision | decoding | attention | batch | ORT items/s | ORT tokens/s | PyTorch items/s"
        " | CT2 items/s | CT2 tokens/s | ORT / CT2 | ORT wall items/s |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        if r["backend"] != "onnxruntime":
            continue
        key = (r["model"], r["precision"], r["decoding"], r["attention"], r["batch"])
        pt = by.get(("pytorch", *key))
        ct = by.get(("ctranslate2", *key))
        cells = [
            *map(str, key[:3]),
            "yes" if r["attention"] else "no",
            str(r["batch"]),
            f"{r['items_per_cpu_s']:.1f}",
            num(r["tokens_per_cpu_s"]),
            f"{pt['items_per_cpu_s']:.1f}" if pt else "",
            f"{ct['items_per_cpu_s']:.1f}" if ct else "",
            num(ct["tokens_per_cpu_s"]) if ct else "",
            f"{r['items_per_cpu_s'] / ct['items_per_cpu_s']:.2f}" if ct else "",
            f"{r['items_per_s']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def num(x: float | None) -> str:
    return f"{x:.0f}" if x else ""


def write_notes(path: Path, text: str) -> None:
    """Replace the runtime section of the benchmark notes, leaving other sections alone."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="attnserve bench runtime", description=__doc__)
    p.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for every backend")
    p.add_argument("--quick", action="store_true", help="short timings (0.3 s per row): a smoke run")
    p.add_argument("--seconds", type=float, default=2.0, help="minimum timed seconds per row")
    p.add_argument("--sentences", type=int, default=256, help="test sentences in the translation workload")
    p.add_argument("--precision", default="fp32,int8", help="comma-separated precisions (CPU: fp32, int8)")
    p.add_argument("--notes", type=Path, default=REPO / "docs" / "BENCHMARKS.md", help="where to record the table")
    p.add_argument("--no-notes", action="store_true", help="print only")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        # Export first (a no-op when up to date) so the ONNX graphs and the snapshot hold the same weights.
        subprocess.run(
            [sys.executable, "-m", "service.cli", "export", "--out", str(args.artifacts)], cwd=REPO, check=True
        )
        vit_dir = find_artifact(args.artifacts, "vit-fashion")
        tr_dir = find_artifact(args.artifacts, "translator-en-es")
        vit_ck, tr_ck = snapshot(vit_dir, tmp / "vit"), snapshot(tr_dir, tmp / "translator")
        from bench.ct2 import AttnserveConverter

        AttnserveConverter(tr_ck).convert(str(tmp / "ct2"))
        images, texts = workload(tmp, args.sentences)
        spec = {
            "vit": str(vit_dir),
            "translator": str(tr_dir),
            "vit_checkpoint": str(vit_ck),
            "translator_checkpoint": str(tr_ck),
            "ct2_model": str(tmp / "ct2"),
            "workload": str(images),
            "texts": str(texts),
            "threads": args.threads,
            "min_seconds": 0.3 if args.quick else args.seconds,
            "vit_batches": [1, 8, 32, 128],
            "translator_batches": [1, 8, 32],
            "sample": 64,
            "precisions": [x for x in args.precision.split(",") if x],
        }
        (tmp / "spec.json").write_text(json.dumps(spec))
        rows = []
        for backend in ("onnxruntime", "pytorch", "ctranslate2"):
            rows += run_worker(backend, tmp / "spec.json", args.threads)
    samples = [r.pop("sample_tokens") for r in rows if "sample_tokens" in r]
    rows = [r for r in rows if "model" in r]
    same = sum(a == b for a, b in zip(samples[0], samples[1], strict=True)) if len(samples) == 2 else None
    command = "attnserve bench runtime " + " ".join(argv if argv is not None else sys.argv[1:])
    versions = f"vit-fashion/{vit_dir.name}, translator-en-es/{tr_dir.name}"
    text = "\n".join(
        [
            "## Runtime (`attnserve bench runtime`)",
            "",
            f"Command: `{command.strip()}`; {args.threads} intra-op thread(s) per backend,"
            " each backend in its own process.",
            f"Machine: {machine()}. Artifacts: {versions}. Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            f"Workload: {args.sentences} test sentences (length-mixed batches, greedy/beam up to 128"
            " tokens), Fashion-MNIST test images. items/s = images or sentences per second;"
            " tokens/s counts generated target tokens (no EOS).",
            f"CTranslate2 greedy tokens equal ONNX Runtime's on {same}/{len(samples[0]) if samples else 0}"
            " sample sentences.",
            "Rates are per CPU-second of each backend's process (1 compute thread): on this shared, loaded CPU"
            " wall-clock rates swing several-fold between neighbouring rows, so only ratios are meaningful.",
            "PyTorch greedy without attention is the model's own cached loop (the batch runs until its longest"
            " sentence ends); its other rows use the runtime's numpy search on torch steps (finished rows leave).",
            "",
            table(rows),
        ]
    )
    print(text)
    if not args.no_notes:
        write_notes(args.notes, text)
        print(f"\nrecorded in {args.notes}", file=sys.stderr)
