"""Every command in README.md and deploy/README.md code blocks works as written against a real running service.

The shell blocks (```bash) are split into commands (a trailing backslash continues a line) and the Python
blocks (```python) are run whole, against the session's `attnserve serve` (tests/service/conftest.py) instead of
`make serve`: `localhost:8000` and `127.0.0.1:8000` become its address, `attnserve` runs this checkout's CLI,
curl gets `--fail-with-body` (so a 4xx/5xx fails the command), and each runs from a scratch folder that links
the repository's top-level entries (files a command writes stay there). A command that cannot run here is in
NOT_HERE with the reason; a command that is in neither (or starts with a program outside RUNNABLE) fails the
test, and so does a NOT_HERE entry that is no longer in the README (the list cannot go stale).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
READMES = ("README.md", "deploy/README.md")
BLOCK = re.compile(r"^ *```(\w*)\n(.*?)^ *```", re.M | re.S)

KUBERNETES = "needs a Kubernetes cluster (tests/deploy/test_kuberay.py checks the manifests it applies)"
RAY_CLUSTER = "needs a Ray cluster started with `ray start` (tests/deploy/test_cluster.py does the same on two nodes)"
NOT_HERE: dict[str, str] = {
    # README.md
    "make serve": "starts the service itself: this test runs against the same `attnserve serve`, started by the "
                  "session fixture on free ports",
    "make test": "the whole test suite, this test included",
    "make serve DEVICE=cuda": "needs an NVIDIA GPU; tests/deploy/test_gpu_install.py checks the GPU install, and "
                              "tests/gpu/test_serve_device.py serves with --device cuda where a GPU is",
    # deploy/README.md
    "pip install -c constraints.txt '.[serve]'": "installs into the running environment",
    "attnserve export": "minutes of torch; the session's artifacts fixture (tests/conftest.py) runs it",
    "export ATTNSERVE_ARTIFACTS=/srv/attnserve/artifacts": "a cluster node's path",
    "ray start --head --metrics-export-port=8080 --dashboard-host=127.0.0.1": RAY_CLUSTER,
    "ray start --address=HEAD_IP:6379 --metrics-export-port=8080": RAY_CLUSTER,
    "serve deploy deploy/serve_config.yaml --address http://127.0.0.1:8265": RAY_CLUSTER,
    "serve status --address http://127.0.0.1:8265": RAY_CLUSTER,
    "python deploy/gen_kuberay.py": "rewrites deploy/kuberay/ in the checkout; tests/deploy/test_kuberay.py checks "
                                    "the committed files equal its output",
    "docker buildx build -f deploy/docker/Dockerfile --build-context data=../shared/data --target serve-cpu "
    "-t attnserve:0.1.0-cpu .":
        "needs a Docker engine (none on the project's machines); tests/deploy checks the Dockerfile's references",
    "docker buildx build -f deploy/docker/Dockerfile --build-context data=../shared/data --target serve-gpu "
    "--build-arg PRECISIONS=fp32,fp16 -t attnserve:0.1.0-gpu .":
        "needs a Docker engine (tests/deploy/test_docker.py checks the GPU stage statically)",
    "helm repo add kuberay https://ray-project.github.io/kuberay-helm/": KUBERNETES,
    "helm install kuberay-operator kuberay/kuberay-operator -n kuberay-system --create-namespace": KUBERNETES,
    'kubectl create secret generic attnserve-ray-auth --from-literal=auth_token="$(openssl rand -hex 32)"': KUBERNETES,
    "kubectl apply -f deploy/kuberay/networkpolicies.yaml": KUBERNETES,
    "kubectl apply -f deploy/kuberay/rayservice.yaml": KUBERNETES,
    "kubectl get rayservice attnserve": KUBERNETES,
    "kubectl port-forward svc/attnserve-serve-svc 8000:8000": KUBERNETES,
    "kubectl apply -f deploy/kuberay/podmonitor.yaml": KUBERNETES,
    "kubectl port-forward svc/attnserve-head-svc 8265:8265 &": KUBERNETES,
    "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=\"$(kubectl get secret attnserve-ray-auth -o "
    "jsonpath='{.data.auth_token}' | base64 -d)\"": KUBERNETES,
    "prometheus --config.file=deploy/prometheus/prometheus.yml": "a server that runs until stopped; tests/deploy "
                                                                 "runs a real Prometheus with this config",
    "curl -s -u admin:admin -H 'content-type: application/json' http://127.0.0.1:3000/api/dashboards/db "
    "-d \"{\\\"dashboard\\\": $(cat deploy/grafana/attnserve.json), \\\"overwrite\\\": true}\"":
        "needs a Grafana server; tests/deploy checks every dashboard query against a real Prometheus",
    ".venv/bin/python -m pytest tests/deploy -s": "the deploy test suite, part of `make test`",
}
NEEDS = {"promtool": "promtool"}  # a command starting with the key runs where the tool is installed (`make tools`)
# Programs this test runs; a command starting with anything else (make, pip, a server...) is never run blindly:
# it fails the test until it is added here or to NOT_HERE with its reason.
RUNNABLE = ("curl", "attnserve translate", "attnserve classify", "attnserve --version", "attnserve --help", "promtool")


def blocks(text: str, languages: tuple[str, ...]) -> list[str]:
    return [body for lang, body in BLOCK.findall(text) if lang in languages]


def shell_commands(body: str) -> list[str]:
    """One command per logical line: a trailing backslash joins the next line, as does a quote left open (a JSON
    body over two lines); comments and blank lines dropped."""
    out, current = [], ""
    for raw in body.splitlines():
        line = raw.strip()
        if line.endswith("\\"):
            current += line[:-1].rstrip() + " "
            continue
        if open_quote(current + line):
            current += line + "\n"
            continue
        command = strip_comment(current + line)
        current = ""
        if command:
            out.append(command)
    return out


def open_quote(text: str) -> str | None:
    quote = None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
    return quote


def strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a `#` outside quotes, after a space)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] == " "):
            return line[:i].rstrip()
    return line.strip()


def program_of(command: str) -> str:
    """The program a command runs (for attnserve, with its subcommand: `attnserve serve` is not run blindly)."""
    words = re.sub(r"^\(cd \S+ && ", "", command).split()
    return " ".join(words[:2]) if words[0] == "attnserve" else words[0]


def readme_commands() -> list[tuple[str, str]]:
    return [(name, cmd) for name in READMES
            for body in blocks((REPO / name).read_text(), ("bash", "sh", "shell"))
            for cmd in shell_commands(body)]


def python_blocks() -> list[tuple[str, str]]:
    return [(name, body) for name in READMES for body in blocks((REPO / name).read_text(), ("python",))]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch folder that sees the repository's files (relative paths work) but keeps what commands write, and
    `attnserve` on PATH as this checkout's CLI."""
    root = tmp_path_factory.mktemp("readme")
    for entry in REPO.iterdir():
        if entry.name not in (".git", ".venv"):
            (root / entry.name).symlink_to(entry)
    (root / "bin").mkdir()
    cli = root / "bin" / "attnserve"
    cli.write_text(f'#!/bin/sh\nPYTHONPATH="{REPO}" exec "{sys.executable}" -m service.cli "$@"\n')
    cli.chmod(0o755)
    return root


def as_run_here(command: str, service) -> str:
    host = service.base.removeprefix("http://")
    command = re.sub(r"\b(localhost|127\.0\.0\.1):8000\b", host, command)
    return re.sub(r"(^|[;&|(] *)curl ", r"\1curl --fail-with-body --max-time 120 ", command)


def run(command: str, cwd: Path, service) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{cwd / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "ATTNSERVE_URL": service.base, "PYTHONPATH": str(REPO)}
    env.pop("ATTNSERVE_TOKEN", None)
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_commands_are_found_and_the_skip_list_is_current():
    found = [cmd for _, cmd in readme_commands()]
    assert len(found) >= 15 and any(c.startswith("curl") for c in found)
    stale = [cmd for cmd in NOT_HERE if cmd not in found]
    assert not stale, f"NOT_HERE lists commands no longer in the READMEs: {stale}"
    assert python_blocks(), "no Python block found"
    # A new command of an unknown kind is refused, not run: `make serve DEVICE=cuda` would install and serve.
    assert program_of("make serve DEVICE=cuda") not in RUNNABLE
    assert program_of("attnserve serve --device cuda") not in RUNNABLE
    assert program_of("attnserve classify x.png --png o.png") in RUNNABLE
    assert program_of("(cd deploy/prometheus && promtool test rules alerts_test.yml)") == "promtool"
    split = shell_commands("curl -s a -d '{\"x\": 1,\n  \"y\": 2}'  # c\nattnserve translate Hi \\\n  --beam 2\n")
    assert split == ["curl -s a -d '{\"x\": 1,\n\"y\": 2}'", "attnserve translate Hi --beam 2"], split


@pytest.mark.slow
@pytest.mark.parametrize(("readme", "command"), [c for c in readme_commands() if c[1] not in NOT_HERE],
                         ids=lambda x: x if x in READMES else x[:60])
def test_readme_command_runs(readme: str, command: str, service, workdir: Path):
    program = program_of(command)
    assert program in RUNNABLE, f"{readme}: `{command}` is neither known to run here ({RUNNABLE}) nor in NOT_HERE"
    tool = NEEDS.get(program)
    if tool and not shutil.which(tool):
        pytest.skip(f"{tool} not on PATH (`make tools` installs it)")
    done = run(as_run_here(command, service), workdir, service)
    assert done.returncode == 0, f"{readme}: `{command}` exited {done.returncode}:\n{done.stdout[-2000:]}\n" \
                                 f"{done.stderr[-2000:]}"


@pytest.mark.slow
@pytest.mark.parametrize(("readme", "code"), python_blocks(), ids=lambda x: x if x in READMES else x[:40])
def test_readme_python_runs(readme: str, code: str, service, workdir: Path):
    script = workdir / "snippet.py"
    script.write_text(as_run_here(code, service))
    done = run(f"{sys.executable} snippet.py", workdir, service)
    assert done.returncode == 0, f"{readme}: the Python block exited {done.returncode}:\n{done.stderr[-3000:]}"
    assert done.stdout.strip(), "the Python block printed nothing"
