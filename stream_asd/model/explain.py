"""Why a window scored high: which mel bands and which seconds of it deviate from the device's
normal sound. Used by ``stream-asd explain`` (a PNG and JSON for a clip) and, for alerted
windows only, by the stream processor (a compact field in the alert record).

The normal profile is the one the statistics model already holds: its scorer (the group's, or
the device's own pair in ``EnsembleGroup.device_scorers`` when the device has one) z-scores its
input per dimension with ``in_mean`` / ``in_scale``, fitted on the training normals'
``group.stats_features(band_means)`` (log10 of lambda * band means when ``stats_log``). Both
``GaussianScorer`` and the Euclidean ``KnnScorer`` keep these arrays, so nothing new is fitted
or stored.

- **Band z-scores**: ``z_i = (stats_features(band_means)_i - in_mean_i) / in_scale_i`` for the
  window's band means, computed as ``EnsembleModel.embed`` computes them (level normalisation
  included when the bundle has it). The top-N bands by ``|z|`` are reported, signed (+: louder
  than normal, -: quieter), with their mel band edges in Hz and the level difference in dB from
  the normal mean.
- **Deviation map**: the same z-scoring applied to every frame's mel power (the window's samples
  level-normalised like the front end's input): ``z[i, t]``. The scale is that of window means,
  which vary less from window to window than single frames do from frame to frame, so a normal
  frame's |z| is larger than a normal window's: read the map relative to itself.
- **Time segment**: per-frame deviation ``d_t = sum_i z_i z[i, t] / sum_i |z_i|`` over the
  window's top-N bands ``i``: the frame's z in the bands that drive the window's deviation, each
  in the direction the window deviates (louder or quieter) and weighted by its ``|z_i|`` (in sd;
  for one band it is that band's frame z). A mean of squared z over all bands was tried first:
  on a 1 s window with a tone burst in its last 20 %, the frame-to-frame noise of the 60 other
  bands buried the burst (normal frames ~50, burst frames ~100, edge frame 694). The segment is
  the run of ``L`` contiguous frames with the highest mean ``d_t`` (``L`` = ``segment_fraction``
  of the window's frames, at least ``min_segment_frames``), searched among the frames whose STFT
  frame lies inside the window (the first and last ones are reflect-padded and deviate in every
  window). Frame t is centred at ``t * hop`` samples (centred STFT); the segment spans from half
  a hop before its first frame's centre to half a hop after its last one, clipped to the window.

The explanation is of the statistics part of the ensemble (per-band energy). The fusion
embedding's score has no per-band decomposition; a fault that changes only the fine structure
of the sound can score high with an unremarkable band profile (the explanation then shows small
|z|, which is itself worth knowing).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import AsdError

if TYPE_CHECKING:  # torch and the model load only when something is explained (fast --help)
    from ..audio.features import FeatureSpec
    from .scoring import EnsembleGroup

__all__ = ["BandDeviation", "Explanation", "mel_band_edges", "normal_profile", "explain_windows",
           "explain_window", "explain_many", "EXPLANATION_VERSION", "DEFAULT_TOP_N"]

EXPLANATION_VERSION = 1
DEFAULT_TOP_N = 5
DEFAULT_SEGMENT_FRACTION = 0.1
DEFAULT_MIN_SEGMENT_FRAMES = 3


def _hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_band_edges(spec: FeatureSpec) -> np.ndarray:
    """(n_mels, 3) lower edge, centre and upper edge in Hz of each mel band of ``spec``: the
    points of the front end's filterbank (HTK mel scale, ``n_mels + 2`` points equally spaced in
    mel between f_min and f_max; band i's triangle rises from point i to its peak at point i+1
    and falls to zero at point i+2)."""
    f_max = spec.sample_rate / 2 if spec.f_max is None else spec.f_max
    pts = _mel_to_hz(np.linspace(_hz_to_mel(spec.f_min), _hz_to_mel(f_max), spec.n_mels + 2))
    return np.stack([pts[:-2], pts[1:-1], pts[2:]], axis=1)


@dataclass(frozen=True)
class BandDeviation:
    band: int          # mel band index (0 = lowest frequency)
    f_low_hz: float
    f_centre_hz: float
    f_high_hz: float
    z: float           # signed: + louder than normal, - quieter
    delta_db: float    # band level minus the normal mean level, dB

    def to_dict(self) -> dict[str, Any]:
        return {"band": self.band, "f_low_hz": round(self.f_low_hz, 1), "f_centre_hz": round(self.f_centre_hz, 1),
                "f_high_hz": round(self.f_high_hz, 1), "z": round(self.z, 2), "delta_db": round(self.delta_db, 2)}

    def describe(self) -> str:
        return (f"band {self.band} ({_khz(self.f_low_hz)}-{_khz(self.f_high_hz)} kHz) {self.z:+.1f} sd "
                f"({self.delta_db:+.1f} dB)")


def _khz(f: float) -> str:
    return f"{f / 1000:.2f}" if f < 1000 else f"{f / 1000:.1f}"


@dataclass
class Explanation:
    """Compact explanation of one window (``to_dict``: the alert record's ``explanation``) plus,
    when asked for, the full arrays the PNG is drawn from."""

    machine_type: str
    device_id: str
    profile: str                        # "device" (the device's own statistics) or "group"
    top_bands: list[BandDeviation]
    segment_start_s: float              # within the window
    segment_end_s: float
    segment_deviation: float            # mean per-frame deviation in the segment
    median_deviation: float             # median per-frame deviation over the window (for comparison)
    max_abs_z: float                    # largest |band z| of the window
    stats_score: float | None = None    # the statistics part's standardised score, when computed
    # full arrays (only with ``maps=True``)
    band_z: np.ndarray | None = field(default=None, repr=False)          # (M,)
    frame_z: np.ndarray | None = field(default=None, repr=False)         # (M, T)
    frame_deviation: np.ndarray | None = field(default=None, repr=False)  # (T,)
    log_mel_db: np.ndarray | None = field(default=None, repr=False)      # (M, T) 10 log10 mel power
    window_db: np.ndarray | None = field(default=None, repr=False)       # (M,) band means, dB
    normal_db: np.ndarray | None = field(default=None, repr=False)       # (M,) normal profile, dB
    normal_sd_db: np.ndarray | None = field(default=None, repr=False)    # (M,) its spread, dB

    def to_dict(self) -> dict[str, Any]:
        """The compact form: a few hundred bytes of JSON."""
        out = {"version": EXPLANATION_VERSION, "profile": self.profile,
               "top_bands": [b.to_dict() for b in self.top_bands],
               "segment": {"start_s": round(self.segment_start_s, 3), "end_s": round(self.segment_end_s, 3),
                           "deviation": round(self.segment_deviation, 2),
                           "median_deviation": round(self.median_deviation, 2)},
               "max_abs_z": round(self.max_abs_z, 2)}
        if self.stats_score is not None and math.isfinite(self.stats_score):
            out["stats_score"] = round(self.stats_score, 3)
        return out

    def summary(self) -> str:
        bands = "; ".join(b.describe() for b in self.top_bands[:3])
        return (f"{self.device_id}: {bands}; most deviant {self.segment_start_s:.2f}-{self.segment_end_s:.2f} s "
                f"of the window")


def normal_profile(group: EnsembleGroup, device_id: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(in_mean, in_scale, "device" | "group"): the normal statistics-feature profile the
    device's statistics scorer z-scores with."""
    scorer, which = group.stats, "group"
    if device_id is not None and str(device_id) in group.device_scorers:
        scorer, which = group.device_scorers[str(device_id)][1], "device"
    mean, scale = getattr(scorer, "in_mean", None), getattr(scorer, "in_scale", None)
    if mean is None or scale is None:
        raise AsdError(f"model group {group.name!r}: its statistics scorer holds no normal band statistics")
    mean, scale = np.asarray(mean, dtype=np.float64), np.asarray(scale, dtype=np.float64)
    if not np.any(mean != 0) and np.all(scale == 1):
        raise AsdError(f"model group {group.name!r}: its statistics scorer does not standardise its inputs "
                       "(standardise_inputs off), so it holds no normal band statistics to explain with")
    return mean, scale, which


def _to_db(group: EnsembleGroup, feats: np.ndarray) -> np.ndarray:
    """Statistics features -> dB of the (un-lambda'd) band power."""
    lam = np.maximum(group.stats_lambda, 1e-300)
    if group.stats_log:
        return 10.0 * (feats - np.log10(lam))
    return 10.0 * np.log10(np.maximum(feats / lam, 1e-30))


def _inner_frames(spec: FeatureSpec, n_frames: int) -> tuple[int, int]:
    """[lo, hi): the frames whose STFT frame (n_fft samples centred on t * hop) lies inside the
    window; the frames at either edge see reflect padding and deviate in every window."""
    half = spec.n_fft // 2
    lo = -(-half // spec.hop_length)  # ceil
    hi = (spec.window_samples - half) // spec.hop_length + 1
    return max(0, lo), min(n_frames, max(hi, 0))


def _segment(dev: np.ndarray, length: int) -> tuple[int, float]:
    """Start frame and mean of the ``length`` contiguous frames with the highest mean."""
    length = max(1, min(int(length), dev.size))
    c = np.concatenate([[0.0], np.cumsum(dev)])
    means = (c[length:] - c[:-length]) / length
    start = int(np.argmax(means))
    return start, float(means[start])


def explain_windows(detector: Any, waves: Any, machine_type: str, device_id: str | None, *,
                    top_n: int = DEFAULT_TOP_N, segment_fraction: float = DEFAULT_SEGMENT_FRACTION,
                    min_segment_frames: int = DEFAULT_MIN_SEGMENT_FRAMES, maps: bool = False,
                    band_means: np.ndarray | None = None) -> list[Explanation]:
    """Explain each of ``waves`` ((B, window_samples) or one window) of one device.

    ``detector``: an ensemble ``Detector``. ``band_means``: the windows' band means when the
    caller already has them (from ``detector.embed``); computed here otherwise. ``maps``: keep
    the full arrays (deviation map, spectrogram, profiles) on each Explanation."""
    if getattr(detector, "kind", None) != "ensemble":
        raise AsdError("explanations need an ensemble bundle (the AE baseline keeps no band statistics)")
    if machine_type not in detector.groups:
        raise AsdError(f"no model group {machine_type!r} in bundle {detector.version} "
                       f"(groups: {sorted(detector.groups)})")
    if top_n < 1 or not 0 < segment_fraction <= 1 or min_segment_frames < 1:
        raise ValueError("top_n >= 1, 0 < segment_fraction <= 1 and min_segment_frames >= 1 are required")
    w = np.asarray(waves, dtype=np.float32)
    if w.ndim == 1:
        w = w[None, :]
    if w.ndim != 2 or w.shape[1] != detector.window_samples:
        raise ValueError(f"expected waves of shape (B, {detector.window_samples}), got {tuple(w.shape)}")
    if w.shape[0] == 0:
        return []
    import torch

    with torch.inference_mode():
        return _explain(detector, w, machine_type, device_id, top_n, segment_fraction, min_segment_frames, maps,
                        band_means)


def _explain(detector: Any, w: np.ndarray, machine_type: str, device_id: str | None, top_n: int,
             segment_fraction: float, min_segment_frames: int, maps: bool,
             band_means: np.ndarray | None) -> list[Explanation]:
    import torch

    from .ensemble import level_normalised

    group: EnsembleGroup = detector.groups[machine_type]
    spec: FeatureSpec = detector.feature_spec
    mean, scale, which = normal_profile(group, device_id)
    if band_means is None:
        band_means = detector.embed(w)[1]  # EnsembleModel.embed: level normalisation included
    bm = np.asarray(band_means, dtype=np.float64).reshape(w.shape[0], -1)
    band_z_all = (group.stats_features(bm) - mean) / scale
    stats_scorer = group.device_scorers[str(device_id)][1] if which == "device" else group.stats
    stats_scores = stats_scorer.score(group.stats_features(bm))
    edges = mel_band_edges(spec)
    model = detector.model
    out = []
    for b in range(w.shape[0]):
        x = torch.from_numpy(np.ascontiguousarray(w[b:b + 1])).to(detector.device)
        if model.config.normalise_level:
            x = level_normalised(x)
        power = model.frontend.mel_power(x)[0].double().cpu().numpy()  # (M, T)
        # per frame: (M, T) -> (T, M) through stats_features, back to (M, T)
        frame_z = ((group.stats_features(power.T) - mean) / scale).T
        z = band_z_all[b]
        order = np.argsort(-np.abs(z), kind="stable")[:top_n]
        # per frame: the frame's z in the window's top bands, each taken in the direction the
        # window deviates in and weighted by how far it does: sum_i z_i z[i, t] / sum_i |z_i|
        wz = z[order]
        dev = (wz @ frame_z[order]) / max(float(np.abs(wz).sum()), 1e-12)
        n_frames = dev.size
        length = min(n_frames, max(int(min_segment_frames), int(round(segment_fraction * n_frames))))
        lo, hi = _inner_frames(spec, n_frames)
        if hi - lo < length:  # too short a window to leave the edge frames out
            lo, hi = 0, n_frames
        s0, seg_dev = _segment(dev[lo:hi], length)
        s0 += lo
        hop_s = spec.hop_length / spec.sample_rate
        start_s = max(0.0, (s0 - 0.5) * hop_s)
        end_s = min(spec.window_seconds, (s0 + length - 0.5) * hop_s)
        norm_db = _to_db(group, mean)
        win_db = _to_db(group, group.stats_features(bm[b:b + 1])[0])
        top = [BandDeviation(int(i), float(edges[i, 0]), float(edges[i, 1]), float(edges[i, 2]), float(z[i]),
                             float(win_db[i] - norm_db[i])) for i in order]
        e = Explanation(machine_type, str(device_id), which, top, float(start_s), float(end_s), seg_dev,
                        float(np.median(dev)), float(np.max(np.abs(z))), float(stats_scores[b]))
        if maps:
            e.band_z, e.frame_z, e.frame_deviation = z, frame_z, dev
            e.log_mel_db = 10.0 * np.log10(power + spec.power_eps)
            e.window_db, e.normal_db = win_db, norm_db
            # the spread of the normal profile in dB (exact for log statistics, first order for linear)
            e.normal_sd_db = 10.0 * scale if group.stats_log else 10.0 / math.log(10) * scale / np.maximum(mean, 1e-300)
        out.append(e)
    return out


def explain_window(detector: Any, wave: Any, machine_type: str, device_id: str | None,
                   **kwargs: Any) -> Explanation:
    """``explain_windows`` for one window."""
    return explain_windows(detector, np.asarray(wave)[None, :] if np.ndim(wave) == 1 else wave,
                           machine_type, device_id, **kwargs)[0]


def explain_many(detector: Any, waves: Any, machine_types: Sequence[str], device_ids: Sequence[str],
                 **kwargs: Any) -> list[Explanation]:
    """Windows of several devices and types: grouped per (type, device), returned in order."""
    w = np.asarray(waves, dtype=np.float32)
    out: list[Explanation | None] = [None] * len(machine_types)
    keys: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(zip(machine_types, device_ids)):
        keys.setdefault((str(key[0]), str(key[1])), []).append(i)
    for (mt, dev), idx in keys.items():
        for i, e in zip(idx, explain_windows(detector, w[idx], mt, dev, **kwargs)):
            out[i] = e
    return out  # type: ignore[return-value]
