"""Reading and writing audio files (WAV, FLAC) as float32 at the project's sample rate.

``read_audio`` returns a 1-D float32 array in [-1, 1] at the requested rate: one channel of a
multichannel file (MIMII is 8-channel; channel 0 by default) or the mean of all channels
(``channel=None``), resampled with torchaudio when the file's rate differs (torch is imported
only then). ``write_audio`` writes 16-bit PCM, the format chosen by the suffix, through a
temporary file in the same folder and ``os.replace``, so a crash never leaves half a file.

Every failure a user can cause (missing, empty, truncated or non-audio file, bad channel,
unknown suffix) raises :class:`~stream_asd.errors.AudioFileError` naming the file and what to do.

Example::

    x = read_audio("fan/train/normal_id_00_00000000.wav")        # float32, 16 kHz, mono
    write_audio("/tmp/copy.flac", x)                              # PCM_16 FLAC
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from ..errors import AudioFileError

__all__ = ["AudioInfo", "audio_info", "read_audio", "write_audio", "resample", "AUDIO_SUFFIXES",
           "DEFAULT_SAMPLE_RATE"]

DEFAULT_SAMPLE_RATE = 16000
#: suffix -> libsndfile container name
AUDIO_SUFFIXES = {".wav": "WAV", ".flac": "FLAC"}


@dataclass(frozen=True)
class AudioInfo:
    """What the file header says, without decoding the samples."""

    path: Path
    sample_rate: int
    channels: int
    frames: int
    format: str  # 'WAV', 'FLAC', ...
    subtype: str  # 'PCM_16', 'FLOAT', ...

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise AudioFileError(f"{path}: no such file; check the path (WAV or FLAC expected)")
    if path.is_dir():
        raise AudioFileError(f"{path}: is a folder, not an audio file; give a .wav or .flac file")


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Header facts of a WAV/FLAC file; raises AudioFileError when it cannot be parsed."""
    path = Path(path)
    _check_exists(path)
    try:
        info = soundfile.info(str(path))
    except Exception as exc:  # LibsndfileError (a RuntimeError), TypeError on odd headers
        raise AudioFileError(f"{path}: not a readable audio file ({_short(exc)}); "
                             "re-encode it as WAV or FLAC (e.g. ffmpeg -i IN -ar 16000 OUT.wav)") from None
    return AudioInfo(path, int(info.samplerate), int(info.channels), int(info.frames),
                     str(info.format), str(info.subtype))


def _short(exc: Exception) -> str:
    text = str(exc).strip().replace("\n", " ")
    return text if len(text) <= 160 else text[:157] + "..."


def read_audio(path: str | os.PathLike, sample_rate: int = DEFAULT_SAMPLE_RATE,
               channel: int | None = 0) -> np.ndarray:
    """Samples of ``path`` as a 1-D float32 array at ``sample_rate``.

    ``channel``: which channel of a multichannel file to return (0 = first; MIMII's reference
    microphone), or None to average all channels. A mono file ignores ``channel``.
    """
    path = Path(path)
    _check_exists(path)
    try:
        data, file_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioFileError(f"{path}: cannot decode audio ({_short(exc)}); the file is not WAV/FLAC "
                             "or is truncated: re-encode it (e.g. ffmpeg -i IN -ar 16000 OUT.wav)") from None
    if data.shape[0] == 0:
        raise AudioFileError(f"{path}: holds no samples (0 frames); remove it or record it again")
    n_channels = data.shape[1]
    if n_channels == 1 or channel is None:
        mono = data[:, 0] if n_channels == 1 else data.mean(axis=1, dtype=np.float64).astype(np.float32)
    else:
        if not -n_channels <= channel < n_channels:
            raise AudioFileError(f"{path}: has {n_channels} channel(s), channel {channel} asked for; "
                                 f"use 0..{n_channels - 1}, or None to mix them down")
        mono = data[:, channel]
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if not np.isfinite(mono).all():
        raise AudioFileError(f"{path}: holds NaN or infinite samples (a broken float file); re-encode it")
    if int(file_rate) != int(sample_rate):
        mono = resample(mono, int(file_rate), int(sample_rate))
    return mono


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Band-limited resampling (torchaudio's windowed sinc) of a 1-D float array."""
    if from_rate <= 0 or to_rate <= 0:
        raise AudioFileError(f"cannot resample from {from_rate} Hz to {to_rate} Hz: rates must be positive")
    samples = np.asarray(samples, dtype=np.float32)
    if from_rate == to_rate:
        return samples
    import torch
    import torchaudio.functional as AF

    out = AF.resample(torch.from_numpy(np.ascontiguousarray(samples)), from_rate, to_rate)
    return out.numpy().astype(np.float32, copy=False)


def write_audio(path: str | os.PathLike, samples: np.ndarray, sample_rate: int = DEFAULT_SAMPLE_RATE) -> Path:
    """Write ``samples`` (1-D mono or 2-D frames x channels; float in [-1, 1] or int16) as 16-bit
    PCM. The format follows the suffix (.wav or .flac). Float input is clipped to [-1, 1].

    Atomic: the data goes to a temporary file next to ``path``, then ``os.replace``.
    """
    path = Path(path)
    fmt = AUDIO_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise AudioFileError(f"{path}: unknown audio suffix {path.suffix!r}; use one of {sorted(AUDIO_SUFFIXES)}")
    data = np.asarray(samples)
    if data.ndim not in (1, 2) or data.size == 0:
        raise AudioFileError(f"{path}: expected a non-empty 1-D or 2-D (frames, channels) array, "
                             f"got shape {data.shape}")
    if data.dtype.kind == "f":
        if not np.isfinite(data).all():
            raise AudioFileError(f"{path}: refusing to write NaN or infinite samples")
        data = np.clip(data, -1.0, 1.0).astype(np.float32, copy=False)
    elif data.dtype != np.int16:
        raise AudioFileError(f"{path}: samples must be float (in [-1, 1]) or int16, got {data.dtype}")
    folder = path.parent
    if not folder.is_dir():
        raise AudioFileError(f"{path}: folder {folder} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        soundfile.write(tmp, data, int(sample_rate), subtype="PCM_16", format=fmt)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; audio files are meant to be shared
        os.replace(tmp, path)
    except Exception as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise AudioFileError(f"{path}: cannot write ({_short(exc)}); check free space and permissions") from None
    return path
