"""Ports for the sockets `attnserve serve` opens on its own choice (Serve behind the front, Ray's two metric ports).

Binding port 0 and closing it hands back an *ephemeral* port: seconds later, when Ray binds it, Ray's own
processes (GCS, raylet, workers, gRPC clients) may have taken it meanwhile from the same range ("Failed to bind
to address 127.0.0.1:34145" in about one start of a dozen). So ports are chosen outside the kernel's ephemeral
range (/proc/sys/net/ipv4/ip_local_port_range), outside the ranges Ray takes ports from, and checked free.
"""

from __future__ import annotations

import functools
import random
import socket
from pathlib import Path

EPHEMERAL_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
FALLBACK_EPHEMERAL = (32768, 65535)  # no /proc (macOS: 49152-65535): assume Linux's lowest start, to its end

# Port ranges Ray 2.60 takes ports from on its own (constants named for where they come from).
RAY_RANGES = (
    (6379, 6379),  # GCS default (ray_constants.DEFAULT_PORT)
    (8265, 8265),  # dashboard (DEFAULT_DASHBOARD_PORT)
    (10002, 19999),  # worker ports (`ray start --min-worker-port/--max-worker-port` defaults)
    (30000, 31000),  # Serve's direct-ingress HTTP ports (RAY_SERVE_DIRECT_INGRESS_MIN/MAX_HTTP_PORT)
    (40000, 41000),  # Serve's direct-ingress gRPC ports
    (44217, 44227),  # AUTOSCALER_METRIC_PORT, DASHBOARD_METRIC_PORT defaults
    (52365, 52365),  # dashboard agent (DEFAULT_DASHBOARD_AGENT_LISTEN_PORT)
)
# Where to look first: above the well-known services and Ray's worker ports, below the usual ephemeral range.
PREFERRED = (20000, 29999)


def ephemeral_range(path: Path = EPHEMERAL_FILE) -> tuple[int, int]:
    """The kernel's ephemeral (local) port range, both ends included."""
    try:
        lo, hi = (int(x) for x in path.read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return FALLBACK_EPHEMERAL


def candidates(ephemeral: tuple[int, int] | None = None) -> list[int]:
    """Ports that neither the kernel nor Ray hands out by itself: PREFERRED, else any such port above 1024."""
    return list(_candidates(ephemeral or ephemeral_range()))


@functools.cache
def _candidates(ephemeral: tuple[int, int]) -> tuple[int, ...]:
    avoid = (ephemeral, *RAY_RANGES)

    def allowed(p: int) -> bool:
        return not any(a <= p <= b for a, b in avoid)

    ports = tuple(p for p in range(PREFERRED[0], PREFERRED[1] + 1) if allowed(p))
    return ports or tuple(p for p in range(1025, 65536) if allowed(p))


def is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing listens on (or is bound to) host:port. Without SO_REUSEADDR: a port still in TIME_WAIT counts
    as taken, since Ray's servers may bind without it too."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def choose_port(host: str = "127.0.0.1", *, taken: set[int] | None = None, ephemeral: tuple[int, int] | None = None,
                rng: random.Random | None = None) -> int:
    """A free port outside the ephemeral range and Ray's ranges, not in `taken` (which it is added to).

    In random order rather than the first free one, so two starts at the same moment rarely pick the same port.
    """
    taken = taken if taken is not None else set()
    pool = [p for p in candidates(ephemeral) if p not in taken]
    (rng or random.SystemRandom()).shuffle(pool)
    for port in pool:
        if is_free(port, host):
            taken.add(port)
            return port
    raise RuntimeError(f"no free port outside the ephemeral range {ephemeral or ephemeral_range()} and Ray's ranges")
