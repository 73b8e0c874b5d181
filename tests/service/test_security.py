"""The local start (`attnserve serve`) is locked down: Ray refuses callers without the start's token, and only
Ray's token-checked gRPC servers listen beyond loopback.

Uses the session's running service (tests/service/conftest.py starts it with the secure defaults).
"""

from __future__ import annotations

import ipaddress
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

GCS_RPC = "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo"  # an empty request is valid: lists the nodes
REPLICA_RPC = "/ray.serve.ASGIService/HandleRequest"  # Serve's inter-deployment call into a replica


@dataclass(frozen=True)
class Socket:
    ip: str
    port: int
    pid: int
    name: str  # process name: gcs_server, raylet, ray::ServeReplica:..., python
    cmdline: str

    @property
    def loopback(self) -> bool:
        a = ipaddress.ip_address(self.ip)
        mapped = getattr(a, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is loopback
        return (mapped or a).is_loopback


def listening(pid: int) -> list[Socket]:
    """Every TCP socket listening in the process tree of `pid` (the serve process; Ray's are its descendants)."""
    import ray  # noqa: F401  psutil ships with ray (ray/thirdparty_files); importing ray puts it on sys.path

    psutil = pytest.importorskip("psutil")
    root = psutil.Process(pid)
    found = set()
    for p in [root, *root.children(recursive=True)]:
        try:
            name, cmd = p.name(), " ".join(p.cmdline())
            conns = p.net_connections(kind="tcp")
        except psutil.Error:
            continue  # a worker that exited meanwhile
        found |= {Socket(c.laddr.ip, c.laddr.port, p.pid, name, cmd) for c in conns if c.status == psutil.CONN_LISTEN}
    return sorted(found, key=lambda s: (s.name, s.port))


def ray_endpoint(service) -> tuple[str, Path]:
    """The GCS address and token file the ready message names (the token itself is never printed)."""
    m = re.search(r"^  ray +(\S+)  \(RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=(\S+)\)$", service.log.read_text(), re.M)
    assert m, f"no `ray` line with token auth in the ready message:\n{service.log.read_text()[-2000:]}"
    return m.group(1), Path(m.group(2))


def call(target: str, method: str, token: str | None = None) -> grpc.StatusCode:
    """A raw unary gRPC call with an empty request, with or without Ray's bearer token."""
    metadata = [("authorization", f"Bearer {token}")] if token is not None else None
    with grpc.insecure_channel(target) as channel:
        try:
            channel.unary_unary(method)(b"", metadata=metadata, timeout=30)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()


def test_ray_refuses_callers_without_the_token(service):
    gcs, token_file = ray_endpoint(service)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 32 and token not in service.log.read_text()

    assert call(gcs, GCS_RPC) == grpc.StatusCode.UNAUTHENTICATED
    assert call(gcs, GCS_RPC, "0" * 64) == grpc.StatusCode.UNAUTHENTICATED
    assert call(gcs, GCS_RPC, token) == grpc.StatusCode.OK  # the check can fail: the right token gets in

    # Serve's replica gRPC servers listen on all interfaces (see test below): they check the token too.
    replicas = {s.port for s in listening(service.pid) if not s.loopback}
    assert replicas
    for port in replicas:
        assert call(f"127.0.0.1:{port}", REPLICA_RPC) == grpc.StatusCode.UNAUTHENTICATED
        assert call(f"127.0.0.1:{port}", REPLICA_RPC, "0" * 64) == grpc.StatusCode.UNAUTHENTICATED
        # With the token the call reaches Serve's handler, which rejects the empty request body.
        assert call(f"127.0.0.1:{port}", REPLICA_RPC, token) not in (
            grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE)


def test_only_token_checked_ray_grpc_listens_beyond_loopback(service):
    sockets = listening(service.pid)
    table = "\n".join(f"{s.ip:>18} {s.port:>6} {s.name}" for s in sockets)
    names = {s.name for s in sockets}
    assert {"gcs_server", "raylet"} <= names, table  # the tree was found, not an empty list

    http_port = int(service.base.rsplit(":", 1)[1])
    metrics_port = int(service.metrics_url.split(":")[2].split("/")[0])
    for port in (http_port, metrics_port):
        on = [s for s in sockets if s.port == port]
        assert on and all(s.ip == "127.0.0.1" for s in on), table

    # Ray binds everything to the node IP, which this start makes 127.0.0.1, except each Serve replica's
    # inter-deployment gRPC server: `[::]:0`, hard-coded in ray/serve/_private/replica.py, with Ray's token
    # interceptor (checked above). Nothing else (HTTP, metrics, dashboard, agents, GCS, raylet) is reachable.
    outside = [s for s in sockets if not s.loopback]
    assert all(s.name.startswith("ray::ServeReplica") for s in outside), table
    assert len(outside) == len({s.pid for s in outside}), table  # one per replica
