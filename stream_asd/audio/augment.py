"""Training-time augmentations (method.md "Augmentation" and "Fine-tuning with pseudo-anomalies").

Stateless functions on torch tensors; every random choice takes an explicit
``torch.Generator`` so a training run is reproducible from its seed. All functions work on CPU
and CUDA tensors and keep the input's device and dtype.

Waveforms are ``[..., T]`` float tensors; spectrograms are ``[..., F, T]`` (frequency before
time, as the ``FeatureSpec`` produces them).

- ``crop_splice``/``crop_splice_mixup``: paper sec. 2.3, eq. 1-2.
- signal transforms of sec. 2.4.1: ``time_shift``, ``pitch_shift`` (a fast resampling
  equivalent of ``torchaudio.functional.pitch_shift``, which takes seconds and GBs per clip for
  most step values), ``fade``, ``add_noise_snr``; ``SignalAugment`` applies them at random.
- pseudo-anomalies of sec. 2.4.2: ``spectral_flip`` (SF) and ``spectral_stack`` (SP).

Nothing here is used at inference time; the runtime imports it only for tests/training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = [
    "crop_points", "crop_splice", "crop_splice_mixup", "time_shift", "pitch_shift", "fade",
    "add_noise_snr", "SignalAugment", "spectral_flip", "spectral_stack", "PseudoAnomaly",
]


def _uniform(gen: torch.Generator | None, low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand((), generator=gen).item())


def _randint(gen: torch.Generator | None, low: int, high: int) -> int:
    """Integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=gen).item())


# --------------------------------------------------------------------------------------------
# Crop-splice + mixup (sec. 2.3)
# --------------------------------------------------------------------------------------------

def crop_points(n_freq: int, n_time: int, gen: torch.Generator | None = None) -> tuple[int, int]:
    """Random crop points x in (1, 3F/4) on the frequency axis and y in (1, 3T/4) on time (eq. 1)."""
    x = _randint(gen, 1, max(1, (3 * n_freq) // 4))
    y = _randint(gen, 1, max(1, (3 * n_time) // 4))
    return x, y


def crop_splice(spec1: torch.Tensor, spec2: torch.Tensor, x: int, y: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Splice two spectrograms ``[..., F, T]`` at the crop point (x, y).

    Each spectrogram keeps its top-left (``[:x, :y]``) and bottom-right (``[x:, y:]``) parts and
    takes the two other quadrants from the other one; the two results are complementary
    (``s1 + s2 == spec1 + spec2`` element-wise). So every frequency row and every time column
    holds both original and interfering content, as the paper asks ("possession of both
    original and interference features at every time pin and every frequency value").
    """
    if spec1.shape != spec2.shape:
        raise ValueError(f"crop_splice needs equal shapes, got {tuple(spec1.shape)} and {tuple(spec2.shape)}")
    n_freq, n_time = spec1.shape[-2], spec1.shape[-1]
    f_idx = torch.arange(n_freq, device=spec1.device).unsqueeze(1) < x
    t_idx = torch.arange(n_time, device=spec1.device).unsqueeze(0) < y
    keep_own = f_idx == t_idx  # top-left and bottom-right quadrants
    s1 = torch.where(keep_own, spec1, spec2)
    s2 = torch.where(keep_own, spec2, spec1)
    return s1, s2


def crop_splice_mixup(spec1: torch.Tensor, spec2: torch.Tensor, y1: torch.Tensor, y2: torch.Tensor,
                      lam: float = 0.4, gen: torch.Generator | None = None,
                      points: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop-splice then mixup (eq. 2): ``x = (1-lam) s1 + lam s2``, ``y = (1-lam) y1 + lam y2``.

    ``y1``/``y2`` are one-hot (or soft) label tensors. A batch shares one crop point.
    Returns (mixed spectrogram, mixed labels).
    """
    if points is None:
        points = crop_points(spec1.shape[-2], spec1.shape[-1], gen)
    s1, s2 = crop_splice(spec1, spec2, *points)
    return (1.0 - lam) * s1 + lam * s2, (1.0 - lam) * y1 + lam * y2


# --------------------------------------------------------------------------------------------
# Signal transforms (sec. 2.4.1)
# --------------------------------------------------------------------------------------------

def time_shift(wave: torch.Tensor, shift: int) -> torch.Tensor:
    """Circular roll along time by ``shift`` samples (negative: towards the start)."""
    return torch.roll(wave, shifts=int(shift), dims=-1)


def pitch_shift(wave: torch.Tensor, n_steps: float, bins_per_octave: int = 12,
                resolution: int = 64) -> torch.Tensor:
    """Shift the pitch by ``n_steps`` (semitones by default), keeping the length.

    Deviation (recorded in method.md): torchaudio's pitch_shift (phase-vocoder stretch +
    resample) costs 0.1-18 s and up to 5 GB per 10 s clip depending on ``n_steps``. This
    equivalent resamples by the frequency ratio ``r = 2**(n_steps/bins_per_octave)`` (rounded to
    ``k/resolution``, so the polyphase resampler stays small and fast) and then crops (r < 1)
    or circularly tiles (r > 1) back to the original length. Every frequency moves by the factor
    r as in the real pitch shift; temporal patterns are stretched by 1/r instead of preserved,
    which for stationary machine sound is an equally valid positive view. ~10 ms per 10 s clip.
    """
    import torchaudio.functional as AF

    ratio = 2.0 ** (float(n_steps) / bins_per_octave)
    num = max(1, round(ratio * resolution))
    if num == resolution:
        return wave.clone()
    g = math.gcd(num, resolution)
    orig, new = num // g, resolution // g
    length = wave.shape[-1]
    # Playing a signal resampled orig -> new at the old rate multiplies frequencies by orig/new.
    out = AF.resample(wave, orig_freq=orig, new_freq=new)
    if out.shape[-1] >= length:
        return out[..., :length].contiguous()
    reps = -(-length // out.shape[-1])
    return out.repeat(*([1] * (out.dim() - 1)), reps)[..., :length].contiguous()


def _fade_curve(n: int, shape: str, device, dtype) -> torch.Tensor:
    """Rising fade curve of n samples, 0 -> 1 (same shapes as torchaudio.transforms.Fade)."""
    t = torch.linspace(0.0, 1.0, n, device=device, dtype=dtype)
    if shape == "linear":
        return t
    if shape == "exponential":
        return torch.pow(2.0, (t - 1.0) * 5.0)
    if shape == "logarithmic":
        return torch.log10(0.1 + t) + 1.0
    if shape == "quarter_sine":
        return torch.sin(t * math.pi / 2.0)
    if shape == "half_sine":
        return torch.sin(t * math.pi - math.pi / 2.0) / 2.0 + 0.5
    raise ValueError(f"unknown fade shape {shape!r}: use linear, exponential, logarithmic, quarter_sine or half_sine")


def fade(wave: torch.Tensor, fade_in: int, fade_out: int, shape: str = "half_sine") -> torch.Tensor:
    """Fade in over the first ``fade_in`` samples and out over the last ``fade_out``."""
    length = wave.shape[-1]
    gain = torch.ones(length, device=wave.device, dtype=wave.dtype)
    fade_in, fade_out = min(int(fade_in), length), min(int(fade_out), length)
    if fade_in > 0:
        gain[:fade_in] = gain[:fade_in] * _fade_curve(fade_in, shape, wave.device, wave.dtype)
    if fade_out > 0:
        gain[length - fade_out:] = gain[length - fade_out:] * _fade_curve(fade_out, shape, wave.device, wave.dtype).flip(0)
    return wave * gain


def add_noise_snr(wave: torch.Tensor, snr_db: float | torch.Tensor, gen: torch.Generator | None = None,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """Add white Gaussian noise (or ``noise``) scaled to the given SNR in dB, per signal.

    Same definition as ``torchaudio.functional.add_noise``: SNR = 10 log10(P_signal / P_noise)
    with P the mean square over time.
    """
    if noise is None:
        noise = torch.randn(wave.shape, generator=gen, dtype=wave.dtype, device="cpu").to(wave.device)
    snr = torch.as_tensor(snr_db, dtype=wave.dtype, device=wave.device)
    p_sig = wave.pow(2).mean(dim=-1, keepdim=True).clamp_min(1e-20)
    p_noise = noise.pow(2).mean(dim=-1, keepdim=True).clamp_min(1e-20)
    if snr.dim() > 0:
        snr = snr.reshape(*snr.shape, *([1] * (wave.dim() - snr.dim())))
    scale = torch.sqrt(p_sig / (p_noise * torch.pow(10.0, snr / 10.0)))
    return wave + scale * noise


@dataclass
class SignalAugment:
    """The positive view of sec. 2.4.1: each transform applied with probability ``p``.

    Defaults follow method.md: time shift up to 56 % of the window, pitch shift by the paper's
    -20 steps, fade with exponential or half-sine shape, white noise at SNR in [-10, 10] dB.
    """

    p_time_shift: float = 0.5
    max_shift_fraction: float = 0.56
    p_pitch_shift: float = 0.5
    pitch_steps: Sequence[float] = (-20.0,)
    p_fade: float = 0.5
    fade_shapes: Sequence[str] = ("exponential", "half_sine")
    max_fade_fraction: float = 0.5
    p_noise: float = 0.5
    snr_db: tuple[float, float] = (-10.0, 10.0)

    def __call__(self, wave: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """Augment one waveform ``[T]`` or each of a batch ``[B, T]`` independently."""
        if wave.dim() == 2:
            return torch.stack([self(w, gen) for w in wave])
        length = wave.shape[-1]
        out = wave
        if _uniform(gen, 0, 1) < self.p_time_shift:
            max_shift = int(self.max_shift_fraction * length)
            out = time_shift(out, _randint(gen, -max_shift, max_shift))
        if self.pitch_steps and _uniform(gen, 0, 1) < self.p_pitch_shift:
            steps = self.pitch_steps[_randint(gen, 0, len(self.pitch_steps) - 1)]
            out = pitch_shift(out, steps)
        if self.fade_shapes and _uniform(gen, 0, 1) < self.p_fade:
            shape = self.fade_shapes[_randint(gen, 0, len(self.fade_shapes) - 1)]
            max_len = int(self.max_fade_fraction * length)
            out = fade(out, _randint(gen, 0, max_len), _randint(gen, 0, max_len), shape)
        if _uniform(gen, 0, 1) < self.p_noise:
            out = add_noise_snr(out, _uniform(gen, *self.snr_db), gen)
        return out


# --------------------------------------------------------------------------------------------
# Pseudo-anomalies (sec. 2.4.2)
# --------------------------------------------------------------------------------------------

def spectral_flip(spec: torch.Tensor) -> torch.Tensor:
    """SF: flip a spectrogram ``[..., F, T]`` along the frequency axis."""
    return spec.flip(-2)


def spectral_stack(spec: torch.Tensor, freq_shifts: Sequence[int], time_shifts: Sequence[int] | None = None,
                   db_factor: float | Sequence[float] = 10.0, channel_dim: int = -3) -> torch.Tensor:
    """SP: stack a log spectrogram onto shifted copies of itself.

    The sum is taken in the linear domain (``10**(dB/db_factor)``: 10 for power dB, 20 for
    magnitude dB; a sequence gives one factor per channel along ``channel_dim``), then converted
    back to dB. The original energy adds up ("overflows") and the shifted copies fill the gaps
    between its spectral lines, raising the background floor. Frequency shifts move copies up
    the frequency axis (zero-filled where nothing shifts in); time shifts roll circularly.
    """
    if time_shifts is None:
        time_shifts = [0] * len(freq_shifts)
    if len(time_shifts) != len(freq_shifts):
        raise ValueError("spectral_stack: freq_shifts and time_shifts need the same length")
    factor = torch.as_tensor(db_factor, dtype=spec.dtype, device=spec.device)
    if factor.dim() == 1:
        shape = [1] * spec.dim()
        shape[channel_dim] = factor.numel()
        factor = factor.reshape(shape)
    lin = torch.pow(10.0, spec / factor)
    total = lin.clone()
    n_freq = spec.shape[-2]
    for df, dt in zip(freq_shifts, time_shifts):
        copy = torch.roll(lin, shifts=int(dt), dims=-1) if dt else lin
        df = int(df)
        if df > 0:
            shifted = torch.zeros_like(copy)
            shifted[..., df:, :] = copy[..., : n_freq - df, :]
        elif df < 0:
            shifted = torch.zeros_like(copy)
            shifted[..., :df, :] = copy[..., -df:, :]
        else:
            shifted = copy
        total = total + shifted
    return factor * torch.log10(total)


@dataclass
class PseudoAnomaly:
    """Negative generator: SF or SP at random (probability ``p_flip`` for SF).

    ``db_factor`` matches the FeatureSpec channels (ch0 log-mel power: 10, ch1 log-mel
    magnitude: 20). SP stacks ``n_copies`` copies shifted by 1..``max_freq_shift_fraction`` of
    the bands and up to ``max_time_shift_fraction`` of the frames.
    """

    p_flip: float = 0.5
    n_copies: tuple[int, int] = (2, 4)
    max_freq_shift_fraction: float = 0.15
    max_time_shift_fraction: float = 0.5
    db_factor: Sequence[float] = field(default_factory=lambda: (10.0, 20.0))

    def __call__(self, spec: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """Make one negative per spectrogram of a batch ``[B, C, F, T]`` (or one ``[C, F, T]``)."""
        if spec.dim() == 4:
            return torch.stack([self(s, gen) for s in spec])
        if _uniform(gen, 0, 1) < self.p_flip:
            return spectral_flip(spec)
        n_freq, n_time = spec.shape[-2], spec.shape[-1]
        k = _randint(gen, *self.n_copies)
        max_df = max(1, int(self.max_freq_shift_fraction * n_freq))
        max_dt = int(self.max_time_shift_fraction * n_time)
        dfs = [_randint(gen, 1, max_df) * (1 if _uniform(gen, 0, 1) < 0.5 else -1) for _ in range(k)]
        dts = [_randint(gen, -max_dt, max_dt) for _ in range(k)]
        factor = list(self.db_factor)[: spec.shape[0]] if spec.dim() == 3 else self.db_factor
        return spectral_stack(spec, dfs, dts, db_factor=factor)
