"""The publishing quality gate: is a candidate bundle at least as good as the current one?

Evaluation sets (each a list of labelled audio clips; every model windows them with its own
window length, so a deliberate feature-spec change can still be compared):

- ``archive``: held-out normal audio from the archive (the newest part of each device's audio,
  never trained on; see ``stream_asd.archive.reader.holdout_split``) plus pseudo-anomalies
  made from it. The pseudo-anomalies are waveform counterparts of the paper's SF/SP negatives
  and of common machine faults (a deviation from the paper's spectrogram-domain generator:
  the detector takes waveforms):
    * ``flip``: x[n] * (-1)^n mirrors the spectrum around fs/4 (SF, spectral flip);
    * ``stack``: x plus copies of itself shifted up and down in frequency (single-sideband,
      via the analytic signal): energy overflows into neighbouring bands (SP, stacking);
    * ``tone``: a steady whine at a random 1-6 kHz, 10 dB under the clip's RMS (bearing);
    * ``clicks``: periodic impulses (loose part, rattling).
- ``labelled``: the test split of a labelled data set (``--eval-data``), when given.

Figures per set and machine type: AUC (normal vs anomaly), pAUC (max FPR 0.1), and the false
alarm rate on the normals at each model's own thresholds. The gate refuses the candidate when,
for any set and machine type, its AUC is below the current model's by more than
``tolerance``, or below ``min_auc``, or when its false alarm rate on the normals is higher
than the current model's by more than ``far_tolerance`` (a model trained on faulty audio
flags healthy audio: it can still rank pseudo-anomalies well, its thresholds betray it). Reasons are plain sentences.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .evaluate import CLIP_SCORES, DEFAULT_CLIP_SCORE

log = logging.getLogger("trainer.gate")

PSEUDO_KINDS = ("flip", "stack", "tone", "clicks")


@dataclass
class EvalClip:
    wave: np.ndarray  # float32 mono at the evaluation sample rate
    label: int  # 1 anomaly (real or pseudo), 0 normal
    machine_type: str
    device_id: str
    kind: str = "normal"  # normal | anomaly | flip | stack | tone | clicks


@dataclass
class EvalSet:
    name: str
    clips: list[EvalClip] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.clips:
            out[c.kind] = out.get(c.kind, 0) + 1
        return out


# ---------------------------------------------------------------------------------------------
# Pseudo-anomalies (waveform domain)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)) + 1e-12))


def ssb_shift(x: np.ndarray, shift_hz: float, sample_rate: int) -> np.ndarray:
    """Shift every frequency by ``shift_hz`` (single-sideband modulation of the analytic signal)."""
    from scipy.signal import hilbert

    t = np.arange(x.shape[-1]) / sample_rate
    return np.real(hilbert(x) * np.exp(2j * np.pi * shift_hz * t)).astype(np.float32)


def pseudo_anomaly(x: np.ndarray, kind: str, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    rms = _rms(x)
    if kind == "flip":
        y = x * np.where(np.arange(x.shape[0]) % 2 == 0, 1.0, -1.0).astype(np.float32)
    elif kind == "stack":
        df = rng.uniform(150.0, 400.0)
        y = x + 0.8 * ssb_shift(x, df, sample_rate) + 0.8 * ssb_shift(x, -df, sample_rate)
    elif kind == "tone":
        t = np.arange(x.shape[0]) / sample_rate
        f = rng.uniform(1000.0, 6000.0)
        y = x + (rms * 10 ** (-10 / 20) * np.sqrt(2)) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    elif kind == "clicks":
        y = x.copy()
        period = int(sample_rate / rng.uniform(4.0, 12.0))
        start = int(rng.integers(0, period))
        for i in range(start, x.shape[0] - 32, period):
            y[i:i + 32] += (8 * rms) * np.hanning(32) * rng.choice([-1.0, 1.0])
    else:
        raise ValueError(f"unknown pseudo-anomaly {kind!r}; use one of {PSEUDO_KINDS}")
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    if peak > 1.0:  # keep it a valid waveform (the stream carries int16)
        y = y / peak
    return y.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Building the sets


def _read(path: Path, sample_rate: int) -> np.ndarray:
    from stream_asd.audio.io import read_audio

    return np.asarray(read_audio(path, sample_rate), dtype=np.float32)


def archive_eval_set(archive: str | Path, sample_rate: int, *, holdout_fraction: float,
                     machine_types: Sequence[str] | None = None, since: Any = None, until: Any = None,
                     max_hours: float | None = None, max_clips: int = 200, seed: int = 0,
                     pseudo_kinds: Sequence[str] = PSEUDO_KINDS, only: Sequence[str] | None = None) -> EvalSet:
    """Held-out archive normals + pseudo-anomalies made from them (same selection as training)."""
    from stream_asd.archive.reader import iter_archive_clips

    clips = list(iter_archive_clips(archive, machine_types=machine_types, since=since, until=until,
                                    max_hours=max_hours, holdout_fraction=holdout_fraction, split="test",
                                    only=only))
    rng = np.random.default_rng(seed)
    if len(clips) > max_clips:
        clips = [clips[i] for i in sorted(rng.choice(len(clips), max_clips, replace=False))]
    out = EvalSet("archive")
    for c in clips:
        wave = _read(c.path, sample_rate)
        out.clips.append(EvalClip(wave, 0, c.machine_type, c.machine_id, "normal"))
        for kind in pseudo_kinds:
            out.clips.append(EvalClip(pseudo_anomaly(wave, kind, sample_rate, rng), 1, c.machine_type,
                                      c.machine_id, kind))
    return out


def labelled_eval_set(data: str | Path, sample_rate: int, *, layout: str = "auto",
                      machine_types: Sequence[str] | None = None, max_clips: int = 400, seed: int = 0) -> EvalSet:
    from .data import list_clips

    clips = [c for c in list_clips(data, layout=layout, split="test", labels=["normal", "anomaly"])
             if not machine_types or c.machine_type in machine_types]
    rng = np.random.default_rng(seed)
    if len(clips) > max_clips:
        clips = [clips[i] for i in sorted(rng.choice(len(clips), max_clips, replace=False))]
    out = EvalSet("labelled")
    for c in clips:
        label = 1 if c.label == "anomaly" else 0
        out.clips.append(EvalClip(_read(c.path, sample_rate), label, c.machine_type,
                                  f"{c.machine_type}-{c.machine_id}", c.label))
    return out


# ---------------------------------------------------------------------------------------------
# Scoring and the decision


def _windows(wave: np.ndarray, window: int) -> np.ndarray:
    """Back-to-back windows with the runtime's rule (one padding rule everywhere)."""
    from stream_asd.model.windows import iter_windows

    return np.stack([w.samples for w in iter_windows(wave, window, window)])


def score_set(detector: Any, evalset: EvalSet) -> list[tuple[EvalClip, float, float]]:
    """(clip, clip score, threshold) for every clip the detector has a model group for; the clip
    score is the one ``asd-train evaluate`` uses by default (the median of the window scores)."""
    window = detector.feature_spec.window_samples
    clip_score = CLIP_SCORES[DEFAULT_CLIP_SCORE]
    out = []
    groups = set(detector.model_groups)
    for c in evalset.clips:
        if c.machine_type not in groups:
            continue
        w = _windows(c.wave, window)
        res = detector.score_windows(w, [c.machine_type] * len(w), [c.device_id] * len(w))
        out.append((c, float(clip_score(np.asarray([r.score for r in res]))), float(res[0].threshold)))
    return out


def figures(scored: list[tuple[EvalClip, float, float]]) -> dict[str, dict[str, float]]:
    """Per machine type: auc, pauc, far (normals over threshold), recall, counts."""
    from sklearn.metrics import roc_auc_score

    out: dict[str, dict[str, float]] = {}
    for mt in sorted({c.machine_type for c, _, _ in scored}):
        rows = [(c, s, t) for c, s, t in scored if c.machine_type == mt]
        y = np.array([c.label for c, _, _ in rows])
        s = np.array([v for _, v, _ in rows], dtype=np.float64)
        thr = np.array([t for _, _, t in rows], dtype=np.float64)
        s = np.nan_to_num(s, nan=np.finfo(np.float64).max, posinf=np.finfo(np.float64).max)
        both = 0 < y.sum() < len(y)
        out[mt] = {
            "auc": float(roc_auc_score(y, s)) if both else math.nan,
            "pauc": float(roc_auc_score(y, s, max_fpr=0.1)) if both else math.nan,
            "far": float(np.mean(s[y == 0] > thr[y == 0])) if (y == 0).any() else math.nan,
            "recall": float(np.mean(s[y == 1] > thr[y == 1])) if (y == 1).any() else math.nan,
            "n_normal": int((y == 0).sum()), "n_anomaly": int((y == 1).sum()),
        }
    return out


@dataclass
class GateResult:
    passed: bool
    reasons: list[str]
    candidate: dict[str, Any]
    current: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        def clean(o: Any) -> Any:
            if isinstance(o, float) and not math.isfinite(o):
                return None
            if isinstance(o, dict):
                return {k: clean(v) for k, v in o.items()}
            return o

        return clean({"passed": self.passed, "reasons": self.reasons, "candidate": self.candidate,
                      "current": self.current})


def run_gate(candidate: Any, current: Any | None, sets: Sequence[EvalSet], *, tolerance: float = 0.02,
             min_auc: float = 0.5, far_tolerance: float | None = 0.2) -> GateResult:
    """Compare two loaded detectors on the evaluation sets; see the module doc for the rule."""
    reasons: list[str] = []
    cand_fig: dict[str, Any] = {}
    cur_fig: dict[str, Any] | None = {} if current is not None else None
    if not any(s.clips for s in sets):
        return GateResult(False, ["no evaluation data: give --archive (with a holdout) or --eval-data"], {}, None)
    for s in sets:
        if not s.clips:
            continue
        cf = figures(score_set(candidate, s))
        cand_fig[s.name] = cf
        kf = figures(score_set(current, s)) if current is not None else {}
        if cur_fig is not None:
            cur_fig[s.name] = kf
        for mt, f in cf.items():
            auc = f["auc"]
            if math.isnan(auc):
                continue
            if auc < min_auc:
                reasons.append(f"{s.name}/{mt}: candidate AUC {auc:.3f} is below the floor {min_auc:.3f}")
            base = kf.get(mt, {}).get("auc", math.nan)
            if not math.isnan(base) and auc < base - tolerance:
                reasons.append(f"{s.name}/{mt}: candidate AUC {auc:.3f} is worse than the current model's "
                               f"{base:.3f} by more than the tolerance {tolerance:.3f}")
            base_far = kf.get(mt, {}).get("far", math.nan)
            if far_tolerance is not None and not math.isnan(base_far) and f["far"] > base_far + far_tolerance:
                reasons.append(f"{s.name}/{mt}: candidate false alarm rate {f['far']:.3f} exceeds the current "
                               f"model's {base_far:.3f} by more than {far_tolerance:.3f}")
    return GateResult(not reasons, reasons, cand_fig, cur_fig)
