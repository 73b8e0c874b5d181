"""Live: deploy/serve_config.yaml on a two-node Ray cluster on this machine, watched by a real Prometheus.

In file order (one cluster for the module): known traffic, Prometheus reports it, the dashboard's metrics exist,
autoscaling up across both nodes and back down, then rolling changes (user_config, model version) under load.
Measured times go to build/deploy-results.json and stdout (`pytest -s`).
"""

from __future__ import annotations

import copy
import json
import re
import time
from typing import Any

import httpx
import pytest
import yaml
from load import Load, png_b64
from localcluster import REPO, LocalCluster, record, validated, wait_until
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow
DASHBOARD = REPO / "deploy" / "grafana" / "attnserve.json"
EXPORT_WAIT_S = 60  # Ray exports replica metrics every 2 s here; Prometheus scrapes every 2 s


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def total(text: str, name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples(text) if n == name and labels.items() <= lab.items())


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in doc["templating"]["list"] if v["type"] == "query"]
    return exprs


# ---------------------------------------------------------------------------------------------- traffic + metrics
N_OK, IMAGES_PER_REQUEST, N_BAD, N_TRANSLATE = 10, 3, 3, 2


@pytest.fixture(scope="module")
def traffic(cluster: LocalCluster) -> dict[str, float]:
    """Send known requests once; return the scraped counters from just before, to compare deltas against."""
    before_text = wait_until("stable baseline", lambda: _stable_scrape(cluster), 60)
    base = {
        "ok": total(before_text, "ray_attnserve_requests_total", route="/v1/classify", status="200"),
        "bad": total(before_text, "ray_attnserve_requests_total", route="/v1/classify", status="422"),
        "images": total(before_text, "ray_attnserve_images_total"),
        "translate": total(before_text, "ray_attnserve_requests_total", route="/v1/translate", status="200"),
    }
    with httpx.Client(base_url=cluster.url, timeout=60) as client:
        for i in range(N_OK):
            body = {"images": [png_b64(10 * i + k) for k in range(IMAGES_PER_REQUEST)]}
            assert client.post("/v1/classify", json=body).status_code == 200
        for _ in range(N_BAD):
            assert client.post("/v1/classify", json={"images": []}).status_code == 422
        for _ in range(N_TRANSLATE):
            r = client.post("/v1/translate", json={"texts": ["Where is the station?", "I like bread."]})
            assert r.status_code == 200, r.text
    return base


def _stable_scrape(cluster: LocalCluster) -> str | None:
    a = cluster.scrape()
    time.sleep(4)  # two export intervals
    b = cluster.scrape()
    key = "ray_attnserve_requests_total"
    return b if total(a, key) == total(b, key) else None


def test_prometheus_reports_the_attnserve_counters_the_traffic_implies(
        cluster: LocalCluster, prometheus: Any, traffic: dict) -> None:
    def up() -> bool:
        # Both nodes' metrics ports, found through Ray's discovery file (which also lists the dashboard's and
        # the autoscaler's own metrics endpoints).
        targets = prometheus.api("targets")["activeTargets"]
        healthy = {t["labels"]["instance"] for t in targets if t["health"] == "up"}
        return healthy >= {f"127.0.0.1:{p}" for p in cluster.metrics_ports}

    wait_until("Prometheus scrapes both nodes found through Ray's discovery file", up, EXPORT_WAIT_S)
    expected = {
        'sum(ray_attnserve_requests_total{route="/v1/classify",status="200"})': traffic["ok"] + N_OK,
        'sum(ray_attnserve_requests_total{route="/v1/classify",status="422"})': traffic["bad"] + N_BAD,
        'sum(ray_attnserve_images_total)': traffic["images"] + N_OK * IMAGES_PER_REQUEST,
        'sum(ray_attnserve_requests_total{route="/v1/translate",status="200"})': traffic["translate"] + N_TRANSLATE,
    }
    got: dict[str, float] = {}

    def matches() -> bool:
        got.update({q: prometheus.scalar(q) for q in expected})
        return got == expected

    try:
        wait_until("Prometheus values equal what was sent", matches, EXPORT_WAIT_S, every_s=2)
    except TimeoutError:
        pytest.fail(f"Prometheus {got} != expected {expected}")
    assert prometheus.scalar('sum(ray_attnserve_errors_total{route="/v1/classify"})') >= N_BAD
    assert prometheus.scalar("sum(ray_attnserve_generated_tokens_total)") > 0
    assert prometheus.scalar("sum(ray_attnserve_input_tokens_total)") > 0


def test_every_dashboard_panel_has_data_in_prometheus(prometheus: Any, traffic: dict) -> None:
    queries = []
    for expr in dashboard_exprs():
        if expr.startswith("label_values("):
            expr = re.fullmatch(r"label_values\((\w+), \w+\)", expr).group(1)
        queries.append(expr.replace("$__rate_interval", "1m").replace("$application", ".*"))
    empty = queries

    def all_have_data() -> bool:
        nonlocal empty
        empty = [q for q in empty if not prometheus.query(q)]
        return not empty

    try:  # a rate needs two samples of a series: counters first seen a moment ago may still be one sample
        wait_until("every dashboard query returns series", all_have_data, 30, every_s=2)
    except TimeoutError:
        pytest.fail(f"dashboard queries with no data: {empty}")


def test_alert_rules_load_and_evaluate_on_real_series(prometheus: Any) -> None:
    def evaluated() -> list[dict] | None:
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else None

    rules = wait_until("rules evaluated", evaluated, 30)
    declared = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert len(rules) == sum(len(g["rules"]) for g in declared["groups"])
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]


def test_every_metric_in_the_dashboard_exists_in_a_real_scrape(cluster: LocalCluster, traffic: dict) -> None:
    names = {n for n, _, _ in samples(wait_until("scrape", cluster.scrape, 10))}
    used = {m for e in dashboard_exprs() for m in re.findall(r"\bray_[a-z0-9_]+", e)}
    assert used, "no metric found in the dashboard"

    def missing() -> set[str]:
        return used - {n for n, _, _ in samples(cluster.scrape())}

    # Counters of a request appear one export interval after it: retry briefly before failing.
    left = used - names
    if left:
        deadline = time.monotonic() + 20
        while left and time.monotonic() < deadline:
            time.sleep(2)
            left = missing()
    assert not left, f"dashboard metrics not exported by the running service: {sorted(left)}"


# ---------------------------------------------------------------------------------------------- autoscaling
def classifier_timeline(cluster: LocalCluster, t0: float) -> tuple[float, int, list[str]]:
    reps = cluster.running_replicas("classifier", "Classifier")
    return round(time.monotonic() - t0, 2), len(reps), sorted({r["node_id"] for r in reps})


def test_autoscaling_up_across_both_nodes_and_back_down(cluster: LocalCluster) -> None:
    auto = next(d for a in cluster.config["applications"] for d in a["deployments"]
                if d["name"] == "Classifier")["autoscaling_config"]
    assert len(cluster.running_replicas("classifier", "Classifier")) == auto["min_replicas"]
    nodes = {n["raylet"]["nodeId"] for n in cluster.nodes()}
    load = Load(f"{cluster.url}/v1/classify", {"images": [png_b64(1)]}, concurrency=8).start()
    timeline, up_s, peak = [], None, (0, [])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            t, n, on = classifier_timeline(cluster, load.t0)
            timeline.append((t, n, len(on)))
            if n >= 2 and up_s is None:
                up_s = t
            if n > peak[0]:
                peak = (n, on)
            if n == auto["max_replicas"]:
                break
            time.sleep(0.5)
        assert up_s is not None, f"never scaled above one replica: {timeline}"
        time.sleep(6)  # keep the load on so every new replica serves, and their metrics are exported
        serving = {lab["replica"] for n, lab, v in samples(cluster.scrape())
                   if n == "ray_attnserve_requests_total" and lab.get("application") == "classifier" and v > 0}
    finally:
        results = load.stop()
    t_stop = time.monotonic()
    down_s, down = None, []
    while time.monotonic() - t_stop < 120:
        t, n, on = classifier_timeline(cluster, t_stop)
        down.append((t, n, len(on)))
        if n == auto["min_replicas"]:
            down_s = t
            break
        time.sleep(0.5)
    failures = [r for r in results if r.status != 200]
    record("autoscaling", {
        "load": "8 closed-loop clients, 1 image per request, /v1/classify",
        "autoscaling_config": auto, "requests": len(results), "failed": len(failures),
        "scale_up_s_load_start_to_2nd_replica_running": up_s, "peak_replicas": peak[0],
        "peak_nodes": len(peak[1]), "replicas_that_served": len(serving),
        "scale_down_s_load_stop_to_min_replicas": down_s,
        "timeline_up": timeline, "timeline_down": down,
    })
    assert not failures, failures[:5]
    assert peak[0] >= 2 and set(peak[1]) == nodes, f"replicas at peak on {peak[1]}, nodes {nodes}"
    assert len(serving) >= 2, f"only {serving} served requests"
    assert down_s is not None, f"did not fall back to {auto['min_replicas']} replica(s): {down}"


# ---------------------------------------------------------------------------------------------- rolling updates
def deploy_and_wait(cluster: LocalCluster, config: dict[str, Any], app: str, deployment: str) -> tuple[float, float]:
    """`serve deploy`, then wait until Serve reports the new config applied and the deployment healthy.
    Returns (seconds the `serve deploy` command took, seconds until applied and healthy)."""
    t_deploy = time.time()
    cli_s = cluster.deploy(validated(config))

    def applied() -> bool:
        a = cluster.applications()[app]
        return (a["last_deployed_time_s"] >= t_deploy - 1 and a["status"] == "RUNNING"
                and a["deployments"][deployment]["status"] == "HEALTHY")

    wait_until(f"{app} updated and healthy", applied, 180)
    return cli_s, time.time() - t_deploy


def classifier_app(config: dict[str, Any]) -> dict[str, Any]:
    return next(a for a in config["applications"] if a["name"] == "classifier")


def batch_hist(cluster: LocalCluster) -> tuple[float, float]:
    text = cluster.scrape()
    return (total(text, "ray_attnserve_batch_size_count", application="classifier"),
            total(text, "ray_attnserve_batch_size_bucket", application="classifier", le="1.0"))


def test_rolling_user_config_and_model_version_under_load(cluster: LocalCluster, second_version: str) -> None:
    old_version = classifier_app(cluster.config)["args"]["classifier"]["version"]
    load = Load(f"{cluster.url}/v1/classify", {"images": [png_b64(2)]}, concurrency=4).start()
    try:
        # 1. user_config: batches capped at one request. Lightweight: replicas reconfigure in place.
        cfg = copy.deepcopy(cluster.config)
        classifier_app(cfg)["deployments"][0]["user_config"]["max_batch_size"] = 1
        batch_cli_s, batch_s = deploy_and_wait(cluster, cfg, "classifier", "Classifier")
        time.sleep(5)  # batches formed before the change are exported within two intervals
        count0, ones0 = batch_hist(cluster)
        time.sleep(8)
        count1, ones1 = batch_hist(cluster)

        # 2. a new model version: the application's args change, so Serve replaces its replicas.
        cfg = copy.deepcopy(cluster.config)
        classifier_app(cfg)["args"]["classifier"]["version"] = second_version
        t_version = time.monotonic() - load.t0
        version_cli_s, version_s = deploy_and_wait(cluster, cfg, "classifier", "Classifier")
        t_done = time.monotonic() - load.t0
        time.sleep(5)
    finally:
        results = load.stop()
    failures = [r for r in results if r.status != 200]
    after = [r.version for r in results if r.t > t_done + 1]
    first_new = min((r.t for r in results if r.version == second_version), default=None)
    record("rolling_update", {
        "load": "4 closed-loop clients, /v1/classify", "requests": len(results), "failed": len(failures),
        "serve_deploy_command_s": [round(batch_cli_s, 1), round(version_cli_s, 1)],
        "user_config_applied_s": round(batch_s, 1), "batches_after_change": count1 - count0,
        "batches_of_one_after_change": ones1 - ones0, "version_rollout_s": round(version_s, 1),
        "first_new_version_response_s_after_deploy": None if first_new is None else round(first_new - t_version, 1),
    })
    assert not failures, failures[:5]
    assert count1 - count0 > 0 and ones1 - ones0 == count1 - count0, (count0, count1, ones0, ones1)
    assert [r.version for r in results if r.t < t_version][:1] == [old_version]
    assert after and set(after) == {second_version}, set(after)
