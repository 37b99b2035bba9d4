"""``stream-asd demo``: the whole system on one machine, from nothing to caught faults.

Steps (each timed and printed):

1. Kafka: reuse the broker of ``stream-asd broker start`` when it runs, else start a local
   Apache Kafka (KRaft) for the demo only; create this run's topics.
2. Training data: normal audio of every synthetic microphone of the fleet (rendered at stream
   times the demo never streams) in the DCASE2020 layout, plus real normal clips from
   ``--realdata`` (default ../shared/realdata when present; skipped when absent).
3. Model: ``asd-train fit --profile tiny|cpu`` (a subprocess); cached in the work folder and
   reused when the data and profile are unchanged.
4. Stream processor: ``stream-asd process`` (a subprocess) with this run's topics and bundle.
5. Fleet: one producer agent (a thread of this process) streams >= 16 microphones in real time,
   faults injected into some of them at known stream times; live terminal view of the scores
   and alerts (colours on a TTY, plain lines otherwise); /metrics of the producer and processor.
6. Summary: windows scored, anomalies caught vs injected per device, latency p50/p99. Exit 0
   only when every injected fault raised an alert on its device after the fault began.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AsdError

log = logging.getLogger(__name__)

SHARED_REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
DEFAULT_WORKDIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stream-asd" / "demo"
REAL_MACHINE_TYPE = "realmachine"  # the DCASE2020 machine of shared/realdata unknown_zyy438
REAL_FOLDER = "clips/dcase2020/unknown_zyy438"


class DemoError(AsdError):
    """A step of the demo failed; the message says which and where its log is."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, default=16, help="synthetic microphones (default 16)")
    parser.add_argument("--machine-types", default=None, metavar="T1,T2",
                        help="machine types of the fleet (default: all the generator knows, up to 4)")
    parser.add_argument("--faulty", type=int, default=3, help="devices that get a fault (default 3)")
    parser.add_argument("--fault", action="append", default=[], metavar="DEVICE:TYPE:AT[:SEVERITY]",
                        help="explicit fault (replaces --faulty), as for stream-asd produce")
    parser.add_argument("--fault-at", type=float, default=None, metavar="S",
                        help="stream second at which faults begin (default: 40%% of --duration)")
    parser.add_argument("--severity", type=float, default=1.0, help="fault severity (default 1.0)")
    parser.add_argument("--duration", type=float, default=120.0, metavar="S", help="seconds of streaming (default 120)")
    parser.add_argument("--keep-running", action="store_true", help="stream until Ctrl-C (faults stay injected)")
    parser.add_argument("--real-devices", type=int, default=2,
                        help="extra microphones replaying real normal clips from --realdata (default 2; 0: none)")
    parser.add_argument("--realdata", type=Path, default=None,
                        help=f"folder of the real clips (default {SHARED_REALDATA} when present)")
    parser.add_argument("--real-train-clips", type=int, default=24, help="real normal clips to train on (default 24)")
    parser.add_argument("--clips-per-device", type=int, default=6, help="10 s training clips per synthetic device")
    parser.add_argument("--profile", default="tiny", choices=["tiny", "cpu"], help="training profile (default tiny)")
    parser.add_argument("--train-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a training profile value (asd-train fit --set)")
    parser.add_argument("--device-thresholds", action="store_true",
                        help="let the trainer calibrate per-device thresholds (off: one threshold per machine "
                             "type; the demo's few held-out windows per device make per-device quantiles noisy)")
    parser.add_argument("--retrain", action="store_true", help="train even when a cached model matches")
    parser.add_argument("--window", type=float, default=None, metavar="S",
                        help="scored window; must equal the model's (default: the model's window)")
    parser.add_argument("--hop", type=float, default=None, metavar="S",
                        help="hop between windows (default: half a window, at least one chunk)")
    parser.add_argument("--bootstrap", default=None, help="use this Kafka instead of a local broker")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="data, model, logs (default %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=9108,
                        help="producer /metrics port; the processor uses the next one (0: off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fleet")
    parser.add_argument("--plain", action="store_true", help="no colours / screen redraws even on a TTY")
    parser.add_argument("--summary-json", type=Path, default=None, help="write the summary as JSON here")


# ---------------------------------------------------------------------------------------------
# Live view and summary: pure functions of the records seen, so they are testable offline.


@dataclass
class DeviceView:
    device_id: str
    machine_type: str
    fault: str = ""  # "bearing@40s" for injected faults
    fault_start_ns: int | None = None
    score: float | None = None
    threshold: float | None = None
    is_anomaly: bool = False
    windows: int = 0
    anomalous: int = 0
    alert: bool = False
    alerts_raised: int = 0
    first_alert_ns: int | None = None  # first raise after the fault began (faulty devices)
    first_anomaly_end_ns: int | None = None  # first anomalous window ending after the fault began
    false_alerts: int = 0  # raises before the fault (or on a healthy device)
    window_ids: set = field(default_factory=set)

    def state(self) -> str:
        if self.alert:
            return "ALERT"
        if self.windows == 0:
            return "waiting"
        return "anomalous" if self.is_anomaly else "ok"


class FleetView:
    """Scores and alerts of the run, per device, plus the latencies."""

    def __init__(self, devices: list[tuple[str, str]]):
        self.devices = {d: DeviceView(d, t) for d, t in devices}
        self.latencies: list[float] = []
        self.rescored = 0
        self.events: list[str] = []  # alert changes, for the plain view

    def set_fault(self, device_id: str, label: str, start_ns: int) -> None:
        v = self.devices[device_id]
        v.fault, v.fault_start_ns = label, start_ns

    def on_score(self, rec) -> None:
        v = self.devices.get(rec.device_id)
        if v is None:
            v = self.devices[rec.device_id] = DeviceView(rec.device_id, rec.machine_type)
        if rec.window_id in v.window_ids:  # a re-score after a restart: recognisable, not counted twice
            self.rescored += 1
            return
        v.window_ids.add(rec.window_id)
        v.windows += 1
        v.score, v.threshold, v.is_anomaly = rec.score, rec.threshold, bool(rec.is_anomaly)
        self.latencies.append(float(rec.capture_to_score_s))
        if rec.is_anomaly:
            v.anomalous += 1
            if v.fault_start_ns is not None and rec.window_end_ns > v.fault_start_ns and v.first_anomaly_end_ns is None:
                v.first_anomaly_end_ns = rec.window_end_ns

    def on_alert(self, rec) -> None:
        v = self.devices.get(rec.device_id)
        if v is None:
            v = self.devices[rec.device_id] = DeviceView(rec.device_id, rec.machine_type)
        if rec.state == "raised":
            v.alert = True
            v.alerts_raised += 1
            if v.fault_start_ns is not None and rec.at_ns >= v.fault_start_ns:
                if v.first_alert_ns is None:
                    v.first_alert_ns = rec.at_ns
            else:
                v.false_alerts += 1
        else:
            v.alert = False
        self.events.append(f"{rec.state.upper():7s} {rec.device_id} ({rec.machine_type}) score {rec.score:.2f} "
                           f"> {rec.threshold:.2f} in {rec.windows_over}/{rec.windows_seen} windows")

    @property
    def windows_scored(self) -> int:
        return sum(v.windows for v in self.devices.values())

    def percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]

    def summary(self) -> dict[str, Any]:
        faults = []
        for v in self.devices.values():
            if v.fault_start_ns is None:
                continue
            faults.append({
                "device_id": v.device_id, "machine_type": v.machine_type, "fault": v.fault,
                "caught": v.first_alert_ns is not None,
                "alert_delay_s": None if v.first_alert_ns is None else round((v.first_alert_ns - v.fault_start_ns) / 1e9, 1),
                "first_anomalous_window_delay_s": None if v.first_anomaly_end_ns is None
                else round((v.first_anomaly_end_ns - v.fault_start_ns) / 1e9, 1),
                "windows": v.windows, "anomalous_windows": v.anomalous, "false_alerts_before_fault": v.false_alerts,
            })
        healthy = [v for v in self.devices.values() if v.fault_start_ns is None]
        caught = sum(f["caught"] for f in faults)
        return {
            "windows_scored": self.windows_scored,
            "rescored_windows": self.rescored,
            "anomalous_windows": sum(v.anomalous for v in self.devices.values()),
            "latency_s": {"p50": _round(self.percentile(50)), "p99": _round(self.percentile(99)),
                          "max": _round(max(self.latencies) if self.latencies else None)},
            "faults_injected": len(faults),
            "faults_caught": caught,
            "faults": faults,
            "healthy_devices": len(healthy),
            "healthy_devices_alerted": sorted(v.device_id for v in healthy if v.alerts_raised),
            "healthy_anomalous_windows": sum(v.anomalous for v in healthy),
            "healthy_windows": sum(v.windows for v in healthy),
            "per_device": {v.device_id: {"machine_type": v.machine_type, "windows": v.windows,
                                         "anomalous": v.anomalous, "alerts": v.alerts_raised,
                                         "last_score": _round(v.score), "threshold": _round(v.threshold),
                                         "fault": v.fault or None}
                           for v in self.devices.values()},
        }


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


RESET, BOLD, DIM, RED, GREEN, YELLOW, CYAN = "\x1b[0m", "\x1b[1m", "\x1b[2m", "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[36m"


def render_table(view: FleetView, header: str, color: bool) -> str:
    """The live table: device, machine type, last score, threshold, windows, state."""

    def paint(text: str, *codes: str) -> str:
        return "".join(codes) + text + RESET if color else text

    lines = [paint(header, BOLD), ""]
    lines.append(f"{'DEVICE':<22} {'MACHINE TYPE':<13} {'SCORE':>8} {'THRESH':>8} {'WINDOWS':>7} {'ANOM':>5}  "
                 f"{'STATE':<10} INJECTED")
    for v in sorted(view.devices.values(), key=lambda d: (d.machine_type, d.device_id)):
        score = f"{v.score:8.2f}" if v.score is not None else f"{'-':>8}"
        thr = f"{v.threshold:8.2f}" if v.threshold is not None else f"{'-':>8}"
        state = v.state()
        cell = f"{state:<10}"
        if state == "ALERT":
            cell = paint(cell, BOLD, RED)
            score = paint(score, BOLD, RED)
        elif state == "anomalous":
            cell = paint(cell, YELLOW)
            score = paint(score, YELLOW)
        elif state == "ok":
            cell = paint(cell, GREEN)
        else:
            cell = paint(cell, DIM)
        fault = paint(v.fault, CYAN) if v.fault else ""
        lines.append(f"{v.device_id:<22} {v.machine_type:<13} {score} {thr} {v.windows:>7} {v.anomalous:>5}  "
                     f"{cell} {fault}")
    return "\n".join(lines)


def format_summary(s: dict[str, Any]) -> str:
    lat = s["latency_s"]
    out = [
        "",
        "=== stream-asd demo summary ===",
        f"devices {s['devices']} ({', '.join(s['machine_types'])}), streamed {s['stream_seconds']:.0f} s, "
        f"chunks sent {s['chunks']['sent']}, delivered {s['chunks']['delivered']}, failed {s['chunks']['failed']}",
        f"windows scored {s['windows_scored']} (re-scored {s['rescored_windows']}), anomalous {s['anomalous_windows']}; "
        f"capture-to-score latency p50 {_fmt(lat['p50'])} s, p99 {_fmt(lat['p99'])} s",
        f"faults caught {s['faults_caught']} of {s['faults_injected']} injected:",
    ]
    for f in s["faults"]:
        mark = "CAUGHT " if f["caught"] else "MISSED "
        delay = f"alert {f['alert_delay_s']} s after onset" if f["caught"] else "no alert after onset"
        out.append(f"  {mark} {f['device_id']:<20} {f['machine_type']:<12} {f['fault']:<18} {delay}; "
                   f"{f['anomalous_windows']}/{f['windows']} windows anomalous")
    out.append(f"healthy devices: {s['healthy_devices']}, alerted: {len(s['healthy_devices_alerted'])} "
               f"{s['healthy_devices_alerted'] or ''}; anomalous windows {s['healthy_anomalous_windows']}"
               f"/{s['healthy_windows']}")
    out.append("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in s["timings_s"].items()))
    out.append("RESULT: " + ("all injected faults caught" if s["ok"] else "NOT all injected faults were caught"))
    return "\n".join(out)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


# ---------------------------------------------------------------------------------------------
# Orchestration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_or_free(port: int) -> int:
    if port == 0:
        return 0
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            return _free_port()


def _training_code_hash() -> str:
    """Hash of the trainer's and the model's sources (read, not imported: stream_asd never imports
    trainer), so a cached model is retrained when the training code changes."""
    import hashlib
    import importlib.util

    h = hashlib.sha256()
    for pkg in ("trainer", "stream_asd.model"):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        for folder in spec.submodule_search_locations:
            for path in sorted(Path(folder).glob("*.py")):
                h.update(path.name.encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.workdir: Path = args.workdir.expanduser().resolve()
        self.run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]
        self.logs = self.workdir / "runs" / self.run_id
        self.timings: dict[str, float] = {}
        self.broker = None  # LocalBroker we started (stopped at the end)
        self.bootstrap: str | None = None
        self.processor: subprocess.Popen | None = None
        self.agent = None
        self.agent_thread: threading.Thread | None = None
        self.report = None
        self.color = sys.stdout.isatty() and not args.plain and os.environ.get("TERM") != "dumb"
        self._interrupted = False
        self.producer_error: Exception | None = None

    # -- steps ------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(f"{BOLD if self.color else ''}[demo]{RESET if self.color else ''} {text}", flush=True)

    def step(self, name: str):
        demo = self

        class _Step:
            def __enter__(self):
                self.t0 = time.monotonic()
                return self

            def __exit__(self, exc_type, *_):
                demo.timings[name] = time.monotonic() - self.t0
                if exc_type is None:
                    demo.say(f"{name}: done in {demo.timings[name]:.1f} s")

        return _Step()

    def start_kafka(self) -> None:
        from .broker import LocalBroker, daemon_status, default_state_dir, metadata_ready

        if self.args.bootstrap:
            if not metadata_ready(self.args.bootstrap, timeout=10):
                raise DemoError(f"no Kafka answers at {self.args.bootstrap}; drop --bootstrap to start a local one")
            self.bootstrap = self.args.bootstrap
            self.say(f"using Kafka at {self.bootstrap}")
            return
        status = daemon_status(default_state_dir())
        if status.running and status.ready:
            self.bootstrap = status.bootstrap
            self.say(f"reusing the running local broker at {self.bootstrap} (stream-asd broker start)")
            return
        self.say("starting a local Apache Kafka broker (first run resolves the jars from Maven Central)")
        self.broker = LocalBroker(self.logs / "broker")
        self.broker.start(port=0)
        self.bootstrap = self.broker.bootstrap
        self.say(f"Kafka ready at {self.bootstrap}")

    def settings(self, window_s: float | None = None, hop_s: float | None = None):
        from .config import load_settings

        topics = {"audio": f"asd.audio.{self.run_id}", "scores": f"asd.scores.{self.run_id}",
                  "alerts": f"asd.alerts.{self.run_id}", "dlq": f"asd.audio.dlq.{self.run_id}",
                  "models": f"asd.models.{self.run_id}", "partitions": 4}
        return load_settings(None, {
            "kafka": {"bootstrap": self.bootstrap}, "topics": topics,
            "window": {"seconds": window_s, "hop_seconds": hop_s},
        })

    def window_of(self, bundle: Path, chunk_s: float) -> tuple[float, float]:
        """The processor scores windows of the bundle's length; hop: --hop or half a window."""
        manifest = json.loads((bundle / "manifest.json").read_text())
        window = float(manifest["feature_spec"]["window_seconds"])
        if self.args.window is not None and abs(self.args.window - window) > 1e-9:
            raise DemoError(f"--window {self.args.window:g} differs from the model's {window:g} s windows; "
                            "train with --train-set features.window_seconds=... instead")
        hop = self.args.hop if self.args.hop is not None else max(chunk_s, round(window / 2 / chunk_s) * chunk_s)
        return window, min(hop, window)

    def create_topics(self, settings) -> None:
        from .kafka import admin_conf, ensure_topics

        t = settings.topics
        # The processor keys scores/alerts/DLQ by device like the audio: same partition count.
        ensure_topics(admin_conf(settings), {t.audio: t.partitions, t.scores: t.partitions, t.alerts: t.partitions,
                                             t.dlq: t.partitions, t.models: 1})

    def fleet_plan(self, sample_rate: int):
        """The synthetic fleet, its faults, and the real-clip devices."""
        from .producer.sources import FaultSpec, known_fault_types, known_machine_types, parse_fault, synthetic_fleet

        a = self.args
        if a.devices < 1:
            raise DemoError("--devices must be >= 1")
        types = [t.strip() for t in a.machine_types.split(",")] if a.machine_types else (known_machine_types()[:4] or None)
        fault_at = a.fault_at if a.fault_at is not None else round(0.4 * a.duration)
        if a.fault:
            faults = [parse_fault(f) for f in a.fault]
        else:
            # Spread the faulty devices over the fleet (so over machine types) and over the fault
            # kinds that add or move energy audibly; each kind must apply to the device's type.
            healthy = synthetic_fleet(a.devices, sample_rate, types, seed=a.seed)
            n = min(a.faulty, a.devices)
            # index j*step + j + 1: consecutive picks land on different machine types (round-robin fleet)
            step = a.devices // n if n else 0
            picks = list(dict.fromkeys((j * step + j + 1) % a.devices for j in range(n)))
            # bearing and rubbing add energy; drift, clogging, click_loss only move or remove it and
            # a small CPU-trained model misses them on some devices (ask for them with --fault).
            preferred = ["bearing", "rubbing"]
            faults = []
            for j, p in enumerate(picks):
                allowed = list(getattr(healthy[p].profile, "faults", None) or known_fault_types() or ["bearing"])
                kinds = [k for k in preferred if k in allowed] or allowed
                faults.append(FaultSpec(str(p), kinds[j % len(kinds)], float(fault_at), a.severity))
        sources = synthetic_fleet(a.devices, sample_rate, types, seed=a.seed, faults=faults)
        return sources, faults

    def realdata_dir(self) -> Path | None:
        root = self.args.realdata if self.args.realdata is not None else SHARED_REALDATA
        if self.args.real_devices <= 0:
            return None
        folder = root / REAL_FOLDER
        if not folder.is_dir():
            self.say(f"no real clips at {folder}: synthetic data only")
            return None
        return folder

    def write_training_set(self, sources, real: Path | None) -> tuple[Path, list[Path]]:
        """DCASE2020 layout: <type>/train/normal_id_XX_NNNNNNNN.wav. Returns the data root and the
        held-out real clips the real devices will replay."""
        from .audio.io import write_audio

        a = self.args
        key = {"devices": a.devices, "types": sorted({s.machine_type for s in sources}), "seed": a.seed,
               "clips": a.clips_per_device, "real": str(real) if real else None, "real_devices": a.real_devices, "real_train": a.real_train_clips,
               "v": 1}
        root = self.workdir / "data"
        stamp = root / "dataset.json"
        held_out: list[Path] = []
        real_clips = sorted(real.glob("normal_*.wav")) if real else []
        # The last 2 clips per real device are held out for streaming, never trained on.
        n_held = 2 * a.real_devices
        n_real_train = max(0, min(a.real_train_clips, len(real_clips) - n_held))
        if real_clips:
            held_out = real_clips[len(real_clips) - n_held:]
        if stamp.exists() and json.loads(stamp.read_text()) == key:
            self.say(f"training data cached in {root}")
            return root, held_out
        shutil.rmtree(root, ignore_errors=True)
        sr = 16_000
        per_type: dict[str, int] = {}
        for src in sources:
            per_type[src.machine_type] = per_type.get(src.machine_type, 0) + 1
            idx = src.profile.index  # normal_id_XX -> device "fan-id_XX", the stream's device id
            folder = root / src.machine_type / "train"
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(a.clips_per_device):
                # Stream times far beyond the demo's, so training never sees streamed samples.
                start = (100_000 + j * 10) * sr
                clean = type(src)(src.profile, sr, None)
                write_audio(folder / f"normal_id_{idx:02d}_{j:08d}.wav", clean.render(start, 10 * sr), sr)
        if real_clips and n_real_train:
            folder = root / REAL_MACHINE_TYPE / "train"
            folder.mkdir(parents=True, exist_ok=True)
            # One real machine heard by --real-devices microphones: its clips are dealt to them.
            for i, clip in enumerate(real_clips[:n_real_train]):
                shutil.copyfile(clip, folder / f"normal_id_{i % a.real_devices:02d}_{i:08d}.wav")
        stamp.write_text(json.dumps(key))
        self.say(f"training data: {sum(per_type.values())} synthetic devices x {a.clips_per_device} clips of 10 s"
                 + (f", {n_real_train} real clips ({REAL_MACHINE_TYPE})" if real_clips and n_real_train else "")
                 + f" in {root}")
        return root, held_out

    def train(self, data: Path) -> Path:
        a = self.args
        bundle = self.workdir / f"model-{a.profile}"
        stamp = self.workdir / f"model-{a.profile}.json"
        # Demo defaults for the small profiles (a --train-set given by the user comes later and wins):
        # - no per-device GMM pairs: a full-covariance GMM on a 128-d embedding from ~50 windows of
        #   one device is degenerate (healthy devices then score far above their threshold);
        # - ensemble weights 0.5/0.5 instead of the paper's 0.9/0.1: in a few CPU epochs the fusion
        #   embedding learns little (bench/model_quality.md: fusion 84 % vs statistics 96 % AUC), so
        #   the demo leans on the statistics model more. Measured on the default demo: 2 of 3 faults
        #   caught and 5 healthy devices alerted with the profile's values, 3 of 3 and 3 with these.
        train_set = ["scoring.device_gmm_min_windows=0", "scoring.weight_fusion=0.5",
                     "scoring.weight_stats=0.5", *a.train_set]
        if not a.device_thresholds:
            # ~10 held-out windows per device: a 0.99 quantile of them is noise. One threshold per
            # machine type (from all its devices' held-out windows) until devices have history.
            train_set.insert(0, "scoring.min_device_windows=1000000")
        key = {"data": json.loads((data / "dataset.json").read_text()), "profile": a.profile, "set": train_set,
               "code": _training_code_hash()}
        if not a.retrain and bundle.is_dir() and stamp.exists() and json.loads(stamp.read_text()) == key:
            self.say(f"model cached in {bundle} (--retrain to train again)")
            return bundle
        log_path = self.logs / "train.log"
        cmd = [sys.executable, "-m", "trainer.cli", "fit", "--data", str(data), "--out", str(bundle),
               "--profile", a.profile, "--force", "--no-progress"]
        for s in train_set:
            cmd += ["--set", s]
        self.say(f"training the model ({a.profile} profile): {' '.join(cmd[2:])}; log {log_path}")
        with log_path.open("w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait()
            except KeyboardInterrupt:
                proc.terminate()
                proc.wait(30)
                raise
        if rc != 0:
            tail = "\n".join(log_path.read_text().splitlines()[-15:])
            raise DemoError(f"training failed (exit {rc}); log {log_path}:\n{tail}")
        stamp.write_text(json.dumps(key))
        return bundle

    def start_processor(self, settings, bundle: Path, metrics_port: int) -> None:
        env = dict(os.environ)
        t = settings.topics
        env.update({
            "ASD_KAFKA__BOOTSTRAP": self.bootstrap, "ASD_TOPICS__AUDIO": t.audio, "ASD_TOPICS__SCORES": t.scores,
            "ASD_TOPICS__ALERTS": t.alerts, "ASD_TOPICS__DLQ": t.dlq, "ASD_TOPICS__MODELS": t.models,
            "ASD_TOPICS__PARTITIONS": str(t.partitions),
            "ASD_WINDOW__SECONDS": str(settings.window.seconds), "ASD_WINDOW__HOP_SECONDS": str(settings.window.hop_seconds),
            "ASD_MODEL__BUNDLE": str(bundle), "ASD_METRICS__PORT": str(metrics_port),
            "ASD_PROCESSOR__GROUP_ID": f"demo-{self.run_id}", "ASD_PROCESSOR__APP_ID": f"demo-{self.run_id}",
            "ASD_PROCESSOR__WORKERS_WEB_PORT": str(_free_port()),
            "ASD_PROCESSOR__DATADIR": str(self.logs / "processor-data"),
        })
        env = {k: v for k, v in env.items() if not (k.startswith("ASD_") and v in ("", "None"))}
        log_path = self.logs / "processor.log"
        self.processor_log = log_path
        cmd = [sys.executable, "-m", "stream_asd.cli", "process"]
        self.say(f"starting the stream processor: stream-asd process (log {log_path})")
        self.processor = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)

    def stop_processor(self) -> None:
        p = self.processor
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)

    def processor_failed(self) -> str | None:
        if self.processor is not None and self.processor.poll() is not None:
            tail = "\n".join(self.processor_log.read_text(errors="replace").splitlines()[-15:])
            return f"the stream processor exited with {self.processor.returncode}; log {self.processor_log}:\n{tail}"
        return None

    # -- main -------------------------------------------------------------------------------

    def run(self) -> int:
        t_start = time.monotonic()
        self.logs.mkdir(parents=True, exist_ok=True)
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM,)}
        signal.signal(signal.SIGTERM, lambda *_: self._on_signal())
        try:
            return self._run(t_start)
        except KeyboardInterrupt:
            self._interrupted = True
            self.say("interrupted")
            return 130
        finally:
            self._shutdown()
            for sig, h in previous.items():
                signal.signal(sig, h)

    def _on_signal(self) -> None:
        raise KeyboardInterrupt

    def _run(self, t_start: float) -> int:
        from prometheus_client import CollectorRegistry

        from .metrics import ProducerMetrics, serve
        from .producer.agent import ProducerAgent
        from .producer.sources import FileSource

        a = self.args
        with self.step("kafka"):
            self.start_kafka()
            settings = self.settings()
            self.create_topics(settings)
        sr = settings.audio.sample_rate
        sources, faults = self.fleet_plan(sr)
        real = self.realdata_dir()
        with self.step("data"):
            data, held_out = self.write_training_set(sources, real)
        if held_out and a.real_devices:
            for i in range(a.real_devices):
                clips = held_out[i::a.real_devices]
                sources.append(FileSource(f"{REAL_MACHINE_TYPE}-id_{i:02d}", REAL_MACHINE_TYPE, clips, sr, loop=True))
        with self.step("train"):
            bundle = self.train(data)
        window_s, hop_s = self.window_of(bundle, settings.audio.chunk_seconds)
        settings = self.settings(window_s, hop_s)
        self.say(f"windows of {window_s:g} s every {hop_s:g} s; alerts after {settings.alerts.k} of "
                 f"{settings.alerts.n} windows over the threshold")

        prod_port = _port_or_free(a.metrics_port)
        proc_port = _port_or_free(a.metrics_port + 1) if a.metrics_port else 0
        with self.step("processor start"):
            self.start_processor(settings, bundle, proc_port)
            self._wait_processor_ready(proc_port)
        registry = CollectorRegistry()
        metrics = ProducerMetrics(registry)
        server = serve(prod_port, "127.0.0.1", registry) if prod_port else None
        if prod_port:
            self.say(f"metrics: producer http://127.0.0.1:{prod_port}/metrics, "
                     f"processor http://127.0.0.1:{proc_port}/metrics")

        view = FleetView([(s.device_id, s.machine_type) for s in sources])
        fault_chunk = {}
        for src in sources:
            fault = getattr(src, "fault", None)
            if fault is not None:
                fault_chunk[src.device_id] = (f"{fault.type}@{fault.start_s:g}s",
                                              int(round(fault.start_s / settings.audio.chunk_seconds)))

        start_ns = time.time_ns()
        seq0 = start_ns // int(settings.audio.chunk_seconds * 1e9)

        def on_chunk(source, header):  # the capture time of the first faulty chunk
            plan = fault_chunk.get(source.device_id)
            if plan is not None and header.seq - seq0 == plan[1]:
                view.set_fault(source.device_id, plan[0], header.capture_ns)

        for dev, (label, _k) in fault_chunk.items():
            view.devices[dev].fault = label
        self.agent = ProducerAgent(settings, sources, realtime=True, duration_s=None if a.keep_running else a.duration,
                                   metrics=metrics, start_ns=start_ns, seq_start=seq0, on_chunk=on_chunk,
                                   producer_id=f"demo-{self.run_id}",
                                   # librdkafka warns while the fresh broker loads its coordinator: expected here
                                   producer_overrides={"log_level": 3})

        def produce():
            try:
                self.report = self.agent.run()
            except Exception as exc:  # surfaced by _watch
                self.producer_error = exc

        self.say(f"streaming {len(sources)} microphones ({', '.join(sorted({s.machine_type for s in sources}))}) "
                 f"for {'ever (Ctrl-C to stop)' if a.keep_running else f'{a.duration:g} s'}; faults: "
                 + (", ".join(f"{d} {l}" for d, (l, _) in fault_chunk.items()) or "none"))
        t_stream = time.monotonic()
        self.agent_thread = threading.Thread(target=produce, name="producer", daemon=True)
        self.agent_thread.start()
        try:
            self._watch(settings, view, t_stream)
        finally:
            if server is not None:
                server.shutdown()
        self.timings["stream"] = time.monotonic() - t_stream

        summary = view.summary()
        rep = self.report
        summary.update({
            "ok": summary["faults_injected"] > 0 and summary["faults_caught"] == summary["faults_injected"],
            "devices": len(sources), "machine_types": sorted({s.machine_type for s in sources}),
            "stream_seconds": round(self.timings["stream"], 1),
            "chunks": {"sent": rep.sent if rep else 0, "delivered": rep.delivered if rep else 0,
                       "failed": rep.failed if rep else 0, "unacknowledged": rep.unacknowledged if rep else 0},
            "bundle": str(bundle), "bootstrap": self.bootstrap, "topics": settings.topics.model_dump(),
            "run_id": self.run_id, "logs": str(self.logs),
        })
        self.timings["total"] = time.monotonic() - t_start
        summary["timings_s"] = {k: round(v, 1) for k, v in self.timings.items()}
        if self.color:
            print(render_table(view, "final state", True))
        print(format_summary(summary), flush=True)
        if a.summary_json:
            a.summary_json.write_text(json.dumps(summary, indent=2))
        return 0 if summary["ok"] else 1

    def _wait_processor_ready(self, port: int, timeout: float = 120.0) -> None:
        """Until the processor serves /metrics (it has loaded the model) or exits."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            failed = self.processor_failed()
            if failed:
                raise DemoError(failed)
            if not port:
                time.sleep(3)
                return
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read()
                return
            except OSError:
                time.sleep(0.5)
        raise DemoError(f"the stream processor did not serve /metrics within {timeout:.0f} s; log {self.processor_log}")

    def _watch(self, settings, view: FleetView, t_stream: float) -> None:
        """Consume scores and alerts, redraw the view, until the stream ends and scoring drains."""
        from confluent_kafka import Consumer

        from .kafka import consumer_conf
        from .wire import AlertRecord, ScoreRecord, WireFormatError

        a = self.args
        consumer = Consumer(consumer_conf(settings, f"demo-view-{self.run_id}"))
        consumer.subscribe([settings.topics.scores, settings.topics.alerts])
        last_draw = 0.0
        last_plain = time.monotonic()
        last_record = time.monotonic()
        produced_done_at: float | None = None
        drain_quiet = max(2 * settings.window.hop_seconds, 10.0)
        try:
            while True:
                msg = consumer.poll(0.2)
                now = time.monotonic()
                if msg is not None and not msg.error():
                    try:
                        if msg.topic() == settings.topics.scores:
                            view.on_score(ScoreRecord.from_json(msg.value()))
                        else:
                            view.on_alert(AlertRecord.from_json(msg.value()))
                        last_record = now
                    except WireFormatError as exc:
                        log.warning("unreadable record on %s: %s", msg.topic(), exc)
                failed = self.processor_failed()
                if failed:
                    raise DemoError(failed)
                if not self.agent_thread.is_alive():
                    if self.producer_error is not None:
                        raise DemoError(f"the producer failed: {self.producer_error}")
                    if produced_done_at is None:
                        produced_done_at = now
                        self.say("stream finished; waiting for the last windows to be scored")
                    # Done when scoring has been quiet for a while (the last windows are in).
                    if now - max(last_record, produced_done_at) > drain_quiet or now - produced_done_at > 120:
                        break
                elapsed = now - t_stream
                header = (f"stream-asd demo  t={elapsed:5.0f} s{'' if a.keep_running else f' / {a.duration:g} s'}  "
                          f"devices {len(view.devices)}  windows {view.windows_scored}  "
                          f"latency p50 {_fmt(view.percentile(50))} s  "
                          f"alerts {sum(v.alert for v in view.devices.values())}  (Ctrl-C stops)")
                if self.color and now - last_draw >= 1.0:
                    sys.stdout.write("\x1b[H\x1b[2J" + render_table(view, header, True) + "\n")
                    sys.stdout.flush()
                    last_draw = now
                elif not self.color:
                    for event in view.events:
                        print(f"[{elapsed:6.1f} s] {event}", flush=True)
                    if now - last_plain >= 15:
                        print(f"[{elapsed:6.1f} s] windows scored {view.windows_scored}, anomalous "
                              f"{sum(v.anomalous for v in view.devices.values())}, alerts active "
                              f"{sum(v.alert for v in view.devices.values())}", flush=True)
                        last_plain = now
                view.events.clear()
        except KeyboardInterrupt:
            self.say("Ctrl-C: stopping the stream and summarising (Ctrl-C again to abort)")
            self.agent.stop("signal")
            self.agent_thread.join(60)
            # Read what is already there (no waiting for more scoring).
            t_end = time.monotonic() + 3
            while time.monotonic() < t_end:
                msg = consumer.poll(0.2)
                if msg is not None and not msg.error():
                    try:
                        (view.on_score(ScoreRecord.from_json(msg.value())) if msg.topic() == settings.topics.scores
                         else view.on_alert(AlertRecord.from_json(msg.value())))
                    except WireFormatError:
                        pass
        finally:
            consumer.close()

    def _shutdown(self) -> None:
        if self.agent is not None and self.agent_thread is not None and self.agent_thread.is_alive():
            self.agent.stop("stop")
            self.agent_thread.join(60)
        self.stop_processor()
        if self.broker is not None:
            self.broker.stop()
            shutil.rmtree(self.broker.state_dir, ignore_errors=True)
        elif self.bootstrap:
            try:  # a reused broker keeps no demo topics behind
                from .kafka import delete_topics

                s = self.settings()
                delete_topics(self.bootstrap, [s.topics.audio, s.topics.scores, s.topics.alerts, s.topics.dlq,
                                               s.topics.models])
            except Exception as exc:  # cleanup must not hide the result
                log.warning("could not delete the demo topics: %s", exc)


def run(args: argparse.Namespace) -> int:
    # The demo speaks for itself; the parts' INFO logs go to their log files or are dropped.
    for name in ("stream_asd.producer.agent", "stream_asd.kafka", "stream_asd.broker"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return Demo(args).run()
