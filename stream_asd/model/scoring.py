"""Scoring (paper sec. 2.8, method.md "Scoring"): Gaussian NLL per model, standardised, ensembled,
thresholded per model group (machine type) and per device.

- ``GaussianScorer``: scikit-learn ``GaussianMixture`` (1 component, 1000 EM iterations, full
  covariance) fitted on training normals. ``nll(X)`` is the negative log-likelihood, computed
  here in numpy from the exported parameters (so loading a bundle needs no pickled sklearn
  object); ``score(X)`` standardises it by the mean/std of the training normals' NLL.
- ``ensemble(fusion_z, stats_z, weights)``: 0.9 * fusion + 0.1 * statistics by default.
- ``Thresholds`` (DEVIATION 5: the paper sets none): one threshold per model group (a high quantile of normal scores) and one per
  device once the device has at least ``min_device_windows`` normal windows.
- ``EnsembleGroup`` / ``AeGroup``: everything one model group needs, exportable as plain arrays
  (safetensors) + JSON metadata.

DEVIATION 4 (docs/model.md; numerically neutral): inputs are z-scored per dimension before the GMM. For a
full-covariance Gaussian that only adds a constant to every NLL, which the NLL standardisation
removes; it keeps the fit well conditioned when feature scales differ by many orders of
magnitude (mel power statistics) and makes ``reg_covar`` a relative ridge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "GaussianScorer", "ensemble", "quantile_threshold", "device_quantile_thresholds", "Thresholds",
    "EnsembleGroup", "AeGroup", "DEFAULT_WEIGHTS", "DEFAULT_QUANTILE", "DEFAULT_MIN_DEVICE_WINDOWS",
]

DEFAULT_WEIGHTS: tuple[float, float] = (0.9, 0.1)  # (fusion, statistics), paper sec. 2.8
DEFAULT_QUANTILE = 0.99  # threshold = this quantile of normal scores (the paper sets none)
DEFAULT_MIN_DEVICE_WINDOWS = 50  # per-device threshold once a device has this many normal windows
MIN_RESTANDARDISE = 10  # EnsembleGroup.calibrate re-estimates NLL mean/std from this many windows on


def _as_2d(x: Any) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"expected a (N, D) array, got shape {a.shape}")
    return a


class GaussianScorer:
    """GMM anomaly scorer: fit on normals, ``nll`` raw, ``score`` standardised (training normals:
    mean 0, std 1).

    >>> s = GaussianScorer().fit(train_embeddings)
    >>> z = s.score(test_embeddings)        # (N,) float64
    """

    ARRAY_NAMES = ("in_mean", "in_scale", "weights", "means", "precisions_cholesky")

    def __init__(self, n_components: int = 1, max_iter: int = 1000, covariance_type: str = "full",
                 reg_covar: float = 1e-6, random_state: int = 0, standardise_inputs: bool = True):
        if covariance_type != "full":
            raise ValueError("GaussianScorer supports covariance_type='full' only (the paper's setting)")
        self.n_components = int(n_components)
        self.max_iter = int(max_iter)
        self.covariance_type = covariance_type
        self.reg_covar = float(reg_covar)
        self.random_state = int(random_state)
        self.standardise_inputs = bool(standardise_inputs)
        self.in_mean: np.ndarray | None = None
        self.in_scale: np.ndarray | None = None
        self.weights: np.ndarray | None = None
        self.means: np.ndarray | None = None
        self.precisions_cholesky: np.ndarray | None = None
        self.nll_mean = 0.0
        self.nll_std = 1.0
        self.n_train = 0
        self.converged = True

    @property
    def fitted(self) -> bool:
        return self.means is not None

    @property
    def dim(self) -> int:
        if self.means is None:
            raise ValueError("GaussianScorer is not fitted")
        return int(self.means.shape[1])

    def fit(self, X: Any, calibration: Any | None = None) -> "GaussianScorer":
        """Fit the GMM on normals ``X``; standardise NLLs by their mean/std on ``X`` or, when
        given, on held-out normals ``calibration`` (better when n_train is not >> dimension:
        in-sample NLLs of a full-covariance fit are then optimistic and too tightly spread)."""
        from sklearn.mixture import GaussianMixture  # lazy: only training needs scikit-learn

        X = _as_2d(X)
        if not np.all(np.isfinite(X)):
            raise ValueError("GaussianScorer.fit: non-finite values in the training features")
        if X.shape[0] < 2:
            raise ValueError("GaussianScorer.fit needs at least 2 samples")
        if self.standardise_inputs:
            self.in_mean = X.mean(axis=0)
            sd = X.std(axis=0)
            self.in_scale = np.where(sd > 0, sd, 1.0)
        else:
            self.in_mean = np.zeros(X.shape[1])
            self.in_scale = np.ones(X.shape[1])
        Xs = (X - self.in_mean) / self.in_scale
        gmm = GaussianMixture(n_components=self.n_components, covariance_type="full", max_iter=self.max_iter,
                              reg_covar=self.reg_covar, random_state=self.random_state)
        gmm.fit(Xs)
        self.weights = np.asarray(gmm.weights_, dtype=np.float64)
        self.means = np.asarray(gmm.means_, dtype=np.float64)
        self.precisions_cholesky = np.asarray(gmm.precisions_cholesky_, dtype=np.float64)
        self.converged = bool(gmm.converged_)
        self.n_train = int(X.shape[0])
        self.nll_mean, self.nll_std = 0.0, 1.0
        self.restandardise(X if calibration is None else calibration)
        return self

    def nll(self, X: Any) -> np.ndarray:
        """Negative log-likelihood per row (N,), float64, same as ``-GaussianMixture.score_samples``
        on the standardised inputs."""
        if not self.fitted:
            raise ValueError("GaussianScorer is not fitted")
        X = _as_2d(X)
        if X.shape[1] != self.dim:
            raise ValueError(f"feature dimension {X.shape[1]} != fitted dimension {self.dim}")
        Xs = (X - self.in_mean) / self.in_scale
        d = Xs.shape[1]
        log_probs = []
        for k in range(self.weights.shape[0]):
            L = self.precisions_cholesky[k]
            y = (Xs - self.means[k]) @ L
            log_det = np.sum(np.log(np.diag(L)))
            log_probs.append(-0.5 * (d * math.log(2 * math.pi) + np.sum(y * y, axis=1)) + log_det
                             + math.log(self.weights[k]))
        lp = np.stack(log_probs, axis=1)
        m = lp.max(axis=1, keepdims=True)
        return -(m[:, 0] + np.log(np.exp(lp - m).sum(axis=1)))

    def restandardise(self, X: Any) -> None:
        """Re-estimate the NLL mean/std on these normals (e.g. held-out calibration windows)."""
        self.nll_mean, self.nll_std = 0.0, 1.0
        nll = self.nll(X)
        self.nll_mean = float(nll.mean())
        sd = float(nll.std())
        self.nll_std = sd if sd > 0 and math.isfinite(sd) else 1.0

    def score(self, X: Any) -> np.ndarray:
        """Standardised NLL: (nll - mean_train) / std_train."""
        return (self.nll(X) - self.nll_mean) / self.nll_std

    # --- plain-array export (never pickle) ---------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        if not self.fitted:
            raise ValueError("GaussianScorer is not fitted")
        return {name: np.ascontiguousarray(getattr(self, name), dtype=np.float64) for name in self.ARRAY_NAMES}

    def to_meta(self) -> dict[str, Any]:
        return {"n_components": self.n_components, "max_iter": self.max_iter,
                "covariance_type": self.covariance_type, "reg_covar": self.reg_covar,
                "random_state": self.random_state, "standardise_inputs": self.standardise_inputs,
                "nll_mean": self.nll_mean, "nll_std": self.nll_std, "n_train": self.n_train,
                "converged": self.converged, "dim": self.dim}

    @classmethod
    def from_parts(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> "GaussianScorer":
        s = cls(n_components=meta["n_components"], max_iter=meta["max_iter"],
                covariance_type=meta["covariance_type"], reg_covar=meta["reg_covar"],
                random_state=meta["random_state"], standardise_inputs=meta["standardise_inputs"])
        for name in cls.ARRAY_NAMES:
            setattr(s, name, np.asarray(arrays[name], dtype=np.float64))
        s.nll_mean = float(meta["nll_mean"])
        s.nll_std = float(meta["nll_std"])
        s.n_train = int(meta["n_train"])
        s.converged = bool(meta["converged"])
        k, d = s.means.shape
        if (s.weights.shape != (k,) or s.precisions_cholesky.shape != (k, d, d)
                or s.in_mean.shape != (d,) or s.in_scale.shape != (d,) or d != int(meta["dim"])):
            raise ValueError("GaussianScorer arrays have inconsistent shapes")
        if not (s.nll_std > 0 and math.isfinite(s.nll_std) and math.isfinite(s.nll_mean)):
            raise ValueError("GaussianScorer nll_mean/nll_std invalid")
        return s


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
    """

    name: str
    fusion: GaussianScorer
    stats: GaussianScorer
    stats_lambda: np.ndarray
    weights: tuple[float, float] = DEFAULT_WEIGHTS
    thresholds: Thresholds = field(default_factory=Thresholds)
    info: dict[str, Any] = field(default_factory=dict)  # free-form (n_train, device list, ...)
    stats_log: bool = False
    device_scorers: dict[str, tuple[GaussianScorer, GaussianScorer]] = field(default_factory=dict)

    def stats_features(self, band_means: Any) -> np.ndarray:
        """The statistics GMM's input: lambda * band means (eq. 8), in log10 when ``stats_log``."""
        x = _as_2d(band_means) * self.stats_lambda
        return np.log10(x + STATS_LOG_EPS) if self.stats_log else x

    @classmethod
    def fit(cls, name: str, fusion_embeddings: Any, band_means: Any, stats_lambda: Any | None = None,
            device_ids: Sequence[str] | None = None, weights: Sequence[float] = DEFAULT_WEIGHTS,
            quantile: float = DEFAULT_QUANTILE, min_device_windows: int = DEFAULT_MIN_DEVICE_WINDOWS,
            reg_covar: float = 1e-6, max_iter: int = 1000, calib_fusion: Any | None = None,
            calib_band_means: Any | None = None, calib_device_ids: Sequence[str] | None = None,
            stats_log: bool = False, per_device_min_windows: int | None = None,
            tail: str = "gaussian") -> "EnsembleGroup":
        """Fit both GMMs on training normals of this group. NLL standardisation and thresholds
        come from the same normals, or from held-out normals ``calib_*`` when given.

        ``band_means``: per-band time means of the mel power (B, M), from ``EnsembleModel.embed``.
        ``stats_lambda``: eq. 8 weights (M,); fitted here from ``band_means`` if None (the mean of
        per-clip means equals the mean over clips and frames for equal-length windows).
        ``per_device_min_windows``: also fit a GMM pair for every device id (``device_ids``) with
        at least this many training windows (None: group GMMs only)."""
        fe = _as_2d(fusion_embeddings)
        bm = _as_2d(band_means)
        lam = (bm.mean(axis=0) / bm.mean(axis=0).sum()) if stats_lambda is None else np.asarray(stats_lambda, dtype=np.float64)
        held_out = calib_fusion is not None
        if held_out != (calib_band_means is not None):
            raise ValueError("give both calib_fusion and calib_band_means, or neither")
        group = cls(name, GaussianScorer(), GaussianScorer(), lam, (float(weights[0]), float(weights[1])),
                    stats_log=bool(stats_log))
        cbm = _as_2d(calib_band_means) if held_out else None
        group.fusion = GaussianScorer(max_iter=max_iter, reg_covar=reg_covar).fit(fe, calib_fusion)
        group.stats = GaussianScorer(max_iter=max_iter, reg_covar=reg_covar).fit(
            group.stats_features(bm), None if cbm is None else group.stats_features(cbm))
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
                    group.device_scorers[dev] = (
                        GaussianScorer(max_iter=max_iter, reg_covar=reg_covar).fit(fe[sel]),
                        GaussianScorer(max_iter=max_iter, reg_covar=reg_covar).fit(group.stats_features(bm[sel])))
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
        def pair(prefix: str, m: Mapping[str, Any]) -> tuple[GaussianScorer, GaussianScorer]:
            def sub(part: str) -> dict[str, np.ndarray]:
                return {k: arrays[f"{prefix}.{part}.{k}"] for k in GaussianScorer.ARRAY_NAMES}

            return GaussianScorer.from_parts(m["fusion"], sub("fusion")), GaussianScorer.from_parts(m["stats"], sub("stats"))

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
