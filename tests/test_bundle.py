"""Model bundle: bit-exact round trip, rejection of corrupt/mismatched bundles, no pickle,
detector scores equal the in-memory model's."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from _model_tiny import TINY_SPEC, tiny_ae_bundle, tiny_ensemble_bundle, tiny_waves
from stream_asd.audio.features import FeatureSpec
from stream_asd.errors import BundleError, UnknownModelGroup
from stream_asd.model import bundle as bundle_mod
from stream_asd.model.bundle import ModelBundle
from stream_asd.model.detector import AeDetector, Detector, WindowScore, load_detector

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model, groups, bundle = tiny_ensemble_bundle()
    path = bundle.save(tmp_path_factory.mktemp("b") / "bundle")
    return model, groups, bundle, path


def _embed(model, w):
    with torch.no_grad():
        e = model.embed(torch.from_numpy(w))
    return e.fusion, e.band_means


def copy_bundle(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def rewrite_manifest(path: Path, change, rehash: bool = True) -> None:
    m = json.loads((path / "manifest.json").read_text())
    change(m)
    if rehash:
        m["manifest_sha256"] = bundle_mod._content_sha256(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_round_trip_is_bit_exact(built, tmp_path):
    model, groups, bundle, path = built
    assert sorted(os.listdir(path)) == ["manifest.json", "scoring.safetensors", "weights.safetensors"]
    loaded = ModelBundle.load(path)
    assert loaded.weights.keys() == bundle.weights.keys()
    for k, v in bundle.weights.items():
        assert torch.equal(loaded.weights[k], v) and loaded.weights[k].dtype == v.dtype, k
    assert loaded.arrays.keys() == bundle.arrays.keys()
    for k, v in bundle.arrays.items():
        assert np.array_equal(loaded.arrays[k], v) and loaded.arrays[k].dtype == np.float64
    assert loaded.groups == json.loads(json.dumps(bundle.groups))
    assert loaded.feature_spec == TINY_SPEC and loaded.version == "test-1"
    # saving the loaded bundle again gives byte-identical files
    again = loaded.save(tmp_path / "again")
    for name in os.listdir(path):
        assert (again / name).read_bytes() == (path / name).read_bytes(), name


def test_manifest_content(built):
    *_, path = built
    m = json.loads((path / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["kind"] == "ensemble"
    assert set(m["model_groups"]) == {"fan", "pump"}
    assert m["feature_spec"]["n_mels"] == 64
    assert m["model_config"]["encoder"]["arch"] == "ghostnetv2_100"
    assert m["data_fingerprint"]["n_clips"] == 80 and m["metrics"]["auc"]["fan"] == 0.9
    assert set(m["files"]) == {"weights.safetensors", "scoring.safetensors"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", f["sha256"]) for f in m["files"].values())
    g = m["model_groups"]["fan"]
    assert g["weights"] == [0.9, 0.1] and "dev-a" in g["thresholds"]["per_device"]
    assert g["stats_log"] is True and set(g["devices"]) == {"dev-a", "dev-b"}
    assert m["model_groups"]["pump"]["devices"] == {} and m["model_groups"]["pump"]["stats_log"] is False
    assert re.match(r"\d{4}-\d\d-\d\dT", m["created_at"])


def test_detector_scores_equal_in_memory_model(built):
    model, groups, _, path = built
    det = load_detector(path, device="cpu")
    assert isinstance(det, Detector) and det.kind == "ensemble" and det.version == "test-1"
    assert det.model_groups == {"fan", "pump"} and det.window_samples == 16000 and det.device == "cpu"
    w = np.concatenate([tiny_waves(3, seed=11, freq=300.0), tiny_waves(3, seed=12, freq=3000.0)])
    types = ["fan", "fan", "fan", "pump", "pump", "pump"]
    devs = ["dev-a", "dev-b", "zz", "dev-a", "dev-b", "zz"]
    out = det.score_windows(w, types, devs)
    assert len(out) == 6 and all(isinstance(o, WindowScore) for o in out)
    # the loaded networks compute the in-memory model's embeddings (to float32 rounding: the
    # detector runs the encoder channels-last)
    fus, bms = _embed(model, w)
    det_fus, det_bms = det.embed(w)
    assert np.allclose(det_fus, fus.double().numpy(), rtol=1e-4, atol=1e-5 * float(fus.abs().max()))
    assert np.allclose(det_bms, bms.double().numpy(), rtol=1e-6)
    # the scores are the groups' scores of those embeddings, with the right (device) GMM pair
    assert set(groups["fan"].device_scorers) == {"dev-a", "dev-b"}
    for i, t in enumerate(types):
        ref = groups[t].scores(det_fus[i:i + 1], det_bms[i:i + 1], [devs[i]])
        assert out[i].score == pytest.approx(float(ref["ensemble"][0]), rel=1e-9)
        assert out[i].scores == pytest.approx({"fusion": float(ref["fusion"][0]), "stats": float(ref["stats"][0])})
        assert out[i].threshold == groups[t].thresholds.for_device(devs[i])
        assert out[i].is_anomaly == (out[i].score > out[i].threshold)
    # fan's dev-a window used dev-a's own pair (differs from the group pair); 'zz' the group pair
    group_pair = groups["fan"].scores(det_fus[:3], det_bms[:3])["ensemble"]
    assert abs(out[0].score - group_pair[0]) > 1e-3 and out[2].score == pytest.approx(group_pair[2], rel=1e-9)
    # pump was fitted on a 500 Hz tone: 3 kHz windows are far out for its statistics model,
    # while fan windows at fan's training tone (300 Hz) are not
    assert min(o.scores["stats"] for o in out[3:]) > 10 + max(o.scores["stats"] for o in out[:3])
    # one window alone gets the same score as inside a batch (streaming == offline)
    single = det.score_windows(w[4:5], ["pump"], ["dev-b"])[0]
    assert single.score == pytest.approx(out[4].score, rel=2e-3, abs=1e-3)
    det.warmup((1, 2))  # silent windows score without error
    assert det.describe()["model_groups"] == ["fan", "pump"]
    with pytest.raises(UnknownModelGroup, match="valve"):
        det.score_windows(w[:1], ["valve"], ["x"])
    with pytest.raises(ValueError):
        det.score_windows(w[:, :100], ["fan"] * 6, devs)


def test_flipped_byte_is_rejected(built, tmp_path):
    *_, path = built
    for name in ("weights.safetensors", "scoring.safetensors"):
        p = copy_bundle(path, tmp_path / f"c-{name}")
        data = bytearray((p / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (p / name).write_bytes(bytes(data))
        with pytest.raises(BundleError, match="sha256 mismatch"):
            load_detector(p, device="cpu")


def test_missing_extra_and_truncated_files_are_rejected(built, tmp_path):
    *_, path = built
    p = copy_bundle(path, tmp_path / "missing")
    (p / "scoring.safetensors").unlink()
    with pytest.raises(BundleError, match="missing"):
        ModelBundle.load(p)
    p = copy_bundle(path, tmp_path / "nomanifest")
    (p / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        ModelBundle.load(p)
    p = copy_bundle(path, tmp_path / "extra")
    (p / "evil.pkl").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(BundleError, match="not in the manifest"):
        ModelBundle.load(p)
    p = copy_bundle(path, tmp_path / "trunc")
    (p / "weights.safetensors").write_bytes((p / "weights.safetensors").read_bytes()[:100])
    with pytest.raises(BundleError, match="truncated"):
        ModelBundle.load(p)
    with pytest.raises(BundleError, match="not a folder"):
        ModelBundle.load(tmp_path / "nowhere")


def test_wrong_format_version_is_rejected(built, tmp_path):
    *_, path = built
    p = copy_bundle(path, tmp_path / "v2")
    rewrite_manifest(p, lambda m: m.update(format_version=2))
    with pytest.raises(BundleError, match="newer"):
        ModelBundle.load(p)
    p = copy_bundle(path, tmp_path / "v0")
    rewrite_manifest(p, lambda m: m.update(format_version=0))
    with pytest.raises(BundleError, match="no longer supported"):
        ModelBundle.load(p)
    p = copy_bundle(path, tmp_path / "notjson")
    (p / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        ModelBundle.load(p)


def test_tampered_manifest_is_rejected(built, tmp_path):
    *_, path = built
    p = copy_bundle(path, tmp_path / "tampered")
    rewrite_manifest(p, lambda m: m["model_groups"]["fan"]["thresholds"].update(group=1e9), rehash=False)
    with pytest.raises(BundleError, match="modified"):
        ModelBundle.load(p)
    # a consistent-looking manifest whose file list lies about a checksum
    p = copy_bundle(path, tmp_path / "lying")
    rewrite_manifest(p, lambda m: m["files"]["weights.safetensors"].update(sha256="0" * 64))
    with pytest.raises(BundleError, match="sha256"):
        ModelBundle.load(p)
    # broken scoring metadata (rehashed) is still refused with a clear message
    p = copy_bundle(path, tmp_path / "badgroup")
    rewrite_manifest(p, lambda m: m["model_groups"]["fan"]["fusion"].update(nll_std=-1.0))
    with pytest.raises(BundleError, match="fan"):
        load_detector(p, device="cpu")


def test_wrong_feature_spec_is_rejected(built, tmp_path):
    *_, path = built
    with pytest.raises(BundleError, match="feature spec differs"):
        ModelBundle.load(path, expected_feature_spec=FeatureSpec())
    p = copy_bundle(path, tmp_path / "spec")
    rewrite_manifest(p, lambda m: m["feature_spec"].update(n_mels=128))
    with pytest.raises(BundleError, match="filterbank"):
        ModelBundle.load(p)
    p = copy_bundle(path, tmp_path / "spec2")
    rewrite_manifest(p, lambda m: m["feature_spec"].update(top_db=80))
    with pytest.raises(BundleError, match="unknown fields"):
        ModelBundle.load(p)
    p = copy_bundle(path, tmp_path / "cfg")
    rewrite_manifest(p, lambda m: m["model_config"]["fusion"].update(map_side=12))
    with pytest.raises(BundleError, match="do not fit"):
        load_detector(p, device="cpu")


def test_save_is_atomic_and_refuses_to_overwrite(built, tmp_path):
    _, _, bundle, _ = built
    dest = bundle.save(tmp_path / "x")
    with pytest.raises(BundleError, match="already exists"):
        bundle.save(dest)
    bundle.save(dest, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no temp folders left


def test_no_pickle_anywhere_in_the_model_package():
    root = Path(__file__).resolve().parents[1] / "stream_asd"
    for f in list((root / "model").glob("*.py")) + [root / "audio" / "features.py"]:
        text = f.read_text()
        for bad in ("torch.load(", "import pickle", "joblib", "np.load(", "allow_pickle=True"):
            assert bad not in text, (f.name, bad)


def test_ae_bundle_round_trip_and_detector(tmp_path):
    model, groups, bundle = tiny_ae_bundle(groups=("fan", "valve"))
    path = bundle.save(tmp_path / "ae")
    det = load_detector(path, device="cpu")
    assert isinstance(det, AeDetector) and det.kind == "ae" and det.model_groups == {"fan", "valve"}
    w = tiny_waves(4, seed=5, spec=det.feature_spec)
    out = det.score_windows(w, ["fan", "valve", "fan", "valve"], ["a", "b", "c", "d"])
    with torch.no_grad():
        err = model.reconstruction_errors(torch.from_numpy(w), [0, 1, 0, 1]).numpy()
    for i, t in enumerate(["fan", "valve", "fan", "valve"]):
        assert out[i].score == pytest.approx(float(groups[t].scores(err[i])), abs=1e-4)
        assert out[i].scores == {"ae": out[i].score}
    loaded = ModelBundle.load(path)
    for k, v in bundle.weights.items():
        assert torch.equal(loaded.weights[k], v)
