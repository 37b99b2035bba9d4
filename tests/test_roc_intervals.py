"""trainer/roc.py: vectorised AUC/pAUC equal scikit-learn's; the stratified bootstrap's intervals
behave (contain the point, shrink with more clips, [1, 1] for a perfect separator); harmonic means."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from trainer.roc import (MAX_FPR, StratifiedBootstrap, auc_pauc, bootstrap_areas, harmonic_mean, interval,
                         nanmean_rows, roc_areas)


def _ci(labels, scores, n_resamples=1000, seed=0):
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    boot = StratifiedBootstrap(labels.tolist(), n_resamples, seed)
    auc, pauc = auc_pauc(labels, scores)
    ra, rp = bootstrap_areas(boot, scores, np.flatnonzero(labels == 0), np.flatnonzero(labels == 1))
    return auc, pauc, interval(auc, ra), interval(pauc, rp), ra, rp


# allow_subnormal=False: training tests earlier in the session call torch.set_flush_denormal(True),
# process-wide, and hypothesis refuses to draw subnormal floats under flush-to-zero.
scores_st = st.lists(st.one_of(st.integers(-3, 3).map(float), st.floats(-5, 5, allow_nan=False, allow_subnormal=False)),
                     min_size=2, max_size=40)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_points_equal_sklearn_ties_included(data):
    scores = data.draw(scores_st)
    labels = data.draw(st.lists(st.integers(0, 1), min_size=len(scores), max_size=len(scores)))
    if min(labels) == max(labels):
        labels[0] = 1 - labels[0]
    auc, pauc = auc_pauc(labels, scores)
    assert auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert pauc == pytest.approx(roc_auc_score(labels, scores, max_fpr=MAX_FPR), abs=1e-12)
    assert auc_pauc(labels, scores, max_fpr=0.35)[1] == pytest.approx(roc_auc_score(labels, scores, max_fpr=0.35),
                                                                      abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_interval_contains_point(data):
    scores = data.draw(scores_st)
    labels = data.draw(st.lists(st.integers(0, 1), min_size=len(scores), max_size=len(scores)))
    if min(labels) == max(labels):
        labels[0] = 1 - labels[0]
    auc, pauc, auc_ci, pauc_ci, _, _ = _ci(labels, scores, n_resamples=200)
    assert auc_ci[0] <= auc <= auc_ci[1]
    assert pauc_ci[0] <= pauc <= pauc_ci[1]
    assert 0.0 <= auc_ci[0] and auc_ci[1] <= 1.0


def test_replicates_are_resampled_aucs():
    # each replicate is the sklearn AUC of a data set with the resample's clips (checked directly)
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(12, int), np.ones(7, int)]
    scores = np.round(rng.normal(size=19) + labels, 1)  # rounding makes ties
    boot = StratifiedBootstrap(labels.tolist(), 25, seed=3)
    neg, pos = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    ra, rp = bootstrap_areas(boot, scores, neg, pos)
    rn, rpos = boot.resample(neg), boot.resample(pos)
    assert rn.shape == (25, 12) and rpos.shape == (25, 7)
    assert set(np.unique(rn)) <= set(neg) and set(np.unique(rpos)) <= set(pos)
    for b in range(25):
        idx = np.r_[rn[b], rpos[b]]
        assert ra[b] == pytest.approx(roc_auc_score(labels[idx], scores[idx]), abs=1e-12)
        assert rp[b] == pytest.approx(roc_auc_score(labels[idx], scores[idx], max_fpr=MAX_FPR), abs=1e-12)


def test_perfect_separator_gives_one_one():
    labels = [0] * 10 + [1] * 10
    scores = list(range(20))
    auc, pauc, auc_ci, pauc_ci, _, _ = _ci(labels, scores)
    assert auc == pauc == 1.0
    assert auc_ci == [1.0, 1.0] and pauc_ci == [1.0, 1.0]


def test_interval_shrinks_with_more_clips():
    rng = np.random.default_rng(7)

    def width(n):
        labels = np.r_[np.zeros(n, int), np.ones(n, int)]
        scores = rng.normal(size=2 * n) + 1.0 * labels
        _, _, auc_ci, pauc_ci, _, _ = _ci(labels, scores)
        return auc_ci[1] - auc_ci[0], pauc_ci[1] - pauc_ci[0]

    small, large = width(15), width(600)
    assert large[0] < small[0] / 3 and large[1] < small[1] / 3
    # ~0.76 AUC with 600 + 600 clips: the normal-theory standard error is about 0.014
    assert 0.03 < large[0] < 0.08


def test_deterministic_and_independent_of_other_strata():
    labels = [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]
    strata = [("a", l) for l in labels[:6]] + [("b", l) for l in labels[6:]]
    scores = np.array([0.1, 0.5, 0.3, 0.4, 0.9, 0.7, 0.2, 0.6, 0.8, 0.3])
    one = StratifiedBootstrap(strata, 100, seed=5)
    again = StratifiedBootstrap(strata, 100, seed=5)
    only_a = StratifiedBootstrap(strata[:6], 100, seed=5)
    a_neg, a_pos = [0, 1, 2], [3, 4, 5]
    r1 = bootstrap_areas(one, scores, a_neg, a_pos)[0]
    np.testing.assert_array_equal(r1, bootstrap_areas(again, scores, a_neg, a_pos)[0])
    np.testing.assert_array_equal(r1, bootstrap_areas(only_a, scores[:6], a_neg, a_pos)[0])
    other = bootstrap_areas(StratifiedBootstrap(strata, 100, seed=6), scores, a_neg, a_pos)[0]
    assert not np.array_equal(r1, other)
    with pytest.raises(ValueError, match="in part"):
        one.resample([0, 1])  # two of stratum ('a', 0)'s three clips


def test_one_class_gives_nan():
    auc, pauc = auc_pauc([0, 0, 0], [1.0, 2.0, 3.0])
    assert math.isnan(auc) and math.isnan(pauc)
    assert all(math.isnan(v) for v in interval(float("nan"), np.array([0.5, 0.6])))
    a, p = roc_areas(np.array([[1.0, 2.0]]), np.zeros((1, 2)))
    assert math.isnan(a[0]) and math.isnan(p[0])


def test_harmonic_and_mean_rows():
    assert harmonic_mean([0.5, 1.0])[0] == pytest.approx(2 / (2 + 1))
    assert harmonic_mean([0.5, float("nan"), 1.0])[0] == pytest.approx(2 / 3)
    assert harmonic_mean([0.0, 1.0])[0] == 0.0
    assert math.isnan(harmonic_mean([float("nan")])[0])
    rows = [np.array([0.5, 1.0]), np.array([1.0, np.nan])]
    np.testing.assert_allclose(harmonic_mean(rows), [2 / 3, 1.0])
    np.testing.assert_allclose(nanmean_rows(rows), [0.75, 1.0])
    from scipy.stats import hmean

    vals = [0.61, 0.93, 0.72, 0.55]
    assert harmonic_mean(vals)[0] == pytest.approx(hmean(vals))
