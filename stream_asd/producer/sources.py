"""Where each microphone's audio comes from.

A :class:`DeviceSource` is one microphone: a device id, a machine type and a stream of mono
float32 samples at the configured rate, handed out one chunk at a time. The agent decides when a
chunk is due (pacing) and stamps it; the source only supplies samples.

- :class:`FileSource`: WAV/FLAC clips of one device played back to back (continuous across clip
  boundaries and, with ``loop``, across the end of the last clip).
- :class:`SyntheticSource`: a device of the synthetic fleet (:mod:`stream_asd.audio.synth`),
  rendered as a pure function of stream time, with an optional fault from a given second on;
  its id is the generator's ``DeviceProfile.device_id`` (``fan-id_00``).
- :class:`CaptureSource`: a live sound device through the optional ``sounddevice`` extra.

:func:`sources_from_paths` turns files, folders and manifest CSVs into file sources with device
ids taken from the path (DCASE/MIMII names) or the manifest; :func:`synthetic_fleet` builds the
synthetic ones.
"""

from __future__ import annotations

import csv
import math
import queue
import re
import socket
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..audio.synth import FAULT_TYPES, MACHINE_TYPES, DeviceProfile, Fault, make_fleet, render_samples
from ..errors import AsdError

AUDIO_SUFFIXES = (".wav", ".flac")


class SourceError(AsdError):
    """A producer source cannot be opened or read (missing file, bad manifest, bad --fault...)."""


@dataclass
class SourceChunk:
    """Samples of one chunk; ``capture_ns`` is set only by sources with their own clock (capture)."""

    samples: np.ndarray  # float32 mono, in [-1, 1]
    capture_ns: int | None = None


class DeviceSource(ABC):
    """One microphone. ``next_chunk(n)`` returns the next ``n`` samples, or None at the end."""

    device_id: str
    machine_type: str
    #: True when the source has its own clock (live capture): the agent waits on it, not on a timer.
    live: bool = False

    @abstractmethod
    def next_chunk(self, n_samples: int) -> SourceChunk | None: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def describe(self) -> str:
        return f"{self.device_id} ({self.machine_type})"


# ---------------------------------------------------------------------------------------------
# Files


def _read_audio(path: Path, sample_rate: int) -> np.ndarray:
    """Mono float32 at ``sample_rate`` via the audio package (resamples when needed)."""
    from ..audio.io import read_audio

    return read_audio(path, sample_rate)  # 1-D float32, first channel of multichannel files


class FileSource(DeviceSource):
    """Clips of one device played back to back, cut into chunks without losing a sample.

    At the end (no ``loop``) the last partial chunk is zero-padded to a full chunk, so every chunk
    on the topic has the configured length; ``tail_samples`` tells how many samples were real.
    With ``loop`` the stream wraps around to the first clip, sample-continuous.
    """

    def __init__(self, device_id: str, machine_type: str, paths: Sequence[Path], sample_rate: int,
                 loop: bool = False):
        if not paths:
            raise SourceError(f"device {device_id}: no audio files")
        self.device_id = device_id
        self.machine_type = machine_type
        self.paths = [Path(p) for p in paths]
        self.sample_rate = sample_rate
        self.loop = loop
        self._next_clip = 0
        self._buffer = np.zeros(0, dtype=np.float32)
        self._samples_seen = 0
        self.tail_samples: int | None = None  # real samples in the last (padded) chunk
        self.loops = 0

    def _load_next(self) -> bool:
        if self._next_clip >= len(self.paths):
            if not self.loop or self._samples_seen == 0:
                return False
            self._next_clip = 0
            self.loops += 1
        path = self.paths[self._next_clip]
        self._next_clip += 1
        clip = _read_audio(path, self.sample_rate)
        self._samples_seen += clip.size
        if clip.size:
            self._buffer = np.concatenate([self._buffer, clip]) if self._buffer.size else clip
        return True

    def next_chunk(self, n_samples: int) -> SourceChunk | None:
        while self._buffer.size < n_samples and self._load_next():
            pass
        if self._buffer.size == 0:
            return None
        out, self._buffer = self._buffer[:n_samples], self._buffer[n_samples:]
        if out.size < n_samples:  # end of the last clip: pad, remember how much was real
            self.tail_samples = int(out.size)
            out = np.concatenate([out, np.zeros(n_samples - out.size, dtype=np.float32)])
        return SourceChunk(np.ascontiguousarray(out, dtype=np.float32))

    def describe(self) -> str:
        return f"{self.device_id} ({self.machine_type}, {len(self.paths)} file(s){', looped' if self.loop else ''})"


# DCASE2020: normal_id_01_00000000.wav; DCASE2021+/MIMII DUE: section_00_source_train_normal_0000.wav;
# MIMII: <snr>/<type>/id_00/normal/00000000.wav
_RE_ID_DIR = re.compile(r"^id_\d+$", re.IGNORECASE)
_LAYOUT_DIRS = {"train", "test", "source_test", "target_test", "normal", "abnormal", "eval", "dev",
                "supplemental"}


@dataclass(frozen=True)
class ClipInfo:
    path: Path
    device_id: str
    machine_type: str
    label: str | None = None


def _machine_type_from(parents: Iterable[Path]) -> str:
    for parent in parents:
        name = parent.name
        if not name or name.lower() in _LAYOUT_DIRS or _RE_ID_DIR.match(name) or re.match(r"^-?\d+db$", name, re.I):
            continue
        return name
    return "unknown"


def describe_clip(path: Path) -> ClipInfo:
    """Device id and machine type of a clip from its path.

    DCASE2020 (``fan/train/normal_id_00_*.wav``) -> ``fan-id_00``; DCASE2021+/MIMII DUE
    (``section_00_...``) -> ``fan-section_00``; MIMII (``fan/id_00/normal/*.wav``) -> ``fan-id_00``;
    anything else -> the file stem, machine type = the nearest folder name.
    """
    from ..audio.datasets import parse_clip_path

    path = Path(path)
    machine_type = _machine_type_from(path.parents)
    # The data set readers own the file-name conventions (the trainer names devices the same way).
    clip = parse_clip_path(path, root=Path(path.anchor or "."))
    if clip is not None:
        return ClipInfo(path, f"{machine_type}-{clip.machine_id.lower()}", machine_type, clip.label)
    return ClipInfo(path, path.stem, machine_type, None)


def _clips_in_folder(folder: Path) -> list[ClipInfo]:
    """Every audio file below ``folder``: described by the data set readers
    (:func:`stream_asd.audio.datasets.iter_clips`: MIMII, DCASE2020/2021+, a manifest.csv in the
    folder) where they recognise it, by :func:`describe_clip` otherwise. No file is skipped: a
    producer that silently left out recordings would be worse than one with a plain device id."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise SourceError(f"folder {folder} holds no .wav or .flac files")
    known: dict[Path, object] = {}
    try:
        from ..audio.datasets import iter_clips

        known = {Path(c.path).resolve(): c for c in iter_clips(folder)}
    except (AsdError, ImportError, OSError, ValueError):
        pass  # not a data set layout: names from the paths
    out = []
    for f in files:
        c = known.get(f.resolve())
        # A root that is itself a split folder (fan/train) makes the readers call the type "train".
        if c is not None and c.machine_type and c.machine_type.lower() not in _LAYOUT_DIRS:
            out.append(ClipInfo(f, c.device_id, c.machine_type, c.label))
        else:
            out.append(describe_clip(f))
    return out


def _read_manifest(csv_path: Path) -> list[ClipInfo]:
    try:
        with csv_path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(f"cannot read manifest {csv_path}: {exc}") from None
    if not rows or "path" not in rows[0]:
        raise SourceError(f"manifest {csv_path} needs a header row with a 'path' column "
                          "(optional: device_id, machine_type, machine_id, label)")
    out = []
    for i, row in enumerate(rows, start=2):
        rel = (row.get("path") or "").strip()
        if not rel:
            raise SourceError(f"manifest {csv_path} line {i}: empty path")
        path = Path(rel) if Path(rel).is_absolute() else csv_path.parent / rel
        guessed = describe_clip(path)
        machine_type = (row.get("machine_type") or "").strip() or guessed.machine_type
        device_id = (row.get("device_id") or "").strip()
        if not device_id:
            mid = (row.get("machine_id") or "").strip()
            # A machine id alone is not unique across folders: keep the folder in the id.
            device_id = f"{path.parent.name}-{mid}" if mid else guessed.device_id
        label = (row.get("label") or "").strip().lower() or guessed.label
        out.append(ClipInfo(path, device_id, machine_type, label))
    return out


def _check_audio_file(path: Path) -> None:
    if not path.exists():
        raise SourceError(f"no such file or folder: {path}; give WAV/FLAC files, folders of them, "
                          "or a manifest CSV (or --synthetic N for a generated fleet)")
    if path.suffix.lower() not in AUDIO_SUFFIXES:
        raise SourceError(f"{path}: not a .wav or .flac file (a manifest must end in .csv)")
    import soundfile

    try:
        soundfile.info(str(path))
    except Exception as exc:  # soundfile raises RuntimeError/LibsndfileError/TypeError
        raise SourceError(f"{path}: not a readable WAV/FLAC file ({exc}); re-encode it or remove it") from None


def collect_clips(paths: Sequence[str | Path], label: str | None = None) -> list[ClipInfo]:
    """Files, folders (recursive) and manifest CSVs -> clip descriptions, checked readable."""
    clips: list[ClipInfo] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise SourceError(f"no such file or folder: {path}; give WAV/FLAC files, folders of them, "
                              "or a manifest CSV (or --synthetic N for a generated fleet)")
        if path.is_dir():
            clips += _clips_in_folder(path)
        elif path.suffix.lower() == ".csv":
            clips += _read_manifest(path)
        else:
            clips.append(describe_clip(path))
    if label is not None:
        clips = [c for c in clips if c.label == label.lower()]
        if not clips:
            raise SourceError(f"no clip is labelled {label!r} in {list(map(str, paths))}")
    for clip in clips:
        _check_audio_file(clip.path)
    return clips


def sources_from_paths(paths: Sequence[str | Path], sample_rate: int, loop: bool = False,
                       label: str | None = None) -> list[FileSource]:
    """One :class:`FileSource` per device found in the given files/folders/manifests, clips of a
    device in path order."""
    by_device: "OrderedDict[str, list[ClipInfo]]" = OrderedDict()
    for clip in collect_clips(paths, label):
        by_device.setdefault(clip.device_id, []).append(clip)
    sources = []
    for device_id, clips in by_device.items():
        types = {c.machine_type for c in clips}
        if len(types) > 1:
            raise SourceError(f"device {device_id} has clips of several machine types {sorted(types)}; "
                              "give each device its own device_id in a manifest")
        sources.append(FileSource(device_id, clips[0].machine_type, [c.path for c in clips], sample_rate, loop))
    return sources


# ---------------------------------------------------------------------------------------------
# Synthetic fleet


@dataclass(frozen=True)
class FaultSpec:
    """``--fault DEVICE:TYPE:AT_SECONDS[:SEVERITY]``: DEVICE is a device id or a fleet index."""

    device: str
    fault_type: str
    at_s: float
    severity: float | None = None


FAULT_SYNTAX = "DEVICE:TYPE:AT_SECONDS[:SEVERITY], e.g. --fault 3:bearing:30:0.8 or --fault fan-id_03:imbalance:60"


def parse_fault(text: str) -> FaultSpec:
    parts = text.split(":")
    if len(parts) not in (3, 4) or not all(p.strip() for p in parts):
        raise SourceError(f"--fault {text!r}: expected {FAULT_SYNTAX}")
    device, fault_type, at = (p.strip() for p in parts[:3])
    try:
        at_s = float(at)
    except ValueError:
        raise SourceError(f"--fault {text!r}: AT_SECONDS {at!r} is not a number; expected {FAULT_SYNTAX}") from None
    if not math.isfinite(at_s) or at_s < 0:
        raise SourceError(f"--fault {text!r}: AT_SECONDS must be >= 0; expected {FAULT_SYNTAX}")
    severity = None
    if len(parts) == 4:
        try:
            severity = float(parts[3])
        except ValueError:
            raise SourceError(f"--fault {text!r}: SEVERITY {parts[3]!r} is not a number; expected {FAULT_SYNTAX}") from None
        if not (math.isfinite(severity) and severity > 0):
            raise SourceError(f"--fault {text!r}: SEVERITY must be > 0; expected {FAULT_SYNTAX}")
    return FaultSpec(device, fault_type, at_s, severity)


def known_fault_types() -> list[str]:
    """The generator's fault types, sorted."""
    return sorted(FAULT_TYPES)


def known_machine_types() -> list[str]:
    """The generator's machine types, in its order (``make_fleet`` deals them round-robin)."""
    return list(MACHINE_TYPES)


class SyntheticSource(DeviceSource):
    """A synthetic microphone: chunk ``k`` is ``render_samples(device, k * n, n, ...)``.

    Rendering is a pure function of stream time, so a chunk can be recomputed for checks and the
    fault begins exactly at ``fault.start_s`` seconds of stream time.
    """

    def __init__(self, profile: DeviceProfile, sample_rate: int, fault: Fault | None = None):
        self.profile = profile
        # The generator's one id (fan-id_00): also what a DCASE-layout copy of this device
        # (synth_dataset.write_dataset) is called by the data set readers, so per-device
        # thresholds of a model trained on that copy apply.
        self.device_id = profile.device_id
        self.machine_type = profile.machine_type
        self.sample_rate = sample_rate
        self.fault = fault
        self._pos = 0  # samples rendered so far

    def render(self, start_sample: int, n_samples: int) -> np.ndarray:
        return render_samples(self.profile, start_sample, n_samples, self.sample_rate, self.fault)

    def next_chunk(self, n_samples: int) -> SourceChunk | None:
        out = self.render(self._pos, n_samples)
        self._pos += n_samples
        return SourceChunk(out)

    def describe(self) -> str:
        f = self.fault
        extra = f", fault {f.type} at {f.start_s:g} s" if f is not None else ""
        return f"{self.device_id} ({self.machine_type}, synthetic{extra})"


def synthetic_fleet(n: int, sample_rate: int, machine_types: Sequence[str] | None = None, seed: int = 0,
                    faults: Sequence[FaultSpec] = ()) -> list[SyntheticSource]:
    """``n`` synthetic devices (machine types round-robin) with the given faults injected; a
    fault's DEVICE is a fleet index or a device id (``fan-id_03``)."""
    if n < 1:
        raise SourceError("--synthetic N needs N >= 1")
    if machine_types:
        unknown = [t for t in machine_types if t not in MACHINE_TYPES]
        if unknown:
            raise SourceError(f"unknown machine type(s) {unknown}; the generator knows {list(MACHINE_TYPES)}")
    fleet = make_fleet(n, list(machine_types) if machine_types else None, seed)
    by_id = {p.device_id: i for i, p in enumerate(fleet)}
    fault_of: dict[int, FaultSpec] = {}
    for spec in faults:
        if spec.device in by_id:
            index = by_id[spec.device]
        elif spec.device.isdigit() and int(spec.device) < len(fleet):
            index = int(spec.device)
        else:
            ids = [p.device_id for p in fleet]
            raise SourceError(f"--fault {spec.device}:...: no such device; use a fleet index 0..{len(fleet) - 1} "
                              f"or one of {ids[:8]}{' ...' if len(ids) > 8 else ''}")
        allowed = list(fleet[index].faults)
        if spec.fault_type not in allowed:
            raise SourceError(f"--fault {spec.device}:{spec.fault_type}:...: no such fault for a "
                              f"{fleet[index].machine_type}; use one of {allowed}")
        if spec.severity is not None and not 0 < spec.severity <= 1:
            raise SourceError(f"--fault {spec.device}:...: SEVERITY must be in (0, 1]")
        if index in fault_of:
            raise SourceError(f"device {fleet[index].device_id} has two --fault options; give one per device")
        fault_of[index] = spec
    sources = []
    for i, profile in enumerate(fleet):
        fault = None
        spec = fault_of.get(i)
        if spec is not None:
            kwargs = {"type": spec.fault_type, "start_s": spec.at_s}
            if spec.severity is not None:
                kwargs["severity"] = spec.severity
            fault = Fault(**kwargs)
        sources.append(SyntheticSource(profile, sample_rate, fault))
    return sources


# ---------------------------------------------------------------------------------------------
# Live capture


CAPTURE_SYNTAX = "DEVICE[,DEVICE_ID[,MACHINE_TYPE]] (DEVICE: a sounddevice index or name, or 'default')"


class CaptureSource(DeviceSource):
    """A live input device via ``sounddevice`` (optional extra ``stream-asd[capture]``).

    The PortAudio callback puts blocks on a queue; ``capture_ns`` of a chunk is the wall-clock
    time of its first sample (the callback's ADC time mapped to the wall clock).
    """

    live = True

    def __init__(self, device: str | int | None, device_id: str, machine_type: str, sample_rate: int,
                 chunk_samples: int, timeout_s: float = 5.0):
        try:
            import sounddevice as sd
        except (ImportError, OSError) as exc:
            raise SourceError(
                "live capture needs the optional extra: pip install 'stream-asd[capture]' and the PortAudio "
                f"library (Debian: apt-get install libportaudio2); import failed: {exc}") from None
        try:
            inputs = [d for d in sd.query_devices() if d.get("max_input_channels", 0) > 0]
        except Exception as exc:
            raise SourceError(f"cannot list sound devices: {exc}") from None
        if not inputs:
            raise SourceError("no sound input device found on this machine; stream files or --synthetic N instead")
        dev = None if device in (None, "", "default") else (int(device) if str(device).isdigit() else device)
        self.device_id = device_id
        self.machine_type = machine_type
        self.sample_rate = sample_rate
        self.timeout_s = timeout_s
        self._queue: "queue.Queue[tuple[np.ndarray, int]]" = queue.Queue()
        self._pending = np.zeros(0, dtype=np.float32)
        self._pending_ns = 0
        self.overflows = 0

        offset_ns = time.time_ns() - int(time.monotonic() * 1e9)

        def callback(indata, frames, time_info, status):  # PortAudio thread
            if status.input_overflow:
                self.overflows += 1
            adc = getattr(time_info, "inputBufferAdcTime", 0.0) or 0.0
            # PortAudio's stream clock is monotonic-like; fall back to now - block length.
            start_ns = int(adc * 1e9) + offset_ns if adc > 0 else time.time_ns() - int(frames / sample_rate * 1e9)
            self._queue.put((indata[:, 0].astype(np.float32, copy=True), start_ns))

        try:
            self._stream = sd.InputStream(device=dev, channels=1, samplerate=sample_rate, dtype="float32",
                                          blocksize=chunk_samples, callback=callback)
            self._stream.start()
        except Exception as exc:
            names = ", ".join(f"{i}: {d['name']}" for i, d in enumerate(sd.query_devices()) if d.get("max_input_channels", 0) > 0)
            raise SourceError(f"cannot open sound device {device!r} at {sample_rate} Hz mono ({exc}); "
                              f"input devices: {names}") from None

    def next_chunk(self, n_samples: int) -> SourceChunk | None:
        while self._pending.size < n_samples:
            try:
                block, start_ns = self._queue.get(timeout=self.timeout_s)
            except queue.Empty:
                raise SourceError(f"sound device of {self.device_id} delivered nothing for {self.timeout_s} s") from None
            if self._pending.size == 0:
                self._pending_ns = start_ns
            self._pending = np.concatenate([self._pending, block])
        out, self._pending = self._pending[:n_samples], self._pending[n_samples:]
        capture_ns = self._pending_ns
        self._pending_ns = capture_ns + int(n_samples / self.sample_rate * 1e9)
        return SourceChunk(out, capture_ns)

    def close(self) -> None:
        try:
            self._stream.stop()
            self._stream.close()
        except Exception:
            pass


def parse_capture(text: str, sample_rate: int, chunk_samples: int, index: int) -> CaptureSource:
    parts = [p.strip() for p in text.split(",")]
    if not parts or len(parts) > 3 or not parts[0]:
        raise SourceError(f"--capture {text!r}: expected {CAPTURE_SYNTAX}")
    device = parts[0]
    device_id = parts[1] if len(parts) > 1 and parts[1] else f"{socket.gethostname()}-mic{index}"
    machine_type = parts[2] if len(parts) > 2 and parts[2] else "unknown"
    return CaptureSource(device, device_id, machine_type, sample_rate, chunk_samples)


@dataclass
class SourceSet:
    """All sources of one producer process (device ids unique)."""

    sources: list[DeviceSource] = field(default_factory=list)

    def add(self, more: Iterable[DeviceSource]) -> None:
        seen = {s.device_id for s in self.sources}
        for s in more:
            if s.device_id in seen:
                raise SourceError(f"device id {s.device_id!r} appears twice; device ids must be unique per topic")
            seen.add(s.device_id)
            self.sources.append(s)
