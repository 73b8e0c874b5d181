"""Checkpoint -> verified artifact folder: export every declared graph, check parity, add precisions, manifest.

The folder is assembled under ``.<version>.partial``. While the checks run it carries
``manifest.partial.json``, which the runtime loads only when named explicitly (decode parity, quality).
``manifest.json`` is written last, once every parity check and quality gate passed, and the folder is then
renamed into place, so ``artifacts/<name>/<version>/`` is always complete; a failed export leaves only the
dot-folder, which nothing finds or loads. Re-running is cheap: an artifact whose manifest names the same
checkpoint sha256, the current manifest format and graph set, and already has the asked precisions is left
alone.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx
import onnxruntime
import torch

from export import family_translator, family_vit
from export.gates import QualityGateError, check_gates
from export.onnx_export import OPSET, describe, export_graph
from export.parity import Mismatch, ParityError, as_dicts, compare, cpu_session
from export.precision import CONVERTERS, METHODS, variant_file
from export.specs import GRAPHS, model_dims
from models.checkpoint import KINDS, load_checkpoint, read_meta
from service.runtime.errors import ArtifactError
from service.runtime.manifest import FORMAT, MANIFEST, PARTIAL_MANIFEST, check_name, load_manifest, locate, sha256_file

FAMILIES = {"vit": family_vit, "translator": family_translator}
CHECKPOINT_FILES = ("model.safetensors", "config.json", "tokenizer.json")


@dataclass
class ExportOptions:
    out: Path = Path("artifacts")
    precisions: tuple[str, ...] = ("fp32", "int8")
    version: str | None = None
    force: bool = False
    greedy_sentences: int = 200  # ORT vs torch greedy tokens, test split
    quality_limit: int | None = None  # test examples for the precision quality check; None = whole split
    gates: bool = True  # fail when a precision loses too much quality (export/gates.py); off for random models
    max_loss: dict[str, float] | None = None  # precision -> allowed loss, overriding export.gates.GATES
    log: list[str] = field(default_factory=list)


def snapshot(checkpoint: Path, into: Path) -> Path:
    """Copy the checkpoint: training may rewrite it while we export."""
    into.mkdir(parents=True)
    for f in CHECKPOINT_FILES:
        if (checkpoint / f).exists():
            shutil.copy2(checkpoint / f, into / f)
    return into


def declared_graphs(meta: dict) -> dict[str, tuple[list[str], list[str]]]:
    """Graph name -> (input names, output names) that ``export.specs.GRAPHS`` declares today for a checkpoint
    (its config.json), per-layer tensors expanded for its layer count."""
    kind = meta["kind"]
    dims = model_dims(kind, KINDS[kind][1](**meta["config"]))
    expanded = [s.expand(dims) for s in GRAPHS[kind]]
    return {s.name: ([t.name for t in s.inputs], [t.name for t in s.outputs]) for s in expanded}


def up_to_date(dest: Path, checkpoint_sha: str, precisions: tuple[str, ...], meta: dict) -> bool:
    """Same checkpoint, current manifest format, at least the asked precisions made by today's method
    (``export.precision.METHODS``), and in every precision exactly the graphs declared today with their input
    and output names; an invalid or unpassed manifest is stale."""
    try:
        m = load_manifest(dest, verify=False)
    except ArtifactError:
        return False
    declared = declared_graphs(meta)
    return (
        m.format >= FORMAT
        and m.source.get("sha256") == checkpoint_sha
        and set(precisions) <= set(m.graphs)
        and all(m.exporter.get(p) == METHODS[p] for p in m.graphs if p in METHODS)  # made the current way
        and all(
            {name: ([t.name for t in g.inputs], [t.name for t in g.outputs]) for name, g in graphs.items()} == declared
            for graphs in m.graphs.values()
        )
    )


def export_checkpoint(checkpoint: Path, opts: ExportOptions) -> Path:
    """Build (or keep) ``<out>/<checkpoint name>/<version>/``; returns that folder."""
    checkpoint = Path(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        snap = snapshot(checkpoint, Path(tmp) / "checkpoint")
        sha = sha256_file(snap / "model.safetensors")
        version = check_name(opts.version or sha[:12], "version")
        dest = opts.out / check_name(checkpoint.name, "name") / version
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest.parent / ".export.lock", "w") as lock:
            # Two exports of one model (e.g. a test fixture and a terminal) would share the partial folder.
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not opts.force and up_to_date(dest, sha, opts.precisions, read_meta(snap)):
                print(f"{dest}: up to date (checkpoint sha256 {sha[:12]}); --force rebuilds", flush=True)
                return dest
            if (dest / MANIFEST).is_file() and not opts.force:  # adding a precision keeps the ones built before
                have = json.loads((dest / MANIFEST).read_text()).get("graphs", {})
                opts = replace(opts, precisions=tuple(dict.fromkeys([*opts.precisions, *have])))
            return _build(snap, checkpoint, sha, version, dest, opts)


def _build(snap: Path, checkpoint: Path, sha: str, version: str, dest: Path, opts: ExportOptions) -> Path:
    t0 = time.time()
    model, meta = load_checkpoint(snap)
    kind, fam = meta["kind"], FAMILIES[meta["kind"]]
    dims = model_dims(kind, model.cfg)
    work = dest.parent / f".{version}.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    specs = [s.expand(dims) for s in GRAPHS[kind]]  # per-layer tensors named for this model

    graphs: dict[str, dict] = {"fp32": {}}
    for spec in specs:
        export_graph(spec, model, dims, work / variant_file(spec.name, "fp32"))
        graphs["fp32"][spec.name] = {
            "file": variant_file(spec.name, "fp32"),
            **describe(work / variant_file(spec.name, "fp32")),
        }
        print(f"  exported {spec.name} ({time.time() - t0:.0f}s)", flush=True)

    mismatches: list[Mismatch] = []
    parity: dict = {"tolerance": {s.name: {"atol": s.atol, "rtol": s.rtol} for s in specs}, "graphs": {}}
    for spec in specs:
        sess, wrapper = cpu_session(work / graphs["fp32"][spec.name]["file"]), spec.wrapper(model).eval()
        cases = fam.random_cases(spec, dims) | fam.real_cases(spec, model, snap)
        results = []
        for case, feeds in cases.items():
            res, bad = compare(spec, wrapper, sess, case, feeds)
            results.append(res)
            mismatches += bad
        parity["graphs"][spec.name] = results

    calibrated: dict[str, str] = {}
    for p in opts.precisions:
        if p == "fp32":
            continue
        graphs[p] = {}
        for spec in specs:
            f = variant_file(spec.name, p)
            feeds = None
            if p == "int8":  # static scales: calibrated on the family's own inputs
                feeds, calibrated[spec.name] = fam.calibration(spec, model, snap, dims)
            CONVERTERS[p](work / graphs["fp32"][spec.name]["file"], work / f, feeds)
            graphs[p][spec.name] = {"file": f, **describe(work / f)}
        print(f"  converted to {p} ({time.time() - t0:.0f}s)", flush=True)

    extra = fam.manifest_extra(meta, model.cfg, snap, work)
    manifest = {
        "format": FORMAT,
        "name": checkpoint.name,
        "version": version,
        "task": fam.TASK,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "opset": OPSET,
        "exporter": {
            "tool": "torch.onnx.export(dynamo=True)",
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            **{p: METHODS[p] for p in opts.precisions if p in METHODS},
            **({"int8_calibration": calibrated} if calibrated else {}),
        },
        "source": {
            "checkpoint": repo_relative(checkpoint),
            "sha256": sha,
            "files": {f: sha256_file(snap / f) for f in CHECKPOINT_FILES if (snap / f).exists()},
            "training": {k: v for k, v in meta.get("training", {}).items() if k != "history"},
            "valid": meta.get("valid"),
        },
        "model": extra.pop("model"),
        "files": {},
        "graphs": graphs,
        "parity": parity,
        "quality": {},
        **extra,
    }
    partial = write_manifest(work, manifest, PARTIAL_MANIFEST)  # the runtime loads it by this explicit path

    greedy, bad = fam.decode_parity(model, snap, partial, opts)
    mismatches += bad
    if greedy:
        parity["greedy_tokens"] = greedy
    parity["mismatches"] = as_dicts(mismatches)
    parity["passed"] = not mismatches
    manifest["quality"] = fam.quality(partial, opts)
    if opts.gates:
        manifest["gates"], failures = check_gates(fam.TASK, manifest["quality"], max_loss=opts.max_loss)
    else:
        manifest["gates"], failures = {"checked": False, "reason": "disabled (ExportOptions.gates=False)"}, []
    for p in manifest["gates"].get("not_run", []):
        print(f"  {p}: quality gate NOT RUN ({manifest['gates']['precisions'][p]['reason']})", flush=True)
    manifest["build_seconds"] = round(time.time() - t0, 1)
    write_manifest(work, manifest, PARTIAL_MANIFEST)  # the figures, also when a check failed
    # The partial folder stays for inspection; it has no manifest.json, so nothing finds or loads it.
    if mismatches:
        raise ParityError(mismatches)
    if failures:
        raise QualityGateError(f"{checkpoint.name}/{version}", failures)
    write_manifest(work, manifest, MANIFEST)  # last: from here on the folder is a complete artifact
    (work / PARTIAL_MANIFEST).unlink()
    install(work, dest)
    print(f"{dest}: built in {time.time() - t0:.0f}s, parity passed", flush=True)
    return dest


def install(work: Path, dest: Path) -> None:
    """Rename the finished folder into place. A folder cannot replace a non-empty one in one rename: an older
    build is first moved aside (to a dot-name lookup ignores), so ``dest`` is only ever absent or complete."""
    old = dest.parent / f".{dest.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    work.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def repo_relative(path: Path) -> str:
    """A path inside the repository as a relative one, so the manifest does not name this machine's folders."""
    repo = Path(__file__).resolve().parents[1]
    try:
        return str(path.resolve().relative_to(repo))
    except ValueError:
        return str(path.resolve())


def write_manifest(folder: Path, manifest: dict, name: str = MANIFEST) -> Path:
    """Checksum every file of the folder into the manifest, write it as ``name``, and load it back through the
    runtime's own schema and checksum check; returns the manifest's path."""
    manifest["files"] = {
        f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        for f in sorted(folder.iterdir())
        if f.is_file() and f.name not in (MANIFEST, PARTIAL_MANIFEST)
    }
    path = folder / name
    tmp = folder / f".{name}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    tmp.rename(path)
    load_manifest(path)
    return path


def precisions_in(location: Path) -> list[str]:
    """Precisions listed in an artifact's manifest (a folder, or an explicit manifest file), fp32 first."""
    graphs = json.loads(locate(location)[1].read_text())["graphs"]
    return sorted(graphs, key=lambda p: (p != "fp32", p))
