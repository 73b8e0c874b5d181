"""A real Prometheus (Debian `prometheus`) for the tests, configured from deploy/prometheus/prometheus.yml."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import httpx
import yaml
from localcluster import free_port, wait_until

PROM_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def config_for(sd_file: Path, *, scrape_interval: str = "2s") -> dict[str, Any]:
    """The shipped config with three test changes: the cluster's own discovery file (it has its own temp dir),
    a short scrape interval, and targets rewritten to 127.0.0.1 (Ray advertises the host's address; same
    machine, but the tests stay on loopback). The rule file is the shipped one, loaded by absolute path."""
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval)
    cfg["rule_files"] = [str(PROM_DIR / f) for f in cfg["rule_files"]]
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "ray"]
    job["file_sd_configs"][0]["files"] = [str(sd_file)]
    job["file_sd_configs"][0]["refresh_interval"] = "2s"
    job["relabel_configs"] = [{"source_labels": ["__address__"], "regex": r".*:(\d+)",
                               "target_label": "__address__", "replacement": "127.0.0.1:$1"}]
    return cfg


class Prometheus:
    def __init__(self, config: dict[str, Any]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="asprom-", dir="/tmp"))
        self.port = free_port()
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.log = open(self.dir / "prometheus.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [shutil.which("prometheus") or "prometheus", f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_until("prometheus ready", self._ready, 60)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited:\n{(self.dir / 'prometheus.log').read_text()[-3000:]}")
        return httpx.get(f"{self.url}/-/ready", timeout=5).status_code == 200

    def api(self, path: str, **params: str) -> Any:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        r.raise_for_status()
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def scalar(self, expr: str) -> float:
        """Value of a query expected to return at most one series; 0 when there is none yet."""
        res = self.query(expr)
        assert len(res) <= 1, res
        return float(res[0]["value"][1]) if res else 0.0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
