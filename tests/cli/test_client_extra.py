"""The `client` extra is enough for service.client: importing it loads only what base + client declare.

A fresh interpreter imports the client (and the CLI entry point); every third-party module it loaded must belong
to a distribution reachable from pyproject.toml's base dependencies plus the `client` extra (their own
requirements followed), and none of the serving stack (Ray, ONNX Runtime, FastAPI, numpy, ...) may load.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NEVER = ("ray", "onnxruntime", "fastapi", "starlette", "numpy", "PIL", "tokenizers", "torch", "yaml", "tqdm",
         "prometheus_client")


def loaded_by_client() -> set[str]:
    code = ("import json, sys; import service.client, service.cli; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    return set(json.loads(out.stdout))


def name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def closure(requirements: list[str]) -> set[str]:
    """The distributions these requirements install, following each one's own (non-extra) requirements."""
    seen: set[str] = set()
    todo = [name(r) for r in requirements]
    while todo:
        dist = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        try:
            todo += [name(r) for r in requires(dist) or [] if "extra ==" not in r]
        except PackageNotFoundError:
            pass
    return seen


def test_the_client_loads_no_serving_stack():
    loaded = loaded_by_client()
    assert not loaded & set(NEVER), sorted(loaded & set(NEVER))


BLOCKED_RUN = """
import importlib.abc, json, sys
blocked = set(json.loads(sys.argv[1]))

class OnlyDeclared(importlib.abc.MetaPathFinder):
    # As in an environment holding only base + client: anything else is not installed.
    def find_spec(self, fullname, path, target=None):
        top = fullname.split(".")[0]
        if top in blocked:
            raise ModuleNotFoundError(f"No module named {top!r} (not in base + client)", name=top)
        return None

sys.meta_path.insert(0, OnlyDeclared())
import service.cli, service.client
from service.client import Client, TokenEvent, TranslateResponse
TokenEvent.model_validate({"index": 0, "token": "x", "text": "x"})
with Client("http://127.0.0.1:9") as c:
    pass
sys.argv = ["attnserve", "translate", "--help"]
service.cli.main(["translate", "--help"])
"""


def test_the_client_runs_with_only_base_plus_the_client_extra_installed():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = closure([*project["dependencies"], *project["optional-dependencies"]["client"]])
    assert {"httpx", "pydantic"} <= declared and not declared & {"ray", "onnxruntime", "fastapi", "numpy"}
    # Every module an installed distribution outside base + client provides (attnserve's own service/ stays).
    blocked = {m for m, dists in packages_distributions().items()
               if not {d.lower().replace("_", "-") for d in dists} & declared} - {"service"}
    assert {"ray", "onnxruntime", "fastapi", "numpy"} <= blocked
    out = subprocess.run([sys.executable, "-c", BLOCKED_RUN, json.dumps(sorted(blocked))], cwd=REPO,
                         capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "usage: attnserve translate" in out.stdout
