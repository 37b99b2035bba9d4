"""Audio file I/O on real files: round trips, channel selection, resampling, typed errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile

from stream_asd.audio.io import audio_info, read_audio, resample, write_audio
from stream_asd.errors import AudioFileError

INT16_STEP = 1.0 / 32768


def _noise(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).uniform(-0.9, 0.9, n)).astype(np.float32)


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_round_trip_within_int16_tolerance(tmp_path, suffix):
    x = _noise(16000)
    path = write_audio(tmp_path / f"clip{suffix}", x, 16000)
    y = read_audio(path)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.max(np.abs(y - x)) <= 2 * INT16_STEP
    info = audio_info(path)
    assert (info.sample_rate, info.channels, info.frames, info.subtype) == (16000, 1, 16000, "PCM_16")
    assert info.format == suffix[1:].upper()
    assert info.duration_s == pytest.approx(1.0)


def test_int16_input_is_written_exactly(tmp_path):
    x = np.arange(-32768, 32768, 7, dtype=np.int16)
    path = write_audio(tmp_path / "ramp.flac", x)
    raw, _ = soundfile.read(path, dtype="int16")
    np.testing.assert_array_equal(raw, x)


def test_float_input_is_clipped_not_wrapped(tmp_path):
    path = write_audio(tmp_path / "loud.wav", np.array([2.0, -3.0, 0.5], dtype=np.float32))
    y = read_audio(path)
    assert y[0] == pytest.approx(1.0, abs=2 * INT16_STEP) and y[1] == pytest.approx(-1.0, abs=2 * INT16_STEP)


def test_multichannel_selects_channel_or_mixes_down(tmp_path):
    frames = np.stack([np.full(800, 0.1), np.full(800, 0.3), np.full(800, -0.2)], axis=1).astype(np.float32)
    path = tmp_path / "mimii_like.wav"
    soundfile.write(path, frames, 16000, subtype="PCM_16")
    assert read_audio(path).mean() == pytest.approx(0.1, abs=1e-3)  # channel 0 by default
    assert read_audio(path, channel=1).mean() == pytest.approx(0.3, abs=1e-3)
    assert read_audio(path, channel=None).mean() == pytest.approx((0.1 + 0.3 - 0.2) / 3, abs=1e-3)
    with pytest.raises(AudioFileError, match="3 channel"):
        read_audio(path, channel=5)


def test_resampling_44k1_to_16k_keeps_tone_frequency(tmp_path):
    sr_in, f0 = 44100, 1000.0
    t = np.arange(sr_in) / sr_in
    path = write_audio(tmp_path / "tone.wav", 0.5 * np.sin(2 * np.pi * f0 * t), sr_in)
    y = read_audio(path, 16000)
    assert abs(y.size - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(y * np.hanning(y.size)))
    peak_hz = np.argmax(spectrum) * 16000 / y.size
    assert abs(peak_hz - f0) <= 1.0
    assert np.max(np.abs(y)) == pytest.approx(0.5, abs=0.02)  # no gain change


def test_resample_identity_and_bad_rate():
    x = _noise(100)
    assert resample(x, 16000, 16000) is not None and np.array_equal(resample(x, 16000, 16000), x)
    with pytest.raises(AudioFileError):
        resample(x, 0, 16000)


@pytest.mark.parametrize("content", [b"", b"RIFF\x00\x00", os.urandom(4096), b"fLaC" + b"\x00" * 64],
                         ids=["empty", "truncated-header", "garbage", "broken-flac"])
def test_unreadable_files_raise_audio_file_error(tmp_path, content):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(AudioFileError, match="bad.wav"):
        read_audio(path)
    with pytest.raises(AudioFileError, match="bad.wav"):
        audio_info(path)


def test_missing_file_and_folder_and_zero_frames(tmp_path):
    with pytest.raises(AudioFileError, match="no such file"):
        read_audio(tmp_path / "missing.wav")
    with pytest.raises(AudioFileError, match="folder"):
        read_audio(tmp_path)
    empty = tmp_path / "zero.wav"
    soundfile.write(empty, np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")
    with pytest.raises(AudioFileError, match="no samples"):
        read_audio(empty)


def test_write_is_atomic_and_rejects_bad_input(tmp_path):
    good = write_audio(tmp_path / "keep.wav", _noise(400))
    before = good.read_bytes()
    with pytest.raises(AudioFileError, match="NaN"):
        write_audio(good, np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(AudioFileError, match="suffix"):
        write_audio(tmp_path / "x.mp3", _noise(10))
    with pytest.raises(AudioFileError, match="does not exist"):
        write_audio(tmp_path / "no" / "dir.wav", _noise(10))
    with pytest.raises(AudioFileError, match="float"):
        write_audio(tmp_path / "i32.wav", np.ones(10, dtype=np.int32))
    assert good.read_bytes() == before  # the old file survives a failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.wav"]  # no temp files left
