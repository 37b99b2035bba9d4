"""Synthetic machine sounds: a deterministic fleet of devices and fault injection.

What it makes
- Machine types (``MACHINE_TYPES``): ``fan`` (shaft and blade-pass harmonics, broadband airflow
  modulated at the blade-pass rate), ``pump`` (motor harmonics, fluid noise pulsating at the
  vane-pass rate), ``slider`` (periodic strokes: gated motor whine and friction noise, an end-stop
  impact per stroke), ``valve`` (open/close clicks with their own resonances, flow hiss while
  open, a pump hum) and ``gearbox`` (meshing harmonics with shaft-rate sidebands).
- Every device is a :class:`DeviceProfile` ``(machine_type, index, seed)``; its fundamental,
  harmonic weights and phases, noise colour, rhythm, click resonances, loudness and its factory
  background (mains hum 50/60 Hz, room noise, distant knocks) all derive from that triple. Its
  one id, ``device_id`` (``fan-id_00``), is also what the data set readers call a DCASE-layout
  copy of it (:mod:`stream_asd.audio.synth_dataset`), so a model trained on that copy knows it.
  Normal operation varies slowly, as real machines do: speed +-1 %, load/level +-1 dB, noise
  colour, background level, a neighbouring machine switching on and off (minutes).
- What is particular to a machine type is one small recipe in ``_RECIPES`` (machine type ->
  function drawing its harmonics, noise colour, rhythm and events); what a fault changes is one
  recipe in ``_FAULT_RECIPES``. Built voices are cached (``functools.lru_cache``) and read-only.
- Faults (``FAULT_TYPES``), each at a severity in [0, 1]: ``bearing`` (impulses at a
  non-integer multiple of the shaft rate exciting a high resonance, load-zone modulated),
  ``imbalance`` (once-per-revolution tone and amplitude modulation), ``rubbing`` (high-band
  friction noise bursting once per revolution), ``drift`` (the operating speed/rhythm drifts up
  by up to 5%: a tonal change with the same loudness), ``clogging`` (high frequencies damped and
  an irregular flutter), ``click_loss`` (valve: missing, weaker, late clicks). Some faults
  add energy (bearing, rubbing), some only move or remove it (drift, clogging, click_loss), so a
  detector that only watches loudness or reconstruction error misses part of them.

Streaming contract
``render(device, start_s, seconds, ...)`` is a pure function of absolute stream time: rendering
a device chunk by chunk gives bit-for-bit the samples of one long render. How: every
time-dependent value is computed per sample with IEEE basic operations and table look-ups only
(no vectorised transcendental functions, whose SIMD and scalar paths may round differently);
slow control signals are evaluated on a fixed absolute grid of ``_CTRL`` samples and
interpolated; noise is frequency-domain shaped white noise in segments of ``2 * BLOCK``
samples at fixed absolute positions (hop ``BLOCK``, sine window, overlap-add), each segment
seeded by (device, noise source, segment index); events (clicks, impacts, bearing impulses,
knocks) are placed analytically from their index. A fault with ``start_s`` leaves every sample
before ``start_s`` exactly as without it.

Example::

    fleet = make_fleet(8, ["fan", "pump"], seed=0)          # fan-id_00, pump-id_00, fan-id_01, ...
    x = render(fleet[0], 0.0, 10.0)                          # float32, 160000 samples
    y = render(fleet[0], 0.0, 10.0, fault=Fault("bearing", 0.6))

Data sets in the DCASE2020 layout: :mod:`stream_asd.audio.synth_dataset` (``write_dataset``).
"""

from __future__ import annotations

import functools
import hashlib
import math
import numbers
from dataclasses import dataclass, fields, is_dataclass
from types import MappingProxyType
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

from ..errors import AsdError

__all__ = [
    "MACHINE_TYPES", "FAULT_TYPES", "FAULTS_BY_TYPE", "GENERATOR_VERSION", "BLOCK", "SynthError",
    "DeviceProfile", "Fault", "make_fleet", "render", "render_samples",
]

#: Bumped whenever the same (profile, fault, time) would render different samples.
GENERATOR_VERSION = 1
MACHINE_TYPES = ("fan", "pump", "slider", "valve", "gearbox")
_CORE_FAULTS = ("bearing", "imbalance", "rubbing", "drift", "clogging")
FAULT_TYPES = _CORE_FAULTS + ("click_loss",)
#: which faults make sense on which machine (click_loss needs the valve's clicks)
FAULTS_BY_TYPE: dict[str, tuple[str, ...]] = {
    "fan": _CORE_FAULTS, "pump": _CORE_FAULTS, "gearbox": _CORE_FAULTS,
    "slider": _CORE_FAULTS, "valve": _CORE_FAULTS + ("click_loss",),
}

#: noise segments are 2*BLOCK samples at absolute positions j*BLOCK (part of the noise realisation)
BLOCK = 8192
_SEG = 2 * BLOCK
_TABLE = 8192  # periodic look-up tables (wavetables, cosine, envelopes)
_CTRL = 32  # control-rate grid (samples) for slow signals
_PIECE = 2 * BLOCK  # samples rendered per vectorised pass (a multiple of BLOCK)
_SOFT_KNEE = 0.85  # soft limiter: |x| <= knee untouched, output always inside (-1, 1)

# Fault strengths at severity 1 (calibrated so that severity ~0.2 is hard to hear and ~0.5 is
# clearly detectable by a spectral model; see docs/audio.md).
_BEARING_GAIN = 2.2  # impulse peak relative to the machine's RMS level
_IMBALANCE_TONE = 0.9  # once-per-revolution harmonic, relative to the wavetable RMS
_IMBALANCE_AM = 0.35  # amplitude-modulation depth
_RUBBING_GAIN = 0.9  # friction noise RMS relative to the machine noise level
_DRIFT = 0.05  # relative speed/rhythm increase
_CLOG_DB = 14.0  # high-frequency attenuation (dB at ~6 kHz)
_CLOG_FLUTTER = 0.45  # irregular amplitude flutter depth
_CLICK_DROP = 0.85  # probability of a missing click


class SynthError(AsdError, ValueError):
    """Bad arguments to the synthetic generator (unknown machine/fault type, negative time...)."""


# ------------------------------------------------------------------------------------------
# Public value types


@dataclass(frozen=True)
class DeviceProfile:
    """One synthetic machine. Everything it sounds like derives from these three fields.
    Hashable and immutable (it keys the voice cache)."""

    machine_type: str
    index: int
    seed: int = 0

    def __post_init__(self):
        if self.machine_type not in MACHINE_TYPES:
            raise SynthError(f"unknown machine type {self.machine_type!r}; the generator knows {list(MACHINE_TYPES)}")
        if not (isinstance(self.index, numbers.Integral) and 0 <= self.index < 10_000):
            raise SynthError(f"device index must be an int in 0..9999, got {self.index!r}")
        if not (isinstance(self.seed, numbers.Integral) and 0 <= self.seed < 2**63):
            raise SynthError(f"seed must be a non-negative int, got {self.seed!r}")
        object.__setattr__(self, "index", int(self.index))
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def device_id(self) -> str:
        """The device's one id (``fan-id_00``): the producer's, the demo's, and the one the data
        set readers give a DCASE-layout copy of it (``fan/train/normal_id_00_*.wav``)."""
        return f"{self.machine_type}-{self.machine_id}"

    @property
    def machine_id(self) -> str:
        """The DCASE-style id used in file names: ``id_00``."""
        return f"id_{self.index:02d}"

    @property
    def faults(self) -> tuple[str, ...]:
        return FAULTS_BY_TYPE[self.machine_type]

    def describe(self) -> dict:
        """The main numbers of this device (for logs and docs)."""
        v = _voice(self, 16000)
        return {"device_id": self.device_id, "machine_type": self.machine_type, "index": self.index,
                "seed": self.seed, **v.summary}


@dataclass(frozen=True)
class Fault:
    """A fault of ``type`` at ``severity`` (0 = none, 1 = strong), active from ``start_s`` seconds
    of stream time, reaching full strength after ``ramp_s`` seconds."""

    type: str
    severity: float = 0.6
    start_s: float = 0.0
    ramp_s: float = 1.0

    def __post_init__(self):
        if self.type not in FAULT_TYPES:
            raise SynthError(f"unknown fault type {self.type!r}; the generator knows {list(FAULT_TYPES)}")
        for name in ("severity", "start_s", "ramp_s"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and math.isfinite(value)):
                raise SynthError(f"fault {name} must be a finite number, got {value!r}")
        if not 0.0 <= self.severity <= 1.0:
            raise SynthError(f"fault severity must be in [0, 1], got {self.severity}")
        if self.start_s < 0 or self.ramp_s < 0:
            raise SynthError("fault start_s and ramp_s must be >= 0")
        object.__setattr__(self, "severity", float(self.severity))
        object.__setattr__(self, "start_s", float(self.start_s))
        object.__setattr__(self, "ramp_s", float(self.ramp_s))


def make_fleet(n_devices: int, machine_types: Sequence[str] | None = None, seed: int = 0) -> list[DeviceProfile]:
    """``n_devices`` profiles, machine types round-robin (fan-id_00, pump-id_00, ..., fan-id_01, ...)."""
    types = tuple(machine_types) if machine_types else MACHINE_TYPES
    if n_devices < 0:
        raise SynthError(f"n_devices must be >= 0, got {n_devices}")
    unknown = [t for t in types if t not in MACHINE_TYPES]
    if unknown:
        raise SynthError(f"unknown machine type(s) {unknown}; the generator knows {list(MACHINE_TYPES)}")
    return [DeviceProfile(types[k % len(types)], k // len(types), int(seed)) for k in range(n_devices)]


# ------------------------------------------------------------------------------------------
# Deterministic helpers


def _key(*parts) -> int:
    """A stable 63-bit integer from strings/ints (not Python's salted hash())."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _rng(profile: DeviceProfile, purpose: str) -> np.random.Generator:
    return np.random.default_rng([profile.seed, _key(profile.machine_type, profile.index, purpose)])


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _u01(salt: int, idx: np.ndarray) -> np.ndarray:
    """Counter-based uniform [0, 1) numbers: a pure function of (salt, integer index)."""
    x = np.asarray(idx, dtype=np.int64).view(np.uint64) * _GOLD + np.uint64(salt & 0xFFFFFFFFFFFFFFFF)
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def _periodic_table(values: np.ndarray) -> np.ndarray:
    """A one-period table of _TABLE points, extended by two wrap-around points for look-ups.
    float32 (precision ~1e-7 is plenty for audio) keeps a device's voice small."""
    values = np.asarray(values, dtype=np.float32)
    return np.concatenate([values, values[:2]])


def _lookup(table: np.ndarray, cycles: np.ndarray) -> np.ndarray:
    """table(frac(cycles)) with linear interpolation; basic IEEE operations only."""
    x = cycles - np.floor(cycles)
    x *= _TABLE
    i = x.astype(np.intp)
    x -= i
    a = table.take(i)
    return a + x * (table.take(i + 1) - a)


_COS = _periodic_table(np.cos(2 * np.pi * np.arange(_TABLE) / _TABLE))


def _harmonic_table(amps: dict[int, float], phases: dict[int, float]) -> np.ndarray:
    """Wavetable of sum_h amps[h] * sin(2 pi h x + phases[h]) over one period, RMS-normalised."""
    spectrum = np.zeros(_TABLE // 2 + 1, dtype=np.complex128)
    for h, a in amps.items():
        if 0 < h < _TABLE // 2 and a > 0:
            spectrum[h] = a * (_TABLE / 2) * np.exp(1j * (phases.get(h, 0.0) - np.pi / 2))
    wave = np.fft.irfft(spectrum, _TABLE)
    rms = float(np.sqrt(np.mean(wave ** 2)))
    return _periodic_table(wave / rms if rms > 0 else wave)


# Mains hum of the factory (harmonics of 50 or 60 Hz), the same wiring everywhere.
_HUM_TABLE = _harmonic_table({1: 0.5, 2: 1.0, 3: 0.4, 4: 0.3, 5: 0.15, 6: 0.1},
                             {1: 0.3, 2: 1.9, 3: 4.0, 4: 2.2, 5: 5.1, 6: 0.7})


def _shape_noise(freqs: np.ndarray, *, tilt_db_oct=0.0, f_ref=1000.0, bumps=(), lowpass=None, highpass=40.0):
    """Magnitude response on ``freqs``: spectral tilt, log-Gaussian bumps (fc, octaves, dB),
    Butterworth-like low/high-pass magnitudes."""
    f = np.maximum(freqs, 1.0)
    mag = 10 ** (tilt_db_oct * np.log2(f / f_ref) / 20)
    for fc, width, gain_db in bumps:
        mag = mag * 10 ** (gain_db * np.exp(-0.5 * (np.log2(f / fc) / width) ** 2) / 20)
    if lowpass is not None:
        fc, order = lowpass
        mag = mag / np.sqrt(1 + (f / fc) ** (2 * order))
    if highpass is not None:
        mag = mag / np.sqrt(1 + (highpass / f) ** 4)
    mag[0] = 0.0
    return mag


def _unit_rms_shape(mag: np.ndarray) -> np.ndarray:
    """Scale a magnitude response so irfft(Z * mag) has unit variance for unit-variance Z parts."""
    power = 4 * np.sum(mag[1:-1] ** 2) + mag[-1] ** 2
    return (mag * (_SEG / np.sqrt(power))).astype(np.float32)


def _decaying_modes(sr: int, modes: Sequence[tuple[float, float, float]], noise_ms: float = 0.0,
                    noise_gain: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Impulse response: sum of damped sines (freq Hz, decay s, amplitude) plus an optional short
    noise burst; peak-normalised. Computed once per device, so transcendental functions are fine."""
    longest = max(decay for _, decay, _ in modes)
    n = max(8, int(round(6 * longest * sr)))
    t = np.arange(n) / sr
    k = np.zeros(n)
    for freq, decay, amp in modes:
        if freq < 0.45 * sr:
            k += amp * np.exp(-t / decay) * np.sin(2 * np.pi * freq * t)
    if noise_ms > 0 and rng is not None:
        m = min(n, int(noise_ms * 1e-3 * sr * 4))
        burst = rng.standard_normal(m) * np.exp(-np.arange(m) / max(1.0, noise_ms * 1e-3 * sr))
        k[:m] += noise_gain * burst
    fade = np.ones(n)
    tail = max(1, n // 8)
    fade[-tail:] = np.linspace(1, 0, tail)
    k *= fade
    peak = np.max(np.abs(k))
    return (k / peak if peak > 0 else k).astype(np.float32)



def _gate_table(duty: float, edge: float) -> np.ndarray:
    """Raised-cosine gate over one period: 1 during [0, duty), edges of ``edge`` (fractions)."""
    x = np.arange(_TABLE) / _TABLE
    edge = max(edge, 1.0 / _TABLE)
    up = np.clip(x / edge, 0, 1) * np.clip((duty - x) / edge, 0, 1)
    return _periodic_table(0.5 - 0.5 * np.cos(np.pi * up))


def _read_only(value):
    """Make every array inside a cached value read-only: one voice is shared by all callers and
    threads, so nothing may write into it after it is built."""
    if isinstance(value, np.ndarray):
        value.setflags(write=False)
    elif isinstance(value, (tuple, list)):
        for item in value:
            _read_only(item)
    elif is_dataclass(value) and not isinstance(value, type):
        for f in fields(value):
            _read_only(getattr(value, f.name))
    return value


# ------------------------------------------------------------------------------------------
# Machine recipes: what is particular to each machine type
#
# A recipe draws, from the device's voice random stream, its machine's rotating part (shaft
# rate and harmonic weights), the colour and level of its noise and its rhythm: how the noise
# (and, for cycling machines, the tones) is modulated, and the events of a cycle. What every
# machine has (phases, background, fault properties, slow variability) is drawn afterwards by
# _build_voice. The order of the draws inside a recipe is part of every device's sound: change
# it only together with GENERATOR_VERSION.


class _Event(NamedTuple):
    """A periodic event of a cycling machine (an end-stop impact, a valve click)."""

    name: str
    offset: float  # position in the cycle, fraction of the period
    amp: float
    kernels: tuple  # impulse-response variants; each event picks one
    jitter_s: float


@dataclass(frozen=True)
class _ShaftAM:
    """Rotating machine: noise amplitude-modulated ``cycles_per_rev`` times per shaft revolution
    (fan blade pass, gearbox shaft rate)."""

    cycles_per_rev: float
    depth: float
    events = ()  # no periodic events (a class attribute, not a field)

    def apply(self, r: "_Renderer", cycles: np.ndarray, rot: np.ndarray, noise: np.ndarray) -> None:
        noise *= 1.0 + self.depth * _lookup(_COS, self.cycles_per_rev * cycles)


@dataclass(frozen=True)
class _ShaftPulse:
    """Rotating machine: noise shaped by a pulse ``table`` ``cycles_per_rev`` times per
    revolution (pump vane pass)."""

    cycles_per_rev: float
    table: np.ndarray
    events = ()

    def apply(self, r: "_Renderer", cycles: np.ndarray, rot: np.ndarray, noise: np.ndarray) -> None:
        noise *= _lookup(self.table, self.cycles_per_rev * cycles)


@dataclass(frozen=True)
class _Cycle:
    """Cycling machine (slider strokes, valve open/close): a ``gate`` over each period of
    ``period_s`` seconds between a floor and 1 for the tones and the noise, and ``events``
    placed on the cycle."""

    period_s: float
    gate: np.ndarray
    rot_floor: float
    noise_floor: float
    events: tuple

    def apply(self, r: "_Renderer", cycles: np.ndarray, rot: np.ndarray, noise: np.ndarray) -> None:
        gate = _lookup(self.gate, r.rhythm_time() / self.period_s)
        rot *= self.rot_floor + (1.0 - self.rot_floor) * gate
        noise *= self.noise_floor + (1.0 - self.noise_floor) * gate


@dataclass(frozen=True)
class _Draw:
    """What a recipe draws with: the device's voice random stream and the render's frequency
    grid, the highest harmonic to synthesise and the device's overall gain."""

    rng: np.random.Generator
    sr: int
    freqs: np.ndarray  # bins of a noise segment, Hz
    f_top: float
    gain: float

    def harmonics_up_to(self, f_r: float) -> range:
        return range(1, max(2, int(self.f_top / f_r)) + 1)

    def decaying_harmonics(self, f_r: float, decay: float, last: int) -> dict[int, float]:
        """Harmonics 1..``last`` (up to f_top) falling off as exp(-h / decay), each with its own
        random weight drawn in harmonic order."""
        return {h: math.exp(-h / decay) * self.rng.uniform(0.5, 1.5) for h in self.harmonics_up_to(f_r) if h <= last}


@dataclass(frozen=True)
class _MachineParts:
    """A recipe's result (levels before the device's gain; harmonics above f_top are dropped
    by the caller)."""

    f_r: float  # shaft (or motor) rotation frequency, Hz
    amps: dict  # harmonic number -> amplitude
    noise_mag: np.ndarray  # magnitude response of the machine noise
    rot_level: float
    noise_level: float
    rhythm: "_ShaftAM | _ShaftPulse | _Cycle"
    summary: dict  # the type's main numbers, for describe()


def _fan(draw: _Draw) -> _MachineParts:
    """Shaft and blade-pass harmonics under a formant; airflow noise modulated at blade pass."""
    rng, u = draw.rng, draw.rng.uniform
    f_r = u(16.0, 26.0)
    blades = int(rng.integers(5, 10))
    slope = u(0.9, 1.5)
    formant_fc, formant_gain = u(300, 1500), u(0.5, 2.0)
    amps: dict[int, float] = {}
    for h in draw.harmonics_up_to(f_r):
        f = h * f_r
        if h % blades == 0:
            a = (h // blades) ** -slope * u(0.6, 1.4)
        else:
            a = 0.06 * u(0.5, 1.5) * math.exp(-h / 6)
        amps[h] = a * (1 + formant_gain * math.exp(-0.5 * (math.log2(f / formant_fc) / 0.5) ** 2))
    noise_mag = _shape_noise(draw.freqs, tilt_db_oct=u(-4.5, -2.0), f_ref=500.0,
                             bumps=[(u(400, 1600), u(0.6, 1.2), u(4, 10))], lowpass=(u(3500, 6500), 2),
                             highpass=60.0)
    rot_level, noise_level = u(0.04, 0.07), u(0.05, 0.08)
    rhythm = _ShaftAM(float(blades), u(0.05, 0.2))
    return _MachineParts(f_r, amps, noise_mag, rot_level, noise_level, rhythm,
                         {"shaft_hz": f_r, "blades": blades, "blade_pass_hz": blades * f_r})


def _pump(draw: _Draw) -> _MachineParts:
    """Motor harmonics, vane-pass harmonics raised; fluid noise pulsating at vane pass."""
    rng, u = draw.rng, draw.rng.uniform
    f_r = u(24.0, 48.0)
    vanes = int(rng.integers(3, 8))
    decay = u(4, 10)
    amps: dict[int, float] = {}
    for h in draw.harmonics_up_to(f_r):
        a = math.exp(-h / decay) * u(0.5, 1.5)
        if h % vanes == 0:
            a *= u(2, 4) / math.sqrt(h // vanes)
        amps[h] = a
    noise_mag = _shape_noise(draw.freqs, tilt_db_oct=-3.0, f_ref=500.0,
                             bumps=[(u(250, 1200), u(0.8, 1.5), u(8, 14))], lowpass=(u(3000, 5000), 2))
    rot_level, noise_level = u(0.03, 0.05), u(0.05, 0.08)
    floor, q = u(0.2, 0.5), u(1.0, 3.0)
    x = np.arange(_TABLE) / _TABLE
    pulse = floor + (1 - floor) * (0.5 + 0.5 * np.cos(2 * np.pi * x)) ** q
    rhythm = _ShaftPulse(float(vanes), _periodic_table(pulse / pulse.mean()))
    return _MachineParts(f_r, amps, noise_mag, rot_level, noise_level, rhythm,
                         {"shaft_hz": f_r, "vanes": vanes, "pulsation_hz": vanes * f_r})


def _slider(draw: _Draw) -> _MachineParts:
    """Strokes: gated motor harmonics and whine, friction noise, an impact at each stroke end."""
    rng, u, sr = draw.rng, draw.rng.uniform, draw.sr
    f_r = u(35.0, 70.0)
    amps = draw.decaying_harmonics(f_r, u(2, 5), last=25)
    whine = int(round(u(1500, 3000) / f_r))
    amps[whine] = amps.get(whine, 0.0) + u(0.2, 0.5)
    noise_mag = _shape_noise(draw.freqs, tilt_db_oct=-2.0, bumps=[(u(1000, 3000), 1.0, 10.0)],
                             lowpass=(7000.0, 2), highpass=100.0)
    rot_level, noise_level = u(0.03, 0.05), u(0.04, 0.07)
    period_s, duty, edge = u(1.2, 2.4), u(0.35, 0.6), 0.06
    k_end = tuple(_decaying_modes(sr, [(u(300, 1500), u(0.015, 0.04), 1.0), (u(1500, 4000), u(0.008, 0.02), 0.6)],
                                  2.0, 0.3, rng) for _ in range(3))
    events = (_Event("stroke_end", duty, u(0.15, 0.3) * draw.gain, k_end, 0.004),
              _Event("stroke_start", 0.0, u(0.05, 0.1) * draw.gain, k_end, 0.004))
    rhythm = _Cycle(period_s, _gate_table(duty, edge / period_s), 0.15, 0.05, events)
    return _MachineParts(f_r, amps, noise_mag, rot_level, noise_level, rhythm,
                         {"motor_hz": f_r, "stroke_period_s": period_s, "duty": duty})


def _valve(draw: _Draw) -> _MachineParts:
    """Open/close clicks with their own resonances, flow hiss while open, a steady pump hum."""
    rng, u, sr = draw.rng, draw.rng.uniform, draw.sr
    f_r = u(20.0, 45.0)
    amps = draw.decaying_harmonics(f_r, u(3, 8), last=30)
    noise_mag = _shape_noise(draw.freqs, tilt_db_oct=0.0, bumps=[(u(2000, 4500), 0.7, 12.0)],
                             lowpass=(7000.0, 2), highpass=500.0)
    rot_level, noise_level = u(0.02, 0.035), u(0.02, 0.04)
    period_s, duty, edge = u(0.5, 1.5), u(0.25, 0.6), 0.008

    def click_bank() -> tuple:
        base = [(u(800, 6000), u(0.003, 0.015), u(0.4, 1.0)) for _ in range(3)]
        # three variants of one click: same resonances, slightly different strike
        return tuple(_decaying_modes(sr, [(f * u(0.98, 1.02), d, a * u(0.8, 1.2)) for f, d, a in base], 1.5, 0.4, rng)
                     for _ in range(3))

    open_amp = u(0.2, 0.35) * draw.gain
    events = (_Event("open", 0.0, open_amp, click_bank(), 0.003),
              _Event("close", duty, open_amp * u(1.1, 1.5), click_bank(), 0.003))
    rhythm = _Cycle(period_s, _gate_table(duty, edge / period_s), 1.0, 0.03, events)
    return _MachineParts(f_r, amps, noise_mag, rot_level, noise_level, rhythm,
                         {"pump_hz": f_r, "cycle_s": period_s, "open_fraction": duty})


def _gearbox(draw: _Draw) -> _MachineParts:
    """Meshing harmonics with shaft-rate sidebands, a little shaft-rate modulation."""
    rng, u = draw.rng, draw.rng.uniform
    f_r = u(12.0, 28.0)
    teeth = int(rng.integers(17, 42))
    slope = u(0.8, 1.6)
    amps: dict[int, float] = {}
    for m in range(1, 5):
        mesh = m * teeth
        if mesh * f_r > draw.f_top:
            break
        a_mesh = m ** -slope * u(0.6, 1.4)
        amps[mesh] = amps.get(mesh, 0.0) + a_mesh
        for j in range(1, 4):
            for side in (mesh - j, mesh + j):
                amps[side] = amps.get(side, 0.0) + a_mesh * 0.3 * u(0.3, 1.0) * math.exp(-(j - 1) / 1.2)
    for h in range(1, 5):
        amps[h] = amps.get(h, 0.0) + 0.1 * u(0.5, 1.5)
    noise_mag = _shape_noise(draw.freqs, tilt_db_oct=-3.0, bumps=[(u(1500, 3500), 0.5, 8.0)], lowpass=(6000.0, 2))
    rot_level, noise_level = u(0.05, 0.08), u(0.02, 0.035)
    rhythm = _ShaftAM(1.0, u(0.04, 0.12))
    return _MachineParts(f_r, amps, noise_mag, rot_level, noise_level, rhythm,
                         {"shaft_hz": f_r, "teeth": teeth, "mesh_hz": teeth * f_r})


#: machine type -> recipe, in the order of MACHINE_TYPES (a new type: a recipe here, its name in
#: MACHINE_TYPES and its faults in FAULTS_BY_TYPE)
_RECIPES: dict[str, Callable[[_Draw], _MachineParts]] = {
    "fan": _fan, "pump": _pump, "slider": _slider, "valve": _valve, "gearbox": _gearbox,
}


# ------------------------------------------------------------------------------------------
# Device voices: everything derived from a profile, per sample rate (cached)


@dataclass(frozen=True)
class _Background:
    """The factory around a device: room noise, mains hum, distant knocks, a neighbouring
    machine switching on and off, and the slow change of their level."""

    shape: np.ndarray  # room noise, float32 unit-RMS shape
    level: float
    hum_hz: float
    hum_level: float
    knock_kernels: tuple
    knock_amp: float
    var: np.ndarray  # slow level terms (amplitude, freq Hz, phase cycles)
    neighbour_table: np.ndarray
    neighbour_hz: float
    neighbour_level: float


@dataclass(frozen=True)
class _Voice:
    """Everything a device sounds like at one sample rate. Built once, then only read."""

    profile: DeviceProfile
    sr: int
    f_r: float  # shaft (or motor) rotation frequency, Hz
    wobble: np.ndarray  # (k, 3): speed-multiplier terms (amplitude, freq Hz, phase cycles)
    rot_amps: Mapping[int, float]
    rot_phases: Mapping[int, float]
    rot_table: np.ndarray
    rot_level: float
    noise_shape: np.ndarray  # float32, unit-RMS
    noise_level: float
    rhythm: "_ShaftAM | _ShaftPulse | _Cycle"
    background: _Background
    # normal variability: load (level) and noise colour, slowly
    level_var: np.ndarray
    colour_var: np.ndarray
    colour_delta: np.ndarray
    # device properties used only when a fault is injected
    bearing_ratio: float
    bearing_kernel: np.ndarray
    rub_fc: float  # centre of the rubbing friction band (Hz)
    flutter: np.ndarray
    machine_rms: float
    summary: Mapping


def _freq_grid(sr: int) -> np.ndarray:
    return np.fft.rfftfreq(_SEG, 1.0 / sr)


# A voice is ~0.2-0.3 MB and takes a few milliseconds to build (a 1 s chunk renders in about
# twice that): the most recently used ones are kept, enough for a producer's whole fleet.
# lru_cache is thread-safe (two threads missing at once may both build; either result is the
# same), and the cached voices are read-only.
_VOICE_CACHE_SIZE = 256
_FAULT_VOICE_CACHE_SIZE = 256


@functools.lru_cache(maxsize=_VOICE_CACHE_SIZE)
def _voice(profile: DeviceProfile, sr: int) -> _Voice:
    return _read_only(_build_voice(profile, sr))


def _build_voice(profile: DeviceProfile, sr: int) -> _Voice:
    """The machine type's recipe, then what every machine has. The order of the random draws is
    part of every device's sound."""
    rng = _rng(profile, "voice")
    u = rng.uniform
    freqs = _freq_grid(sr)
    f_top = min(5200.0, 0.42 * sr)  # highest harmonic we synthesise
    gain = u(0.75, 1.25)

    # slow speed wobble (load changes) + small fast jitter: relative speed terms
    slow = [(u(0.002, 0.004), u(1 / 300, 1 / 30), u()) for _ in range(3)]
    fast = [(u(0.0002, 0.0005), u(2.0, 7.0), u()) for _ in range(2)]
    wobble = np.array(slow + fast)

    machine = _RECIPES[profile.machine_type](_Draw(rng, sr, freqs, f_top, gain))
    f_r = machine.f_r
    amps = {h: a for h, a in machine.amps.items() if h * f_r <= f_top}
    phases = {h: u(0, 2 * np.pi) for h in sorted(amps)}
    rot_level = machine.rot_level * gain
    noise_level = machine.noise_level * gain

    # factory background: mains hum, room noise, distant knocks
    hum_hz = 50.0 if u() < 0.5 else 60.0
    bg_mag = _shape_noise(freqs, tilt_db_oct=-3.0, f_ref=500.0, bumps=[(u(100, 400), 1.0, 6.0)], lowpass=(6000.0, 2))
    knock_kernels = tuple(_decaying_modes(sr, [(u(60, 200), u(0.02, 0.05), 1.0), (u(200, 600), u(0.01, 0.03), 0.4)])
                          for _ in range(2))

    # fault-specific device properties (used only when a fault is injected)
    bearing_ratio = u(3.1, 5.7)
    bearing_kernel = _decaying_modes(sr, [(min(u(2500, 5500), 0.4 * sr), u(0.0008, 0.002), 1.0),
                                          (min(u(5500, 7000), 0.44 * sr), u(0.0004, 0.001), 0.4)])
    rub_fc = min(u(3000, 6000), 0.4 * sr)
    flutter = np.array([(u(0.5, 1.0), u(0.7, 5.0), u()) for _ in range(4)])
    flutter[:, 0] /= flutter[:, 0].sum()
    # the last three draws of the voice stream, in this order
    bg_level = u(0.006, 0.015)
    hum_level = u(0.002, 0.006)
    knock_amp = u(0.02, 0.05)

    # normal variability: the same device sounds a little different from minute to minute
    vr = _rng(profile, "variability")
    level_var = np.array([(vr.uniform(0.04, 0.08), vr.uniform(1 / 240, 1 / 25), vr.uniform()) for _ in range(2)])
    colour_var = np.array([(vr.uniform(0.5, 1.0), vr.uniform(1 / 200, 1 / 30), vr.uniform()) for _ in range(2)])
    colour_var[:, 0] /= 2 * colour_var[:, 0].sum()  # 0.5 + sum in [0, 1]
    tilt = 10 ** (vr.uniform(3.0, 5.0) * np.clip(np.log2(np.maximum(freqs, 1.0) / 500.0) / 3.5, -0.5, 1.3) / 20)
    noise_shape = _unit_rms_shape(machine.noise_mag)
    colour_delta = (noise_shape * (tilt - 1.0)).astype(np.float32)
    bg_var = np.array([(vr.uniform(0.1, 0.2), vr.uniform(1 / 120, 1 / 15), vr.uniform()) for _ in range(2)])
    nb_hz = vr.uniform(30.0, 120.0)
    nb_decay = vr.uniform(1.5, 4.0)
    nb_amps = {h: math.exp(-h / nb_decay) * vr.uniform(0.5, 1.5) for h in range(1, int(min(2000.0, f_top) / nb_hz) + 1)}
    neighbour_table = _harmonic_table(nb_amps, {h: vr.uniform(0, 2 * np.pi) for h in nb_amps})
    neighbour_level = vr.uniform(0.1, 0.25) * math.hypot(rot_level, noise_level)

    background = _Background(
        shape=_unit_rms_shape(bg_mag), level=bg_level, hum_hz=hum_hz, hum_level=hum_level,
        knock_kernels=knock_kernels, knock_amp=knock_amp, var=bg_var,
        neighbour_table=neighbour_table, neighbour_hz=nb_hz, neighbour_level=neighbour_level)
    summary = {**{k: round(float(v), 3) if isinstance(v, float) else v for k, v in machine.summary.items()},
               "harmonics": len(amps), "gain": round(gain, 3), "mains_hz": hum_hz}
    return _Voice(
        profile=profile, sr=sr, f_r=f_r, wobble=wobble,
        rot_amps=MappingProxyType(amps), rot_phases=MappingProxyType(phases),
        rot_table=_harmonic_table(amps, phases), rot_level=rot_level,
        noise_shape=noise_shape, noise_level=noise_level, rhythm=machine.rhythm, background=background,
        level_var=level_var, colour_var=colour_var, colour_delta=colour_delta,
        bearing_ratio=bearing_ratio, bearing_kernel=bearing_kernel, rub_fc=rub_fc, flutter=flutter,
        machine_rms=float(math.hypot(rot_level, noise_level)), summary=MappingProxyType(summary),
    )


# ------------------------------------------------------------------------------------------
# Fault voices: what a fault changes in a device's voice, per fault type (cached)


def _db_attenuation(freqs_hz: np.ndarray, severity: float) -> np.ndarray:
    """Clogging: linear gain, 1 below 500 Hz falling to -_CLOG_DB*severity dB around 6 kHz."""
    octaves = np.clip(np.log2(np.maximum(freqs_hz, 1.0) / 500.0) / 3.5, 0.0, 1.3)
    return 10 ** (-_CLOG_DB * severity * octaves / 20)


@dataclass(frozen=True)
class _FaultVoice:
    rot_delta: np.ndarray | None = None  # wavetable difference (imbalance, clogging)
    noise_delta: np.ndarray | None = None  # noise shape difference (clogging)
    am_depth: float = 0.0
    flutter_depth: float = 0.0
    drift: float = 0.0
    bearing_amp: float = 0.0
    rub_level: float = 0.0
    rub_shape: np.ndarray | None = None
    click_drop: float = 0.0


def _bearing_fault(v: _Voice, s: float, sr: int) -> _FaultVoice:
    """Impulses at a non-integer multiple of the shaft rate (placed by the renderer)."""
    return _FaultVoice(bearing_amp=_BEARING_GAIN * s ** 1.5 * v.machine_rms)


def _imbalance_fault(v: _Voice, s: float, sr: int) -> _FaultVoice:
    """A once-per-revolution tone (same overall wavetable scale) and amplitude modulation."""
    amps = dict(v.rot_amps)
    rms = math.sqrt(sum(a * a for a in amps.values()) / 2)
    amps[1] = amps.get(1, 0.0) + _IMBALANCE_TONE * s * s * rms
    table = _harmonic_table(amps, v.rot_phases) * math.sqrt(sum(a * a for a in amps.values()) / 2) / rms
    return _FaultVoice(rot_delta=table - v.rot_table, am_depth=_IMBALANCE_AM * s)


def _rubbing_fault(v: _Voice, s: float, sr: int) -> _FaultVoice:
    """High-band friction noise (burst once per revolution by the renderer)."""
    shape = _unit_rms_shape(_shape_noise(_freq_grid(sr), bumps=[(v.rub_fc, 0.6, 10.0)], highpass=1500.0,
                                         lowpass=(0.45 * sr, 4)))
    return _FaultVoice(rub_level=_RUBBING_GAIN * s * s * v.noise_level, rub_shape=shape)


def _drift_fault(v: _Voice, s: float, sr: int) -> _FaultVoice:
    """The operating speed and rhythm drift up (the renderer warps time)."""
    return _FaultVoice(drift=_DRIFT * s)


def _clogging_fault(v: _Voice, s: float, sr: int) -> _FaultVoice:
    """High frequencies of tones and noise damped, an irregular flutter."""
    amps = {h: a * float(_db_attenuation(np.array([h * v.f_r]), s)[0]) for h, a in v.rot_amps.items()}
    rms = math.sqrt(sum(a * a for a in v.rot_amps.values()) / 2)
    table = _harmonic_table(amps, v.rot_phases) * math.sqrt(sum(a * a for a in amps.values()) / 2) / rms
    noise_delta = (v.noise_shape * (_db_attenuation(_freq_grid(sr), s) - 1.0)).astype(np.float32)
    return _FaultVoice(rot_delta=table - v.rot_table, noise_delta=noise_delta, flutter_depth=_CLOG_FLUTTER * s)


def _click_loss_fault(v: _Voice, s: float, sr: int) -> _FaultVoice:
    """Missing, weaker and late clicks (decided per click by the renderer)."""
    return _FaultVoice(click_drop=_CLICK_DROP * s)


#: fault type -> recipe (voice, severity, sample rate), in the order of FAULT_TYPES
_FAULT_RECIPES: dict[str, Callable[[_Voice, float, int], _FaultVoice]] = {
    "bearing": _bearing_fault, "imbalance": _imbalance_fault, "rubbing": _rubbing_fault,
    "drift": _drift_fault, "clogging": _clogging_fault, "click_loss": _click_loss_fault,
}


def _fault_voice(profile: DeviceProfile, fault: Fault, sr: int) -> _FaultVoice:
    if fault.type not in FAULTS_BY_TYPE[profile.machine_type]:
        raise SynthError(f"fault {fault.type!r} does not apply to a {profile.machine_type}; "
                         f"use one of {list(FAULTS_BY_TYPE[profile.machine_type])}")
    # the voice of a fault does not depend on when it starts
    return _fault_voice_of(profile, fault.type, fault.severity, sr)


@functools.lru_cache(maxsize=_FAULT_VOICE_CACHE_SIZE)
def _fault_voice_of(profile: DeviceProfile, fault_type: str, severity: float, sr: int) -> _FaultVoice:
    return _read_only(_FAULT_RECIPES[fault_type](_voice(profile, sr), severity, sr))


# ------------------------------------------------------------------------------------------
# Rendering


def render(device: DeviceProfile, start_s: float, seconds: float, sample_rate: int = 16000,
           fault: Fault | None = None) -> np.ndarray:
    """``seconds`` of ``device`` from stream time ``start_s`` as float32 in (-1, 1).

    Sample ``i`` of the result is sample ``round(start_s * sample_rate) + i`` of the device's
    endless stream, whatever the chunking. ``fault`` changes the sound from ``fault.start_s``.
    """
    for name, value in (("start_s", start_s), ("seconds", seconds)):
        if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
            raise SynthError(f"{name} must be a finite number >= 0, got {value!r}")
    return render_samples(device, int(round(start_s * sample_rate)), int(round(seconds * sample_rate)),
                          sample_rate, fault)


def render_samples(device: DeviceProfile, start: int, n: int, sample_rate: int = 16000,
                   fault: Fault | None = None) -> np.ndarray:
    """Samples ``[start, start + n)`` of the device's stream (the exact-integer form of render)."""
    if not isinstance(device, DeviceProfile):
        raise SynthError(f"device must be a DeviceProfile, got {type(device).__name__}")
    if start < 0 or n < 0:
        raise SynthError(f"start and n must be >= 0, got {start}, {n}")
    if not (isinstance(sample_rate, numbers.Integral) and 8000 <= sample_rate <= 192000):
        raise SynthError(f"sample_rate must be an int in 8000..192000, got {sample_rate!r}")
    start, n, sample_rate = int(start), int(n), int(sample_rate)
    if fault is not None and not isinstance(fault, Fault):
        raise SynthError(f"fault must be a Fault or None, got {type(fault).__name__}")
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    v = _voice(device, sample_rate)
    fv = _fault_voice(device, fault, sample_rate) if fault is not None else None
    # Work in block-aligned pieces of at most _PIECE samples: arrays stay cache-sized (large
    # temporaries cost page faults on every call), and the pieces share the noise segments.
    out = np.empty(n, dtype=np.float32)
    segments: dict = {}
    pos, end = start, start + n
    while pos < end:
        stop = min(end, (pos // _PIECE + 1) * _PIECE)
        out[pos - start:stop - start] = _Renderer(v, fv, fault, pos, stop - pos, segments).run()
        pos = stop
    return out


class _Renderer:
    """One render call. Every array is indexed by absolute sample number ``start + i``."""

    def __init__(self, v: _Voice, fv: _FaultVoice | None, fault: Fault | None, start: int, n: int, segments: dict):
        self.v, self.fv, self.start, self.n = v, fv, start, n
        self.segments = segments  # (source, n_shapes, j) -> windowed segments, shared by the pieces
        self.sr = v.sr
        self.idx = np.arange(start, start + n, dtype=np.int64)
        self.t = self.idx / float(self.sr)
        # control grid: absolute multiples of _CTRL covering the span
        g0 = start // _CTRL
        g1 = (start + n - 1) // _CTRL + 1
        self.grid_t = np.arange(g0, g1 + 1, dtype=np.int64) * _CTRL / float(self.sr)
        rel = self.idx - g0 * _CTRL
        self.gi = rel // _CTRL
        self.gf = (rel - self.gi * _CTRL) / float(_CTRL)
        self.fault = fault
        self.ramp = self._ramp(self.t) if fv is not None else None
        self.active = fv is not None and bool(np.any(self.ramp > 0))

    # -- time helpers --------------------------------------------------------------------
    def _interp(self, grid_values: np.ndarray) -> np.ndarray:
        a = grid_values.take(self.gi)
        return a + self.gf * (grid_values.take(self.gi + 1) - a)

    def _ramp(self, t: np.ndarray) -> np.ndarray:
        f = self.fault
        if f.ramp_s <= 0:
            return (t >= f.start_s).astype(np.float64)
        return np.clip((t - f.start_s) / f.ramp_s, 0.0, 1.0)

    def _ramp_integral(self, t: np.ndarray) -> np.ndarray:
        """Integral of the ramp from -inf to t (seconds at full strength), exact per sample."""
        f = self.fault
        d = np.maximum(t - f.start_s, 0.0)
        if f.ramp_s <= 0:
            return d
        inside = np.minimum(d, f.ramp_s)
        return inside * inside / (2 * f.ramp_s) + (d - inside)

    def _unwarp(self, w: np.ndarray, drift: float) -> np.ndarray:
        """Inverse of w(t) = t + drift * ramp_integral(t), for event times of drifting rhythms."""
        f = self.fault
        s0, r = f.start_s, f.ramp_s
        t = w.copy()
        after0 = w > s0
        if r > 0:
            w_end = s0 + r + drift * r / 2
            inside = after0 & (w <= w_end)
            # w = t + drift (t - s0)^2 / (2 r): solve the quadratic for d = t - s0 >= 0
            dw = w[inside] - s0
            a = drift / (2 * r)
            t[inside] = s0 + (2 * dw / (1 + np.sqrt(1 + 4 * a * dw)) if a > 0 else dw)
            late = w > w_end
            t[late] = s0 + r + (w[late] - w_end) / (1 + drift)
        else:
            t[after0] = s0 + (w[after0] - s0) / (1 + drift)
        return t

    def _slow(self, terms: np.ndarray, offset: float) -> np.ndarray:
        """offset + sum of amp*cos(2 pi (nu t + phase)), evaluated on the control grid."""
        acc = np.full_like(self.grid_t, offset)
        for amp, nu, ph in terms:
            acc += amp * _lookup(_COS, nu * self.grid_t + ph)
        return self._interp(acc)

    def rhythm_time(self) -> np.ndarray:
        """Stream time on the machine's rhythm axis: t, sped up by a drift fault."""
        if self.active and self.fv.drift:
            return self.t + self.fv.drift * self._ramp_integral(self.t)
        return self.t

    def _neighbour_gate(self) -> np.ndarray:
        """0/1 per 40 s slot (a neighbouring machine on or off), 3 s cross-fades, control rate."""
        v = self.v
        slot, fade = 40.0, 3.0
        salt = _key(v.profile.machine_type, v.profile.index, v.profile.seed, "neighbour")
        pos = self.grid_t / slot
        q = np.floor(pos)
        qi = q.astype(np.int64)
        s0 = (_u01(salt, qi) < 0.4).astype(np.float64)
        s1 = (_u01(salt, qi + 1) < 0.4).astype(np.float64)
        x = np.clip((pos - q - (1 - fade / slot)) * (slot / fade), 0.0, 1.0)
        return self._interp(s0 + (s1 - s0) * (x * x * (3 - 2 * x)))

    def _cycles(self) -> np.ndarray:
        """Shaft revolutions since t=0 (speed wobble and drift included), per sample."""
        v = self.v
        # integral of the relative speed wobble a*cos(2 pi (nu t + phi)) -> a sin(...)/(2 pi nu)
        gt = self.grid_t
        acc = np.zeros_like(gt)
        for amp, nu, ph in v.wobble:
            acc += (amp / (2 * np.pi * nu)) * _lookup(_COS, nu * gt + ph - 0.25)
        cycles = v.f_r * self.t + v.f_r * self._interp(acc)
        if self.active and self.fv.drift:
            cycles = cycles + (v.f_r * self.fv.drift) * self._ramp_integral(self.t)
        return cycles

    # -- noise ----------------------------------------------------------------------------
    _window = np.sin(np.pi * (np.arange(_SEG) + 0.5) / _SEG).astype(np.float32)

    def _noise(self, source: str, shapes: Sequence[np.ndarray], colour: tuple | None = None) -> list[np.ndarray]:
        """Shaped noise sharing one white realisation per segment; one output per shape.
        ``colour=(delta, terms)``: the first shape becomes shape + alpha_j * delta, alpha_j the
        slow colour mix at segment j's centre (a change over minutes needs no finer steps)."""
        first = self.start // BLOCK - 1
        last = (self.start + self.n - 1) // BLOCK
        outs = [np.zeros(self.n, dtype=np.float64) for _ in shapes]
        for j in range(first, last + 1):  # ascending j: every sample sums its two segments in one order
            cache_key = (source, len(shapes), j)
            segs = self.segments.get(cache_key)
            if segs is None:
                segs = self._segment(source, shapes, j, colour)
                for old in [k for k in self.segments if k[0] == source and k[2] < first]:
                    del self.segments[old]
                self.segments[cache_key] = segs
            lo = max(self.start, j * BLOCK)
            hi = min(self.start + self.n, j * BLOCK + _SEG)
            for out, seg in zip(outs, segs):
                out[lo - self.start:hi - self.start] += seg[lo - j * BLOCK:hi - j * BLOCK]
        return outs

    def _segment(self, source: str, shapes: Sequence[np.ndarray], j: int, colour: tuple | None) -> list[np.ndarray]:
        """Windowed noise segment j (samples [j*BLOCK, j*BLOCK + 2*BLOCK)) for each shape."""
        v = self.v
        key = _key(v.profile.machine_type, v.profile.index, "noise", source)
        bins = _SEG // 2 + 1
        rng = np.random.default_rng([v.profile.seed, key, j + 1])
        # uniform parts with unit variance: after the inverse FFT the sum of thousands of bins
        # is Gaussian, and uniforms are several times cheaper to draw than normals
        parts = rng.random(2 * bins, dtype=np.float32)
        parts -= np.float32(0.5)
        parts *= np.float32(math.sqrt(12.0))
        z = parts[:bins] + 1j * parts[bins:]
        segs = []
        for k, shape in enumerate(shapes):
            if k == 0 and colour is not None:
                delta, terms = colour
                centre = np.array([(j * BLOCK + BLOCK) / self.sr])
                alpha = 0.5 + sum(amp * _lookup(_COS, nu * centre + ph)[0] for amp, nu, ph in terms)
                shape = shape + np.float32(alpha) * delta
            seg = np.fft.irfft(z * shape, _SEG)
            seg *= self._window
            segs.append(seg)
        return segs

    # -- events ---------------------------------------------------------------------------
    def _place(self, out: np.ndarray, pos: np.ndarray, amp: np.ndarray, kernel: np.ndarray) -> None:
        rel = pos - self.start
        k = kernel.size
        keep = (rel > -k) & (rel < self.n) & (amp != 0)
        if not np.any(keep):
            return
        idx = rel[keep][:, None] + np.arange(k)[None, :]
        vals = amp[keep][:, None] * kernel[None, :]
        m = (idx >= 0) & (idx < self.n)
        out += np.bincount(idx[m], weights=vals[m], minlength=self.n)

    def _event_range(self, rate_hz: float, kernel_len: int, max_shift_s: float) -> np.ndarray:
        t0 = (self.start - kernel_len) / self.sr - max_shift_s
        t1 = (self.start + self.n) / self.sr + max_shift_s
        return np.arange(math.floor(t0 * rate_hz) - 1, math.ceil(t1 * rate_hz) + 2, dtype=np.int64)

    def _periodic_events(self, out: np.ndarray, cycle: _Cycle) -> None:
        v, fv = self.v, self.fv
        drift = fv.drift if (self.active and fv.drift) else 0.0
        salt = _key(v.profile.machine_type, v.profile.index, v.profile.seed, "events")
        for e, (name, offset, amp, kernels, jitter_s) in enumerate(cycle.events):
            klen = max(k.size for k in kernels)
            # event indices live on the (possibly drift-warped) rhythm axis w(t) >= t
            t_span = np.array([(self.start - klen) / self.sr - 0.2 * cycle.period_s - jitter_s,
                               (self.start + self.n) / self.sr])
            w_span = t_span + drift * self._ramp_integral(t_span) if drift else t_span
            i = np.arange(math.floor(w_span[0] / cycle.period_s) - 2, math.ceil(w_span[1] / cycle.period_s) + 2,
                          dtype=np.int64)
            w = (i + offset) * cycle.period_s
            tau = self._unwarp(w, drift) if drift else w
            tau = tau + jitter_s * _u01(salt + 11 * e, i)
            a = amp * (0.85 + 0.3 * _u01(salt + 11 * e + 1, i))
            if self.active and fv.click_drop:
                r = self._ramp(tau)
                drop = _u01(salt + 11 * e + 2, i) < fv.click_drop * r
                a = np.where(drop, 0.0, a * (1 - 0.4 * self.fault.severity * r * _u01(salt + 11 * e + 3, i)))
                tau = tau + 0.08 * cycle.period_s * self.fault.severity * r * _u01(salt + 11 * e + 4, i)
            variant = np.floor(_u01(salt + 11 * e + 5, i) * len(kernels)).astype(np.int64)
            pos = np.floor(tau * self.sr + 0.5).astype(np.int64)
            for k, kernel in enumerate(kernels):
                sel = variant == k
                self._place(out, pos[sel], a[sel], kernel)

    def _knocks(self, out: np.ndarray) -> None:
        v, bg = self.v, self.v.background
        slot = 0.25
        salt = _key(v.profile.machine_type, v.profile.index, v.profile.seed, "knocks")
        klen = max(k.size for k in bg.knock_kernels)
        i = self._event_range(1.0 / slot, klen, slot)
        happens = _u01(salt, i) < 0.12
        tau = (i + _u01(salt + 1, i)) * slot
        a = np.where(happens, bg.knock_amp * (0.3 + 0.7 * _u01(salt + 2, i)), 0.0)
        variant = np.floor(_u01(salt + 3, i) * len(bg.knock_kernels)).astype(np.int64)
        pos = np.floor(tau * self.sr + 0.5).astype(np.int64)
        for k, kernel in enumerate(bg.knock_kernels):
            sel = variant == k
            self._place(out, pos[sel], a[sel], kernel)

    def _bearing(self, out: np.ndarray) -> None:
        v, fv = self.v, self.fv
        rate = v.bearing_ratio * v.f_r
        salt = _key(v.profile.machine_type, v.profile.index, v.profile.seed, "bearing")
        i = self._event_range(rate, v.bearing_kernel.size, 0.2 / rate)
        tau = (i + 0.15 * (_u01(salt, i) - 0.5)) / rate  # a little slip, as real bearings have
        load = 0.55 + 0.45 * _lookup(_COS, v.f_r * tau)  # load zone: once per revolution
        a = fv.bearing_amp * self._ramp(tau) * load * (0.8 + 0.4 * _u01(salt + 1, i))
        pos = np.floor(tau * self.sr + 0.5).astype(np.int64)
        self._place(out, pos, a, v.bearing_kernel)

    # -- mix --------------------------------------------------------------------------------
    def run(self) -> np.ndarray:
        v, fv, active = self.v, self.fv, self.active
        cycles = self._cycles()
        rot = _lookup(v.rot_table, cycles)
        if active and fv.rot_delta is not None:
            rot += self.ramp * _lookup(fv.rot_delta, cycles)
        rot *= v.rot_level

        shapes = [v.noise_shape]
        if active and fv.noise_delta is not None:
            shapes.append(fv.noise_delta)
        # normal colour variation: a slow mix towards a brighter version of the same noise
        noises = self._noise("machine", shapes, colour=(v.colour_delta, v.colour_var))
        noise = noises[0]
        if len(noises) > 1:
            noise += self.ramp * noises[1]
        noise *= v.noise_level

        # machine rhythm: blade-pass AM, pump pulsation, stroke/open gates (in place)
        v.rhythm.apply(self, cycles, rot, noise)
        machine = rot + noise
        machine *= self._slow(v.level_var, 1.0)  # load changes: a slow +-1 dB

        if active and fv.am_depth:  # imbalance: once-per-revolution amplitude modulation
            machine *= 1.0 + (fv.am_depth * self.ramp) * _lookup(_COS, cycles + 0.1)
        if active and fv.flutter_depth:  # clogging: irregular flutter
            acc = np.zeros_like(self.grid_t)
            for amp, nu, ph in v.flutter:
                acc += amp * _lookup(_COS, nu * self.grid_t + ph)
            machine *= 1.0 + (fv.flutter_depth * self.ramp) * self._interp(acc)

        if v.rhythm.events:
            self._periodic_events(machine, v.rhythm)
        if active and fv.bearing_amp:
            self._bearing(machine)
        if active and fv.rub_level:
            rub = self._noise("rubbing", [fv.rub_shape])[0]
            burst = _lookup(_RUB_ENV, cycles)
            machine += (fv.rub_level * self.ramp) * burst * rub

        bg = v.background
        background = self._noise("background", [bg.shape])[0] * bg.level
        background += bg.hum_level * _lookup(_HUM_TABLE, bg.hum_hz * self.t)
        background *= self._slow(bg.var, 1.0)
        background += (bg.neighbour_level * self._neighbour_gate()) * _lookup(bg.neighbour_table, bg.neighbour_hz * self.t)
        self._knocks(background)
        return _soft_limit(machine + background)


_RUB_ENV = _periodic_table((0.5 + 0.5 * np.cos(2 * np.pi * np.arange(_TABLE) / _TABLE)) ** 3 / 0.3125)


def _soft_limit(x: np.ndarray) -> np.ndarray:
    """Identity below the knee, a rational curve above it that never reaches 1 (basic ops only)."""
    mag = np.abs(x)
    over = mag > _SOFT_KNEE
    if np.any(over):
        u = (mag[over] - _SOFT_KNEE) / (1 - _SOFT_KNEE)
        x[over] = np.sign(x[over]) * (_SOFT_KNEE + (1 - _SOFT_KNEE) * 0.98 * u / (1 + u))
    return x.astype(np.float32)
