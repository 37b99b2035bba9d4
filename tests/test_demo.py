"""The demo: its view/summary logic offline, and a short end-to-end run on the real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream_asd.demo import FleetView, format_summary, render_table
from stream_asd.wire import AlertRecord, ScoreRecord

S = 1_000_000_000


def _score(dev, k, score, thr=1.0, t0=0, latency=1.5):
    return ScoreRecord(device_id=dev, machine_type="fan", window_id=f"{dev}:{k}-{k + 9}", first_seq=k, last_seq=k + 9,
                       window_start_ns=t0 + k * S, window_end_ns=t0 + (k + 10) * S, score=score, scores={"fusion": score},
                       threshold=thr, is_anomaly=score > thr, model_version="v1", scored_at_ns=t0 + (k + 11) * S,
                       capture_to_score_s=latency)


def _alert(dev, state, at_ns):
    return AlertRecord(alert_id="a", device_id=dev, machine_type="fan", state=state, window_id=f"{dev}:x",
                       score=3.0, threshold=1.0, windows_over=3, windows_seen=5, model_version="v1", at_ns=at_ns)


def test_fleet_view_counts_caught_faults_false_alerts_and_rescores():
    view = FleetView([("fan-00", "fan"), ("fan-01", "fan"), ("fan-02", "fan")])
    view.set_fault("fan-01", "bearing@40s", 40 * S)
    view.set_fault("fan-02", "imbalance@40s", 40 * S)
    for k in range(0, 80, 5):
        view.on_score(_score("fan-00", k, 0.2, latency=1.0))
        view.on_score(_score("fan-01", k, 3.0 if k >= 35 else 0.1, latency=2.0))
        view.on_score(_score("fan-02", k, 0.3, latency=3.0))
    view.on_score(_score("fan-00", 0, 0.2))  # a re-score of a window already seen
    view.on_alert(_alert("fan-01", "raised", 55 * S))
    view.on_alert(_alert("fan-00", "raised", 30 * S))  # a healthy device alerted: a false alarm
    view.on_alert(_alert("fan-02", "raised", 20 * S))  # before its fault: does not count as caught
    s = view.summary()
    assert s["windows_scored"] == 48 and s["rescored_windows"] == 1
    assert (s["faults_injected"], s["faults_caught"]) == (2, 1)
    by_dev = {f["device_id"]: f for f in s["faults"]}
    assert by_dev["fan-01"]["caught"] and by_dev["fan-01"]["alert_delay_s"] == 15.0
    assert by_dev["fan-01"]["first_anomalous_window_delay_s"] == 5.0  # window 35..45 s ends 5 s after onset
    assert not by_dev["fan-02"]["caught"] and by_dev["fan-02"]["false_alerts_before_fault"] == 1
    assert s["healthy_devices_alerted"] == ["fan-00"]
    assert s["latency_s"]["p50"] == 2.0 and s["latency_s"]["max"] == 3.0
    assert s["anomalous_windows"] == 9


def test_table_flags_alerts_in_colour_and_stays_plain_otherwise():
    view = FleetView([("fan-00", "fan"), ("fan-01", "fan")])
    view.on_score(_score("fan-00", 0, 0.1))
    view.on_score(_score("fan-01", 0, 5.0))
    view.on_alert(_alert("fan-01", "raised", 1))
    coloured = render_table(view, "hdr", color=True)
    plain = render_table(view, "hdr", color=False)
    assert "\x1b[" not in plain and "ALERT" in plain and "ok" in plain
    alert_line = next(line for line in coloured.splitlines() if line.startswith("fan-01"))
    assert "\x1b[1m\x1b[31mALERT" in alert_line  # bold red
    assert "\x1b[31m" not in next(line for line in coloured.splitlines() if line.startswith("fan-00"))


@pytest.mark.slow
def test_short_demo_catches_the_injected_faults(kafka_broker, tmp_path):
    pytest.importorskip("stream_asd.audio.synth")
    pytest.importorskip("stream_asd.processor.cli")
    summary_path = tmp_path / "summary.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "stream_asd.cli", "demo", "--bootstrap", kafka_broker.bootstrap,
         "--workdir", str(tmp_path / "work"), "--devices", "16", "--faulty", "2", "--duration", "60",
         "--fault-at", "20", "--clips-per-device", "4", "--real-devices", "0", "--metrics-port", "0", "--plain",
         "--summary-json", str(summary_path)],
        capture_output=True, text=True, timeout=290, env=env)
    wall = time.monotonic() - t0
    assert summary_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads(summary_path.read_text())
    assert proc.returncode == 0, format_summary(s) + proc.stderr[-2000:]
    assert s["devices"] == 16 and len(s["machine_types"]) >= 2
    assert s["faults_injected"] == 2 and s["faults_caught"] == 2
    assert s["chunks"]["sent"] == s["chunks"]["delivered"] == 16 * 60 and s["chunks"]["failed"] == 0
    assert s["windows_scored"] >= 16 * 5  # >= 5 windows per device in 60 s (10 s windows, 5 s hop)
    assert s["latency_s"]["p50"] is not None and s["latency_s"]["p50"] < 30
    assert wall < 300
