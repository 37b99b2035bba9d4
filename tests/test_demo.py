"""The demo: its fleet plan, processor settings, view and summary logic offline, and a short
end-to-end run on the real broker."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from stream_asd.config import load_settings
from stream_asd.demo.cache import ModelTiming
from stream_asd.demo.console import Workspace
from stream_asd.demo.errors import DemoError
from stream_asd.demo.options import add_arguments
from stream_asd.demo.processor import processor_env, processor_settings, processor_windows, stream_hop
from stream_asd.demo.summary import format_summary, fleet_summary, run_summary
from stream_asd.demo.view import FleetView, render_table
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
    s = fleet_summary(view)
    assert s["windows_scored"] == 48 and s["rescored_windows"] == 1
    assert (s["faults_injected"], s["faults_caught"]) == (2, 1)
    by_dev = {f["device_id"]: f for f in s["faults"]}
    assert by_dev["fan-01"]["caught"] and by_dev["fan-01"]["alert_delay_s"] == 15.0
    assert by_dev["fan-01"]["first_anomalous_window_delay_s"] == 5.0  # window 35..45 s ends 5 s after onset
    assert not by_dev["fan-02"]["caught"] and by_dev["fan-02"]["false_alerts_before_fault"] == 1
    assert s["healthy_devices_alerted"] == ["fan-00"]
    assert s["false_alarms_on_healthy"] == 1
    assert [(f["device_id"], f["raised_at_s"]) for f in s["false_alarms"]] == [("fan-00", [30.0])]
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


def _demo_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_summary_names_every_false_alarm_on_a_healthy_microphone():
    view = FleetView([("fan-00", "fan"), ("fan-01", "fan"), ("pump-00", "pump")], start_ns=100 * S)
    view.set_fault("fan-01", "bearing@40s", 140 * S)
    view.on_alert(_alert("fan-01", "raised", 144 * S))
    view.on_alert(_alert("fan-00", "raised", 112 * S))
    view.on_alert(_alert("fan-00", "cleared", 120 * S))
    view.on_alert(_alert("fan-00", "raised", 150 * S))
    assert "FALSE ALARM" in view.events[1] and "FALSE ALARM" not in view.events[0]
    plan = SimpleNamespace(sources=[1, 2, 3], machine_types=["fan", "pump"])
    report = SimpleNamespace(sent=30, delivered=30, failed=0, unacknowledged=0)
    s = run_summary(view, plan, report, {"stream": 60.0})
    assert s["ok"] and s["false_alarms_on_healthy"] == 2
    text = format_summary(s)
    assert "false alarms on healthy microphones: 2 (on 1 of 2 healthy microphones" in text
    line = next(x for x in text.splitlines() if "FALSE ALARM" in x)
    assert "fan-00" in line and "alert raised at 12 s, 50 s" in line
    assert "CAUGHT" in text and "RESULT: all injected faults caught" in text


def test_summary_sets_the_calibrations_prediction_beside_the_measured_rate():
    view = FleetView([("fan-00", "fan"), ("fan-01", "fan"), ("pump-00", "pump")], start_ns=0)
    view.set_fault("fan-01", "bearing@40s", 40 * S)
    view.on_alert(_alert("fan-00", "raised", 12 * S))
    plan = SimpleNamespace(sources=[1, 2, 3], machine_types=["fan", "pump"])
    s = run_summary(view, plan, None, {"stream": 8640.0}, {"fan": 0.1, "pump": 0.3})
    p = s["predicted_false_alarms"]
    # two healthy microphones (fan-00 at 0.1/day, pump-00 at 0.3/day) for a tenth of a day each
    assert p["expected_in_run"] == pytest.approx(0.04) and p["healthy_device_days"] == pytest.approx(0.2)
    assert p["measured_per_device_day"] == pytest.approx(5.0)  # 1 false alert in 0.2 device-days
    assert "0.1-0.3 false alerts per device-day, 0.0400 expected in this run" in format_summary(s)
    assert run_summary(view, plan, None, {"stream": 60.0})["predicted_false_alarms"] is None


def test_no_fault_injected_or_one_missed_is_not_ok():
    plan = SimpleNamespace(sources=[1], machine_types=["fan"])
    view = FleetView([("fan-00", "fan")])
    assert not run_summary(view, plan, None, {})["ok"]
    view.set_fault("fan-00", "bearing@40s", 40 * S)
    view.on_alert(_alert("fan-00", "raised", 39 * S))  # before the onset: not a catch
    s = run_summary(view, plan, None, {})
    assert not s["ok"] and "MISSED" in format_summary(s) and "1 alert(s) before onset" in format_summary(s)


def test_processor_settings_file_carries_the_demo_settings_but_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("ASD_BATCH__MAX_SIZE", "7")  # the user's environment reaches the processor via the file
    monkeypatch.setenv("ASD_KAFKA__SASL_PASSWORD", "s3cret")
    settings = load_settings(None, {"kafka": {"bootstrap": "127.0.0.1:1234"}, "topics": {"audio": "asd.audio.r1"},
                                    "window": {"seconds": 1.0, "hop_seconds": 1.0}})
    ws = Workspace(tmp_path, "r1")
    path = tmp_path / "processor.json"
    path.write_text(json.dumps(processor_settings(settings, tmp_path / "model", 9109, ws)))
    assert "s3cret" not in path.read_text() and "**********" not in path.read_text()
    env = processor_env(settings, {"PATH": "/bin", "ASD_BATCH__MAX_SIZE": "7", "ASD_CONFIG": "/elsewhere.toml",
                                   "ASD_KAFKA__SASL_PASSWORD": "s3cret"})
    assert env == {"PATH": "/bin", "ASD_KAFKA__SASL_PASSWORD": "s3cret"}
    for name in list(os.environ):
        if name.startswith("ASD_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    got = load_settings(path)  # what `stream-asd process --config FILE` resolves
    assert got.kafka.bootstrap == "127.0.0.1:1234" and got.topics.audio == "asd.audio.r1"
    assert (got.window.seconds, got.window.hop_seconds, got.batch.max_size) == (1.0, 1.0, 7)
    assert got.model.bundle == tmp_path / "model" and got.metrics.port == 9109
    assert got.processor.group_id == "demo-r1" and got.processor.datadir == ws.logs / "processor-data"
    assert got.kafka.sasl_password.get_secret_value() == "s3cret"


def test_processor_windows_follow_the_model():
    audio = load_settings(None, {"audio": {"chunk_seconds": 1.0}}).audio
    assert processor_windows(_demo_args(), ModelTiming(1.0, audio.sample_rate), audio) == (1.0, 1.0)
    assert processor_windows(_demo_args(), ModelTiming(4.0, audio.sample_rate), audio) == (4.0, 2.0)
    assert processor_windows(_demo_args("--hop", "3"), ModelTiming(2.0, audio.sample_rate), audio) == (2.0, 2.0)
    # the hop the model's thresholds were calibrated for wins over half a window
    assert processor_windows(_demo_args(), ModelTiming(4.0, audio.sample_rate, 1.0), audio) == (4.0, 1.0)
    assert stream_hop(_demo_args(), audio) == 1.0 and stream_hop(_demo_args("--hop", "2"), audio) == 2.0
    with pytest.raises(DemoError, match="--window 2 differs"):
        processor_windows(_demo_args("--window", "2"), ModelTiming(1.0, audio.sample_rate), audio)
    with pytest.raises(DemoError, match="features.sample_rate"):
        processor_windows(_demo_args(), ModelTiming(1.0, audio.sample_rate * 2), audio)


def test_fleet_plan_spreads_faults_over_machine_types_and_deals_real_clips(tmp_path):
    pytest.importorskip("stream_asd.audio.synth")
    from stream_asd.demo.console import Console
    from stream_asd.demo.fleet import REAL_FOLDER, plan_fleet

    real = tmp_path / REAL_FOLDER
    real.mkdir(parents=True)
    for i in range(10):
        (real / f"normal_{i:02d}.wav").write_bytes(b"")
    args = _demo_args("--devices", "16", "--faulty", "3", "--duration", "100", "--realdata", str(tmp_path),
                      "--real-train-clips", "24")
    plan = plan_fleet(args, 16_000, Console(plain=True))
    faults = plan.faults()
    assert len(faults) == 3 and all(at == 40.0 for _, at in faults.values())
    # fleet indexes 1, 7, 13 of a round-robin fleet of 4 types: pump, valve, pump; bearing/rubbing alternate
    assert {d: label for d, (label, _) in faults.items()} == {
        "pump-id_00": "bearing@40s", "valve-id_01": "rubbing@40s", "pump-id_03": "bearing@40s"}
    assert len(plan.sources) == 18 and [s.machine_type for s in plan.real] == ["realmachine"] * 2
    assert [p.name for p in plan.real_clips.train] == [f"normal_{i:02d}.wav" for i in range(6)]
    assert [p.name for p in plan.real_clips.replay] == [f"normal_{i:02d}.wav" for i in range(6, 10)]


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
