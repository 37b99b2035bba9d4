"""Evaluation metrics against hand-computed values; report files."""

from __future__ import annotations

import json
import math

import pytest

from trainer.evaluate import ScoredClip, compute_metrics, write_report


def _clips(mtype, mid, normals, anomalies, thr):
    return ([ScoredClip(f"{mtype}/{mid}/n{i}", mtype, mid, 0, s, thr) for i, s in enumerate(normals)]
            + [ScoredClip(f"{mtype}/{mid}/a{i}", mtype, mid, 1, s, thr) for i, s in enumerate(anomalies)])


def test_auc_recall_far_by_hand():
    # id_00: normals 1,2,3,4; anomalies 2.5, 5 -> pairs won: 2.5 beats {1,2} (2 of 4), 5 beats all 4 -> 6/8
    clips = _clips("fan", "id_00", [1, 2, 3, 4], [2.5, 5], thr=3.5)
    # id_01: perfect separation
    clips += _clips("fan", "id_01", [0, 1], [2, 3], thr=1.5)
    m = compute_metrics(clips)
    fan = m["machine_types"]["fan"]
    assert fan["ids"]["id_00"]["auc"] == pytest.approx(0.75)
    assert fan["ids"]["id_01"]["auc"] == pytest.approx(1.0)
    assert fan["auc"] == pytest.approx((0.75 + 1.0) / 2)
    assert fan["min_auc"] == pytest.approx(0.75)
    # recall at threshold: id_00 anomalies above 3.5: only 5 -> 1/2; id_01: both -> 2/2; pooled 3/4
    assert fan["ids"]["id_00"]["recall"] == pytest.approx(0.5)
    assert fan["recall"] == pytest.approx(0.75)
    # false alarms: id_00 normal 4 > 3.5 -> 1/4; id_01 none -> pooled 1/6
    assert fan["ids"]["id_00"]["far"] == pytest.approx(0.25)
    assert fan["far"] == pytest.approx(1 / 6)
    assert m["mean_auc"] == pytest.approx(0.875)


def test_pauc_matches_mcclish_by_hand():
    # 10 normals 0..9, anomalies at 9.5 and 4.5. FPR 0.1 is reached when the threshold passes
    # normal 9: above that only the anomaly 9.5 -> TPR 0.5 on FPR in [0, 0.1].
    normals = list(range(10))
    clips = _clips("pump", "id_00", normals, [9.5, 4.5], thr=100)
    m = compute_metrics(clips)["machine_types"]["pump"]["ids"]["id_00"]
    partial = 0.5 * 0.1  # area under the ROC on [0, 0.1]: TPR 0.5 from FPR 0 to 0.1
    min_area, max_area = 0.5 * 0.1 * 0.1, 0.1
    expected = 0.5 * (1 + (partial - min_area) / (max_area - min_area))  # McClish standardisation
    assert m["pauc"] == pytest.approx(expected)
    assert m["auc"] == pytest.approx((10 + 5) / 20)
    assert m["recall"] == 0.0 and m["far"] == 0.0


def test_single_class_id_gives_nan_not_crash():
    clips = _clips("valve", "id_00", [1, 2], [], thr=0)
    m = compute_metrics(clips)["machine_types"]["valve"]
    assert math.isnan(m["auc"]) and math.isnan(m["recall"])
    assert m["far"] == 1.0


def test_report_files(tmp_path):
    clips = _clips("fan", "id_00", [1, 2, 3, 4], [2.5, 5], 3.5) + _clips("pump", "id_00", [0, 1], [2, 3], 1.5)
    metrics = write_report(clips, tmp_path, {"bundle": "b"})
    for name in ("metrics.json", "summary.md", "scores.csv", "roc_fan.png", "far_frr_fan.png", "roc_pump.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "roc_fan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["machine_types"]["fan"]["auc"] == pytest.approx(0.75)
    summary = (tmp_path / "summary.md").read_text()
    assert "| fan | 75.00 |" in summary and "| pump | 100.00 |" in summary
    assert metrics["n_clips"] == 10


def test_per_model_metrics(tmp_path):
    # 'stats' separates perfectly, 'fusion' is inverted: the per-model table must say so
    clips = []
    for i, (label, f, s) in enumerate([(0, 3.0, 0.0), (0, 2.0, 1.0), (1, 1.0, 2.0), (1, 0.0, 3.0)]):
        clips.append(ScoredClip(f"c{i}", "fan", "id_00", label, 0.9 * f + 0.1 * s, 1.0, {"fusion": f, "stats": s}))
    metrics = write_report(clips, tmp_path)
    assert metrics["per_model"]["stats"]["mean_auc"] == pytest.approx(1.0)
    assert metrics["per_model"]["fusion"]["mean_auc"] == pytest.approx(0.0)
    assert "| stats | 100.00 |" in (tmp_path / "summary.md").read_text()


def test_operating_point_sets_measured_exceedance_beside_the_bundles_promise():
    from stream_asd.model.alert_rate import AlertRule, false_alerts_per_day
    from trainer.operating_point import alerting_figures, alerting_markdown

    rule = AlertRule(3, 5, 1.0, 1.0)
    calibration = {"fan": {"window_exceedance": 0.005, "alert_rule": rule.to_dict(),
                           "predicted_false_alerts_per_device_day": false_alerts_per_day(0.005, rule)}}
    clips = [ScoredClip(f"n{i}", "fan", "id_00", 0, 0.0, 1.0, None, "", 10, 1 if i < 2 else 0) for i in range(10)]
    clips.append(ScoredClip("a0", "fan", "id_00", 1, 5.0, 1.0, None, "", 10, 10))  # anomalies do not count
    fig = alerting_figures(clips, calibration)["fan"]
    assert (fig["normal_windows"], fig["windows_over"]) == (100, 2)
    assert fig["exceedance_measured"] == pytest.approx(0.02)
    # 4x the set exceedance under a 3-window rule is 64x the predicted rate
    assert fig["implied_false_alerts_per_device_day"] == pytest.approx(64 * fig["predicted_false_alerts_per_device_day"])
    assert "| fan | 100 | 2 | 0.02 | 5.00e-03 |" in "\n".join(alerting_markdown({"fan": fig}))
    assert alerting_figures(clips, {})["fan"]["implied_false_alerts_per_device_day"] is None  # old bundle
