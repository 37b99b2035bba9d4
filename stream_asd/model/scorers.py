"""Novelty scorers of one model part (fusion embedding or statistics features): fitted on
normal windows, they give each window a raw novelty (higher = less like the normals) and a
standardised score (held-out normals: mean 0, std 1) that the ensemble weights add up.

- ``GaussianScorer`` (the paper, sec. 2.8): a full-covariance Gaussian mixture; raw score is
  the negative log-likelihood. DEVIATION 4 (docs/model.md; numerically neutral): inputs are
  z-scored per dimension first. For a full covariance that only adds a constant to every NLL,
  which the standardisation removes; it keeps the fit well conditioned when feature scales
  differ by orders of magnitude (mel power statistics) and makes ``reg_covar`` a relative ridge.
- ``KnnScorer`` (DEVIATION 12, docs/model.md): the mean distance to the k nearest normal
  windows in a memory bank (cosine for embeddings, Euclidean on z-scored inputs otherwise).
  A GMM's NLL grows with the square of the distance along directions the few training windows
  happened not to vary in, so a healthy state the training clips never heard scores in the
  hundreds; a nearest-neighbour distance is bounded and needs no covariance estimate.

Both export plain arrays + JSON (never pickle); ``scorer_from_parts`` rebuilds either from a
bundle by its ``kind``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

__all__ = ["GaussianScorer", "KnnScorer", "SCORER_KINDS", "make_scorer", "scorer_from_parts"]

SCORER_KINDS = ("gmm", "knn")


def _as_2d(x: Any) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"expected a (N, D) array, got shape {a.shape}")
    return a


class _Standardised:
    """Standardisation shared by the scorers: ``score = (raw - raw_mean) / raw_std``."""

    raw_mean: float
    raw_std: float
    _FITTED_BY = ""  # the (N, D) array a fit sets: its columns are the input dimension

    @property
    def fitted(self) -> bool:
        return getattr(self, self._FITTED_BY) is not None

    @property
    def dim(self) -> int:
        if not self.fitted:
            raise ValueError(f"{type(self).__name__} is not fitted")
        return int(getattr(self, self._FITTED_BY).shape[1])

    def raw(self, X: Any) -> np.ndarray:  # pragma: no cover - each scorer defines it
        raise NotImplementedError

    def restandardise(self, X: Any) -> None:
        """Re-estimate the raw mean/std on these normals (e.g. held-out calibration windows)."""
        self._standardise_on(self.raw(X))

    def _standardise_on(self, raw: np.ndarray) -> None:
        self.raw_mean = float(raw.mean())
        sd = float(raw.std())
        self.raw_std = sd if sd > 0 and math.isfinite(sd) else 1.0

    def score(self, X: Any) -> np.ndarray:
        """Standardised raw score: (raw - mean) / std of the normals it was standardised on."""
        return (self.raw(X) - self.raw_mean) / self.raw_std


class GaussianScorer(_Standardised):
    """GMM anomaly scorer: fit on normals, ``nll`` raw, ``score`` standardised (training normals:
    mean 0, std 1).

    >>> s = GaussianScorer().fit(train_embeddings)
    >>> z = s.score(test_embeddings)        # (N,) float64
    """

    KIND = "gmm"
    _FITTED_BY = "means"
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
        self.raw_mean = 0.0
        self.raw_std = 1.0
        self.n_train = 0
        self.converged = True

    # the bundle and older callers name the standardisation after what a GMM scores
    nll_mean = property(lambda self: self.raw_mean, lambda self, v: setattr(self, "raw_mean", v))
    nll_std = property(lambda self: self.raw_std, lambda self, v: setattr(self, "raw_std", v))

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

    raw = nll

    # --- plain-array export (never pickle) ---------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        if not self.fitted:
            raise ValueError("GaussianScorer is not fitted")
        return {name: np.ascontiguousarray(getattr(self, name), dtype=np.float64) for name in self.ARRAY_NAMES}

    def to_meta(self) -> dict[str, Any]:
        return {"kind": self.KIND, "n_components": self.n_components, "max_iter": self.max_iter,
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


class KnnScorer(_Standardised):
    """Mean distance to the ``k`` nearest windows of a memory bank of normal windows.

    ``metric="cosine"``: 1 - cosine similarity of the raw vectors (embeddings trained with an
    angular margin, ArcFace, live on the sphere). ``metric="euclidean"``: on inputs z-scored per
    dimension by the training normals (statistics features in dB). The bank keeps at most
    ``max_bank`` windows (a seeded random subset) so memory and scoring time stay bounded.

    >>> s = KnnScorer(k=1).fit(train_embeddings, calibration=held_out_embeddings)
    >>> z = s.score(test_embeddings)
    """

    KIND = "knn"
    _FITTED_BY = "bank"
    ARRAY_NAMES = ("in_mean", "in_scale", "bank")
    METRICS = ("cosine", "euclidean")
    ROWS_PER_BLOCK = 1024  # distance matrix computed in blocks of rows (memory bound)

    def __init__(self, k: int = 1, metric: str = "cosine", max_bank: int = 8192, random_state: int = 0):
        if metric not in self.METRICS:
            raise ValueError(f"metric must be one of {self.METRICS}, got {metric!r}")
        if k < 1 or max_bank < 1:
            raise ValueError("k and max_bank must be at least 1")
        self.k = int(k)
        self.metric = metric
        self.max_bank = int(max_bank)
        self.random_state = int(random_state)
        self.in_mean: np.ndarray | None = None
        self.in_scale: np.ndarray | None = None
        self.bank: np.ndarray | None = None
        self.raw_mean = 0.0
        self.raw_std = 1.0
        self.n_train = 0

    def _prepare(self, X: np.ndarray) -> np.ndarray:
        x = ((X - self.in_mean) / self.in_scale).astype(np.float32)
        if self.metric == "cosine":
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    def fit(self, X: Any, calibration: Any | None = None) -> "KnnScorer":
        """Keep (a subset of) the normals ``X`` as the bank; standardise on ``calibration`` when
        given, else on ``X`` leave-one-out (a bank window's own zero distance left out)."""
        X = _as_2d(X)
        if not np.all(np.isfinite(X)):
            raise ValueError("KnnScorer.fit: non-finite values in the training features")
        if X.shape[0] < self.k + 1:
            raise ValueError(f"KnnScorer.fit needs at least k + 1 = {self.k + 1} samples")
        d = X.shape[1]
        if self.metric == "euclidean":
            self.in_mean = X.mean(axis=0)
            sd = X.std(axis=0)
            self.in_scale = np.where(sd > 0, sd, 1.0)
        else:
            self.in_mean, self.in_scale = np.zeros(d), np.ones(d)
        keep = np.arange(X.shape[0])
        if keep.size > self.max_bank:
            keep = np.sort(np.random.default_rng(self.random_state).choice(keep.size, self.max_bank, replace=False))
        self.bank = self._prepare(X[keep])
        self.n_train = int(X.shape[0])
        if calibration is not None:
            self.restandardise(calibration)
        else:
            self._standardise_on(self._raw(X, self_rows=keep))
        return self

    def _raw(self, X: np.ndarray, self_rows: np.ndarray | None = None) -> np.ndarray:
        x = self._prepare(X)
        in_bank = None
        if self_rows is not None:  # row self_rows[j] of X is bank row j: mask its self-match
            in_bank = np.full(X.shape[0], -1)
            in_bank[self_rows] = np.arange(self_rows.size)
        out = np.empty(x.shape[0])
        k = min(self.k, self.bank.shape[0] - (self_rows is not None))
        for start in range(0, x.shape[0], self.ROWS_PER_BLOCK):
            xb = x[start:start + self.ROWS_PER_BLOCK]
            if self.metric == "cosine":
                dist = 1.0 - xb @ self.bank.T
            else:
                dist = (np.square(xb).sum(1)[:, None] - 2.0 * xb @ self.bank.T + np.square(self.bank).sum(1)[None, :])
                dist = np.sqrt(np.maximum(dist, 0.0))
            if in_bank is not None:
                rows = np.nonzero(in_bank[start:start + xb.shape[0]] >= 0)[0]
                dist[rows, in_bank[start + rows]] = np.inf
            out[start:start + xb.shape[0]] = np.partition(dist, k - 1, axis=1)[:, :k].mean(axis=1)
        return np.maximum(out, 0.0)

    def raw(self, X: Any) -> np.ndarray:
        """Mean distance to the k nearest bank windows, per row (N,)."""
        if not self.fitted:
            raise ValueError("KnnScorer is not fitted")
        X = _as_2d(X)
        if X.shape[1] != self.dim:
            raise ValueError(f"feature dimension {X.shape[1]} != fitted dimension {self.dim}")
        return self._raw(X)

    def to_arrays(self) -> dict[str, np.ndarray]:
        if not self.fitted:
            raise ValueError("KnnScorer is not fitted")
        return {"in_mean": np.ascontiguousarray(self.in_mean, dtype=np.float64),
                "in_scale": np.ascontiguousarray(self.in_scale, dtype=np.float64),
                "bank": np.ascontiguousarray(self.bank, dtype=np.float32)}

    def to_meta(self) -> dict[str, Any]:
        return {"kind": self.KIND, "k": self.k, "metric": self.metric, "max_bank": self.max_bank,
                "random_state": self.random_state, "raw_mean": self.raw_mean, "raw_std": self.raw_std,
                "n_train": self.n_train, "dim": self.dim}

    @classmethod
    def from_parts(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> "KnnScorer":
        s = cls(k=int(meta["k"]), metric=str(meta["metric"]), max_bank=int(meta["max_bank"]),
                random_state=int(meta["random_state"]))
        s.in_mean = np.asarray(arrays["in_mean"], dtype=np.float64)
        s.in_scale = np.asarray(arrays["in_scale"], dtype=np.float64)
        s.bank = np.asarray(arrays["bank"], dtype=np.float32)
        s.raw_mean, s.raw_std = float(meta["raw_mean"]), float(meta["raw_std"])
        s.n_train = int(meta["n_train"])
        n, d = s.bank.shape if s.bank.ndim == 2 else (0, -1)
        if (s.bank.ndim != 2 or n < s.k or n > s.max_bank or s.in_mean.shape != (d,) or s.in_scale.shape != (d,)
                or d != int(meta["dim"])):
            raise ValueError("KnnScorer arrays have inconsistent shapes")
        if not (np.all(np.isfinite(s.bank)) and np.all(s.in_scale > 0)):
            raise ValueError("KnnScorer bank or input scale invalid")
        if not (s.raw_std > 0 and math.isfinite(s.raw_std) and math.isfinite(s.raw_mean)):
            raise ValueError("KnnScorer raw_mean/raw_std invalid")
        return s


Scorer = GaussianScorer | KnnScorer


def make_scorer(kind: str, *, metric: str = "cosine", k: int = 1, max_bank: int = 8192,
                reg_covar: float = 1e-6, max_iter: int = 1000) -> Scorer:
    """A new, unfitted scorer of this kind with the settings that kind reads."""
    if kind == "gmm":
        return GaussianScorer(max_iter=max_iter, reg_covar=reg_covar)
    if kind == "knn":
        return KnnScorer(k=k, metric=metric, max_bank=max_bank)
    raise ValueError(f"scorer kind must be one of {SCORER_KINDS}, got {kind!r}")


def scorer_from_parts(meta: Mapping[str, Any], arrays_with_prefix: Mapping[str, np.ndarray], prefix: str) -> Scorer:
    """Rebuild a scorer from its bundle meta and the arrays named ``<prefix>.<array>``; bundles
    written before k-NN scoring carry no ``kind`` and are GMMs."""
    kind = meta.get("kind", "gmm")
    cls = {"gmm": GaussianScorer, "knn": KnnScorer}.get(kind)
    if cls is None:
        raise ValueError(f"unknown scorer kind {kind!r}")
    return cls.from_parts(meta, {n: arrays_with_prefix[f"{prefix}.{n}"] for n in cls.ARRAY_NAMES})
