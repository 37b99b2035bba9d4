"""ROC statistics with intervals: AUC, pAUC, a stratified bootstrap over clips, harmonic means.

AUC and pAUC are the DCASE evaluator's figures, ``sklearn.metrics.roc_auc_score`` and
``roc_auc_score(max_fpr=0.1)`` (McClish-standardised partial AUC). :func:`roc_areas` computes
both from *weighted* counts of negatives and positives per distinct score, so one call gives
the figures of a thousand resampled data sets at once (numpy, no Python loop over resamples);
with unit weights it equals scikit-learn's result (tests/test_roc_intervals.py checks this).

Intervals (docs/training.md, "Intervals"): a stratified percentile bootstrap over clips.
:class:`StratifiedBootstrap` draws, for every stratum (in ``asd-train evaluate``: machine type,
machine id or section, domain, label), as many clips as the stratum has, with replacement;
every figure of a report (an id's AUC, a type's mean over ids, a pooled AUC, a domain's AUC,
the DCASE harmonic mean) is computed from the same resampled data sets, so a mean's interval
is the interval of the mean, not a combination of separate intervals. Each stratum's draws come
from a generator seeded by (seed, the stratum's name): an id's interval does not depend on
which other ids are in the report, and a rerun gives the same numbers. Keeping normal and
anomalous clips apart (the test set's design fixes both counts) means every resample has both
classes, so the AUC is always defined, and a perfect separator gives [1, 1].

:func:`interval` takes the 2.5 and 97.5 % quantiles of the replicates. The percentile interval
of a skewed statistic can, through Monte-Carlo noise or bias (pAUC with few normals: ten
normals give FPR steps of 0.1, so max_fpr 0.1 spans one normal), miss the point estimate; the
reported interval is then widened to reach it, so a report never shows a figure outside its own
interval. The intervals measure test-set sampling only (which clips were recorded), not the
spread between training runs (``bench/model_quality.py --seeds N`` measures that).
"""

from __future__ import annotations

import zlib
from typing import Hashable, Iterable, Sequence

import numpy as np

MAX_FPR = 0.1
DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
DEFAULT_SEED = 0

_CHUNK_CELLS = 4_000_000  # resamples x distinct scores per block (memory bound of roc_areas)


def roc_areas(neg_counts: np.ndarray, pos_counts: np.ndarray, max_fpr: float | None = MAX_FPR
              ) -> tuple[np.ndarray, np.ndarray]:
    """(AUC, pAUC) of weighted samples: ``neg_counts``/``pos_counts`` (B, K) give how often each
    of K distinct scores, in *descending* order, occurs among the negatives / positives of each
    of B data sets. Ties form one ROC step (the diagonal scikit-learn's ``roc_curve`` draws), so
    the AUC is the Mann-Whitney statistic with ties counted half. pAUC: the area on FPR [0,
    max_fpr] with the end point interpolated, McClish-standardised (``roc_auc_score(max_fpr)``);
    ``max_fpr`` None or 1 gives the AUC. A data set without negatives or positives gives NaN."""
    neg = np.atleast_2d(np.asarray(neg_counts, dtype=np.float64))
    pos = np.atleast_2d(np.asarray(pos_counts, dtype=np.float64))
    if neg.shape != pos.shape:
        raise ValueError(f"count shapes differ: {neg.shape} vs {pos.shape}")
    n0, n1 = neg.sum(axis=1, keepdims=True), pos.sum(axis=1, keepdims=True)
    zero = np.zeros((neg.shape[0], 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = np.concatenate([zero, np.cumsum(neg, axis=1) / n0], axis=1)
        tpr = np.concatenate([zero, np.cumsum(pos, axis=1) / n1], axis=1)
    x0, x1, y0, y1 = fpr[:, :-1], fpr[:, 1:], tpr[:, :-1], tpr[:, 1:]
    auc = np.sum((x1 - x0) * (y0 + y1) / 2, axis=1)
    undefined = (n0[:, 0] == 0) | (n1[:, 0] == 0)
    auc[undefined] = np.nan
    if max_fpr is None or max_fpr == 1:
        return auc, auc.copy()
    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    end = np.minimum(x1, max_fpr)
    width = np.clip(end - x0, 0.0, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(x1 > x0, (y1 - y0) / (x1 - x0), 0.0)
    partial = np.sum(width * (y0 + (y0 + slope * width)) / 2, axis=1)
    min_area, max_area = 0.5 * max_fpr ** 2, max_fpr
    pauc = 0.5 * (1 + (partial - min_area) / (max_area - min_area))
    pauc[undefined] = np.nan
    return auc, pauc


def auc_pauc(labels: Sequence[int], scores: Sequence[float], max_fpr: float | None = MAX_FPR) -> tuple[float, float]:
    """(AUC, pAUC) of one labelled score list (1 = anomaly/positive); NaN with one class only."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    values, k = np.unique(-scores, return_inverse=True)  # ascending -score = descending score
    k = k.reshape(-1)
    neg = np.bincount(k[labels == 0], minlength=len(values))[None]
    pos = np.bincount(k[labels == 1], minlength=len(values))[None]
    auc, pauc = roc_areas(neg, pos, max_fpr)
    return float(auc[0]), float(pauc[0])


class StratifiedBootstrap:
    """``n_resamples`` bootstrap resamples of a set of items (clips), drawn with replacement
    within each stratum: a resample has as many items of every stratum as the data. Stratum
    ``key``'s draws come from ``numpy.random.default_rng([seed, crc32(repr(key))])``."""

    def __init__(self, strata: Sequence[Hashable], n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED):
        if n_resamples < 1:
            raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
        self.n_resamples = int(n_resamples)
        self.seed = int(seed)
        members: dict[Hashable, list[int]] = {}
        for i, key in enumerate(strata):
            members.setdefault(key, []).append(i)
        self._index = np.full(len(strata), -1, dtype=np.int64)  # item -> stratum number
        self._size: list[int] = []
        self._draws: list[np.ndarray] = []
        for number, key in enumerate(members):
            idx = np.asarray(members[key], dtype=np.int64)
            rng = np.random.default_rng([self.seed, zlib.crc32(repr(key).encode())])
            self._index[idx] = number
            self._size.append(len(idx))
            dtype = np.int32 if len(strata) < 2**31 else np.int64
            self._draws.append(idx[rng.integers(0, len(idx), size=(self.n_resamples, len(idx)))].astype(dtype))

    def resample(self, items: Iterable[int]) -> np.ndarray:
        """(n_resamples, len(items)) item indices: the resamples restricted to ``items``, which
        must be whole strata (a stratum partly inside would not be resampled as a whole)."""
        items = np.unique(np.asarray(list(items), dtype=np.int64))
        if items.size == 0:
            return np.zeros((self.n_resamples, 0), dtype=np.int64)
        numbers, counts = np.unique(self._index[items], return_counts=True)
        partial = [int(n) for n, c in zip(numbers, counts) if c != self._size[n]]
        if partial:
            raise ValueError(f"items cover {len(partial)} strata only in part; select whole strata")
        return np.concatenate([self._draws[n] for n in numbers], axis=1)


def bootstrap_areas(boot: StratifiedBootstrap, scores: np.ndarray, negatives: Iterable[int],
                    positives: Iterable[int], max_fpr: float | None = MAX_FPR) -> tuple[np.ndarray, np.ndarray]:
    """(AUC, pAUC) replicates, shape (n_resamples,), of ``positives`` against ``negatives``
    (item indices into ``scores``, each a union of whole strata of ``boot``)."""
    scores = np.asarray(scores, dtype=np.float64)
    negatives = np.asarray(list(negatives), dtype=np.int64)
    positives = np.asarray(list(positives), dtype=np.int64)
    neg_idx, pos_idx = boot.resample(negatives), boot.resample(positives)
    B = boot.n_resamples
    if neg_idx.shape[1] == 0 or pos_idx.shape[1] == 0:
        return np.full(B, np.nan), np.full(B, np.nan)
    used = np.unique(np.concatenate([negatives, positives]))
    values = np.unique(-scores[used])  # distinct scores, descending
    K = len(values)
    rank = np.zeros(len(scores), dtype=np.int64)
    rank[used] = np.searchsorted(values, -scores[used])
    auc, pauc = np.empty(B), np.empty(B)
    step = max(1, _CHUNK_CELLS // K)
    for start in range(0, B, step):
        stop = min(B, start + step)
        rows = np.arange(stop - start, dtype=np.int64)[:, None] * K
        neg = np.bincount((rows + rank[neg_idx[start:stop]]).ravel(), minlength=(stop - start) * K)
        pos = np.bincount((rows + rank[pos_idx[start:stop]]).ravel(), minlength=(stop - start) * K)
        auc[start:stop], pauc[start:stop] = roc_areas(neg.reshape(-1, K), pos.reshape(-1, K), max_fpr)
    return auc, pauc


def interval(point: float, replicates: np.ndarray, level: float = DEFAULT_LEVEL) -> list[float]:
    """[lo, hi]: the percentile interval of the replicates at ``level``, widened to contain
    ``point`` when it falls outside (module doc); [NaN, NaN] when the point is NaN."""
    reps = np.asarray(replicates, dtype=np.float64)
    reps = reps[~np.isnan(reps)]
    if point is None or np.isnan(point) or reps.size == 0:
        return [float("nan"), float("nan")]
    tail = (1 - level) / 2
    lo, hi = np.quantile(reps, [tail, 1 - tail])
    return [float(min(lo, point)), float(max(hi, point))]


def nanmean_rows(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Element-wise mean of replicate arrays, NaN entries skipped (all NaN -> NaN)."""
    if not len(rows):
        return np.array([np.nan])
    stack = np.vstack([np.atleast_1d(np.asarray(r, dtype=np.float64)) for r in rows])
    count = (~np.isnan(stack)).sum(axis=0)
    total = np.nansum(stack, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def harmonic_mean(rows: Sequence[np.ndarray] | Sequence[float]) -> np.ndarray:
    """Element-wise harmonic mean of values or replicate arrays (the DCASE official score:
    ``scipy.stats.hmean`` over AUCs and pAUCs); NaN entries skipped, a 0 gives 0."""
    if not len(rows):
        return np.array([np.nan])
    stack = np.vstack([np.atleast_1d(np.asarray(r, dtype=np.float64)) for r in rows])
    valid = ~np.isnan(stack)
    count = valid.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(valid, 1.0 / np.where(valid, stack, 1.0), 0.0)
        return np.where(count > 0, count / inv.sum(axis=0), np.nan)
