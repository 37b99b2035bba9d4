"""Properties of the training augmentations (stream_asd/audio/augment.py)."""

from __future__ import annotations

import math
import time

import pytest
import torch

from stream_asd.audio import augment as A

SR = 16000


def _tone(freq: float, seconds: float = 1.0, amp: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(SR * seconds), dtype=torch.float64) / SR
    return (amp * torch.sin(2 * math.pi * freq * t)).float()


def _peak_hz(wave: torch.Tensor) -> float:
    spec = torch.fft.rfft(wave.double() * torch.hann_window(wave.shape[-1], dtype=torch.float64)).abs()
    return float(spec.argmax()) * SR / wave.shape[-1]


def test_crop_points_in_range():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        x, y = A.crop_points(64, 100, gen)
        assert 1 <= x <= 48 and 1 <= y <= 75


def test_crop_splice_is_complementary_and_keeps_quadrants():
    gen = torch.Generator().manual_seed(1)
    s1, s2 = torch.randn(2, 2, 16, 20, generator=gen).unbind(0)
    a, b = A.crop_splice(s1, s2, 5, 7)
    assert torch.equal(a + b, s1 + s2)
    assert torch.equal(a[..., :5, :7], s1[..., :5, :7]) and torch.equal(a[..., 5:, 7:], s1[..., 5:, 7:])
    assert torch.equal(a[..., :5, 7:], s2[..., :5, 7:]) and torch.equal(a[..., 5:, :7], s2[..., 5:, :7])
    # every frequency row and every time column holds content of both spectrograms
    from_1 = a == s1
    assert from_1.any(-1).all() and (~from_1).any(-1).all()
    assert from_1.any(-2).all() and (~from_1).any(-2).all()


def test_mixup_ratio_on_inputs_and_labels():
    s1 = torch.zeros(1, 8, 8)
    s2 = torch.ones(1, 8, 8)
    y1 = torch.tensor([1.0, 0.0, 0.0])
    y2 = torch.tensor([0.0, 0.0, 1.0])
    x, y = A.crop_splice_mixup(s1, s2, y1, y2, lam=0.4, points=(4, 4))
    assert torch.allclose(y, torch.tensor([0.6, 0.0, 0.4]))
    # kept quadrants: 0.6*0 + 0.4*1; swapped quadrants: 0.6*1 + 0.4*0
    assert torch.allclose(x[..., :4, :4], torch.full((1, 4, 4), 0.4))
    assert torch.allclose(x[..., :4, 4:], torch.full((1, 4, 4), 0.6))
    assert math.isclose(float(x.mean()), 0.5, abs_tol=1e-6)


def test_time_shift_is_circular():
    w = torch.arange(10.0)
    assert torch.equal(A.time_shift(w, 3), torch.tensor([7.0, 8, 9, 0, 1, 2, 3, 4, 5, 6]))
    assert torch.equal(A.time_shift(A.time_shift(w, -4), 4), w)


@pytest.mark.parametrize("steps,expected", [(-12, 500.0), (-20, 1000.0 * 2 ** (-20 / 12)), (7, 1000.0 * 2 ** (7 / 12))])
def test_pitch_shift_moves_tone_peak(steps, expected):
    w = _tone(1000.0)
    out = A.pitch_shift(w, steps)
    assert out.shape == w.shape
    # resampling ratio is rounded to k/64: within 1.6 % of the exact frequency
    assert abs(_peak_hz(out) - expected) / expected < 0.016


def test_pitch_shift_is_fast_on_a_10s_clip():
    w = torch.randn(2, 160000)
    t0 = time.perf_counter()
    out = A.pitch_shift(w, -20)
    assert out.shape == w.shape
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("shape", ["exponential", "half_sine", "linear"])
def test_fade_shapes(shape):
    w = torch.ones(1000)
    out = A.fade(w, 100, 200, shape)
    assert out[0] < 0.05 and out[-1] < 0.05
    assert torch.equal(out[100:800], w[100:800])
    assert (out[:100].diff() >= -1e-6).all()  # rising fade in
    assert (out[800:].diff() <= 1e-6).all()   # falling fade out


@pytest.mark.parametrize("snr", [-10.0, 0.0, 10.0])
def test_noise_snr_within_tolerance(snr):
    gen = torch.Generator().manual_seed(3)
    w = _tone(440.0, seconds=2.0)
    out = A.add_noise_snr(w, snr, gen)
    noise = out - w
    measured = 10 * math.log10(float(w.pow(2).mean()) / float(noise.pow(2).mean()))
    assert abs(measured - snr) < 0.05


def test_noise_snr_per_batch_item():
    gen = torch.Generator().manual_seed(4)
    w = torch.stack([_tone(440.0), _tone(300.0, amp=0.1)])
    out = A.add_noise_snr(w, torch.tensor([-5.0, 5.0]), gen)
    for i, snr in enumerate([-5.0, 5.0]):
        noise = out[i] - w[i]
        measured = 10 * math.log10(float(w[i].pow(2).mean()) / float(noise.pow(2).mean()))
        assert abs(measured - snr) < 0.05


def test_signal_augment_deterministic_and_shape():
    aug = A.SignalAugment(p_time_shift=1, p_pitch_shift=1, p_fade=1, p_noise=1)
    w = torch.randn(3, 8000, generator=torch.Generator().manual_seed(0))
    a = aug(w, torch.Generator().manual_seed(9))
    b = aug(w, torch.Generator().manual_seed(9))
    assert a.shape == w.shape and torch.equal(a, b)
    assert not torch.allclose(a, w)


def test_spectral_flip_flips_bands():
    spec = torch.zeros(2, 32, 10)
    spec[:, 3] = 5.0  # energy in band 3
    out = A.spectral_flip(spec)
    assert torch.all(out[:, 28] == 5.0) and torch.all(out[:, 3] == 0.0)
    assert torch.equal(A.spectral_flip(out), spec)


def _harmonic_logmel() -> torch.Tensor:
    """2-channel log-mel of a few spectral lines over a low floor: ch0 power dB, ch1 magnitude dB."""
    power = torch.full((32, 40), 1e-6)
    power[[4, 9, 14, 20]] = 1.0
    return torch.stack([10 * torch.log10(power), 20 * torch.log10(power.sqrt())])


def test_spectral_stack_raises_energy_and_background():
    spec = _harmonic_logmel()
    out = A.spectral_stack(spec, freq_shifts=[1, 2, -2], time_shifts=[0, 5, -3], db_factor=(10.0, 20.0))
    for ch, factor in enumerate((10.0, 20.0)):
        lin_in, lin_out = 10 ** (spec[ch] / factor), 10 ** (out[ch] / factor)
        assert float(lin_out.sum()) > 3.0 * float(lin_in.sum())           # energy overflows
        assert float(out[ch].median()) > float(spec[ch].median()) + 3.0   # noise floor rises
        loud_in = int((lin_in > 0.1).sum())
        assert int((lin_out > 0.1).sum()) >= 2 * loud_in                   # gaps between lines fill
        assert (out[ch] >= spec[ch] - 1e-4).all()                          # nothing removed


def test_pseudo_anomaly_batch_shapes_and_difference():
    gen = torch.Generator().manual_seed(0)
    batch = torch.stack([_harmonic_logmel()] * 6)
    neg = A.PseudoAnomaly()(batch, gen)
    assert neg.shape == batch.shape
    for i in range(6):
        assert not torch.allclose(neg[i], batch[i])
