"""Synthetic machine sounds for the learning-loop tests (small, deterministic, no downloads).

A "fan" device hums at its own fundamental with harmonics over broadband noise; its fault
adds a high whine and periodic clicks. Good enough for a tiny model to tell them apart.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16_000
F0 = {"id_00": 120.0, "id_01": 150.0}


def machine_sound(f0: float, seconds: float, rng: np.random.Generator, anomalous: bool = False) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    x = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) / k for k in range(1, 6)) * 0.1
    x = x + rng.standard_normal(t.shape[0]) * 0.03
    if anomalous:
        x = x + 0.08 * np.sin(2 * np.pi * rng.uniform(3000, 5000) * t)
        x[:: SR // 4] += 0.8
    return (0.8 * x).astype(np.float32)


def write_dataset(root: Path, *, train_anomalous: bool = False, n_train: int = 10, n_test: int = 4,
                  seconds: float = 3.0, seed: int = 0) -> Path:
    """DCASE2020 layout: fan/train/normal_id_XX_*.wav, fan/test/{normal,anomaly}_id_XX_*.wav.
    ``train_anomalous``: the training clips are faulty machines labelled normal (a bad model)."""
    rng = np.random.default_rng(seed)
    for mid, f0 in F0.items():
        for split, n, lab in (("train", n_train, "normal"), ("test", n_test, "normal"), ("test", n_test, "anomaly")):
            d = root / "fan" / split
            d.mkdir(parents=True, exist_ok=True)
            anomalous = lab == "anomaly" or (split == "train" and train_anomalous)
            for j in range(n):
                sf.write(d / f"{lab}_{mid}_{j:08d}.wav", machine_sound(f0, seconds, rng, anomalous), SR)
    return root


def write_archive(root: Path, *, seconds_per_device: int = 40, segment_seconds: float = 5.0, seed: int = 1,
                  start_ns: int | None = None) -> Path:
    """An archive as `stream-asd archive` writes it, from normal machine sound of both devices."""
    import time

    from stream_asd.archive.store import ArchiveStore
    from stream_asd.archive.writer import ArchiverOptions, SegmentWriter, _Pending
    from stream_asd.wire import ChunkHeader, decode_chunk, encode_chunk, float_to_pcm16

    rng = np.random.default_rng(seed)
    writer = SegmentWriter(ArchiveStore(root), ArchiverOptions(segment_seconds=segment_seconds), lambda c: None)
    t0 = start_ns if start_ns is not None else time.time_ns() - seconds_per_device * 10**9
    for mid, f0 in F0.items():
        wave = machine_sound(f0, seconds_per_device, rng)
        for seq in range(seconds_per_device):
            pcm = float_to_pcm16(wave[seq * SR:(seq + 1) * SR])
            key, value, headers = encode_chunk(ChunkHeader(f"fan-{mid}", "fan", seq, t0 + seq * 10**9, "t"), pcm)
            writer.add(_Pending(0, seq, decode_chunk(key, value, headers), 0.0), 0.0)
    writer.flush_all()
    return root


def corrupt_bundle_copy(bundle: Path, out: Path) -> Path:
    """A copy of ``bundle`` with one byte of its weights flipped (its manifest sha256 no longer
    matches), for the "bad bundle never replaces a good one" checks."""
    shutil.copytree(bundle, out)
    w = out / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    return out
