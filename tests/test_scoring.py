"""GMM scorer, NLL standardisation, ensemble weights, thresholds."""

import math

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from stream_asd.model.scoring import (AeGroup, EnsembleGroup, GaussianScorer, Thresholds,
                                      device_quantile_thresholds, ensemble, quantile_threshold)


def normals(n=400, d=6, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, d))
    return rng.standard_normal((n, d)) @ a + rng.uniform(-5, 5, d)


def test_training_normals_standardise_to_mean0_std1():
    x = normals()
    s = GaussianScorer().fit(x)
    z = s.score(x)
    assert abs(z.mean()) < 1e-9 and abs(z.std() - 1) < 1e-9
    assert s.n_train == 400 and s.converged


def test_nll_equals_sklearn_on_standardised_inputs():
    x, test = np.split(normals(450, seed=1), [400])
    s = GaussianScorer(standardise_inputs=False).fit(x)
    gmm = GaussianMixture(1, covariance_type="full", max_iter=1000, random_state=0).fit(x)
    assert np.allclose(s.nll(x), -gmm.score_samples(x), rtol=1e-9, atol=1e-9)
    # standardising inputs only shifts NLL by a constant: standardised scores agree
    s2 = GaussianScorer(standardise_inputs=True).fit(x)
    assert np.allclose(s.score(test), s2.score(test), atol=2e-3)  # reg_covar acts on different scales


def test_far_points_score_higher_and_scales_are_comparable():
    x = normals(seed=3)
    big = GaussianScorer().fit(x * 1e6)      # e.g. mel power statistics
    small = GaussianScorer().fit(x * 1e-3)   # e.g. embeddings
    out = x[:5] + 50.0
    assert np.all(big.score(out * 1e6) > 5) and np.all(small.score(out * 1e-3) > 5)
    assert np.allclose(big.score(x[:20] * 1e6), small.score(x[:20] * 1e-3), atol=1e-3)


def test_calibration_set_standardisation():
    x = normals(seed=4)
    cal = normals(100, seed=5)
    s = GaussianScorer().fit(x, calibration=cal)
    z = s.score(cal)
    assert abs(z.mean()) < 1e-9 and abs(z.std() - 1) < 1e-9


def test_export_import_plain_arrays_is_exact():
    x = normals(seed=6)
    s = GaussianScorer(reg_covar=1e-3).fit(x)
    arrays = s.to_arrays()
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float64 for v in arrays.values())
    t = GaussianScorer.from_parts(s.to_meta(), arrays)
    assert np.array_equal(s.nll(x), t.nll(x))
    bad = dict(arrays, means=arrays["means"][:, :3])
    with pytest.raises(ValueError):
        GaussianScorer.from_parts(s.to_meta(), bad)


def test_ensemble_weights():
    assert np.allclose(ensemble([1.0, 2.0], [10.0, -10.0]), [0.9 + 1.0, 1.8 - 1.0])
    assert np.allclose(ensemble([1.0], [3.0], (0.5, 0.5)), [2.0])
    with pytest.raises(ValueError):
        ensemble([1.0], [1.0], (1.0,))


def test_group_and_device_thresholds():
    s = np.arange(100, dtype=float)
    assert math.isclose(quantile_threshold(s, 0.99), 98.01)
    ids = ["a"] * 60 + ["b"] * 40
    per = device_quantile_thresholds(s, ids, q=0.5, min_windows=50)
    assert list(per) == ["a"] and math.isclose(per["a"], 29.5)
    th = Thresholds.calibrate(s, ids, quantile=0.5, min_device_windows=40)
    assert math.isclose(th.group, 49.5) and math.isclose(th.for_device("b"), 79.5)
    assert th.for_device("unknown") == th.group
    assert Thresholds.from_meta(th.to_meta()) == th
    assert Thresholds.from_meta(Thresholds().to_meta()).group == math.inf


def test_ensemble_group_fit_scores_and_round_trip():
    rng = np.random.default_rng(7)
    emb = rng.standard_normal((300, 8))
    bm = np.abs(rng.standard_normal((300, 12))) * np.linspace(1, 1e4, 12)
    g = EnsembleGroup.fit("fan", emb, bm, device_ids=["d"] * 300, quantile=0.95, min_device_windows=100)
    assert math.isclose(float(g.stats_lambda.sum()), 1.0)
    sc = g.scores(emb, bm)
    assert abs(sc["fusion"].mean()) < 1e-9 and abs(sc["stats"].std() - 1) < 1e-9
    assert np.allclose(sc["ensemble"], 0.9 * sc["fusion"] + 0.1 * sc["stats"])
    assert math.isclose(g.thresholds.group, float(np.quantile(sc["ensemble"], 0.95)))
    assert "d" in g.thresholds.per_device
    meta, arrays = g.to_parts("g0")
    h = EnsembleGroup.from_parts("fan", meta, arrays)
    assert np.array_equal(h.scores(emb, bm)["ensemble"], sc["ensemble"])


def test_ae_group_standardisation():
    g = AeGroup("fan", 0)
    g.fit_standardisation([1.0, 2.0, 3.0])
    assert np.allclose(g.scores([2.0, 2.0 + math.sqrt(2 / 3)]), [0.0, 1.0])
    assert AeGroup.from_meta("fan", g.to_meta()) == g


def test_calibrate_on_held_out_normals_restandardises():
    rng = np.random.default_rng(8)
    # fewer fit windows than dimensions: in-sample NLLs are tight, held-out ones explode
    emb = rng.standard_normal((60, 40))
    bm = np.abs(rng.standard_normal((60, 48))) + 1.0
    g = EnsembleGroup.fit("fan", emb[:30], bm[:30], reg_covar=1e-2)
    raw = g.scores(emb[30:], bm[30:])["ensemble"]
    assert raw.mean() > 10  # far off the in-sample scale
    g.calibrate(emb[30:], bm[30:], quantile=0.9)
    z = g.scores(emb[30:], bm[30:])
    assert abs(z["fusion"].mean()) < 1e-9 and abs(z["stats"].std() - 1) < 1e-9
    assert g.info["standardised_on"] == 30
    assert math.isclose(g.thresholds.group, float(np.quantile(z["ensemble"], 0.9)))
    # ranking is unchanged by the restandardisation (affine per model)
    assert np.array_equal(np.argsort(z["fusion"]), np.argsort(g.fusion.nll(emb[30:])))


def test_stats_log_option_uses_db_features():
    rng = np.random.default_rng(9)
    emb = rng.standard_normal((200, 4))
    bm = np.exp(rng.standard_normal((200, 6))) * np.logspace(0, 8, 6)  # log-normal power
    g = EnsembleGroup.fit("fan", emb, bm, stats_log=True)
    assert np.allclose(g.stats_features(bm[:3]), np.log10(bm[:3] * g.stats_lambda + 1e-12))
    meta, arrays = g.to_parts("g0")
    assert meta["stats_log"] is True
    h = EnsembleGroup.from_parts("fan", meta, arrays)
    assert h.stats_log and np.array_equal(h.scores(emb, bm)["stats"], g.scores(emb, bm)["stats"])
    # old manifests without the key load as linear statistics
    meta.pop("stats_log")
    assert EnsembleGroup.from_parts("fan", meta, arrays).stats_log is False


def test_per_device_scorers():
    rng = np.random.default_rng(10)
    a = rng.standard_normal((120, 5))
    b = rng.standard_normal((120, 5)) * 0.2 + 3.0  # device b sounds different from device a
    emb = np.concatenate([a, b])
    bm = np.abs(rng.standard_normal((240, 6))) + 1.0
    ids = ["t-a"] * 120 + ["t-b"] * 120
    g = EnsembleGroup.fit("t", emb, bm, device_ids=ids, per_device_min_windows=100)
    assert set(g.device_scorers) == {"t-a", "t-b"}
    # a window typical of a but placed at b's centre scale: own pair flags it, group pair not as much
    odd = np.full((1, 5), 1.5)
    own = g.scores(odd, bm[:1], ["t-b"])["fusion"][0]
    grp = g.scores(odd, bm[:1], None)["fusion"][0]
    assert own > 10 and own > grp
    # per-device rows are standardised by their own pair: mean 0 on their training windows
    z = g.scores(emb, bm, ids)
    assert abs(z["fusion"][120:].mean()) < 1e-9 and abs(z["fusion"][:120].std() - 1) < 1e-9
    # unknown device -> group pair
    assert np.array_equal(g.scores(emb[:5], bm[:5], ["x"] * 5)["ensemble"], g.scores(emb[:5], bm[:5])["ensemble"])
    # held-out calibration restandardises each device pair on its own windows
    cal = np.concatenate([rng.standard_normal((30, 5)), rng.standard_normal((30, 5)) * 0.2 + 3.0])
    g.calibrate(cal, bm[:60], ["t-a"] * 30 + ["t-b"] * 30, quantile=0.9, min_device_windows=30)
    zc = g.scores(cal, bm[:60], ["t-a"] * 30 + ["t-b"] * 30)["fusion"]
    assert abs(zc[:30].mean()) < 1e-9 and abs(zc[30:].std() - 1) < 1e-9
    assert set(g.thresholds.per_device) == {"t-a", "t-b"}
    meta, arrays = g.to_parts("g3")
    assert set(meta["devices"]) == {"t-a", "t-b"} and "g3.dev1.fusion.means" in arrays
    h = EnsembleGroup.from_parts("t", meta, arrays)
    assert np.array_equal(h.scores(cal, bm[:60], ["t-a"] * 30 + ["t-b"] * 30)["ensemble"],
                          g.scores(cal, bm[:60], ["t-a"] * 30 + ["t-b"] * 30)["ensemble"])
    with pytest.raises(ValueError):
        EnsembleGroup.fit("t", emb, bm, per_device_min_windows=10)
