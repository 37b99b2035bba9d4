"""Synthetic data sets in the DCASE2020 layout, written from :mod:`stream_asd.audio.synth`
devices: ``<type>/{train,test}/{normal,anomaly}_id_XX_NNNNNNNN.wav`` plus ``manifest.csv`` (the
fault, severity and level of every clip) and ``synth.json`` (the arguments and device list).

    write_dataset("data/synth", ["fan", "pump", "valve"], devices_per_type=4, seed=1, level_db=6)
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .synth import (FAULT_TYPES, FAULTS_BY_TYPE, GENERATOR_VERSION, MACHINE_TYPES, DeviceProfile, Fault, SynthError,
                    _key, render)

__all__ = ["MANIFEST_COLUMNS", "write_dataset"]


MANIFEST_COLUMNS = ["path", "dataset", "machine_type", "machine_id", "split", "domain", "label", "sample_rate",
                    "channels", "duration_s", "sha256", "device_id", "start_s", "fault", "severity", "gain_db"]


def write_dataset(out_dir: str | os.PathLike, machine_types: Sequence[str] = ("fan", "pump", "valve"),
                  devices_per_type: int = 4, n_train: int = 100, n_test_normal: int = 50,
                  n_test_anomaly: int = 50, seconds: float = 10.0, seed: int = 0,
                  faults: Sequence[str] = FAULT_TYPES, severity: tuple[float, float] = (0.3, 1.0),
                  sample_rate: int = 16000, level_db: float = 0.0, progress=None) -> Path:
    """Write a DCASE2020-layout data set and its ``manifest.csv``; returns ``out_dir``.

    ``<type>/train/normal_id_XX_NNNNNNNN.wav`` and ``<type>/test/{normal,anomaly}_id_XX_NNNNNNNN.wav``
    per device (``id_XX`` = device index). Train clips are consecutive stretches of each
    device's stream; test normals come later, anomalies later still, each anomaly with one of
    the ``faults`` that apply to the machine type (cycled) at a severity uniform in ``severity``.
    The manifest (columns ``MANIFEST_COLUMNS``) records the fault, severity and level of each clip.
    ``level_db``: every clip (train and test alike) is scaled by a gain uniform in
    [-level_db, +level_db] dB, as a microphone placed a little nearer or farther, so that
    loudness alone carries no label information (a clip-RMS detector sits near AUC 0.5). A gain
    that would push the clip's peak past 0.99 is lowered to keep it there.
    Same arguments, same bytes.
    """
    from .io import write_audio

    out = Path(out_dir)
    types = list(machine_types)
    unknown = [t for t in types if t not in MACHINE_TYPES]
    if unknown or not types:
        raise SynthError(f"machine types {types}: use some of {list(MACHINE_TYPES)}")
    bad = [f for f in faults if f not in FAULT_TYPES]
    if bad:
        raise SynthError(f"unknown fault type(s) {bad}; the generator knows {list(FAULT_TYPES)}")
    lo, hi = (float(x) for x in severity)
    if not 0.0 <= lo <= hi <= 1.0:
        raise SynthError(f"severity range {severity} must satisfy 0 <= lo <= hi <= 1")
    if not (math.isfinite(level_db) and 0.0 <= level_db <= 40.0):
        raise SynthError(f"level_db={level_db}: use a value in [0, 40] dB")
    if min(devices_per_type, n_train, n_test_normal, n_test_anomaly) < 0 or seconds <= 0:
        raise SynthError("counts must be >= 0 and seconds > 0")
    if n_test_anomaly and not all(set(faults) & set(FAULTS_BY_TYPE[t]) for t in types):
        raise SynthError(f"none of the faults {list(faults)} applies to one of {types}; see FAULTS_BY_TYPE")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    total = len(types) * devices_per_type * (n_train + n_test_normal + n_test_anomaly)
    done = 0
    gap = 60.0  # seconds of stream between the parts, so no two clips overlap
    for machine_type in types:
        applicable = [f for f in faults if f in FAULTS_BY_TYPE[machine_type]]
        for index in range(devices_per_type):
            device = DeviceProfile(machine_type, index, int(seed))
            pick = np.random.default_rng([int(seed), _key(machine_type, index, "dataset")])
            # a separate stream, so level_db=0 writes the same clips as before it existed
            levels = np.random.default_rng([int(seed), _key(machine_type, index, "level")])
            parts = [("train", "normal", n_train), ("test", "normal", n_test_normal),
                     ("test", "anomaly", n_test_anomaly)]
            t0 = gap
            for split, label, count in parts:
                folder = out / machine_type / split
                folder.mkdir(parents=True, exist_ok=True)
                for k in range(count):
                    start_s = t0 + k * seconds
                    fault = None
                    if label == "anomaly":
                        fault = Fault(applicable[k % len(applicable)], round(float(pick.uniform(lo, hi)), 4), 0.0, 0.0)
                    x = render(device, start_s, seconds, sample_rate, fault)
                    gain_db = float(levels.uniform(-level_db, level_db)) if level_db else 0.0
                    if gain_db:
                        peak = float(np.max(np.abs(x))) if x.size else 0.0
                        gain = min(10 ** (gain_db / 20), 0.99 / peak if peak > 0 else math.inf)
                        gain_db = 20 * math.log10(gain)
                        x = (x * np.float32(gain)).astype(np.float32)
                    path = folder / f"{label}_{device.machine_id}_{k:08d}.wav"
                    write_audio(path, x, sample_rate)
                    rows.append({
                        "path": path.relative_to(out).as_posix(), "dataset": f"synthetic v{GENERATOR_VERSION} seed {seed}",
                        "machine_type": machine_type, "machine_id": device.machine_id, "split": split, "domain": "",
                        "label": label, "sample_rate": sample_rate, "channels": 1, "duration_s": seconds,
                        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "device_id": device.device_id,
                        "start_s": start_s, "fault": fault.type if fault else "",
                        "severity": fault.severity if fault else "", "gain_db": round(gain_db, 3),
                    })
                    done += 1
                    if progress is not None:
                        progress(done, total)
                t0 += count * seconds + gap
    rows.sort(key=lambda r: r["path"])
    tmp = out / ".manifest.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "manifest.csv")
    info = {"generator_version": GENERATOR_VERSION, "seed": seed, "machine_types": types,
            "devices_per_type": devices_per_type, "n_train": n_train, "n_test_normal": n_test_normal,
            "n_test_anomaly": n_test_anomaly, "seconds": seconds, "sample_rate": sample_rate,
            "faults": list(faults), "severity": [lo, hi], "level_db": level_db, "clips": len(rows),
            "devices": [DeviceProfile(t, i, int(seed)).describe() for t in types for i in range(devices_per_type)]}
    (out / "synth.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out

