"""End-to-end training on a tiny synthetic set: bundles load, anomalies score higher, Ctrl-C is clean."""

from __future__ import annotations

import json

import numpy as np
import pytest

import trainer  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
from stream_asd.errors import ConfigError
from trainer.profiles import get_profile

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from stream_asd.audio.synth_dataset import write_dataset

    root = tmp_path_factory.mktemp("synth")
    # 2 types x 2 devices, 2 s clips; anomalies at full severity with energy-changing faults
    write_dataset(root, ["fan", "pump"], devices_per_type=2, n_train=8, n_test_normal=4, n_test_anomaly=4,
                  seconds=2.0, seed=11, faults=("rubbing", "bearing"), severity=(1.0, 1.0))
    return root


@pytest.fixture(scope="module")
def tiny_bundle(tiny_data, tmp_path_factory):
    from trainer.fit import fit

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bundles") / "ens"
    report = fit(tiny_data, out, profile=get_profile("tiny"), seed=3, progress=False)
    return out, report


def test_fit_tiny_writes_loadable_bundle(tiny_bundle):
    from stream_asd.model.detector import load_detector

    out, report = tiny_bundle
    det = load_detector(out, device="cpu")
    assert det.kind == "ensemble"
    assert sorted(det.model_groups) == ["fan", "pump"]
    assert det.feature_spec.n_mels == 64 and det.window_samples == 16000
    names = [s["name"] for s in report["stages"]]
    assert names == ["normalisation", "simsiam", "finetune", "timecnn", "fusion", "scoring"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["training"]["profile"]["name"] == "tiny"
    assert manifest["data_fingerprint"]["n_clips"] == 32
    # thresholds were calibrated (finite) for every group
    for g in manifest["model_groups"].values():
        assert np.isfinite(float(g["thresholds"]["group"]))


def test_anomalies_score_higher_than_normals(tiny_bundle, tiny_data):
    from trainer.evaluate import compute_metrics, score_dataset

    out, _ = tiny_bundle
    clips = score_dataset(out, tiny_data, progress=False)
    assert len(clips) == 2 * 2 * 8
    normals = np.array([c.score for c in clips if c.label == 0])
    anomalies = np.array([c.score for c in clips if c.label == 1])
    assert anomalies.mean() > normals.mean()
    m = compute_metrics(clips)
    assert m["mean_auc"] >= 0.75, m["mean_auc"]


def test_fit_is_deterministic_by_seed(tiny_data, tmp_path):
    from trainer.fit import fit

    torch.set_num_threads(1)
    prof = get_profile("tiny", ["run.max_steps=2", "fusion.epochs=1", "timecnn.epochs=1"])
    a = fit(tiny_data, tmp_path / "a", profile=prof, seed=5, progress=False)
    b = fit(tiny_data, tmp_path / "b", profile=prof, seed=5, progress=False)
    c = fit(tiny_data, tmp_path / "c", profile=prof, seed=6, progress=False)
    la = [s.get("losses") for s in a["stages"]]
    assert la == [s.get("losses") for s in b["stages"]]
    assert la != [s.get("losses") for s in c["stages"]]
    ga = json.loads((tmp_path / "a" / "manifest.json").read_text())["model_groups"]
    gb = json.loads((tmp_path / "b" / "manifest.json").read_text())["model_groups"]
    assert ga == gb


def test_ctrl_c_leaves_no_partial_bundle(tiny_data, tmp_path, monkeypatch):
    import trainer.ensemble as E
    from trainer.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(E, "train_timecnn", interrupted)
    out = tmp_path / "bundles" / "b1"
    rc = main(["fit", "--data", str(tiny_data), "--out", str(out), "--profile", "tiny", "--no-progress",
               "--set", "run.max_steps=1"])
    assert rc == 130
    assert not out.exists()
    parent = tmp_path / "bundles"
    assert not parent.exists() or not any(parent.iterdir())  # no temporary folder either


def test_ae_baseline_bundle(tiny_data, tmp_path):
    from stream_asd.model.detector import load_detector
    from trainer.evaluate import compute_metrics, score_dataset
    from trainer.fit import fit

    torch.set_num_threads(1)
    # 30 epochs instead of the tiny profile's 3 (2 s here): 3 leave the AE at mean AUC 0.63-0.66
    # on this set, 30 reach 0.78-0.92 over seeds 1-5 (0.92 for seed 1)
    fit(tiny_data, tmp_path / "ae", profile=get_profile("tiny", ["ae.epochs=30"]), model="ae", seed=1,
        progress=False)
    det = load_detector(tmp_path / "ae", device="cpu")
    assert det.kind == "ae"
    m = compute_metrics(score_dataset(tmp_path / "ae", tiny_data, progress=False))
    assert m["mean_auc"] >= 0.7, m["mean_auc"]  # chance is 0.5: the AE baseline must rank anomalies higher


def test_existing_output_is_refused(tiny_bundle, tiny_data):
    from stream_asd.errors import AsdError
    from trainer.fit import fit

    out, _ = tiny_bundle
    with pytest.raises(AsdError, match="exists"):
        fit(tiny_data, out, profile=get_profile("tiny"), progress=False)


def test_profile_overrides():
    p = get_profile("cpu", ["simsiam.epochs=7", "augment.pitch_steps=-2,2", "features.window_seconds=1.5"])
    assert p.simsiam.epochs == 7 and p.augment.pitch_steps == (-2.0, 2.0) and p.features.window_seconds == 1.5
    assert get_profile("paper").features.n_mels == 224 and get_profile("paper").timecnn.epochs == 200
    with pytest.raises(ConfigError):
        get_profile("cpu", ["simsiam.nope=1"])
    with pytest.raises(ConfigError):
        get_profile("cpu", ["simsiam.epochs=many"])


@pytest.mark.parametrize("setting", ["scoring.gmm_components", "timecnn.embedding_dim", "encoder.name",
                                     "run.num_workers", "run.log_every"])
def test_removed_profile_fields_are_refused(setting):
    # fields nothing read (issue 12 item 3): setting one is an error, not a silent no-op
    with pytest.raises(ConfigError, match="unknown profile setting"):
        get_profile("paper", [f"{setting}=1"])


def test_scoring_windows_overlap_and_keep_clips_on_their_side(tiny_data):
    from trainer.fit import load_training_data
    from trainer.train_ensemble import scoring_windows

    profile = get_profile("tiny", ["scoring.fit_hop_fraction=0.5"])
    td = load_training_data(tiny_data, "auto", profile, 0, None, False)
    sw, fit_mask, calib_mask = scoring_windows(td, profile)
    # 2 s clips, 1 s windows: training hop 1 s -> 2 windows a clip, scoring hop 0.5 s -> 3
    assert len(td.train) == 2 * len(td.train.clips)
    assert len(sw) == 3 * len(td.train.clips)
    assert bool((fit_mask ^ calib_mask).all())
    calib_before = set(td.train.clip_index[td.calib_mask].tolist())
    assert calib_before and set(sw.clip_index[calib_mask].tolist()) == calib_before
    assert not calib_before & set(sw.clip_index[fit_mask].tolist())
    # every window is a real slice of its clip's audio (the second window starts half a window in)
    first = sw.waves[sw.clip_index == 0]
    train_first = td.train.waves[td.train.clip_index == 0]
    assert torch.equal(first[0], train_first[0]) and torch.equal(first[2], train_first[1])
    assert torch.equal(first[1][:8000], train_first[0][8000:])
    # a hop no finer than the training hop reuses the training windows as they are
    same = scoring_windows(td, get_profile("tiny", ["scoring.fit_hop_fraction=1.0"]))
    assert same[0] is td.train
    with pytest.raises(ConfigError, match="fit_hop_fraction"):
        scoring_windows(td, get_profile("tiny", ["scoring.fit_hop_fraction=0"]))


def test_clip_score_aggregates_the_detectors_window_scores(tiny_bundle, tiny_data):
    from stream_asd.model.detector import load_detector
    from trainer.data import list_clips, load_wave, window_wave
    from trainer.evaluate import score_dataset

    out, _ = tiny_bundle
    by = {agg: {c.path: c for c in score_dataset(out, tiny_data, progress=False, clip_score=agg)}
          for agg in ("median", "mean", "max")}
    det = load_detector(out, device="cpu")
    clip = next(c for c in list_clips(tiny_data, split="test") if c.label == "anomaly")
    waves = window_wave(load_wave(clip.path, det.feature_spec.sample_rate), det.window_samples).numpy()
    ws = np.array([r.score for r in det.score_windows(waves, [clip.machine_type] * len(waves),
                                                       [f"{clip.machine_type}-{clip.machine_id}"] * len(waves))])
    got = {agg: by[agg][str(clip.path)] for agg in by}
    assert got["median"].score == pytest.approx(float(np.median(ws)), rel=1e-9)
    assert got["mean"].score == pytest.approx(float(ws.mean()), rel=1e-9)
    assert got["max"].score == pytest.approx(float(ws.max()), rel=1e-9)
    assert set(got["median"].parts) == {"fusion", "stats"}
    with pytest.raises(ValueError, match="clip_score"):
        score_dataset(out, tiny_data, progress=False, clip_score="mode")
