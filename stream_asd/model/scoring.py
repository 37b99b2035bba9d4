"""Scoring (paper sec. 2.8, method.md "Scoring"): a novelty score per model part, standardised,
ensembled, thresholded per model group (machine type) and per device.

- The scorers (stream_asd/model/scorers.py): ``GaussianScorer``, the paper's GMM (1 component,
  full covariance, NLL computed in numpy from exported parameters, so loading a bundle needs
  no pickled sklearn object), or ``KnnScorer`` (mean distance to the nearest normal windows);
  ``score(X)`` standardises the raw score by its mean/std on held-out normals.
- ``ensemble(fusion_z, stats_z, weights)``: 0.9 * fusion + 0.1 * statistics by default.
- ``Thresholds`` (DEVIATION 5: the paper sets none): one threshold per model group (a high quantile of normal scores) and one per
  device once the device has at least ``min_device_windows`` normal windows.
- ``EnsembleGroup`` / ``AeGroup``: everything one model group needs, exportable as plain arrays
  (safetensors) + JSON metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .scorers import GaussianScorer, KnnScorer, Scorer, _as_2d, make_scorer, scorer_from_parts

__all__ = [
    "GaussianScorer", "KnnScorer", "ensemble", "quantile_threshold", "device_quantile_thresholds", "Thresholds",
    "EnsembleGroup", "AeGroup", "DEFAULT_WEIGHTS", "DEFAULT_QUANTILE", "DEFAULT_MIN_DEVICE_WINDOWS",
]

DEFAULT_WEIGHTS: tuple[float, float] = (0.9, 0.1)  # (fusion, statistics), paper sec. 2.8
DEFAULT_QUANTILE = 0.99  # threshold = this quantile of normal scores (the paper sets none)
DEFAULT_MIN_DEVICE_WINDOWS = 50  # per-device threshold once a device has this many normal windows
MIN_RESTANDARDISE = 10  # EnsembleGroup.calibrate re-estimates NLL mean/std from this many windows on


def ensemble(fusion_z: Any, stats_z: Any, weights: Sequence[float] = DEFAULT_WEIGHTS) -> np.ndarray:
    """Ensemble score (eq. 9 on standardised scores): w_fusion * fusion_z + w_stats * stats_z."""
    if len(weights) != 2:
        raise ValueError("ensemble weights are (fusion, statistics)")
    return float(weights[0]) * np.asarray(fusion_z, dtype=np.float64) + float(weights[1]) * np.asarray(stats_z, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------

def quantile_threshold(scores: Any, q: float = DEFAULT_QUANTILE) -> float:
    """The q-quantile of normal scores (linear interpolation)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size == 0:
        raise ValueError("quantile_threshold needs at least one score")
    if not 0 < q <= 1:
        raise ValueError("q must be in (0, 1]")
    return float(np.quantile(s, q))


#: the empirical quantile is used only when at least this many windows are expected beyond it;
#: with fewer the sample cannot say where a 0.999 quantile lies
MIN_TAIL_WINDOWS = 5


TAILS = ("gaussian", "exponential")


def extreme_quantile(scores: Any, q: float, tail: str = "gaussian") -> tuple[float, str]:
    """The q-quantile of normal scores and how it was estimated. A high quantile from few
    windows (fewer than ``MIN_TAIL_WINDOWS`` expected beyond it) is extrapolated, and never set
    below the empirical quantile: the thresholds of an operator's false-alarm target are often
    at 0.995-0.999, from a few hundred held-out windows. ``tail``: ``gaussian`` fits a normal
    distribution to all the scores; ``exponential`` fits the excesses of the top tenth (at
    least ``MIN_TAIL_WINDOWS`` scores) over the next score, a peaks-over-threshold estimate that
    follows a right-skewed tail (GMM negative log-likelihoods are chi-square-like) where the
    Gaussian one undershoots."""
    from statistics import NormalDist

    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    s = np.asarray(scores, dtype=np.float64).ravel()
    emp = quantile_threshold(s, q)
    if q >= 1 or s.size < 3 or s.size * (1 - q) >= MIN_TAIL_WINDOWS:
        return emp, "empirical"
    if tail == "gaussian" or s.size <= MIN_TAIL_WINDOWS:
        return max(emp, float(s.mean() + NormalDist().inv_cdf(q) * s.std(ddof=1))), "gaussian tail"
    top = np.sort(s)[::-1]
    m = max(MIN_TAIL_WINDOWS, s.size // 10)
    u = top[m]  # excesses of the m largest over the next one
    scale = float(np.mean(top[:m] - u))
    return max(emp, float(u + scale * math.log((m / s.size) / (1 - q)))), "exponential tail"


def device_quantile_thresholds(scores: Any, device_ids: Sequence[str], q: float = DEFAULT_QUANTILE,
                               min_windows: int = DEFAULT_MIN_DEVICE_WINDOWS, tail: str = "gaussian") -> dict[str, float]:
    """Per-device q-quantile, only for devices with at least ``min_windows`` normal scores."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    ids = np.asarray([str(d) for d in device_ids])
    if ids.shape[0] != s.shape[0]:
        raise ValueError("scores and device_ids differ in length")
    out: dict[str, float] = {}
    for dev in sorted(set(ids.tolist())):
        sel = s[ids == dev]
        if sel.size >= min_windows:
            out[dev] = extreme_quantile(sel, q, tail)[0]
    return out


@dataclass
class Thresholds:
    """Decision thresholds of one model group: ``group`` and optional ``per_device``."""

    group: float = math.inf
    per_device: dict[str, float] = field(default_factory=dict)
    quantile: float = DEFAULT_QUANTILE
    min_device_windows: int = DEFAULT_MIN_DEVICE_WINDOWS
    # how the quantile was chosen and what it promises (false-alarm target, alert rule,
    # predicted rate; trainer), plus the estimation method and window count: JSON only
    calibration: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def calibrate(cls, normal_scores: Any, device_ids: Sequence[str] | None = None,
                  quantile: float = DEFAULT_QUANTILE,
                  min_device_windows: int = DEFAULT_MIN_DEVICE_WINDOWS, tail: str = "gaussian") -> "Thresholds":
        per_device = ({} if device_ids is None else
                      device_quantile_thresholds(normal_scores, device_ids, quantile, min_device_windows, tail))
        group, method = extreme_quantile(normal_scores, quantile, tail)
        n = int(np.asarray(normal_scores).size)
        return cls(group, per_device, quantile, min_device_windows, {"method": method, "n_windows": n})

    def for_device(self, device_id: str) -> float:
        return self.per_device.get(str(device_id), self.group)

    def to_meta(self) -> dict[str, Any]:
        return {"group": _json_float(self.group), "per_device": {k: _json_float(v) for k, v in sorted(self.per_device.items())},
                "quantile": self.quantile, "min_device_windows": self.min_device_windows,
                "calibration": dict(self.calibration)}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "Thresholds":
        return cls(_float_json(meta["group"]), {str(k): _float_json(v) for k, v in meta.get("per_device", {}).items()},
                   float(meta.get("quantile", DEFAULT_QUANTILE)), int(meta.get("min_device_windows", DEFAULT_MIN_DEVICE_WINDOWS)),
                   dict(meta.get("calibration", {})))


def _json_float(v: float) -> float | str:
    # JSON has no infinity; an uncalibrated threshold is stored as the string "inf".
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def _float_json(v: Any) -> float:
    return float(v)


# --------------------------------------------------------------------------------------------
# Model groups (one per machine type)
# --------------------------------------------------------------------------------------------

STATS_LOG_EPS = 1e-12


@dataclass
class EnsembleGroup:
    """Scoring state of one model group of the ensemble: GMMs on fusion embeddings and on
    statistics features, the statistics lambda, ensemble weights and thresholds.

    Options (both off by default, both stored in the bundle):

    - ``stats_log``: the statistics GMM sees ``log10(lambda * band_means + 1e-12)`` (dB) instead
      of linear power. DEVIATION 8 (docs/model.md): eq. 7-8 are kept formally, but linear mel
      power is heavy-tailed and dominated by the loudest bands; in the log domain lambda only
      shifts each dimension, which the full-covariance Gaussian absorbs (trainer measured mean
      AUC 0.86 -> 0.97 for the statistics model on the synthetic benchmark).
    - ``device_scorers``: a (fusion, statistics) GaussianScorer pair per device id that had
      enough training windows; ``scores(..., device_ids)`` uses a device's own pair when present
      and the group's otherwise. DEVIATION 9: the paper fits one GMM pair per machine type/id set.
    - scorer kinds (``fit(fusion_scorer=..., stats_scorer=...)``): ``gmm`` (the paper) or
      ``knn`` (DEVIATION 12): cosine k-NN on fusion embeddings, Euclidean k-NN on z-scored
      statistics features. Each part's kind is stored with it.
    """

    name: str
    fusion: Scorer
    stats: Scorer
    stats_lambda: np.ndarray
    weights: tuple[float, float] = DEFAULT_WEIGHTS
    thresholds: Thresholds = field(default_factory=Thresholds)
    info: dict[str, Any] = field(default_factory=dict)  # free-form (n_train, device list, ...)
    stats_log: bool = False
    device_scorers: dict[str, tuple[Scorer, Scorer]] = field(default_factory=dict)

    def stats_features(self, band_means: Any) -> np.ndarray:
        """The statistics GMM's input: lambda * band means (eq. 8), in log10 when ``stats_log``.
        Lambda is kept for eq. 8 but changes no score: the scorers' per-dimension z-scoring
        removes it (in the log domain all it leaves is the 1e-12/lambda floor; docs/model.md)."""
        x = _as_2d(band_means) * self.stats_lambda
        return np.log10(x + STATS_LOG_EPS) if self.stats_log else x

    @classmethod
    def fit(cls, name: str, fusion_embeddings: Any, band_means: Any, stats_lambda: Any | None = None,
            device_ids: Sequence[str] | None = None, weights: Sequence[float] = DEFAULT_WEIGHTS,
            quantile: float = DEFAULT_QUANTILE, min_device_windows: int = DEFAULT_MIN_DEVICE_WINDOWS,
            reg_covar: float = 1e-6, max_iter: int = 1000, calib_fusion: Any | None = None,
            calib_band_means: Any | None = None, calib_device_ids: Sequence[str] | None = None,
            stats_log: bool = False, per_device_min_windows: int | None = None,
            tail: str = "gaussian", fusion_scorer: str = "gmm", stats_scorer: str = "gmm",
            knn_k: int = 1, knn_bank: int = 8192) -> "EnsembleGroup":
        """Fit both GMMs on training normals of this group. NLL standardisation and thresholds
        come from the same normals, or from held-out normals ``calib_*`` when given.

        ``band_means``: per-band time means of the mel power (B, M), from ``EnsembleModel.embed``.
        ``stats_lambda``: eq. 8 weights (M,); fitted here from ``band_means`` if None (the mean of
        per-clip means equals the mean over clips and frames for equal-length windows).
        ``per_device_min_windows``: also fit a GMM pair for every device id (``device_ids``) with
        at least this many training windows (None: group GMMs only).
        ``fusion_scorer`` / ``stats_scorer``: ``gmm`` or ``knn`` (``knn_k`` neighbours, a bank of
        at most ``knn_bank`` windows)."""
        fe = _as_2d(fusion_embeddings)
        bm = _as_2d(band_means)
        lam = (bm.mean(axis=0) / bm.mean(axis=0).sum()) if stats_lambda is None else np.asarray(stats_lambda, dtype=np.float64)
        held_out = calib_fusion is not None
        if held_out != (calib_band_means is not None):
            raise ValueError("give both calib_fusion and calib_band_means, or neither")
        group = cls(name, GaussianScorer(), GaussianScorer(), lam, (float(weights[0]), float(weights[1])),
                    stats_log=bool(stats_log))
        cbm = _as_2d(calib_band_means) if held_out else None
        common = {"k": knn_k, "max_bank": knn_bank, "reg_covar": reg_covar, "max_iter": max_iter}

        def new_fusion():
            return make_scorer(fusion_scorer, metric="cosine", **common)

        def new_stats():
            return make_scorer(stats_scorer, metric="euclidean", **common)

        group.fusion = new_fusion().fit(fe, calib_fusion)
        group.stats = new_stats().fit(group.stats_features(bm), None if cbm is None else group.stats_features(cbm))
        group.info["n_train"] = int(bm.shape[0])
        if per_device_min_windows is not None:
            if device_ids is None:
                raise ValueError("per_device_min_windows needs device_ids")
            ids = np.asarray([str(d) for d in device_ids])
            if ids.shape[0] != bm.shape[0]:
                raise ValueError("device_ids and training windows differ in length")
            for dev in sorted(set(ids.tolist())):
                sel = ids == dev
                if sel.sum() >= max(2, per_device_min_windows):
                    group.device_scorers[dev] = (new_fusion().fit(fe[sel]),
                                                 new_stats().fit(group.stats_features(bm[sel])))
            group.info["per_device_min_windows"] = int(per_device_min_windows)
        if held_out:
            group.info["n_calibration"] = int(cbm.shape[0])
            group.calibrate(calib_fusion, cbm, calib_device_ids, quantile, min_device_windows, tail=tail)
        else:
            group.calibrate(fe, bm, device_ids, quantile, min_device_windows, restandardise=False, tail=tail)
        return group

    def _pairs(self, n: int, device_ids: Sequence[str] | None) -> dict[str | None, np.ndarray]:
        """Row indices per scorer pair: device id with its own pair, None for the group pair."""
        if device_ids is None or not self.device_scorers:
            return {None: np.arange(n)}
        ids = [str(d) for d in device_ids]
        if len(ids) != n:
            raise ValueError("device_ids and rows differ in length")
        rows: dict[str | None, list[int]] = {}
        for r, d in enumerate(ids):
            rows.setdefault(d if d in self.device_scorers else None, []).append(r)
        out = {k: np.asarray(v, dtype=np.int64) for k, v in rows.items()}
        return out

    def scores(self, fusion_embeddings: Any, band_means: Any,
               device_ids: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """{'fusion': z, 'stats': z, 'ensemble': w . z} per row; rows of a device with its own
        GMM pair are scored with it when ``device_ids`` is given."""
        fe = _as_2d(fusion_embeddings)
        sf = self.stats_features(band_means)
        zf = np.empty(fe.shape[0])
        zs = np.empty(fe.shape[0])
        for dev, idx in self._pairs(fe.shape[0], device_ids).items():
            f, st = (self.fusion, self.stats) if dev is None else self.device_scorers[dev]
            zf[idx] = f.score(fe[idx])
            zs[idx] = st.score(sf[idx])
        return {"fusion": zf, "stats": zs, "ensemble": ensemble(zf, zs, self.weights)}

    def calibrate(self, fusion_embeddings: Any, band_means: Any, device_ids: Sequence[str] | None = None,
                  quantile: float = DEFAULT_QUANTILE, min_device_windows: int = DEFAULT_MIN_DEVICE_WINDOWS,
                  restandardise: bool = True, tail: str = "gaussian") -> Thresholds:
        """Thresholds from these normals' ensemble scores. With ``restandardise`` (default) and at
        least ``MIN_RESTANDARDISE`` windows, the NLL standardisations are first re-estimated on
        them (the group pair on all windows scored by it, each device pair on its device's
        windows): pass held-out normals here. In-sample NLLs of a full-covariance GMM fitted on
        few windows (n not >> dimension) are far too optimistic and tightly spread, which would
        make held-out normals score in the thousands and the 0.9/0.1 weighting meaningless."""
        fe = _as_2d(fusion_embeddings)
        bm = _as_2d(band_means)
        if restandardise:
            sf = self.stats_features(bm)
            if fe.shape[0] >= MIN_RESTANDARDISE:  # the group pair (also the fallback): all normals
                self.fusion.restandardise(fe)
                self.stats.restandardise(sf)
                self.info["standardised_on"] = int(fe.shape[0])
            for dev, idx in self._pairs(fe.shape[0], device_ids).items():
                if dev is not None and idx.size >= MIN_RESTANDARDISE:
                    f, st = self.device_scorers[dev]
                    f.restandardise(fe[idx])
                    st.restandardise(sf[idx])
        self.thresholds = Thresholds.calibrate(self.scores(fe, bm, device_ids)["ensemble"], device_ids,
                                               quantile, min_device_windows, tail)
        return self.thresholds

    def to_parts(self, prefix: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {f"{prefix}.stats_lambda": np.ascontiguousarray(self.stats_lambda, dtype=np.float64)}
        for part in ("fusion", "stats"):
            for k, v in getattr(self, part).to_arrays().items():
                arrays[f"{prefix}.{part}.{k}"] = v
        devices = {}
        for i, (dev, (f, st)) in enumerate(sorted(self.device_scorers.items())):
            dprefix = f"{prefix}.dev{i}"
            for part, scorer in (("fusion", f), ("stats", st)):
                for k, v in scorer.to_arrays().items():
                    arrays[f"{dprefix}.{part}.{k}"] = v
            devices[dev] = {"arrays": dprefix, "fusion": f.to_meta(), "stats": st.to_meta()}
        meta = {"arrays": prefix, "weights": list(self.weights), "fusion": self.fusion.to_meta(),
                "stats": self.stats.to_meta(), "thresholds": self.thresholds.to_meta(), "info": self.info,
                "stats_log": self.stats_log, "devices": devices}
        return meta, arrays

    @classmethod
    def from_parts(cls, name: str, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> "EnsembleGroup":
        def pair(prefix: str, m: Mapping[str, Any]) -> tuple[Scorer, Scorer]:
            return (scorer_from_parts(m["fusion"], arrays, f"{prefix}.fusion"),
                    scorer_from_parts(m["stats"], arrays, f"{prefix}.stats"))

        prefix = meta["arrays"]
        fusion, stats = pair(prefix, meta)
        lam = np.asarray(arrays[f"{prefix}.stats_lambda"], dtype=np.float64)
        if lam.shape != (stats.dim,):
            raise ValueError(f"stats_lambda has shape {lam.shape}, statistics GMM has dimension {stats.dim}")
        devices = {}
        for dev, dm in dict(meta.get("devices", {})).items():
            f, st = pair(dm["arrays"], dm)
            if f.dim != fusion.dim or st.dim != stats.dim:
                raise ValueError(f"device {dev!r}: GMM dimensions differ from the group's")
            devices[str(dev)] = (f, st)
        w = meta["weights"]
        return cls(name, fusion, stats, lam, (float(w[0]), float(w[1])), Thresholds.from_meta(meta["thresholds"]),
                   dict(meta.get("info", {})), bool(meta.get("stats_log", False)), devices)


@dataclass
class AeGroup:
    """Scoring state of one model group of the AE baseline: the index of its autoencoder,
    mean/std of the training normals' reconstruction errors, thresholds."""

    name: str
    index: int
    err_mean: float = 0.0
    err_std: float = 1.0
    thresholds: Thresholds = field(default_factory=Thresholds)
    info: dict[str, Any] = field(default_factory=dict)

    def fit_standardisation(self, train_errors: Any) -> None:
        e = np.asarray(train_errors, dtype=np.float64).ravel()
        if e.size < 2:
            raise ValueError("need at least 2 training errors")
        self.err_mean = float(e.mean())
        sd = float(e.std())
        self.err_std = sd if sd > 0 else 1.0
        self.info["n_train"] = int(e.size)

    def scores(self, errors: Any) -> np.ndarray:
        return (np.asarray(errors, dtype=np.float64) - self.err_mean) / self.err_std

    def calibrate(self, errors: Any, device_ids: Sequence[str] | None = None, quantile: float = DEFAULT_QUANTILE,
                  min_device_windows: int = DEFAULT_MIN_DEVICE_WINDOWS, tail: str = "gaussian") -> Thresholds:
        self.thresholds = Thresholds.calibrate(self.scores(errors), device_ids, quantile, min_device_windows, tail)
        return self.thresholds

    def to_meta(self) -> dict[str, Any]:
        return {"index": self.index, "err_mean": self.err_mean, "err_std": self.err_std,
                "thresholds": self.thresholds.to_meta(), "info": self.info}

    @classmethod
    def from_meta(cls, name: str, meta: Mapping[str, Any]) -> "AeGroup":
        g = cls(name, int(meta["index"]), float(meta["err_mean"]), float(meta["err_std"]),
                Thresholds.from_meta(meta["thresholds"]), dict(meta.get("info", {})))
        if not (g.err_std > 0 and math.isfinite(g.err_std)):
            raise ValueError("err_std must be a positive number")
        return g
