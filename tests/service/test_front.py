"""service/launch/front.py: its HAProxy config from the shipped Serve config, and the real HAProxy in front of
the session service. Its overload behaviour is measured in tests/reliability (goodput at 3x capacity)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from local_serve import free_port, shipped_config
from prometheus_client.parser import text_string_to_metric_families

from service.launch.front import V2_BUSY, Backend, Front, backends, binary, error_files, render, v2_busy


def test_each_model_admits_what_its_replicas_admit():
    got = {b.name: b for b in backends(shipped_config())}
    # deploy/serve_config.yaml: max_pending 96 (translator) and 120 (classifier), autoscaling up to 2 replicas
    # Each replica admits max_pending: as many in flight on each of its direct-ingress slots (one per replica).
    assert got["translator"] == Backend("translator", "translator-en-es", "/v1/translate", 192, 96, 2, 96)
    assert got["classifier"] == Backend("classifier", "vit-fashion", "/v1/classify", 240, 120, 2, 120)


def test_config_is_accepted_by_haproxy(tmp_path: Path):
    for status, data in error_files(1).items():
        (tmp_path / f"{status}.http").write_bytes(data)
    (tmp_path / V2_BUSY).write_bytes(v2_busy(1))
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(render(backends(shipped_config()), host="127.0.0.1", port=8000, upstream_port=8001,
                          metrics_host="127.0.0.1", metrics_port=8081, errors_dir=tmp_path, retry_after_s=1))
    check = subprocess.run([binary(), "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "[WARNING]" not in check.stdout + check.stderr, check.stdout + check.stderr  # nothing printed at start
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
    assert isinstance(json.loads(v2_busy(1))["error"], str)  # the v2 protocol's form


def served(service, server: str | None = None) -> float:
    """2xx answers of the translator's backend (or of one of its servers), from the front's exporter."""
    text = httpx.get(service.front_metrics_url, timeout=10).text
    name = "haproxy_backend_http_responses_total" if server is None else "haproxy_server_http_responses_total"
    return sum(x.value for f in text_string_to_metric_families(text) for x in f.samples
               if x.name == name and x.labels.get("proxy") == "translator" and x.labels.get("code") == "2xx"
               and (server is None or x.labels.get("server") == server))


def test_requests_pass_through_the_front(service):
    before = served(service)
    with service.client() as c:
        assert c.post("/v1/translate", json={"texts": ["Hello."]}).status_code == 200
        assert c.get("/healthz").status_code == 200  # not a model route: another backend
    assert served(service) == before + 1


def test_v1_goes_straight_to_the_replica_and_v2_through_serve(service):
    """The follower points the translator's first direct slot at its replica's direct-ingress port (polled each
    second, so wait for it); /v1 is then answered by that server, v2 by Serve's proxy."""
    with service.client() as c:
        for _ in range(60):
            direct = served(service, "direct1")
            assert c.post("/v1/translate", json={"texts": ["Hello."]}).status_code == 200
            if served(service, "direct1") == direct + 1:
                break
            time.sleep(1)
        else:
            raise AssertionError("no /v1 request reached the replica's direct-ingress port")
        proxy = served(service, "serve")
        body = {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["Hello."]}]}
        r = c.post("/v2/models/translator-en-es/infer", json=body)
        assert r.status_code == 200, r.text
        assert served(service, "serve") == proxy + 1 and served(service, "direct1") == direct + 1


def test_malformed_http_gets_a_400_from_the_front(service):
    """HAProxy answers what is not HTTP/1.1 itself: a 400, never a 5xx (its own page: haproxy/haproxy#3032)."""
    with httpx.Client(base_url=service.base, timeout=30) as c:
        assert c.get("/healthz", headers={"X-Big": "a" * 20_000}).status_code == 400  # over its 16 KiB buffer
        assert c.get("/healthz").status_code == 200
    url = urlsplit(service.base)
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400 ")


class Named(BaseHTTPRequestHandler):
    """Answers every request with the server's name: which upstream HAProxy chose."""

    def do_GET(self):
        body = self.server.name.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


def named_server(name: str) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Named)
    server.name = name  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_direct_slots_follow_the_replicas(tmp_path: Path):
    """The real HAProxy: /v1 goes to the replica a slot points at once its health check passes, v2 always to
    Serve's proxy; with the replica gone from the targets, or its port closed, /v1 falls back to the proxy."""
    proxy, replica, other = named_server("proxy"), named_server("replica"), named_server("other")
    port = free_port()
    front = Front(shipped_config(), exe=binary(), host="127.0.0.1", port=port, upstream_port=proxy.server_port,
                  metrics_host="127.0.0.1", metrics_port=None, retry_after_s=1).start()
    base = f"http://127.0.0.1:{port}"

    def answers(path: str, want: str) -> bool:
        for _ in range(50):  # health checks run every second
            if httpx.post(base + path, timeout=10).text == want:
                return True
            time.sleep(0.1)
        return False

    try:
        assert httpx.post(f"{base}/v1/classify", timeout=10).text == "proxy"  # no replica known yet
        front.point("classifier", [("127.0.0.1", replica.server_port)])
        assert answers("/v1/classify", "replica")
        assert httpx.post(f"{base}/v2/models/vit-fashion/infer", timeout=10).text == "proxy"
        assert httpx.post(f"{base}/v1/translate", timeout=10).text == "proxy"  # another model's backend
        front.point("classifier", [("127.0.0.1", other.server_port)])  # a replaced replica
        assert answers("/v1/classify", "other")
        assert front.direct["classifier"] == [("127.0.0.1", other.server_port), None]  # the freed slot
        other.shutdown()
        other.server_close()  # the replica died: its port refuses, HAProxy redispatches to the proxy
        assert answers("/v1/classify", "proxy")
        front.point("classifier", [])
        assert front.direct["classifier"] == [None, None]
        assert httpx.post(f"{base}/v1/classify", timeout=10).text == "proxy"
    finally:
        front.stop()
        for s in (proxy, replica):
            s.shutdown()


def test_a_full_model_is_refused_at_once_in_each_protocols_form(tmp_path: Path):
    """The real HAProxy from the real Front, ahead of a slow upstream holding the one admitted request: with the
    queue full too, the next /v1 and v2 requests are refused at once, each in its protocol's error form."""
    class Slow(BaseHTTPRequestHandler):
        def do_POST(self):
            time.sleep(3)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    config = {"applications": [{"route_prefix": "/v1/translate", "args": {"component": "translator",
                                "translator": {"name": "translator-en-es", "max_pending": 1}},
                                "deployments": [{"num_replicas": 1}]}]}
    port = free_port()
    front = Front(config, exe=binary(), host="127.0.0.1", port=port, upstream_port=upstream.server_port,
                  metrics_host="127.0.0.1", metrics_port=None, retry_after_s=2).start()
    try:
        base = f"http://127.0.0.1:{port}"
        held = [threading.Thread(target=httpx.post, args=(f"{base}/v1/translate",), kwargs={"timeout": 30})
                for _ in range(2)]  # one admitted, one queued (max_queue = 1)
        for t in held:
            t.start()
            time.sleep(0.3)
        t0 = time.monotonic()
        v1 = httpx.post(f"{base}/v1/translate", timeout=30)
        v2 = httpx.post(f"{base}/v2/models/translator-en-es/infer", timeout=30)
        assert time.monotonic() - t0 < 1.0  # refused, not queued
        assert v1.status_code == 503 and v1.headers["Retry-After"] == "2"
        assert v1.json()["error"]["code"] == "overloaded"
        assert v2.status_code == 503 and v2.headers["Retry-After"] == "2"
        assert v2.json()["error"].startswith("overloaded")
        assert httpx.post(f"{base}/v1/classify", timeout=30).status_code == 200  # not a limited route here
        for t in held:
            t.join()
    finally:
        front.stop()
        upstream.shutdown()
