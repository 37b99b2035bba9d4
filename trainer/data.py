"""Training data: clips from a data set layout, cut into windows of the FeatureSpec's length.

Layouts come from the runtime's dataset readers (``stream_asd.audio.datasets.iter_clips``:
dcase2020, dcase2021, mimii, auto). ``--layout archive`` (the archiver's FLAC archive, machine
type / device / date folders) goes through the hook ``ARCHIVE_READER``: the learning-loop part
registers its reader there (``register_archive_reader``), or a ``stream_asd.archive.dataset``
module providing ``iter_archive_clips(root, **selection)`` is picked up when present.

The class label of a window is its (machine_type, machine_id) pair: the self-supervised label
of method.md (machine id / section / device within a model group).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from stream_asd.errors import DatasetLayoutError

log = logging.getLogger("trainer.data")

LAYOUTS = ("auto", "dcase2020", "dcase2021", "mimii", "manifest", "archive")

#: reader for --layout archive: callable(root, **kwargs) -> iterable of clip records
ARCHIVE_READER: Callable[..., Iterable[Any]] | None = None


def register_archive_reader(reader: Callable[..., Iterable[Any]]) -> None:
    """Install the reader used for ``--layout archive`` (records need path, machine_type,
    machine_id and optionally split/label/domain attributes)."""
    global ARCHIVE_READER
    ARCHIVE_READER = reader


@dataclass(frozen=True)
class ClipRef:
    """What training needs to know about one clip."""

    path: Path
    machine_type: str
    machine_id: str
    split: str = "train"
    label: str = "normal"
    domain: str = ""


def _as_ref(clip: Any) -> ClipRef:
    return ClipRef(Path(clip.path), str(clip.machine_type), str(clip.machine_id),
                   str(getattr(clip, "split", "train") or "train"), str(getattr(clip, "label", "normal") or "normal"),
                   str(getattr(clip, "domain", "") or ""))


def _archive_clips(root: Path) -> Iterable[Any]:
    if ARCHIVE_READER is not None:
        return ARCHIVE_READER(root)
    try:
        module = importlib.import_module("stream_asd.archive.dataset")
    except ImportError:
        raise DatasetLayoutError("--layout archive: no archive reader is installed (stream_asd.archive.dataset "
                                 "missing); use a dcase2020/dcase2021/mimii folder instead") from None
    return module.iter_archive_clips(root)


def list_clips(root: str | Path, layout: str = "auto", split: str | None = "train",
               labels: Sequence[str] | None = None) -> list[ClipRef]:
    """All clips of ``split`` (None: every split) under ``root`` in a stable order."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise DatasetLayoutError(f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if not root.exists():
        raise DatasetLayoutError(f"{root}: no such data folder")
    if layout == "archive":
        raw = _archive_clips(root)
    else:
        from stream_asd.audio.datasets import iter_clips

        raw = iter_clips(root, layout)
    clips = [_as_ref(c) for c in raw]
    if split is not None:
        clips = [c for c in clips if c.split == split]
    if labels is not None:
        clips = [c for c in clips if c.label in labels]
    clips.sort(key=lambda c: (c.machine_type, c.machine_id, str(c.path)))
    return clips


def load_wave(path: str | Path, sample_rate: int) -> torch.Tensor:
    from stream_asd.audio.io import read_audio

    return torch.from_numpy(np.ascontiguousarray(read_audio(path, sample_rate), dtype=np.float32))


def window_wave(wave: torch.Tensor, window: int, hop: int | None = None) -> torch.Tensor:
    """Cut a 1-D wave into windows (n, window) with the runtime's rule
    (``stream_asd.model.windows.iter_windows``): complete windows every ``hop`` samples, a clip
    shorter than one window repeated to fill one. The same windows as streaming and scoring."""
    from stream_asd.model.windows import iter_windows

    if wave.shape[-1] == 0:
        raise DatasetLayoutError("empty audio clip")
    return torch.from_numpy(np.stack([w.samples for w in iter_windows(wave.numpy(), window, hop or window)]))


@dataclass
class WindowSet:
    """Windows of audio with their labels; the input of every training stage."""

    waves: torch.Tensor                 # (N, window) float32
    labels: torch.Tensor                # (N,) int64 class index of (machine_type, machine_id)
    clip_index: torch.Tensor            # (N,) int64 index into ``clips``
    classes: list[tuple[str, str]]      # class index -> (machine_type, machine_id)
    clips: list[ClipRef] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.waves.shape[0])

    @property
    def machine_types(self) -> list[str]:
        return [self.classes[i][0] for i in self.labels.tolist()]

    @property
    def machine_ids(self) -> list[str]:
        return [self.classes[i][1] for i in self.labels.tolist()]

    def subset(self, index: torch.Tensor) -> "WindowSet":
        return WindowSet(self.waves[index], self.labels[index], self.clip_index[index], self.classes, self.clips)


def load_windows(clips: Sequence[ClipRef], sample_rate: int, window: int, hop: int | None = None,
                 classes: list[tuple[str, str]] | None = None, progress: bool = False) -> WindowSet:
    """Read and window every clip; labels index ``classes`` (built from the clips if None)."""
    if not clips:
        raise DatasetLayoutError("no training clips found: check --data and --layout")
    if classes is None:
        classes = sorted({(c.machine_type, c.machine_id) for c in clips})
    index = {k: i for i, k in enumerate(classes)}
    waves, labels, clip_idx = [], [], []
    iterator: Iterable = enumerate(clips)
    if progress:
        from .progress import progress_bar  # tqdm on a terminal, plain log lines otherwise

        iterator = progress_bar(iterator, total=len(clips), desc="reading clips", unit="clip")
    for i, clip in iterator:
        w = window_wave(load_wave(clip.path, sample_rate), window, hop)
        waves.append(w)
        labels += [index[(clip.machine_type, clip.machine_id)]] * w.shape[0]
        clip_idx += [i] * w.shape[0]
    return WindowSet(torch.cat(waves), torch.tensor(labels, dtype=torch.long),
                     torch.tensor(clip_idx, dtype=torch.long), list(classes), list(clips))


def fingerprint(clips: Sequence[ClipRef]) -> dict[str, Any]:
    """Data fingerprint for the bundle manifest: clip count per class and a hash of the file
    list with sizes and modification times (cheap; content hashes would read everything twice)."""
    h = hashlib.sha256()
    counts: dict[str, int] = {}
    for c in clips:
        st = c.path.stat()
        h.update(f"{c.path}|{st.st_size}|{int(st.st_mtime)}\n".encode())
        key = f"{c.machine_type}/{c.machine_id}"
        counts[key] = counts.get(key, 0) + 1
    return {"n_clips": len(clips), "clips_per_device": counts, "file_list_sha256": h.hexdigest()}


def split_calibration(clips: Sequence[ClipRef], fraction: float, seed: int) -> tuple[list[ClipRef], list[ClipRef]]:
    """Hold out ``fraction`` of each device's clips (at least one when it has >= 4) for
    score standardisation and thresholds, so those are not measured on the GMM's own data."""
    rng = np.random.default_rng(seed)
    fit, calib = [], []
    by_dev: dict[tuple[str, str], list[ClipRef]] = {}
    for c in clips:
        by_dev.setdefault((c.machine_type, c.machine_id), []).append(c)
    for key in sorted(by_dev):
        group = by_dev[key]
        order = rng.permutation(len(group))
        n_cal = int(round(fraction * len(group))) if len(group) >= 4 else 0
        if fraction > 0 and len(group) >= 4:
            n_cal = max(1, n_cal)
        cal_set = set(order[:n_cal].tolist())
        for i, c in enumerate(group):
            (calib if i in cal_set else fit).append(c)
    return fit, calib
