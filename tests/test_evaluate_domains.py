"""asd-train evaluate: 95 % intervals on every AUC/pAUC; source/target domain figures and the
DCASE score from the right clips, by hand and end to end on a DCASE2021-layout folder of real
audio files written here (synthetic machine sound, a tiny bundle built here)."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
from scipy.stats import hmean
from sklearn.metrics import roc_auc_score

from trainer.evaluate import ScoredClip, compute_metrics, summary_lines, write_report


def _section(mtype, sec, domain, normals, anomalies):
    return ([ScoredClip(f"{mtype}/{sec}/{domain}/n{i}", mtype, sec, 0, float(s), 1.0, None, domain)
             for i, s in enumerate(normals)]
            + [ScoredClip(f"{mtype}/{sec}/{domain}/a{i}", mtype, sec, 1, float(s), 1.0, None, domain)
               for i, s in enumerate(anomalies)])


def _dcase_clips(target_anomalies=(0.5, 2.5, 3.0)):
    rng = np.random.default_rng(0)
    clips = _section("fan", "section_00", "source", rng.normal(0, 1, 12), rng.normal(1.5, 1, 6))
    clips += _section("fan", "section_00", "target", rng.normal(0.5, 1, 8), target_anomalies)
    clips += _section("fan", "section_01", "source", rng.normal(0, 1, 10), rng.normal(2, 1, 5))
    clips += _section("fan", "section_01", "target", rng.normal(0, 1, 10), rng.normal(1, 1, 5))
    clips += _section("pump", "section_00", "source", rng.normal(0, 1, 10), rng.normal(1, 1, 5))
    clips += _section("pump", "section_00", "target", rng.normal(0, 1, 10), rng.normal(0.5, 1, 5))
    return clips


def _ref(clips, sel, max_fpr=None):
    sub = [c for c in clips if sel(c)]
    y, s = [c.label for c in sub], [c.score for c in sub]
    return roc_auc_score(y, s, max_fpr=max_fpr)


def _walk_areas(node, path=""):
    """Every (path, key, dict) where an AUC/pAUC figure sits in a report."""
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, (dict, list)):
                yield from _walk_areas(v, f"{path}/{k}")
            elif isinstance(v, float) and ("auc" in k or k in ("score", "score_2021")) and not k.startswith("min_"):
                yield path, k, node


def test_domain_figures_by_hand():
    clips = _dcase_clips()
    m = compute_metrics(clips, n_resamples=200)
    sec = m["machine_types"]["fan"]["ids"]["section_00"]
    in_sec = lambda c: c.machine_type == "fan" and c.machine_id == "section_00"  # noqa: E731
    # within a domain: that domain's normals against that domain's anomalies (DCASE2021)
    for d in ("source", "target"):
        assert sec["domains"][d]["auc"] == pytest.approx(_ref(clips, lambda c: in_sec(c) and c.domain == d))
        assert sec["domains"][d]["pauc"] == pytest.approx(_ref(clips, lambda c: in_sec(c) and c.domain == d, 0.1))
    assert sec["domains"]["target"]["n_normal"] == 8 and sec["domains"]["target"]["n_anomaly"] == 3
    # official (DCASE2022-2024 evaluators): the domain's normals against all anomalies of the section
    for d in ("source", "target"):
        assert sec["dcase"][f"auc_{d}"] == pytest.approx(_ref(clips, lambda c: in_sec(c) and (c.domain == d or c.label)))
    assert sec["dcase"]["pauc"] == pytest.approx(_ref(clips, in_sec, 0.1)) == pytest.approx(sec["pauc"])
    assert sec["dcase"]["score"] == pytest.approx(hmean([sec["dcase"]["auc_source"], sec["dcase"]["auc_target"],
                                                         sec["dcase"]["pauc"]]))
    assert sec["dcase"]["score_2021"] == pytest.approx(hmean([sec["domains"][d][k] for d in ("source", "target")
                                                              for k in ("auc", "pauc")]))
    # a type's figures: harmonic means over its sections; the total: over every section's values
    fan = m["machine_types"]["fan"]
    secs = [fan["ids"][s]["dcase"] for s in ("section_00", "section_01")]
    assert fan["dcase"]["auc_target"] == pytest.approx(hmean([s["auc_target"] for s in secs]))
    assert fan["dcase"]["score"] == pytest.approx(hmean([s[k] for s in secs for k in ("auc_source", "auc_target", "pauc")]))
    assert fan["domains"]["source"]["auc"] == pytest.approx(np.mean([fan["ids"][s]["domains"]["source"]["auc"]
                                                                     for s in ("section_00", "section_01")]))
    every = [v["dcase"] for t in m["machine_types"].values() for v in t["ids"].values()]
    assert len(every) == 3 and m["dcase"]["n_sections"] == 3
    assert m["dcase"]["score"] == pytest.approx(hmean([s[k] for s in every for k in ("auc_source", "auc_target", "pauc")]))


def test_swapping_target_anomalies_changes_only_target_figures():
    a = compute_metrics(_dcase_clips(), n_resamples=200)
    b = compute_metrics(_dcase_clips(target_anomalies=(-3.0, -2.0, 4.0)), n_resamples=200)
    sa, sb = (x["machine_types"]["fan"]["ids"]["section_00"] for x in (a, b))
    assert sa["domains"]["source"] == sb["domains"]["source"]  # value and interval
    assert sa["domains"]["target"]["auc"] != sb["domains"]["target"]["auc"]
    # the official source AUC counts every anomaly of the section, so it moves too (by design)
    assert sa["dcase"]["auc_source"] != sb["dcase"]["auc_source"]
    # other sections and types untouched
    assert a["machine_types"]["fan"]["ids"]["section_01"] == b["machine_types"]["fan"]["ids"]["section_01"]
    assert a["machine_types"]["pump"] == b["machine_types"]["pump"]


def test_every_figure_has_an_interval_containing_it(tmp_path):
    clips = _dcase_clips()
    for c in clips:
        c.parts = {"fusion": c.score, "stats": -c.score}
    m = write_report(clips, tmp_path, n_resamples=300)
    found = 0
    for path, key, node in _walk_areas(m):
        if path.startswith("/per_model"):
            continue
        found += 1
        ci = node[key + "_ci95"]
        assert ci[0] <= node[key] <= ci[1], (path, key)
    assert found > 40
    pm = m["per_model"]["stats"]
    assert pm["mean_auc_ci95"][0] <= pm["mean_auc"] <= pm["mean_auc_ci95"][1]
    assert set(pm["auc_ci95"]) == {"fan", "pump"} and "dcase_score_ci95" in pm
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["machine_types"]["fan"]["ids"]["section_00"]["dcase"]["score_ci95"] == \
        m["machine_types"]["fan"]["ids"]["section_00"]["dcase"]["score_ci95"]
    assert saved["intervals"]["resamples"] == 300
    summary = (tmp_path / "summary.md").read_text()
    assert "DCASE official score" in summary and "## Domains and DCASE score" in summary
    assert "| fan | section_00 |" in summary
    lo, hi = m["mean_auc_ci95"]
    assert f"[{100 * lo:.2f}, {100 * hi:.2f}]" in summary
    assert any("DCASE score" in line for line in summary_lines(m))
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert {r["domain"] for r in rows} == {"source", "target"}


def test_intervals_off_and_no_domains():
    clips = [ScoredClip(f"n{i}", "fan", "id_00", 0, float(i), 9.0) for i in range(6)]
    clips += [ScoredClip(f"a{i}", "fan", "id_00", 1, float(i) + 2.5, 9.0) for i in range(4)]
    m = compute_metrics(clips, n_resamples=0)
    assert m["mean_auc_ci95"] is None and m["machine_types"]["fan"]["ids"]["id_00"]["auc_ci95"] is None
    assert "dcase" not in m and "domains" not in m["machine_types"]["fan"]
    m = compute_metrics(clips)
    ci = m["machine_types"]["fan"]["ids"]["id_00"]["auc_ci95"]
    assert ci[0] < m["mean_auc"] <= ci[1] and m["mean_auc_ci95"] == ci  # one id, one type: same resamples


# --- end to end: a DCASE2021-layout folder of real audio files -----------------------------

torch = pytest.importorskip("torch")


def _write_dcase2021(root):
    """fan/{train,source_test,target_test}: section_00, source = one synthetic machine, target =
    another (the domain shift), anomalies with a strong bearing fault; 2 s clips."""
    from stream_asd.audio.io import write_audio
    from stream_asd.audio.synth import DeviceProfile, Fault, render

    devices = {"source": DeviceProfile("fan", 0, 4), "target": DeviceProfile("fan", 1, 4)}
    for folder, split, counts in (("train", "train", {"normal": 2}),
                                  ("source_test", "test", {"normal": 4, "anomaly": 4}),
                                  ("target_test", "test", {"normal": 4, "anomaly": 4})):
        for domain, dev in devices.items():
            if folder.endswith("_test") and not folder.startswith(domain):
                continue
            for label, n in counts.items():
                for k in range(n):
                    fault = Fault("bearing", 1.0, 0.0, 0.0) if label == "anomaly" else None
                    start = 60.0 + 2.0 * k + (100.0 if split == "test" else 0.0) + (50.0 if fault else 0.0)
                    path = root / "fan" / folder / f"section_00_{domain}_{split}_{label}_{k:04d}.wav"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_audio(path, render(dev, start, 2.0, 16000, fault), 16000)
    return root


@pytest.fixture(scope="module")
def dcase_bundle(tmp_path_factory):
    from _model_tiny import tiny_ensemble_bundle

    torch.set_num_threads(1)
    _, _, bundle = tiny_ensemble_bundle(groups=("fan",))
    return bundle.save(tmp_path_factory.mktemp("dcase") / "bundle")


def _evaluate(bundle, data, out):
    from trainer.cli import main

    assert main(["evaluate", "--bundle", str(bundle), "--data", str(data), "--out", str(out), "--no-progress",
                 "--bootstrap", "200"]) == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    return json.loads((out / "metrics.json").read_text()), rows


def test_evaluate_dcase2021_folder_domains_from_the_right_clips(dcase_bundle, tmp_path):
    data = _write_dcase2021(tmp_path / "data")
    m, rows = _evaluate(dcase_bundle, data, tmp_path / "report")
    assert len(rows) == 16  # the test clips only: 2 domains x (4 normal + 4 anomaly)
    assert {(r["domain"], r["label"]) for r in rows} == {(d, l) for d in ("source", "target") for l in "01"}
    assert all(f"_{r['domain']}_test_" in r["path"] for r in rows)
    sec = m["machine_types"]["fan"]["ids"]["section_00"]

    def ref(sel, max_fpr=None):
        sub = [r for r in rows if sel(r)]
        return roc_auc_score([int(r["label"]) for r in sub], [float(r["score"]) for r in sub], max_fpr=max_fpr)

    for d in ("source", "target"):
        assert sec["domains"][d]["auc"] == pytest.approx(ref(lambda r: r["domain"] == d), abs=1e-5)
        assert sec["dcase"][f"auc_{d}"] == pytest.approx(ref(lambda r: r["domain"] == d or r["label"] == "1"), abs=1e-5)
        assert sec["domains"][d]["n_normal"] == 4 and sec["domains"][d]["n_anomaly"] == 4
    assert sec["dcase"]["pauc"] == pytest.approx(ref(lambda r: True, 0.1), abs=1e-5)
    assert not math.isnan(m["dcase"]["score"]) and m["dcase"]["score_ci95"][0] <= m["dcase"]["score"]

    # replace the target anomalies by copies of target normals (labels kept): only the target moves
    swapped = tmp_path / "swapped"
    shutil.copytree(data, swapped)
    tt = swapped / "fan" / "target_test"
    for k in range(4):
        shutil.copyfile(tt / f"section_00_target_test_normal_{k:04d}.wav", tt / f"section_00_target_test_anomaly_{k:04d}.wav")
    m2, rows2 = _evaluate(dcase_bundle, swapped, tmp_path / "report2")
    sec2 = m2["machine_types"]["fan"]["ids"]["section_00"]
    src = lambda rs: [(r["path"].split("/")[-1], float(r["score"])) for r in rs if r["domain"] == "source"]  # noqa: E731
    assert [p for p, _ in src(rows2)] == [p for p, _ in src(rows)]
    np.testing.assert_allclose([s for _, s in src(rows2)], [s for _, s in src(rows)], rtol=1e-6, atol=1e-6)
    assert sec2["domains"]["source"]["auc"] == pytest.approx(sec["domains"]["source"]["auc"])
    assert sec2["domains"]["target"]["auc"] == pytest.approx(0.5)  # anomalies now sound exactly like the normals
    assert sec["domains"]["target"]["auc"] != pytest.approx(0.5)
