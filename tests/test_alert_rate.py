"""The false-alarm arithmetic (stream_asd/model/alert_rate.py) against the processor's own alert
rule (processor/alerts.py) fed with simulated exceedances, and the trainer's use of it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_asd.model.alert_rate import AlertRule, exceedance_for_target, false_alerts_per_day
from stream_asd.model.scoring import Thresholds, extreme_quantile
from stream_asd.processor.alerts import AlertTracker


def simulated_raises(exceed: np.ndarray, k: int, n: int) -> int:
    tracker = AlertTracker(k, n, clear_after=n)
    raises = 0
    for i, over in enumerate(exceed):
        rec = tracker.observe(device_id="d", machine_type="fan", window_index=i, window_id=str(i), score=0.0,
                              threshold=0.0, is_anomaly=bool(over), model_version="v", at_ns=i)
        raises += rec is not None and rec.state == "raised"
    return raises


def test_independent_windows_match_the_alert_tracker():
    """Without overlap (hop = window) the formula is the rate the processor's rule produces."""
    rule = AlertRule(k=3, n=5, window_s=1.0, hop_s=1.0)
    p = 0.03
    rng = np.random.default_rng(0)
    windows = 2_000_000
    raises = simulated_raises(rng.random(windows) < p, rule.k, rule.n)
    predicted = false_alerts_per_day(p, rule) * windows / rule.slots_per_day
    assert raises == pytest.approx(predicted, rel=0.15)


def test_overlapping_windows_are_not_counted_as_independent():
    """Windows 10 s long every 5 s: one disturbance lifts two windows; the formula follows the
    simulated rule within a factor 1.5 where the independent-windows formula is ~8x too low."""
    rule = AlertRule(k=3, n=5, window_s=10.0, hop_s=5.0)
    rng = np.random.default_rng(1)
    slots = 1_000_000
    disturbed = rng.random(slots) < 0.01
    exceed = disturbed | np.roll(disturbed, 1)  # window j covers slots j-1 and j
    p = exceed.mean()
    raises = simulated_raises(exceed, rule.k, rule.n)
    per_day = raises / (slots * rule.hop_s) * 86_400
    assert per_day == pytest.approx(false_alerts_per_day(p, rule), rel=0.5)
    naive = AlertRule(k=3, n=5, window_s=5.0, hop_s=5.0)
    assert false_alerts_per_day(p, naive) < per_day / 5


@settings(max_examples=60, deadline=None)
@given(target=st.floats(1e-4, 10.0, allow_subnormal=False), k=st.integers(1, 5), extra=st.integers(0, 5),
       window=st.sampled_from([1.0, 2.0, 10.0]), hop_frac=st.sampled_from([0.25, 0.5, 1.0]))
def test_exceedance_for_target_inverts_the_rate(target, k, extra, window, hop_frac):
    rule = AlertRule(k=k, n=k + extra, window_s=window, hop_s=window * hop_frac)
    p = exceedance_for_target(target, rule)
    assert 0 < p <= 0.5
    if p < 0.5:
        assert false_alerts_per_day(p, rule) == pytest.approx(target, rel=1e-9)
    # a stricter target never loosens the threshold
    assert exceedance_for_target(target / 10, rule) <= p


def test_default_target_sits_above_the_old_fixed_quantile():
    """10 s windows, 5 s hop, 3 of 5, 0.1 false alerts per device-day: p ~ 0.0024, a stricter
    threshold than the 0.99 quantile the bundles shipped (which predicts ~1.7 a day)."""
    rule = AlertRule()
    p = exceedance_for_target(0.1, rule)
    assert 0.001 < p < 0.005
    assert false_alerts_per_day(0.01, rule) > 1.0


def test_extreme_quantile_extrapolates_beyond_a_small_sample():
    rng = np.random.default_rng(2)
    few = rng.standard_normal(200)
    value, method = extreme_quantile(few, 0.999)
    assert method == "gaussian tail"
    assert value >= np.quantile(few, 0.999)
    assert value == pytest.approx(3.09, abs=0.5)  # the normal's 0.999 quantile
    many = rng.standard_normal(100_000)
    value, method = extreme_quantile(many, 0.999)
    assert method == "empirical" and value == pytest.approx(np.quantile(many, 0.999))


def test_exponential_tail_follows_a_skewed_sample_where_the_gaussian_undershoots():
    # standardised chi-square-like scores (GMM negative log-likelihoods): true 0.999 quantile
    # of a unit exponential shifted to mean 0 is ln(1000) - 1 = 5.9
    rng = np.random.default_rng(3)
    errors = {"gaussian": [], "exponential": []}
    for _ in range(200):
        few = rng.exponential(1.0, 300) - 1.0
        for tail in errors:
            value, method = extreme_quantile(few, 0.999, tail)
            assert method == f"{tail} tail" and value >= np.quantile(few, 0.999)
            errors[tail].append(value - (math.log(1000) - 1))
    assert np.median(errors["gaussian"]) < -1.0  # mean + 3.1 sd = 3.1, lifted to about the sample max only
    assert abs(np.median(errors["exponential"])) < 0.5
    with pytest.raises(ValueError, match="tail must be"):
        extreme_quantile(np.arange(10.0), 0.999, "pareto")


def test_thresholds_keep_their_calibration_through_json():
    th = Thresholds.calibrate(np.linspace(0, 1, 500), quantile=0.995)
    th.calibration.update({"target_false_alerts_per_device_day": 0.1})
    back = Thresholds.from_meta(th.to_meta())
    assert back.calibration["target_false_alerts_per_device_day"] == 0.1
    assert back.calibration["method"] == "gaussian tail" and back.calibration["n_windows"] == 500
    assert math.isclose(back.group, th.group)


def test_profile_turns_the_target_into_the_quantile():
    from trainer.profiles import get_profile, threshold_calibration

    cal = threshold_calibration(get_profile("paper"))
    assert cal["alert_rule"] == {"k": 3, "n": 5, "window_s": 10.0, "hop_s": 5.0}
    assert cal["quantile"] == pytest.approx(1 - exceedance_for_target(0.1, AlertRule()))
    assert cal["predicted_false_alerts_per_device_day"] == pytest.approx(0.1)
    strict = threshold_calibration(get_profile("paper", ["alerts.max_false_alerts_per_device_day=0.01"]))
    assert strict["quantile"] > cal["quantile"]
    fixed = threshold_calibration(get_profile("paper", ["scoring.threshold_quantile=0.99"]))
    assert fixed["quantile"] == pytest.approx(0.99) and fixed["target_false_alerts_per_device_day"] is None
    assert fixed["predicted_false_alerts_per_device_day"] > 1.0
