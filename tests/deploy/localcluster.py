"""A two-node Ray cluster on this machine, driven only through public entry points.

`ray start --block` per node (own temp dir, ports, CPUs and memory), `serve deploy` against the head's dashboard,
Serve's REST API for replica states, HTTP for traffic. The test process never becomes a Ray driver, so it cannot
collide with a Ray instance another test started in-process, and `ray stop` (which would kill every Ray on the
machine) is never needed: each node is stopped through the process group it was started in.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from service.launch.ports import choose_port

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "deploy" / "serve_config.yaml"
RESULTS = REPO / "build" / "deploy-results.json"


def record(key: str, value: Any) -> None:
    """Measured numbers go to build/deploy-results.json (git-ignored) and to stdout (`pytest -s`)."""
    RESULTS.parent.mkdir(exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = value
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nDEPLOY-RESULT {key} = {json.dumps(value)}", flush=True)


def free_port() -> int:
    """Outside the ephemeral range (service/launch/ports.py): Ray binds it later, and takes ephemeral ports."""
    return choose_port()


def wait_until(what: str, check: Any, timeout_s: float, every_s: float = 0.5) -> Any:
    """Poll `check()` until it returns something truthy; bounded, with the last error in the message."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            if out := check():
                return out
        except (httpx.HTTPError, OSError, KeyError, ValueError) as e:
            last = e
        time.sleep(every_s)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s (last error: {last!r})")


def small_cluster_config(*, port: int, artifact_root: Path, versions: dict[str, str]) -> dict[str, Any]:
    """deploy/serve_config.yaml with overrides that fit two small nodes on one machine.

    - proxy on the head only: two proxies on one machine would both bind the same HTTP port;
    - HTTP on a free loopback port; artifacts from `artifact_root`, model versions pinned;
    - the Classifier autoscales 1..3 on a low target with short delays, so a test sees both directions quickly.
    """
    cfg = yaml.safe_load(SERVE_CONFIG.read_text())
    cfg["proxy_location"] = "HeadOnly"
    cfg["http_options"] = {**cfg.get("http_options", {}), "host": "127.0.0.1", "port": port}
    for app in cfg["applications"]:
        app["args"] = copy.deepcopy(app["args"])  # YAML merge keys share nested dicts between applications
        app["args"]["artifact_root"] = str(artifact_root)
        for key, version in versions.items():
            app["args"][key]["version"] = version
        for dep in app["deployments"]:
            if dep["name"] == "Classifier":
                dep["autoscaling_config"] = {
                    **dep["autoscaling_config"], "min_replicas": 1, "initial_replicas": 1, "max_replicas": 3,
                    "target_ongoing_requests": 2, "upscale_delay_s": 1, "downscale_delay_s": 5,
                    "metrics_interval_s": 0.5, "look_back_period_s": 2}
    return validated(cfg)


def validated(cfg: dict[str, Any]) -> dict[str, Any]:
    """The same typed configs Serve and the app use: fail here, not inside the cluster."""
    from ray.serve.schema import ServeDeploySchema

    from service.app import BuildArgs

    schema = ServeDeploySchema.model_validate(cfg)
    for app in schema.applications:
        BuildArgs.model_validate(app.args)
    return cfg


class LocalCluster:
    """Head + one worker node. `cpus` are logical CPUs per node: they decide where replicas fit."""

    def __init__(self, *, cpus: tuple[int, int] = (1, 1), memory_gb: float = 3.0, env: dict[str, str] | None = None):
        # Short path: Ray's unix sockets live under the temp dir and must stay below ~107 characters.
        self.root = Path(tempfile.mkdtemp(prefix="asdeploy-", dir="/tmp"))
        self.cpus, self.memory = cpus, int(memory_gb * 1e9)
        self.token = secrets.token_hex(16)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.metrics_ports = [free_port(), free_port()]
        self.serve_port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "ATTNSERVE_ARTIFACTS"))}
        # Token auth on, with a token of our own: everything that talks to this cluster uses it explicitly.
        self.env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0",
                         # Fixed by default (44217, 44227): would clash with any other Ray on this machine.
                         "AUTOSCALER_METRIC_PORT": str(free_port()), "DASHBOARD_METRIC_PORT": str(free_port())})
        self.env.update(env or {})
        self.procs: list[subprocess.Popen] = []
        self.config: dict[str, Any] = {}  # the Serve config deployed last

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.serve_port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    @property
    def sd_file(self) -> Path:
        """The Prometheus file_sd file Ray's head keeps current (a symlink into the session dir)."""
        return self.root / "head" / "prom_metrics_service_discovery.json"

    def _node(self, name: str, cpus: int, metrics_port: int, extra: list[str]) -> None:
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
               "--num-gpus=0", f"--memory={self.memory}", "--object-store-memory=100000000",
               f"--temp-dir={self.root / name}", f"--metrics-export-port={metrics_port}",
               "--disable-usage-stats", *extra]
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True, cwd=self.root))

    def start(self, timeout_s: float = 180) -> LocalCluster:
        t0 = time.monotonic()
        # The dashboard is needed: `serve deploy` and Serve's REST API go through it, and it writes the
        # Prometheus service-discovery file. Loopback only, on a free port.
        self._node("head", self.cpus[0], self.metrics_ports[0],
                   ["--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
                    f"--dashboard-agent-listen-port={free_port()}"])
        wait_until("head node", self._healthy, timeout_s)
        self._node("worker", self.cpus[1], self.metrics_ports[1],
                   [f"--address=127.0.0.1:{self.gcs_port}", f"--dashboard-agent-listen-port={free_port()}"])
        wait_until("worker node joined", lambda: len(self.nodes()) == 2, timeout_s - (time.monotonic() - t0))
        return self

    def _healthy(self) -> bool:
        self._check_alive()
        return httpx.get(f"{self.dashboard}/api/gcs_healthz", headers=self.headers, timeout=5).status_code == 200

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                log = (self.root / ("head.log" if p is self.procs[0] else "worker.log")).read_text()[-3000:]
                raise RuntimeError(f"a Ray node exited with {p.returncode}:\n{log}")

    def nodes(self) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.dashboard}/nodes?view=summary", headers=self.headers, timeout=10)
        r.raise_for_status()
        return [n for n in r.json()["data"]["summary"] if n["raylet"]["state"] == "ALIVE"]

    def deploy(self, config: dict[str, Any], name: str = "serve_config") -> float:
        """`serve deploy` the config, exactly as an operator would (through the head's dashboard). Returns how
        long the command took (it returns once the controller accepted the config)."""
        t0 = time.monotonic()
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        r = subprocess.run([str(BIN / "serve"), "deploy", str(path), "--address", self.dashboard],
                           env=self.env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"serve deploy failed:\n{r.stdout}\n{r.stderr}"
        self.config = config
        return time.monotonic() - t0

    def applications(self) -> dict[str, Any]:
        r = httpx.get(f"{self.dashboard}/api/serve/applications/", headers=self.headers, timeout=10)
        r.raise_for_status()
        return r.json()["applications"]

    def deployment(self, app: str, name: str) -> dict[str, Any]:
        return self.applications()[app]["deployments"][name]

    def running_replicas(self, app: str, name: str) -> list[dict[str, Any]]:
        return [r for r in self.deployment(app, name)["replicas"] if r["state"] == "RUNNING"]

    def wait_running(self, timeout_s: float) -> None:
        def ok() -> bool:
            self._check_alive()
            apps = self.applications()
            failed = {n: a["message"] for n, a in apps.items() if a["status"] == "DEPLOY_FAILED"}
            assert not failed, f"deploy failed: {failed}"
            return bool(apps) and all(a["status"] == "RUNNING" for a in apps.values())

        wait_until("all applications RUNNING", ok, timeout_s, every_s=1)

    def scrape(self) -> str:
        """Prometheus text from every node's metrics export port."""
        return "\n".join(httpx.get(f"http://127.0.0.1:{p}/metrics", timeout=10).text for p in self.metrics_ports)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, to what we started: each `ray start` and its descendants (raylet, GCS, agents;
        workers call setsid, so process groups are not enough), plus any process naming our temp dir. Nothing
        else is touched. The raylet and GCS drain for ~30 s on SIGTERM (measured here); a throwaway test cluster
        gets 5 s."""
        ours = {p.pid for p in self.procs} | _descendants({p.pid for p in self.procs}) | _naming(str(self.root))
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
            for pid in ours:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                for p in self.procs:
                    p.poll()  # reap our own children: a zombie would still look alive
                if not any(_alive(pid) for pid in ours):
                    break
                time.sleep(0.2)
        for p in self.procs:
            p.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)


def _proc_stat() -> dict[int, tuple[int, str]]:
    """{pid: (ppid, cmdline)} of every process we can read."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                out[int(d.name)] = (ppid, (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _descendants(roots: set[int]) -> set[int]:
    procs, found, frontier = _proc_stat(), set(), set(roots)
    while frontier:
        frontier = {pid for pid, (ppid, _) in procs.items() if ppid in frontier} - found
        found |= frontier
    return found


def _naming(text: str) -> set[int]:
    return {pid for pid, (_, cmd) in _proc_stat().items() if text in cmd and pid != os.getpid()}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
