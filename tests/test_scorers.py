"""The novelty scorers (stream_asd/model/scorers.py): k-NN beside the paper's GMM, bundle round
trips, old bundles without a scorer kind, settings refused before training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_asd.errors import ConfigError
from stream_asd.model.bundle import ModelBundle
from stream_asd.model.detector import load_detector
from stream_asd.model.ensemble import EnsembleConfig, EnsembleModel
from stream_asd.model.scorers import GaussianScorer, KnnScorer, make_scorer, scorer_from_parts
from stream_asd.model.scoring import EnsembleGroup

from _model_tiny import TINY_SPEC, tiny_waves


def _normals(n: int, seed: int, d: int = 12) -> np.ndarray:
    # normals on a low-dimensional curve (a machine's operating states), like embeddings
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 2 * np.pi, (n, 1))
    basis = np.random.default_rng(99).normal(size=(2, d))
    return np.cos(t) * basis[0] + np.sin(t) * basis[1] + 3.0 + 0.05 * rng.normal(size=(n, d))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_held_out_normals_standardised_and_off_manifold_points_score_higher(metric):
    train, calib, test = _normals(400, 0), _normals(200, 1), _normals(200, 2)
    off = test + np.random.default_rng(3).normal(0, 1.0, test.shape)  # off the normal states
    s = KnnScorer(k=3, metric=metric).fit(train, calibration=calib)
    z_cal = s.score(calib)
    assert abs(z_cal.mean()) < 1e-9 and abs(z_cal.std() - 1) < 1e-9
    assert abs(s.score(test).mean()) < 0.5
    assert np.median(s.score(off)) > np.quantile(s.score(test), 0.99)


def test_knn_leave_one_out_standardisation_matches_held_out_normals():
    # without calibration windows the bank windows' own zero distances must be left out, or
    # held-out normals would all score far above 0 (thresholds far too low)
    train, test = _normals(300, 0), _normals(300, 1)
    s = KnnScorer(k=1, metric="euclidean").fit(train)
    assert abs(s.score(test).mean()) < 0.5


def test_knn_bank_is_bounded_and_deterministic():
    x = _normals(1000, 0)
    a = KnnScorer(max_bank=128, random_state=7).fit(x)
    b = KnnScorer(max_bank=128, random_state=7).fit(x)
    assert a.bank.shape == (128, x.shape[1]) and a.n_train == 1000
    assert np.array_equal(a.bank, b.bank)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 40), st.integers(1, 8), st.sampled_from(["cosine", "euclidean"]), st.integers(0, 10_000))
def test_knn_raw_is_zero_on_its_bank_and_cosine_bounded(n, d, metric, seed):
    x = np.random.default_rng(seed).normal(size=(n, d)) + 0.1
    s = KnnScorer(k=1, metric=metric).fit(x)
    raw = s.raw(x)
    assert np.all(raw >= 0) and np.all(raw < 1e-3 * max(1.0, float(np.abs(x).max())))
    far = np.random.default_rng(seed + 1).normal(size=(5, d)) * 1e6
    if metric == "cosine":
        assert np.all(s.raw(far) <= 2.0 + 1e-6)


@pytest.mark.parametrize("kind", ["gmm", "knn"])
def test_scorer_round_trip_through_plain_arrays(kind):
    x, y = _normals(200, 0), _normals(50, 1)
    s = make_scorer(kind, metric="euclidean", k=2, reg_covar=1e-3).fit(x, calibration=y)
    arrays = {f"p.{k}": v for k, v in s.to_arrays().items()}
    t = scorer_from_parts(s.to_meta(), arrays, "p")
    assert type(t) is type(s)
    assert np.allclose(t.score(y), s.score(y), atol=1e-5)


def test_meta_without_kind_is_a_gmm():
    s = GaussianScorer(reg_covar=1e-3).fit(_normals(100, 0))
    meta = {k: v for k, v in s.to_meta().items() if k != "kind"}  # bundles before k-NN
    t = scorer_from_parts(meta, {f"p.{k}": v for k, v in s.to_arrays().items()}, "p")
    assert isinstance(t, GaussianScorer)
    with pytest.raises(ValueError, match="unknown scorer kind"):
        scorer_from_parts({**meta, "kind": "svm"}, {}, "p")


def test_knn_bank_that_disagrees_with_its_meta_is_refused():
    s = KnnScorer(k=1).fit(_normals(50, 0))
    arrays = s.to_arrays()
    with pytest.raises(ValueError, match="inconsistent shapes"):
        KnnScorer.from_parts({**s.to_meta(), "dim": 3}, arrays)
    with pytest.raises(ValueError, match="invalid"):
        KnnScorer.from_parts(s.to_meta(), {**arrays, "bank": np.full_like(arrays["bank"], np.nan)})


def test_knn_ensemble_bundle_scores_the_same_after_load(tmp_path):
    torch.manual_seed(0)
    model = EnsembleModel(TINY_SPEC, EnsembleConfig.tiny()).eval()
    w = tiny_waves(40, seed=0)
    with torch.no_grad():
        e = model.embed(torch.from_numpy(w))
    devices = ["dev-a"] * 20 + ["dev-b"] * 20
    g = EnsembleGroup.fit("fan", e.fusion, e.band_means, device_ids=devices, stats_log=True,
                          per_device_min_windows=20, fusion_scorer="knn", stats_scorer="knn", knn_k=2)
    assert isinstance(g.fusion, KnnScorer) and g.fusion.metric == "cosine"
    assert isinstance(g.stats, KnnScorer) and g.stats.metric == "euclidean"
    assert all(isinstance(p, KnnScorer) for pair in g.device_scorers.values() for p in pair)
    model.to_bundle({"fan": g}, version="knn-1").save(tmp_path / "b")
    det = load_detector(tmp_path / "b", "cpu")
    test = tiny_waves(6, seed=5)
    got = det.score_windows(test, ["fan"] * 6, ["dev-a"] * 3 + ["dev-z"] * 3)
    # the loaded scorers (banks, standardisation, device pairs) score the detector's own
    # embeddings as the fitted ones do; an untrained network's embeddings lie so close together
    # that float32 differences between two forward passes would dominate a comparison
    fus, bms = det.embed(test)
    want = g.scores(fus, bms, ["dev-a"] * 3 + ["dev-z"] * 3)["ensemble"]
    assert np.allclose([s.score for s in got], want, rtol=1e-6, atol=1e-6)
    assert ModelBundle.load(tmp_path / "b").groups["fan"]["fusion"]["kind"] == "knn"


def test_unknown_scorer_setting_refused_before_training():
    from trainer.profiles import check_scorers, get_profile

    with pytest.raises(ConfigError, match="fusion_scorer='svm'"):
        check_scorers(get_profile("tiny", ["scoring.fusion_scorer=svm"]))
    with pytest.raises(ConfigError, match="knn_k"):
        check_scorers(get_profile("tiny", ["scoring.knn_k=0"]))
    check_scorers(get_profile("tiny", ["scoring.fusion_scorer=knn"]))
