"""Steps 2 and 3: the training data and the model, cached in the work folder.

Each is rebuilt only when its key changes: the data's key is the fleet and clip choice, the
model's is the data's key, the profile and its overrides, and a hash of the training code.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .console import Console, Workspace
from .errors import DemoError
from .fleet import REAL_MACHINE_TYPE, FleetPlan

CLIP_SECONDS = 5  # many short clips hear more of a machine's states than a few long ones
TRAIN_START_S = 100_000  # training clips are rendered at stream times the demo never streams
# Training clips are spread over stream time, not one stretch: a machine's healthy sound varies
# over minutes (load, noise colour, a neighbouring machine switching on and off every ~40 s
# slot), and a model that heard one minute of it flags the rest as anomalous (valve-id_02
# alerted 5 s into the stream with score 31 over 1.79 when its 6 clips were consecutive).
# 317 s: about five minutes, and no multiple of the 40 s slots.
TRAIN_CLIP_SPACING_S = 317


# -- training data --------------------------------------------------------------------------


def training_set(args: argparse.Namespace, ws: Workspace, plan: FleetPlan, sample_rate: int,
                 console: Console) -> Path:
    """Normal audio of every microphone, DCASE2020 layout (<type>/train/normal_id_XX_NNNNNNNN.wav,
    so the trainer's device ids equal the stream's: fan-id_00)."""
    root = ws.root / "data"
    key = dataset_key(args, plan, sample_rate)
    stamp = root / "dataset.json"
    if stamp.exists() and json.loads(stamp.read_text()) == key:
        console.say(f"training data cached in {root}")
        return root
    shutil.rmtree(root, ignore_errors=True)
    write_synthetic_clips(root, plan.synthetic, args.clips_per_device, sample_rate)
    n_real = copy_real_clips(root, plan, args.real_devices)
    stamp.write_text(json.dumps(key))
    console.say(f"training data: {len(plan.synthetic)} synthetic devices x {args.clips_per_device} clips of "
                f"{CLIP_SECONDS} s" + (f", {n_real} real clips ({REAL_MACHINE_TYPE})" if n_real else "") + f" in {root}")
    return root


def dataset_key(args: argparse.Namespace, plan: FleetPlan, sample_rate: int) -> dict:
    real = plan.real_clips
    return {"devices": args.devices, "types": sorted({s.machine_type for s in plan.synthetic}), "seed": args.seed,
            "clips": args.clips_per_device, "real": str(real.folder) if real else None,
            "real_devices": args.real_devices, "real_train": args.real_train_clips, "sample_rate": sample_rate,
            "clip_seconds": CLIP_SECONDS, "spacing_s": TRAIN_CLIP_SPACING_S, "v": 2}


def write_synthetic_clips(root: Path, sources: list, clips_per_device: int, sample_rate: int) -> None:
    from ..audio.io import write_audio

    n = CLIP_SECONDS * sample_rate
    for src in sources:
        folder = root / src.machine_type / "train"
        folder.mkdir(parents=True, exist_ok=True)
        clean = type(src)(src.profile, sample_rate, None)  # the same machine without its fault
        for j in range(clips_per_device):
            start = (TRAIN_START_S + j * TRAIN_CLIP_SPACING_S) * sample_rate
            # normal_id_XX -> device "fan-id_XX", the stream's device id
            write_audio(folder / f"normal_id_{src.profile.index:02d}_{j:08d}.wav", clean.render(start, n), sample_rate)


def copy_real_clips(root: Path, plan: FleetPlan, real_devices: int) -> int:
    """The real machine's training clips, dealt to its --real-devices microphones."""
    real = plan.real_clips
    if real is None or not real.train:
        return 0
    folder = root / REAL_MACHINE_TYPE / "train"
    folder.mkdir(parents=True, exist_ok=True)
    for i, clip in enumerate(real.train):
        shutil.copyfile(clip, folder / f"normal_id_{i % real_devices:02d}_{i:08d}.wav")
    return len(real.train)


# -- model ----------------------------------------------------------------------------------


def trained_model(args: argparse.Namespace, ws: Workspace, data: Path, console: Console,
                  rule: list[str] | None = None) -> Path:
    """``asd-train fit`` as a subprocess, unless the cached bundle's key matches. ``rule``: the
    stream's alert rule as overrides (:func:`alert_rule_overrides`), so thresholds are set for it."""
    bundle = ws.root / f"model-{args.profile}"
    stamp = ws.root / f"model-{args.profile}.json"
    overrides = [*(rule or []), *train_overrides(args)]
    key = {"data": json.loads((data / "dataset.json").read_text()), "profile": args.profile, "set": overrides,
           "code": training_code_hash()}
    if not args.retrain and bundle.is_dir() and stamp.exists() and json.loads(stamp.read_text()) == key:
        console.say(f"model cached in {bundle} (--retrain to train again)")
        return bundle
    cmd = [sys.executable, "-m", "trainer.cli", "fit", "--data", str(data), "--out", str(bundle),
           "--profile", args.profile, "--force", "--no-progress"]
    for s in overrides:
        cmd += ["--set", s]
    log_path = ws.logs / "train.log"
    console.say(f"training the model ({args.profile} profile): {' '.join(cmd[2:])}; log {log_path}")
    fit(cmd, log_path)
    stamp.write_text(json.dumps(key))
    return bundle


def train_overrides(args: argparse.Namespace) -> list[str]:
    """Demo defaults for the small profiles; the user's --train-set comes later and wins.

    - no per-device GMM pairs: a full-covariance GMM on a 128-d embedding from ~50 windows of one
      device is degenerate (healthy devices then score far above their threshold);
    - ensemble weights 0.5/0.5 instead of the paper's 0.9/0.1: in a few CPU epochs the fusion
      embedding learns little (bench/model_quality.md: fusion 84 % vs statistics 96 % AUC). Measured
      on the default demo: 2 of 3 faults caught and 5 healthy devices alerted with the profile's
      values, 3 of 3 and 3 with these;
    - one threshold per machine type unless --device-thresholds: a 0.99 quantile of ~10 held-out
      windows per device is noise.
    """
    overrides = ["scoring.device_gmm_min_windows=0", "scoring.weight_fusion=0.5", "scoring.weight_stats=0.5",
                 *args.train_set]
    if not args.device_thresholds:
        overrides.insert(0, "scoring.min_device_windows=1000000")
    return overrides


def alert_rule_overrides(alerts, hop_seconds: float) -> list[str]:
    """The processor's k-of-n rule and hop for the trainer: it sets each group's threshold so
    that this rule gives alerts.max_false_alerts_per_device_day on healthy audio (docs/alerting.md)."""
    return [f"alerts.k={alerts.k}", f"alerts.n={alerts.n}", f"alerts.hop_seconds={hop_seconds:g}"]


def fit(cmd: list[str], log_path: Path) -> None:
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


def training_code_hash() -> str:
    """Hash of the trainer's and the model's sources (read, not imported: stream_asd never imports
    trainer), so a cached model is retrained when the training code changes."""
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


@dataclass(frozen=True)
class ModelTiming:
    """What the stream must match: the bundle's window length and sample rate; the hop its
    thresholds were calibrated for and the false alerts per device-day they predict per group."""

    window_seconds: float
    sample_rate: int
    calibrated_hop_seconds: float | None = None
    predicted_false_alerts_per_device_day: dict[str, float] | None = None


def model_timing(bundle: Path) -> ModelTiming:
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = manifest["feature_spec"]
    from ..model.alert_rate import group_calibrations

    calibration = group_calibrations(manifest)
    hops = {c["alert_rule"]["hop_s"] for c in calibration.values() if c.get("alert_rule")}
    predicted = {name: float(c["predicted_false_alerts_per_device_day"]) for name, c in calibration.items()
                 if c.get("predicted_false_alerts_per_device_day") is not None}
    return ModelTiming(float(spec["window_seconds"]), int(spec["sample_rate"]),
                       float(hops.pop()) if len(hops) == 1 else None, predicted or None)
