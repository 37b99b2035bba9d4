"""Explanations (issue 14 item 2): a fault in a known band is named by its band, a fault in a
known part of the window by its seconds, a normal window stays unremarkable; the explain CLI
writes a PNG and JSON. A tiny ensemble (1 s windows, 64 mel bands) whose statistics are fitted
here on synthetic normal windows (a 440 Hz tone in white noise)."""

import dataclasses
import json

import numpy as np
import pytest
import soundfile
import torch

from _model_tiny import TINY_SPEC, tiny_ae_bundle, tiny_waves
from stream_asd.cli import main
from stream_asd.model.detector import Detector
from stream_asd.model.ensemble import EnsembleConfig, EnsembleModel
from stream_asd.model.explain import explain_window, explain_windows, mel_band_edges, normal_profile
from stream_asd.model.scoring import EnsembleGroup

torch.set_num_threads(1)

SR = TINY_SPEC.sample_rate
N = TINY_SPEC.window_samples
T = np.arange(N) / SR
EDGES = mel_band_edges(TINY_SPEC)


def _detector(normalise_level=False, stats_scorer="gmm", n_train=60, seed=0):
    torch.manual_seed(seed)
    model = EnsembleModel(TINY_SPEC, dataclasses.replace(EnsembleConfig.tiny(), normalise_level=normalise_level))
    model.eval()
    w = tiny_waves(n_train, seed=1)
    with torch.no_grad():
        e = model.embed(torch.from_numpy(w))
    devices = ["dev-a"] * (n_train // 2) + ["dev-b"] * (n_train - n_train // 2)
    group = EnsembleGroup.fit("fan", e.fusion, e.band_means, device_ids=devices, reg_covar=1e-2, stats_log=True,
                              per_device_min_windows=n_train // 2, stats_scorer=stats_scorer)
    return Detector(model.to_bundle({"fan": group}, version="explain-1"), device="cpu")


@pytest.fixture(scope="module")
def det():
    return _detector()


def _tone(f, amp=0.05, start=0.0, end=1.0):
    x = np.zeros(N, dtype=np.float32)
    a, b = int(start * N), int(end * N)
    x[a:b] = amp * np.sin(2 * np.pi * f * T[a:b])
    return x


def _band_noise(lo, hi, rms=0.03, seed=5):
    spec = np.fft.rfft(np.random.default_rng(seed).standard_normal(N))
    f = np.fft.rfftfreq(N, 1 / SR)
    spec[(f < lo) | (f > hi)] = 0
    x = np.fft.irfft(spec, N)
    return (rms * x / x.std()).astype(np.float32)


def test_band_edges_are_the_filterbank_points(det):
    fb = det.model.frontend.mel_fb.numpy()  # (n_freqs, n_mels)
    freqs = np.linspace(0, SR / 2, fb.shape[0])
    bin_hz = freqs[1]
    assert EDGES.shape == (TINY_SPEC.n_mels, 3)
    assert np.all(np.diff(EDGES[:, 1]) > 0) and np.all(EDGES[:, 0] < EDGES[:, 1]) and np.all(EDGES[:, 1] < EDGES[:, 2])
    # each band's triangle peaks at its centre and is zero outside (lo, hi), to one FFT bin
    assert np.max(np.abs(freqs[fb.argmax(axis=0)] - EDGES[:, 1])) <= bin_hz / 2
    for i in range(TINY_SPEC.n_mels):
        nz = freqs[fb[:, i] > 0]
        assert nz.min() >= EDGES[i, 0] - 1e-6 and nz.max() <= EDGES[i, 2] + 1e-6


@pytest.mark.parametrize("band", [20, 30, 42, 55])  # away from the normal 440 Hz tone (bands 11-12)
def test_tone_fault_is_named_by_its_band(det, band):
    f = EDGES[band, 1]  # a tone at the band's centre frequency
    normal = tiny_waves(3, seed=99)
    ex = explain_windows(det, normal + _tone(f), "fan", "dev-a")
    for e in ex:
        top = e.top_bands[0]
        assert top.band == band, e.summary()  # fails if bands were reversed or mislabelled
        assert top.f_low_hz < f < top.f_high_hz
        assert top.z > 10 and top.delta_db > 3  # louder than normal
        assert e.max_abs_z == pytest.approx(abs(top.z))


def test_band_noise_fault_is_named_by_bands_in_its_range(det):
    lo, hi = 2000.0, 2400.0
    e = explain_window(det, tiny_waves(1, seed=98)[0] + _band_noise(lo, hi), "fan", "dev-a")
    for b in e.top_bands[:3]:
        assert b.z > 5, e.summary()
        assert b.f_high_hz > lo and b.f_low_hz < hi, e.summary()  # the band overlaps the noise's range


def test_normal_windows_stay_unremarkable(det):
    normal = tiny_waves(8, seed=97)
    f = EDGES[42, 1]
    normal_z = [e.max_abs_z for e in explain_windows(det, normal, "fan", "dev-a")]
    fault_z = [e.max_abs_z for e in explain_windows(det, normal + _tone(f), "fan", "dev-a")]
    assert max(normal_z) < 5
    assert min(fault_z) > 5 * max(normal_z), (normal_z, fault_z)


@pytest.mark.parametrize("where", [(0.8, 1.0), (0.05, 0.25), (0.4, 0.55)])
def test_time_segment_locates_a_burst(det, where):
    start, end = where
    for seed in (11, 12, 13):
        wave = tiny_waves(1, seed=seed)[0] + _tone(EDGES[42, 1], start=start, end=end)
        e = explain_window(det, wave, "fan", "dev-a")
        assert e.top_bands[0].band == 42
        assert start - 0.02 <= e.segment_start_s < e.segment_end_s <= end + 0.02, (where, e.summary())
        assert e.segment_end_s - e.segment_start_s == pytest.approx(6 * TINY_SPEC.hop_length / SR, abs=1e-9)
        assert e.segment_deviation > 5 * abs(e.median_deviation) + 5


def test_device_profile_is_the_devices_own(det):
    g = det.groups["fan"]
    mean, scale, which = normal_profile(g, "dev-a")
    assert which == "device" and mean is g.device_scorers["dev-a"][1].in_mean
    mean, scale, which = normal_profile(g, "dev-unknown")
    assert which == "group" and mean is g.stats.in_mean
    e = explain_window(det, tiny_waves(1, seed=96)[0], "fan", "dev-unknown")
    assert e.profile == "group" and e.to_dict()["profile"] == "group"
    # the z-scores are the statistics scorer's own standardised inputs
    bm = det.embed(tiny_waves(1, seed=96))[1]
    m, s, _ = normal_profile(g, "dev-b")
    z = ((g.stats_features(bm) - m) / s)[0]
    e = explain_window(det, tiny_waves(1, seed=96)[0], "fan", "dev-b", top_n=64)
    assert e.profile == "device"
    assert {b.band: b.z for b in e.top_bands} == pytest.approx(dict(enumerate(z)), rel=1e-9, abs=1e-9)


def test_knn_statistics_scorer_explains_too():
    d = _detector(stats_scorer="knn")
    e = explain_window(d, tiny_waves(1, seed=95)[0] + _tone(EDGES[30, 1]), "fan", "dev-a")
    assert e.top_bands[0].band == 30 and e.top_bands[0].z > 10


def test_level_normalisation_is_applied_to_frames_and_band_means():
    d = _detector(normalise_level=True)
    wave = tiny_waves(1, seed=94)[0]
    e1 = explain_window(d, wave, "fan", "dev-a", maps=True)
    e4 = explain_window(d, 4 * wave, "fan", "dev-a", maps=True)  # +12 dB microphone gain: not a fault
    assert e4.max_abs_z == pytest.approx(e1.max_abs_z, rel=1e-3)
    assert abs(e4.median_deviation) < 5 and np.allclose(e4.frame_z, e1.frame_z, atol=1e-3)
    # the frames average to the band means EnsembleModel.embed gives (level-normalised)
    frames = 10 ** (e4.log_mel_db / 10) - TINY_SPEC.power_eps
    bm = d.embed((4 * wave)[None, :])[1][0]
    assert np.allclose(frames.mean(axis=1), bm, rtol=1e-4)
    assert d.embed(wave[None, :])[1][0] == pytest.approx(bm, rel=1e-4)


def test_compact_form_is_small_json(det):
    e = explain_window(det, tiny_waves(1, seed=93)[0] + _tone(EDGES[42, 1]), "fan", "dev-a")
    d = e.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert len(text) < 1000
    assert set(d) >= {"version", "profile", "top_bands", "segment", "max_abs_z"}
    assert len(d["top_bands"]) == 5 and d["top_bands"][0]["band"] == 42
    assert set(d["top_bands"][0]) == {"band", "f_low_hz", "f_centre_hz", "f_high_hz", "z", "delta_db"}
    assert "band 42 (2.9-3.2 kHz) +" in e.summary()


# --- the CLI ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle_path(det, tmp_path_factory):
    return det.bundle.save(tmp_path_factory.mktemp("explain") / "bundle")


def test_explain_cli_writes_png_and_json(bundle_path, tmp_path, capsys):
    # a 3 s clip of device id_03; a 3 kHz (band 42) burst at 1.8-1.95 s, i.e. in window 1
    clip = np.concatenate([tiny_waves(1, seed=s)[0] for s in (40, 41, 42)])
    t = np.arange(clip.size) / SR
    a, b = int(1.8 * SR), int(1.95 * SR)
    clip[a:b] += 0.05 * np.sin(2 * np.pi * EDGES[42, 1] * t[a:b])
    wav = tmp_path / "fan" / "anomaly_id_03_00000001.wav"
    wav.parent.mkdir()
    soundfile.write(wav, clip, SR)
    png, js = tmp_path / "out" / "why.png", tmp_path / "why.json"
    rc = main(["explain", "--bundle", str(bundle_path), str(wav), "--out", str(png), "--json", str(js),
               "--device", "cpu"])
    assert rc == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    report = json.loads(js.read_text())
    out = capsys.readouterr()
    assert json.loads(out.out) == report
    assert "band 42 (2.87-3.15 kHz)" in out.err
    assert report["machine_type"] == "fan" and report["device_id"] == "fan-id_03"  # as stream-asd score infers
    assert report["window"] == 1 and report["is_anomaly"] is True and len(report["windows"]) == 3
    top = report["explanation"]["top_bands"][0]
    assert top["band"] == 42 and top["f_low_hz"] < 3000 < top["f_high_hz"] and top["z"] > 5
    seg = report["segment_in_clip"]
    assert 1.78 <= seg["start_s"] < seg["end_s"] <= 1.97
    assert report["explanation"]["segment"]["start_s"] == pytest.approx(seg["start_s"] - 1.0, abs=1e-3)


def test_explain_cli_usage_errors_exit_2(bundle_path, tmp_path, capsys):
    wav = tmp_path / "clip.wav"
    soundfile.write(wav, tiny_waves(1, seed=3)[0], SR)
    png = tmp_path / "x.png"
    base = ["explain", "--bundle", str(bundle_path), "--device", "cpu"]
    cases = [
        ([str(tmp_path / "missing.wav"), "--out", str(png)], "no such file"),
        ([str(tmp_path), "--out", str(png)], "is a folder"),
        ([str(wav), "--out", str(tmp_path)], "the figure is a PNG"),
        ([str(wav), "--out", str(png), "--machine-type", "pump"], "is not in the bundle"),
        ([str(wav), "--out", str(png), "--top", "0"], "--top 0"),
        ([str(wav), "--out", str(png), "--json", str(png)], "same file"),
    ]
    for extra, msg in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (extra, err)
    ae = tiny_ae_bundle()[2].save(tmp_path / "ae")
    assert main(["explain", "--bundle", str(ae), str(wav), "--out", str(png), "--device", "cpu"]) == 2
    assert "explanations need an ensemble bundle" in capsys.readouterr().err
    assert main(["explain", "--bundle", str(tmp_path / "nobundle"), str(wav), "--out", str(png)]) == 2
    assert not png.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ae", "clip.wav"]
