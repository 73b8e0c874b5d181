"""The front (service/front.py): its HAProxy config from the shipped Serve config, and the real HAProxy in front of
the session service. Its overload behaviour is measured in tests/reliability (goodput at 3x capacity)."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from local_serve import shipped_config
from prometheus_client.parser import text_string_to_metric_families

from service.front import Backend, backends, binary, error_files, render


def test_each_model_admits_what_its_replicas_admit():
    got = {b.name: b for b in backends(shipped_config())}
    # deploy/serve_config.yaml: max_pending 96 (translator) and 120 (classifier), autoscaling up to 2 replicas
    assert got["translator"] == Backend("translator", "translator-en-es", "/v1/translate", 192, 96)
    assert got["classifier"] == Backend("classifier", "vit-fashion", "/v1/classify", 240, 120)


def test_config_is_accepted_by_haproxy(tmp_path: Path):
    for status, data in error_files(1).items():
        (tmp_path / f"{status}.http").write_bytes(data)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(render(backends(shipped_config()), host="127.0.0.1", port=8000, upstream_port=8001,
                          metrics_host="127.0.0.1", metrics_port=8081, errors_dir=tmp_path, retry_after_s=1))
    check = subprocess.run([binary(), "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    text = cfg.read_text()
    assert "path_reg ^/v2/models/translator\\-en\\-es(/versions/[^/]+)?/infer$" in text  # v2 infer counts too
    assert "bind 127.0.0.1:8000" in text and "bind 127.0.0.1:8081" in text


def test_error_files_are_the_service_error_format():
    for status, data in error_files(2).items():
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        assert lines[0].startswith(f"HTTP/1.1 {503 if status == 502 else status} ")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        assert headers["Content-Type"] == "application/json" and int(headers["Content-Length"]) == len(body)
        err = json.loads(body)["error"]
        assert set(err) == {"code", "message"} and err["message"]
        assert ("Retry-After" in headers) == (status in (502, 503))
    assert json.loads(error_files(1)[503].split(b"\r\n\r\n")[1])["error"]["code"] == "overloaded"


def test_requests_pass_through_the_front(service):
    def served() -> float:
        """2xx answers of the translator's backend, from the front's Prometheus exporter."""
        text = httpx.get(service.front_metrics_url, timeout=10).text
        return sum(x.value for f in text_string_to_metric_families(text) for x in f.samples
                   if x.name == "haproxy_backend_http_responses_total" and x.labels.get("proxy") == "translator"
                   and x.labels.get("code") == "2xx")

    before = served()
    with service.client() as c:
        assert c.post("/v1/translate", json={"texts": ["Hello."]}).status_code == 200
        assert c.get("/healthz").status_code == 200  # not a model route: another backend
    assert served() == before + 1


def test_malformed_http_gets_a_400_from_the_front(service):
    """HAProxy answers what is not HTTP/1.1 itself: a 400, never a 5xx (its own page: haproxy/haproxy#3032)."""
    with httpx.Client(base_url=service.base, timeout=30) as c:
        assert c.get("/healthz", headers={"X-Big": "a" * 20_000}).status_code == 400  # over its 16 KiB buffer
        assert c.get("/healthz").status_code == 200
    url = urlsplit(service.base)
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400 ")
