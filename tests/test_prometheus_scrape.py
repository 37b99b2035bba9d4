"""A real Prometheus (Debian package) scrapes stream-asd metrics on loopback and evaluates
deploy/prometheus/rules.yml; the recording rules and alert expressions give the values the
emitter's known rates imply (tests/metrics_emitter.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
TOOLS_BIN = Path(os.environ.get("STREAM_ASD_TOOLS", Path.home() / ".cache" / "stream-asd-tools")) / "bin"


def _prometheus() -> str:
    for candidate in (TOOLS_BIN / "prometheus", shutil.which("prometheus")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    message = "prometheus not installed: run `make ops-tools` (scripts/install-ops-tools.sh)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _wait(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except OSError as exc:  # server not up yet
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    binary = _prometheus()
    work = tmp_path_factory.mktemp("prometheus")
    processor_port, producer_port, web_port = _free_port(), _free_port(), _free_port()
    emitter = subprocess.Popen([sys.executable, str(ROOT / "tests" / "metrics_emitter.py"),
                                str(processor_port), str(producer_port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    config = work / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "stream-asd-processor", "static_configs": [{"targets": [f"127.0.0.1:{processor_port}"]}]},
            {"job_name": "stream-asd-producer", "static_configs": [{"targets": [f"127.0.0.1:{producer_port}"]}]},
        ],
    }))
    server = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
                               f"--web.listen-address=127.0.0.1:{web_port}", "--log.level=warn"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{web_port}"
    try:
        assert emitter.stdout.readline().strip() == "ready", emitter.stderr.read()
        _wait(lambda: urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200, 30, "Prometheus ready")
        yield base, emitter
    finally:
        for proc in (server, emitter):
            proc.terminate()
        for proc in (server, emitter):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def query(base: str, expr: str) -> list[dict]:
    data = _get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert data["status"] == "success", data
    return data["data"]["result"]


def query_at(base: str, expr: str, at: float) -> list[dict]:
    data = _get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": at}))
    assert data["status"] == "success", data
    return data["data"]["result"]


def scalar(base: str, expr: str) -> float:
    result = query(base, expr)
    assert len(result) == 1, f"{expr}: expected one series, got {result}"
    return float(result[0]["value"][1])


def test_rules_and_alerts_on_a_real_scrape(prometheus):
    base, emitter = prometheus
    # Enough history for stable rates: >= 8 s of 1 s scrapes, and the reload failure scraped.
    _wait(lambda: query(base, 'count_over_time(asd_windows_scored_total[1m]) >= 8'), 40, "8 scrapes")
    # A failed model reload after Prometheus has seen the counter at 0 (an increase to alert on).
    _wait(lambda: query(base, 'asd_model_reloads_total{result="failure"} == 0'), 20, "the counter at 0")
    emitter.send_signal(signal.SIGUSR1)
    _wait(lambda: query(base, 'asd_model_reloads_total{result="failure"} >= 1'), 20, "the reload failure")
    time.sleep(2.0)  # two more rule evaluations on the latest samples

    # Every rule evaluated without error.
    groups = _get(f"{base}/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) >= 20
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad

    # Rate rules: with ~10 s of history in a 5 min range, rate() is the increase over the
    # samples (plus a little extrapolation at the edges) divided by 300 s, not 40/s yet. So:
    # the raw samples grow at the emitter's rate, and rule x 300 is their increase.
    for rule, counter, per_second in (("asd:windows_scored:rate5m", "asd_windows_scored_total", 40.0),
                                      ("asd:chunks_consumed:rate5m", "asd_chunks_consumed_total", 100.0),
                                      ("asd:producer_delivered:rate5m", "asd_producer_delivered_total", 100.0)):
        [recorded] = query(base, f'{rule}{{machine_type="fan"}}[10s]')  # samples with their own times
        at, rate = recorded["values"][-1][0], float(recorded["values"][-1][1])
        [raw] = query_at(base, f'{counter}{{machine_type="fan"}}[5m]', at)
        (t0, v0), (t1, v1) = raw["values"][0], raw["values"][-1]
        increase, span = float(v1) - float(v0), t1 - t0
        assert span >= 6 and increase / span == pytest.approx(per_second, rel=0.10), (counter, increase, span)
        assert increase * 0.999 <= rate * 300 <= increase * 1.25, (rule, rate, increase)
    scored_per_consumed = scalar(base, "sum(asd:windows_scored:rate5m) / sum(asd:chunks_consumed:rate5m)")
    assert scored_per_consumed == pytest.approx(0.4, abs=0.03)
    delivered_per_consumed = scalar(base, "sum(asd:producer_delivered:rate5m) / sum(asd:chunks_consumed:rate5m)")
    # two targets scraped at different phases: the edge extrapolation differs by up to ~1 s
    # of ~10 s of history
    assert delivered_per_consumed == pytest.approx(1.0, abs=0.15)
    assert scalar(base, 'asd:anomalous_windows:ratio_rate5m{machine_type="fan"}') == pytest.approx(0.25, abs=0.02)
    assert scalar(base, "asd:dlq_messages:ratio_rate5m") == pytest.approx(0.10, abs=0.01)
    # all latencies 2.0 s: in the (1, 2] bucket, p95 interpolates to 1 + 0.95 = 1.95 s
    assert scalar(base, 'asd:capture_to_score_seconds:p95_rate5m{machine_type="fan"}') == pytest.approx(1.95, abs=1e-9)
    assert scalar(base, "asd:batch_size_windows:mean_rate5m") == pytest.approx(16.0, abs=1e-9)
    assert scalar(base, "asd:processor_up:sum") == 1.0
    assert scalar(base, "asd:model_loaded_age_seconds") == pytest.approx(9 * 86400, abs=120)
    active = {r["metric"]["machine_type"]: float(r["value"][1]) for r in query(base, "asd:alerts_active:sum")}
    assert active == {"fan": 2.0, "pump": 0.0}

    # Alert expressions, straight from the rules file: only the fans are anomalous.
    alert_exprs = {r["name"]: r["query"] for r in rules if r["type"] == "alerting"}
    anomaly = query(base, alert_exprs["AsdMachineAnomaly"])
    assert [(r["metric"]["machine_type"], float(r["value"][1])) for r in anomaly] == [("fan", 2.0)]
    assert query(base, alert_exprs["AsdProcessorDown"]) == []
    assert query(base, alert_exprs["AsdProcessorAbsent"]) == []
    assert query(base, alert_exprs["AsdScoringStalled"]) == []
    dlq = query(base, alert_exprs["AsdDeadLetterRateHigh"])
    assert len(dlq) == 1 and float(dlq[0]["value"][1]) == pytest.approx(0.10, abs=0.01)

    # And the alert states Prometheus itself holds.
    alerts = {(a["labels"]["alertname"], a["state"]) for a in _get(f"{base}/api/v1/alerts")["data"]["alerts"]}
    assert ("AsdModelReloadFailed", "firing") in alerts  # no `for`: fires at once
    assert ("AsdMachineAnomaly", "pending") in alerts  # for: 1m
    assert ("AsdModelStale", "pending") in alerts  # for: 1h
    names = {name for name, _ in alerts}
    assert not names & {"AsdProcessorDown", "AsdProcessorAbsent", "AsdScoringStalled", "AsdAudioNotConsumed",
                        "AsdNoModelLoaded"}, alerts
