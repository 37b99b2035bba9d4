"""Tiny ensemble/AE bundles for the model tests (same code paths as the paper's sizes)."""

from __future__ import annotations

import numpy as np
import torch

from stream_asd.audio.features import FeatureSpec
from stream_asd.model.ensemble import AeModel, EnsembleConfig, EnsembleModel
from stream_asd.model.networks import AutoencoderConfig
from stream_asd.model.scoring import AeGroup, EnsembleGroup

# 1 s windows, 64 mel bands (GhostNetV2 needs >= 64 rows/columns after its 32x downsampling).
TINY_SPEC = FeatureSpec(window_seconds=1.0, n_mels=64, n_fft=512, hop_length=256)


def tiny_waves(n: int, seed: int = 0, spec: FeatureSpec = TINY_SPEC, freq: float = 440.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(spec.window_samples) / spec.sample_rate
    tone = 0.3 * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi, (n, 1)))
    return (tone + 0.05 * rng.standard_normal((n, spec.window_samples))).astype(np.float32)


def tiny_ensemble_bundle(groups=("fan", "pump"), n_train: int = 40, seed: int = 0):
    torch.manual_seed(seed)
    model = EnsembleModel(TINY_SPEC, EnsembleConfig.tiny()).eval()
    fitted = {}
    for i, name in enumerate(groups):
        w = tiny_waves(n_train, seed=seed + i, freq=300.0 + 200 * i)
        with torch.no_grad():
            e = model.embed(torch.from_numpy(w))
        devices = ["dev-a"] * (n_train // 2) + ["dev-b"] * (n_train - n_train // 2)
        # the first group also exercises the options: log statistics and per-device GMM pairs
        extra = dict(stats_log=True, per_device_min_windows=n_train // 2) if i == 0 else {}
        fitted[name] = EnsembleGroup.fit(name, e.fusion, e.band_means, device_ids=devices, reg_covar=1e-2,
                                         min_device_windows=n_train // 2, **extra)
    bundle = model.to_bundle(fitted, version="test-1", metrics={"auc": {"fan": 0.9}},
                             data_fingerprint={"sha256": "0" * 64, "n_clips": n_train * len(groups)})
    return model, fitted, bundle


def tiny_ae_bundle(groups=("fan",), n_train: int = 20, seed: int = 0):
    torch.manual_seed(seed)
    spec = FeatureSpec(window_seconds=1.0, n_mels=32, n_fft=512, hop_length=256)
    model = AeModel(spec, AutoencoderConfig(hidden=(32, 32), bottleneck=4), groups).eval()
    fitted = {}
    for name in model.group_names:
        g = AeGroup(name, model.group_index(name))
        w = tiny_waves(n_train, seed=seed, spec=spec)
        with torch.no_grad():
            err = model.reconstruction_errors(torch.from_numpy(w), [g.index] * n_train).numpy()
        g.fit_standardisation(err)
        g.calibrate(err)
        fitted[name] = g
    return model, fitted, model.to_bundle(fitted, version="ae-1")
