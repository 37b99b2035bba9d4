"""Feature code: shapes, a pure tone lands in the right mel band, snippet == clip (no per-clip
normalisation), statistics model eq. 7-8."""

import math

import numpy as np
import pytest
import torch

from stream_asd.audio.features import (FeatureSpec, LogMelFrontend, fit_statistics_lambda,
                                       statistics_features)
from stream_asd.errors import BundleError

torch.set_num_threads(1)


def tone(freq, seconds=1.0, sr=16000, amp=0.5):
    t = torch.arange(int(seconds * sr), dtype=torch.float32) / sr
    return amp * torch.sin(2 * math.pi * freq * t)


def test_default_shape_is_224_by_313_for_10_seconds():
    spec = FeatureSpec()
    assert spec.window_samples == 160_000
    fe = LogMelFrontend(spec)
    x = fe(torch.zeros(2, spec.window_samples))
    assert x.shape == (2, 2, 224, 313)
    assert x.dtype == torch.float32
    # silence -> both channels at the eps floor (-100 dB / -200 dB), nothing NaN
    assert torch.allclose(x[:, 0], torch.full_like(x[:, 0], -100.0))
    assert torch.allclose(x[:, 1], torch.full_like(x[:, 1], -200.0))


def test_pure_tone_peaks_in_the_band_that_contains_it():
    spec = FeatureSpec(n_mels=64)
    fe = LogMelFrontend(spec)
    for f in (250.0, 1000.0, 4000.0):
        x = fe(tone(f).unsqueeze(0))
        band = int(x[0, 0, :, 5:-5].mean(-1).argmax())
        centre = int(fe.mel_fb[int(round(f / (spec.sample_rate / spec.n_fft)))].argmax())
        assert abs(band - centre) <= 1, (f, band, centre)
        assert int(x[0, 1, :, 5:-5].mean(-1).argmax()) == band  # magnitude channel agrees


def test_channels_come_from_the_same_stft():
    fe = LogMelFrontend(FeatureSpec(n_mels=32))
    w = torch.randn(1, 16000) * 0.1
    x, p = fe.forward_with_power(w)
    assert torch.allclose(x[:, 0], 10 * torch.log10(p + 1e-10), atol=1e-4)
    assert torch.allclose(fe.mel_power(w), p)
    # magnitude dB of white noise differs from power dB (different filter sums): not a copy
    assert (x[:, 1] - x[:, 0]).abs().mean() > 1.0


def test_snippet_and_whole_clip_give_identical_frames():
    spec = FeatureSpec(n_mels=64, window_seconds=2.0)
    fe = LogMelFrontend(spec)
    g = torch.Generator().manual_seed(0)
    clip = torch.randn(1, 6 * 16000, generator=g) * 0.05
    clip[:, 3 * 16000:] *= 20  # a loud second half: a per-clip max normalisation would shift values
    full = fe(clip)
    start_frame = 40
    start = start_frame * spec.hop_length
    snip = fe(clip[:, start:start + spec.window_samples])
    edge = spec.n_fft // (2 * spec.hop_length)  # frames touched by reflect padding
    n = snip.shape[-1]
    a = snip[..., edge:n - edge]
    b = full[..., start_frame + edge:start_frame + n - edge]
    assert torch.allclose(a, b, atol=1e-3), float((a - b).abs().max())


def test_fixed_normalisation_is_affine_and_stored_in_state_dict():
    fe = LogMelFrontend(FeatureSpec(n_mels=16))
    w = torch.randn(3, 8000) * 0.1
    raw = fe(w)
    fe.fit_normalisation([w])
    z = fe(w)
    assert abs(float(z.mean())) < 1e-3
    assert abs(float(z.std()) - 1.0) < 0.05
    sd = fe.state_dict()
    assert set(sd) == {"window", "mel_fb", "norm_mean", "norm_std"}
    fe2 = LogMelFrontend(FeatureSpec(n_mels=16))
    fe2.load_state_dict(sd)
    assert torch.equal(fe2(w), z)
    assert not torch.equal(raw, z)


def test_statistics_lambda_and_features_follow_eq7_eq8():
    p1 = torch.tensor([[[1.0, 3.0], [2.0, 2.0], [0.0, 0.0]]])          # (1, 3, 2)
    p2 = torch.tensor([[[1.0, 1.0], [6.0, 6.0], [4.0, 4.0]]])
    lam = fit_statistics_lambda([p1, p2])
    y = torch.tensor([1.5, 4.0, 2.0], dtype=torch.float64)  # mean over clips and frames
    assert torch.allclose(lam, y / y.sum())
    assert math.isclose(float(lam.sum()), 1.0)
    feat = statistics_features(p1, lam)
    assert torch.allclose(feat, torch.tensor([[2.0, 2.0, 0.0]], dtype=torch.float64) * lam)
    with pytest.raises(ValueError):
        fit_statistics_lambda([torch.zeros(1, 3, 2)])


def test_feature_spec_round_trip_and_validation():
    spec = FeatureSpec(n_mels=64, f_max=7000.0)
    assert FeatureSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(BundleError, match="unknown fields"):
        FeatureSpec.from_dict({**spec.to_dict(), "top_db": 80})
    with pytest.raises(BundleError):
        FeatureSpec.from_dict({**spec.to_dict(), "f_max": 99999.0})
    with pytest.raises(ValueError):
        FeatureSpec(hop_length=0)
    assert FeatureSpec().n_frames() == 313
    assert np.isclose(FeatureSpec(window_seconds=0.5).window_samples, 8000)
