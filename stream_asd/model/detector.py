"""Scoring windows with a loaded bundle: what the stream processor and ``stream-asd score`` call.

>>> det = load_detector("bundles/current")            # 'auto': CUDA when present, else CPU
>>> out = det.score_windows(waves, ["fan"] * len(waves), ["fan-01"] * len(waves))
>>> out[0].score, out[0].scores, out[0].threshold, out[0].is_anomaly

``Detector`` (the ensemble) and ``AeDetector`` (the DCASE2020-style baseline) share one
interface. ``score_windows`` is batched (micro-batches of ``max_batch`` windows), runs under
``torch.inference_mode`` on the detector's device, and returns one ``WindowScore`` per window.
A machine type without a model group raises ``UnknownModelGroup``.
Scores are standardised (training normals: mean 0, std 1 per model), so thresholds are
comparable across model groups and versions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from ..audio.features import FeatureSpec
from ..errors import BundleError, UnknownModelGroup
from .bundle import ModelBundle
from .ensemble import AeModel, EnsembleModel, load_ae_groups, load_ensemble_groups

__all__ = ["WindowScore", "Detector", "AeDetector", "load_detector", "resolve_device"]


class WindowScore(NamedTuple):
    score: float              # ensemble (or AE) score, standardised
    scores: dict[str, float]  # per-model standardised scores: {'fusion', 'stats'} or {'ae'}
    threshold: float          # the threshold applied (device's if calibrated, else the group's)
    is_anomaly: bool          # score > threshold


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return device


class _BaseDetector:
    kind: str = ""

    def __init__(self, bundle: ModelBundle, device: str = "auto", max_batch: int = 32):
        self.bundle = bundle
        self.version: str = bundle.version
        self.feature_spec: FeatureSpec = bundle.feature_spec
        self.window_samples: int = bundle.feature_spec.window_samples
        self.model_groups: set[str] = set(bundle.groups)
        self.device: str = resolve_device(device)
        self.max_batch = int(max_batch)
        if self.device == "cpu":
            # Untrained/odd BatchNorm statistics can create denormals: very slow on CPUs.
            torch.set_flush_denormal(True)

    @property
    def path(self) -> Path | None:
        return self.bundle.path

    def _check(self, waves: Any, machine_types: Sequence[str], device_ids: Sequence[str]) -> np.ndarray:
        w = np.asarray(waves, dtype=np.float32)
        if w.ndim == 1:
            w = w[None, :]
        if w.ndim != 2 or w.shape[1] != self.window_samples:
            raise ValueError(f"expected waves of shape (B, {self.window_samples}), got {tuple(w.shape)}")
        if len(machine_types) != w.shape[0] or len(device_ids) != w.shape[0]:
            raise ValueError("waves, machine_types and device_ids must have the same length")
        if not np.all(np.isfinite(w)):
            raise ValueError("waves contain NaN or Inf")
        unknown = sorted(set(machine_types) - self.model_groups)
        if unknown:
            raise UnknownModelGroup(f"no model group for machine type(s) {unknown} in bundle {self.version} "
                                    f"(it covers {sorted(self.model_groups)}); train a bundle that includes them")
        return w

    def _batches(self, w: np.ndarray):
        for i in range(0, w.shape[0], self.max_batch):
            yield i, torch.from_numpy(np.ascontiguousarray(w[i:i + self.max_batch])).to(self.device, non_blocking=True)

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run silent windows through the networks once per batch size, so that the first real
        batch does not pay for kernel selection / allocation (seconds on some CPUs and GPUs)."""
        group = sorted(self.model_groups)[0]
        for b in batch_sizes:
            self.score_windows(np.zeros((int(b), self.window_samples), dtype=np.float32), [group] * int(b),
                               ["warmup"] * int(b))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": self.version, "device": self.device,
                "model_groups": sorted(self.model_groups), "feature_spec": self.feature_spec.to_dict()}


class Detector(_BaseDetector):
    """The paper's ensemble: fusion-embedding GMM (0.9) + statistics GMM (0.1) per model group."""

    kind = "ensemble"

    def __init__(self, bundle: ModelBundle, device: str = "auto", max_batch: int = 32, channels_last: bool = True):
        super().__init__(bundle, device, max_batch)
        self.model = EnsembleModel.from_bundle(bundle).to(self.device).eval()
        self.model.encoder.use_channels_last(channels_last)
        self.groups = load_ensemble_groups(bundle)
        for name, g in self.groups.items():
            if g.fusion.dim != self.model.embedding_dim or g.stats.dim != self.feature_spec.n_mels:
                raise BundleError(f"model group {name!r}: GMM dimensions do not match the networks")

    @torch.inference_mode()
    def embed(self, waves: Any) -> tuple[np.ndarray, np.ndarray]:
        """(fusion embeddings (B, 128), band means (B, n_mels)) as float64 numpy."""
        w = np.asarray(waves, dtype=np.float32)
        fus, bms = [], []
        for _, x in self._batches(w):
            e = self.model.embed(x)
            fus.append(e.fusion.double().cpu().numpy())
            bms.append(e.band_means.double().cpu().numpy())
        return np.concatenate(fus), np.concatenate(bms)

    def score_windows(self, waves: Any, machine_types: Sequence[str], device_ids: Sequence[str]) -> list[WindowScore]:
        w = self._check(waves, machine_types, device_ids)
        if w.shape[0] == 0:
            return []
        fusion, band_means = self.embed(w)
        types = np.asarray(list(machine_types), dtype=object)
        out: list[WindowScore | None] = [None] * w.shape[0]
        for name in sorted(set(machine_types)):
            idx = np.nonzero(types == name)[0]
            g = self.groups[name]
            s = g.scores(fusion[idx], band_means[idx], [str(device_ids[i]) for i in idx])
            for j, i in enumerate(idx):
                thr = g.thresholds.for_device(device_ids[i])
                score = float(s["ensemble"][j])
                out[i] = WindowScore(score, {"fusion": float(s["fusion"][j]), "stats": float(s["stats"][j])},
                                     float(thr), bool(score > thr))
        return out  # type: ignore[return-value]


class AeDetector(_BaseDetector):
    """DCASE2020-style autoencoder baseline: standardised mean reconstruction error."""

    kind = "ae"

    def __init__(self, bundle: ModelBundle, device: str = "auto", max_batch: int = 32):
        super().__init__(bundle, device, max_batch)
        self.model = AeModel.from_bundle(bundle).to(self.device).eval()
        self.groups = load_ae_groups(bundle)

    @torch.inference_mode()
    def errors(self, waves: Any, machine_types: Sequence[str]) -> np.ndarray:
        w = np.asarray(waves, dtype=np.float32)
        idx = np.asarray([self.model.group_index(t) for t in machine_types])
        out = []
        for i, x in self._batches(w):
            out.append(self.model.reconstruction_errors(x, idx[i:i + x.shape[0]]).double().cpu().numpy())
        return np.concatenate(out)

    def score_windows(self, waves: Any, machine_types: Sequence[str], device_ids: Sequence[str]) -> list[WindowScore]:
        w = self._check(waves, machine_types, device_ids)
        if w.shape[0] == 0:
            return []
        errs = self.errors(w, machine_types)
        out = []
        for i, (t, dev) in enumerate(zip(machine_types, device_ids)):
            g = self.groups[t]
            z = float(g.scores(errs[i]))
            thr = g.thresholds.for_device(dev)
            out.append(WindowScore(z, {"ae": z}, float(thr), bool(z > thr)))
        return out


def load_detector(path: str | os.PathLike[str], device: str = "auto", *,
                  expected_feature_spec: FeatureSpec | None = None, max_batch: int = 32) -> Detector | AeDetector:
    """Verify and load a bundle folder and return the matching detector. Raises BundleError."""
    bundle = ModelBundle.load(path, expected_feature_spec=expected_feature_spec)
    if bundle.kind == "ensemble":
        return Detector(bundle, device, max_batch)
    if bundle.kind == "ae":
        return AeDetector(bundle, device, max_batch)
    raise BundleError(f"unknown bundle kind {bundle.kind!r}")
