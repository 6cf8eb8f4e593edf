"""A real Prometheus server scrapes the local stack after the demo batch, with the alert rules loaded.

Real processes throughout: the CLI's stack (embedded S3 server, Ray head, coordinator and retention
controller) under a temporary $HEADSHOTS_HOME, and Debian's `prometheus` on loopback with a 1 s
scrape interval. Everything is read back through Prometheus' HTTP API, as Grafana would.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from contextlib import closing
from pathlib import Path

import pytest
import yaml

from tests.e2e.test_cli_demo import DEMO_NAMES, IMAGES_PER_STYLE, STYLES, run_cli

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "monitoring" / "alerts" / "rules.yaml"
READY_TIMEOUT_S = 60
RULES_SETTLE_S = 15
STOP_GRACE_S = 10


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _port_of(url: str) -> int:
    port = urllib.parse.urlsplit(url).port
    assert port, f"no port in {url!r}"
    return port


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e-prometheus") / "home"
    try:
        demo = json.loads(run_cli(home, "demo", "--json", "-o", str(home.parent / "out")).stdout)
        env = json.loads(run_cli(home, "env", "--json").stdout)
        yield demo, env
    finally:
        run_cli(home, "down", check=False, timeout=120)


@pytest.fixture(scope="module")
def prometheus(stack, tmp_path_factory):
    binary = shutil.which("prometheus")
    if not binary:
        pytest.fail("prometheus is not installed: run `bash scripts/setup.sh` as root "
                    "(it installs the Debian `prometheus` package)")
    _, env = stack
    workdir = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "headshots-coordinator",
             "static_configs": [{"targets": [f"127.0.0.1:{_port_of(env['metrics_url'])}"]}]},
            {"job_name": "headshots-retention",
             "static_configs": [{"targets": [f"127.0.0.1:{_port_of(env['retention_metrics_url'])}"]}]},
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = open(workdir / "prometheus.log", "wb")
    process = subprocess.Popen(
        [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        api = f"http://127.0.0.1:{port}"
        _wait_until(lambda: _get(f"{api}/-/ready") is not None, "Prometheus ready", workdir)
        yield api, workdir
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_GRACE_S)
        log.close()


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read()
    except OSError:
        return None


def _wait_until(condition, what: str, workdir: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    log = (workdir / "prometheus.log").read_text(errors="replace")[-3000:]
    raise AssertionError(f"{what}: not within {READY_TIMEOUT_S} s; Prometheus log:\n{log}")


def query(api: str, promql: str) -> list[dict]:
    body = _get(f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert body is not None, f"Prometheus did not answer the query {promql!r}"
    answer = json.loads(body)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def value(api: str, promql: str) -> float:
    result = query(api, promql)
    assert len(result) == 1, f"{promql}: expected one series, got {result}"
    return float(result[0]["value"][1])


@pytest.fixture(scope="module")
def scraped(prometheus):
    api, workdir = prometheus
    # Both targets up and the demo's figures in: custom metrics show after a few scrapes.
    _wait_until(lambda: len(query(api, "up == 1")) == 2 and query(api, "headshots_batches_submitted_total")
                and query(api, "headshots_retention_last_success_timestamp_seconds"), "both targets scraped", workdir)
    return api


def test_the_pipeline_metrics_show_the_demo_batch(scraped):
    # Counters: the persons gauge only counts batches still running, and the demo has finished.
    assert value(scraped, "headshots_batches_submitted_total") >= 1
    assert "done" in {series["metric"]["state"] for series in query(scraped, "headshots_persons")}
    assert value(scraped, "sum(headshots_images_generated_total)") >= len(DEMO_NAMES) * len(STYLES) * IMAGES_PER_STYLE
    assert value(scraped, "sum(headshots_training_steps_total)") > 0
    assert value(scraped, 'sum(headshots_stage_duration_seconds_count{stage="train"})') >= len(DEMO_NAMES)


def test_the_privacy_metrics_show_a_healthy_retention_controller(scraped):
    overdue = query(scraped, "headshots_retention_overdue_objects")
    assert {series["metric"]["artifact"] for series in overdue} >= {"uploads", "derived", "models"}
    assert sum(float(series["value"][1]) for series in overdue) == 0
    # The controller sweeps as it starts: the last success is recent, within the configured interval.
    since_last_sweep = value(scraped, "time() - headshots_retention_last_success_timestamp_seconds")
    assert 0 <= since_last_sweep < value(scraped, "headshots_retention_sweep_interval_seconds")
    assert value(scraped, "headshots_deletion_oldest_pending_request_age_seconds") == 0


def test_the_alert_rules_load_and_evaluate_quietly_on_a_healthy_stack(scraped):
    rules_answer = json.loads(_get(f"{scraped}/api/v1/rules"))
    loaded = [rule for group in rules_answer["data"]["groups"] for rule in group["rules"]]
    expected = [rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    assert sorted(rule["name"] for rule in loaded) == sorted(expected)
    # Rules evaluated before the first scrape saw no data (the "metrics absent" alert goes pending):
    # give them a few evaluations with data. An alert that is really due stays pending and fails below.
    deadline = time.monotonic() + RULES_SETTLE_S
    while time.monotonic() < deadline and any(
            rule.get("health") != "ok" or rule["state"] != "inactive" for rule in loaded):
        time.sleep(0.5)
        loaded = [rule for group in json.loads(_get(f"{scraped}/api/v1/rules"))["data"]["groups"]
                  for rule in group["rules"]]
    assert {rule["name"]: (rule["health"], rule.get("lastError", "")) for rule in loaded} == {
        name: ("ok", "") for name in expected}
    assert [rule["name"] for rule in loaded if rule["state"] != "inactive"] == []
