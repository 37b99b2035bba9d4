"""Features shared by the trainer and the stream processor: one ``FeatureSpec``, one STFT.

The spectrogram model sees two channels computed from ONE short-time Fourier transform
(method.md, "Features"):

- ch0 = 10*log10(mel(|X|^2) + eps)   log-mel power
- ch1 = 20*log10(mel(|X|)   + eps)   log-mel magnitude

There is deliberately no per-clip max normalisation (torchaudio's ``AmplitudeToDB(top_db=...)``
clamps relative to the clip's own maximum, so a 10 s snippet and the whole recording would get
different features for the same frames). The only normalisation is an optional affine one with a
mean/std per channel and mel band fitted on training data and stored with the model.

The statistics model (paper sec. 2.7, eq. 7-8) uses the mel *power* spectrogram of the same
STFT: ``fit_statistics_lambda`` computes lambda once on training normals and
``statistics_features`` turns a clip into ``lambda * (per-band time mean)``.

Everything here runs on CPU or CUDA (the module's buffers follow ``.to(device)``).

Example::

    spec = FeatureSpec()
    frontend = LogMelFrontend(spec)
    x = frontend(torch.zeros(4, spec.window_samples))   # (4, 2, 224, 313)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torchaudio
from torch import nn

from ..errors import BundleError

__all__ = [
    "FeatureSpec",
    "LogMelFrontend",
    "stft_power",
    "fit_statistics_lambda",
    "statistics_features",
    "band_means",
]


# Documented maxima (docs/model.md, "Refused bundles"): far above any real use (the paper's
# spec is 16 kHz, 10 s, n_fft 2048, hop 512, 224 bands: 313 x 1025 STFT bins), low enough that
# one window's STFT fits in memory. A bundle whose spec exceeds them is refused at load time
# instead of failing at the first scored window.
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 192_000
MAX_WINDOW_SECONDS = 60.0
MIN_N_FFT = 16
MAX_N_FFT = 16_384
MAX_HOP_LENGTH = 16_384
MAX_N_MELS = 1_024
MAX_STFT_BINS = 1 << 24  # frames x max(n_fft//2+1, n_mels) per window (paper: 320,825)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _spec_problems(s: "FeatureSpec") -> list[str]:
    problems: list[str] = []
    if not _is_int(s.sample_rate) or not MIN_SAMPLE_RATE <= s.sample_rate <= MAX_SAMPLE_RATE:
        problems.append(f"sample_rate must be an integer in [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz, "
                        f"got {_short(s.sample_rate)}")
    if not _is_real(s.window_seconds) or not 0 < s.window_seconds <= MAX_WINDOW_SECONDS:
        problems.append(f"window_seconds must be a finite number in (0, {MAX_WINDOW_SECONDS:g}], got {_short(s.window_seconds)}")
    if not _is_int(s.n_fft) or not MIN_N_FFT <= s.n_fft <= MAX_N_FFT:
        problems.append(f"n_fft must be an integer in [{MIN_N_FFT}, {MAX_N_FFT}], got {_short(s.n_fft)}")
    if not _is_int(s.hop_length) or not 1 <= s.hop_length <= MAX_HOP_LENGTH:
        problems.append(f"hop_length must be an integer in [1, {MAX_HOP_LENGTH}], got {_short(s.hop_length)}")
    if not _is_int(s.n_mels) or not 1 <= s.n_mels <= MAX_N_MELS:
        problems.append(f"n_mels must be an integer in [1, {MAX_N_MELS}], got {_short(s.n_mels)}")
    if not _is_real(s.f_min):
        problems.append(f"f_min must be a finite number, got {_short(s.f_min)}")
    if s.f_max is not None and not _is_real(s.f_max):
        problems.append(f"f_max must be a finite number or null, got {_short(s.f_max)}")
    if not _is_real(s.power_eps) or not 0 < s.power_eps <= 1:
        problems.append(f"power_eps must be a finite number in (0, 1], got {_short(s.power_eps)}")
    if problems:  # the checks below need sane values
        return problems
    f_max = s.sample_rate / 2 if s.f_max is None else s.f_max
    if not (0 <= s.f_min < f_max <= s.sample_rate / 2):
        problems.append("need 0 <= f_min < f_max <= sample_rate/2")
    n = s.window_samples
    if n <= s.n_fft // 2:
        problems.append(f"a window of {s.window_seconds:g} s is {n} samples: the STFT (reflect padding of "
                        f"n_fft//2 = {s.n_fft // 2}) needs more than n_fft//2 samples")
    bins = s.n_frames() * max(s.n_freqs, s.n_mels)
    if bins > MAX_STFT_BINS:
        problems.append(f"{s.n_frames()} frames x {max(s.n_freqs, s.n_mels)} bins per window = {bins} > "
                        f"{MAX_STFT_BINS} (raise hop_length or shorten window_seconds)")
    return problems


@dataclass(frozen=True)
class FeatureSpec:
    """Everything that defines the features; saved in every model bundle.

    Defaults are the paper's: 16 kHz, 10 s windows, n_fft 2048, hop 512, 224 mel bands
    (-> 224 x 313 frames for 10 s).
    """

    sample_rate: int = 16_000
    window_seconds: float = 10.0
    n_fft: int = 2048
    hop_length: int = 512
    n_mels: int = 224
    f_min: float = 0.0
    f_max: float | None = None
    power_eps: float = 1e-10

    def __post_init__(self) -> None:
        problems = _spec_problems(self)
        if problems:
            raise ValueError("invalid FeatureSpec: " + "; ".join(problems))

    @property
    def window_samples(self) -> int:
        """Samples in one scored window (160,000 for 10 s at 16 kHz)."""
        return int(round(self.window_seconds * self.sample_rate))

    @property
    def n_freqs(self) -> int:
        return self.n_fft // 2 + 1

    def n_frames(self, n_samples: int | None = None) -> int:
        """STFT frames for ``n_samples`` (centred frames: 1 + n // hop)."""
        n = self.window_samples if n_samples is None else n_samples
        return 1 + n // self.hop_length

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FeatureSpec":
        """Rebuild from ``to_dict`` output; unknown keys are an error (a newer, incompatible spec)."""
        if not isinstance(data, Mapping):
            raise BundleError(f"feature spec must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BundleError(f"feature spec has unknown fields {unknown}: the bundle was written by a "
                              "newer stream-asd; upgrade stream-asd to load it")
        try:
            return cls(**dict(data))
        except (TypeError, ValueError) as exc:
            raise BundleError(f"invalid feature spec in the bundle: {exc}") from None


def stft_power(wave: torch.Tensor, n_fft: int, hop_length: int, window: torch.Tensor) -> torch.Tensor:
    """|STFT|^2 of (B, N) audio -> (B, n_fft//2+1, frames), centred frames, reflect padding."""
    spec = torch.stft(wave, n_fft=n_fft, hop_length=hop_length, win_length=n_fft, window=window,
                      center=True, pad_mode="reflect", return_complex=True)
    return spec.real.square() + spec.imag.square()


class LogMelFrontend(nn.Module):
    """Two-channel log-mel features from one STFT, plus the mel power for the statistics model.

    Buffers: ``window`` (Hann, n_fft), ``mel_fb`` (n_freqs, n_mels, HTK mel scale, triangle peak 1),
    ``norm_mean`` / ``norm_std`` (2, n_mels): identity (0 / 1) unless ``set_normalisation`` was
    called with statistics from training data. All follow ``.to(device)`` and ``state_dict``.
    Input waves: float32 (B, N) in [-1, 1]; any N >= 1 works (frames = 1 + N // hop).
    """

    def __init__(self, spec: FeatureSpec | None = None):
        super().__init__()
        self.spec = spec or FeatureSpec()
        s = self.spec
        self.register_buffer("window", torch.hann_window(s.n_fft, periodic=True), persistent=True)
        fb = torchaudio.functional.melscale_fbanks(
            n_freqs=s.n_freqs, f_min=s.f_min, f_max=s.f_max if s.f_max is not None else s.sample_rate / 2,
            n_mels=s.n_mels, sample_rate=s.sample_rate, norm=None, mel_scale="htk")
        self.register_buffer("mel_fb", fb.to(torch.float32), persistent=True)
        self.register_buffer("norm_mean", torch.zeros(2, s.n_mels), persistent=True)
        self.register_buffer("norm_std", torch.ones(2, s.n_mels), persistent=True)

    # --- the two outputs of one STFT -------------------------------------------------------
    def _mel_power_and_magnitude(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if wave.dim() == 1:
            wave = wave.unsqueeze(0)
        if wave.dim() != 2:
            raise ValueError(f"expected waves of shape (B, N), got {tuple(wave.shape)}")
        power = stft_power(wave.to(self.window.dtype), self.spec.n_fft, self.spec.hop_length, self.window)
        # (B, F, T) x (F, M) -> (B, M, T)
        mel_power = torch.einsum("bft,fm->bmt", power, self.mel_fb)
        mel_mag = torch.einsum("bft,fm->bmt", power.sqrt(), self.mel_fb)
        return mel_power, mel_mag

    def mel_power(self, wave: torch.Tensor) -> torch.Tensor:
        """Mel power spectrogram (B, n_mels, T), linear scale (input of the statistics model)."""
        if wave.dim() == 1:
            wave = wave.unsqueeze(0)
        power = stft_power(wave.to(self.window.dtype), self.spec.n_fft, self.spec.hop_length, self.window)
        return torch.einsum("bft,fm->bmt", power, self.mel_fb)

    def log_mel(self, mel_power: torch.Tensor, mel_mag: torch.Tensor) -> torch.Tensor:
        eps = self.spec.power_eps
        ch0 = 10.0 * torch.log10(mel_power + eps)
        ch1 = 20.0 * torch.log10(mel_mag + eps)
        x = torch.stack([ch0, ch1], dim=1)  # (B, 2, M, T)
        return (x - self.norm_mean[None, :, :, None]) / self.norm_std[None, :, :, None]

    def forward_with_power(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-mel 2-ch (B, 2, M, T), mel power (B, M, T)) from one STFT."""
        mel_power, mel_mag = self._mel_power_and_magnitude(wave)
        return self.log_mel(mel_power, mel_mag), mel_power

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, N) float32 -> (B, 2, n_mels, T): ch0 log-mel power (dB), ch1 log-mel magnitude (dB)."""
        mel_power, mel_mag = self._mel_power_and_magnitude(wave)
        return self.log_mel(mel_power, mel_mag)

    def log_mel_power(self, wave: torch.Tensor) -> torch.Tensor:
        """Only ch0, un-normalised: 10*log10(mel power + eps), (B, n_mels, T) (AE baseline input)."""
        return 10.0 * torch.log10(self.mel_power(wave) + self.spec.power_eps)

    # --- optional normalisation fitted on training data ------------------------------------
    @torch.no_grad()
    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Use fixed statistics (2, n_mels) from training data; std is floored at 1e-3 dB."""
        m = torch.as_tensor(mean, dtype=torch.float32).reshape(2, self.spec.n_mels)
        s = torch.as_tensor(std, dtype=torch.float32).reshape(2, self.spec.n_mels).clamp_min(1e-3)
        self.norm_mean.copy_(m)
        self.norm_std.copy_(s)

    @torch.no_grad()
    def fit_normalisation(self, waves: Iterable[torch.Tensor]) -> None:
        """Fit mean/std per channel and band over batches of training waves (B, N), then set them."""
        self.set_normalisation(torch.zeros(2, self.spec.n_mels), torch.ones(2, self.spec.n_mels))
        total = torch.zeros(2, self.spec.n_mels, dtype=torch.float64)
        total_sq = torch.zeros_like(total)
        count = 0
        for wave in waves:
            x = self(wave.to(self.window.device)).double()
            total += x.sum(dim=(0, 3)).cpu()
            total_sq += x.square().sum(dim=(0, 3)).cpu()
            count += x.shape[0] * x.shape[3]
        if count == 0:
            raise ValueError("fit_normalisation needs at least one batch")
        mean = total / count
        std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
        self.set_normalisation(mean.float(), std.float())

    def extra_repr(self) -> str:
        return f"spec={self.spec}"


# --- statistics model (paper eq. 7-8) -------------------------------------------------------

def band_means(mel_power: torch.Tensor) -> torch.Tensor:
    """Per-band time mean of a mel power spectrogram: (B, M, T) -> (B, M)."""
    return mel_power.mean(dim=-1)


def fit_statistics_lambda(mel_power_batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Eq. 7-8: y_i = mean over all training clips and frames of mel power in band i;
    lambda_i = y_i / sum_f y_f. Input: an iterable of (B, M, T) batches (or one tensor).
    Returns lambda (M,) as float64 (sums to 1)."""
    if isinstance(mel_power_batches, torch.Tensor):
        mel_power_batches = [mel_power_batches]
    total: torch.Tensor | None = None
    frames = 0
    for batch in mel_power_batches:
        batch = torch.as_tensor(batch)
        if batch.dim() == 2:
            batch = batch.unsqueeze(0)
        s = batch.detach().double().sum(dim=(0, 2)).cpu()
        total = s if total is None else total + s
        frames += batch.shape[0] * batch.shape[2]
    if total is None or frames == 0:
        raise ValueError("fit_statistics_lambda needs at least one non-empty batch")
    y = total / frames
    denom = float(y.sum())
    if not math.isfinite(denom) or denom <= 0:
        raise ValueError("training mel power sums to zero or non-finite: cannot fit statistics lambda")
    return y / denom


def statistics_features(mel_power: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """A clip's statistics feature: lambda * (per-band time mean). (B, M, T), (M,) -> (B, M).

    Accepts precomputed band means (B, M) too."""
    means = band_means(mel_power) if mel_power.dim() == 3 else mel_power
    lam = torch.as_tensor(lam, device=means.device)
    return means.to(lam.dtype) * lam
