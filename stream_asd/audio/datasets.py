"""Dataset readers: MIMII, DCASE2020 Task 2, DCASE2021+ / MIMII DUE folders, and manifest CSVs.

Each reader turns a folder into a sorted list of :class:`Clip` (path, machine type, machine id
or section, split, label, domain). Layouts (method.md, "Evaluation"):

- ``mimii``: ``[<snr>/]<type>/id_XX/{normal,abnormal}/*.wav`` (8-channel files; read channel 0).
  MIMII has no train/test split. We use the DCASE2020 convention, deterministically: per
  (snr, type, id), every abnormal clip and as many normal clips (the last ones by name) are
  ``test``, the other normal clips ``train`` (``split_inferred=True``).
- ``dcase2020``: ``<type>/{train,test}/{normal,anomaly}_id_XX_NNNNNNNN.wav``.
- ``dcase2021``: ``<type>/{train,source_test,target_test,test}/
  [<type>_<split>_]section_XX_{source,target}_{train,test}_{normal,anomaly}_*.wav``
  (DCASE2021-2024, MIMII DUE, MIMII DG; ``machine_id`` = ``section_XX``, ``domain`` set).
- ``manifest``: a ``manifest.csv`` at the root with columns ``path, label`` and optionally
  ``machine_type, machine_id, split, domain`` (the layout of ``shared/realdata`` and of the
  synthetic data sets ``synth_dataset.write_dataset`` writes). Paths are relative to the CSV.

The DCASE layouts also accept plain folders of DCASE-named files without ``train``/``test``
subfolders (``<type>/*.wav`` or the files directly in the root): fields come from the file name,
the machine type from the folder. When nothing says the split (DCASE2020 names in a plain
folder, MIMII, a manifest row with an empty split), it is inferred from the label: normal ->
``train``, anomaly -> ``test``, and the clip says ``split_inferred=True``.

Files that carry no label (DCASE evaluation sets) are skipped. ``layout='auto'`` prefers a
root ``manifest.csv`` (it is the ground truth where one exists) and otherwise reads every
file with whichever layout its path matches, so a tree holding several layouts works too.

Example::

    clips = iter_clips("data/dcase2020_dev", machine_types=["fan"])
    train = [c for c in clips if c.split == "train"]
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import DatasetLayoutError

__all__ = ["Clip", "LAYOUTS", "FILE_LAYOUTS", "detect_layout", "iter_clips", "read_manifest", "parse_clip_path"]

log = logging.getLogger(__name__)

#: layouts read from folder and file names, in the order they are tried for each file
FILE_LAYOUTS = ("mimii", "dcase2021", "dcase2020")
LAYOUTS = FILE_LAYOUTS + ("manifest",)
MANIFEST_NAME = "manifest.csv"
_AUDIO_SUFFIXES = (".wav", ".flac")

_DCASE2021_RE = re.compile(
    r"(?:^|_)(?P<section>section_\d+)_(?P<domain>source|target)_(?P<split>train|test)_(?P<label>normal|anomaly)(?:_|$)")
_DCASE2020_RE = re.compile(r"^(?P<label>normal|anomaly)_(?P<id>id_\d+)(?:_|$)")
_MIMII_ID_RE = re.compile(r"^id_\d+$")
_SNR_RE = re.compile(r"^-?\d+_?dB", re.IGNORECASE)  # MIMII's '-6_dB', '0_dB', '6_dB_fan'
# Folders that hold the clips of one machine type in the DCASE layouts (not the type itself).
_SPLIT_DIRS = {"train", "test", "source_test", "target_test", "supplemental", "eval", "dev"}


@dataclass(frozen=True)
class Clip:
    """One labelled audio clip of a data set."""

    path: Path
    machine_type: str
    machine_id: str  # 'id_00' (MIMII, DCASE2020) or 'section_00' (DCASE2021+)
    split: str  # 'train' | 'test'
    label: str  # 'normal' | 'anomaly'
    domain: str | None = None  # 'source' | 'target' (DCASE2021+), else None
    split_inferred: bool = False  # True when no folder, name or manifest said the split
    snr: str | None = None  # MIMII only: the SNR folder, e.g. '6_dB'
    layout: str = ""  # which reader produced the clip

    @property
    def device_id(self) -> str:
        return f"{self.machine_type}-{self.machine_id}"

    @property
    def is_anomaly(self) -> bool:
        return self.label == "anomaly"


def _audio_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(_AUDIO_SUFFIXES):
                files.append(Path(dirpath) / name)
    return sorted(files)


def _type_folder(path: Path, root: Path) -> tuple[str, str | None]:
    """(machine type, split folder or None) for a DCASE-named file: the folder above a
    train/test folder, else the file's own folder (which may be the root itself)."""
    parent = path.parent
    if parent.name in _SPLIT_DIRS and parent != root:
        return parent.parent.name, parent.name
    return parent.name, None


def parse_clip_path(path: Path, root: Path | None = None, layouts: Sequence[str] = FILE_LAYOUTS) -> Clip | None:
    """The clip a file's path describes under the first matching layout, or None.

    MIMII clips come back with a provisional split (normal -> train); :func:`iter_clips`
    assigns MIMII's test normals afterwards.
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    stem = path.stem
    for layout in layouts:
        if layout == "mimii":
            label_dir, id_dir = path.parent, path.parent.parent
            if label_dir.name in ("normal", "abnormal") and _MIMII_ID_RE.match(id_dir.name) and id_dir != root:
                type_dir = id_dir.parent
                snr_dir = type_dir.parent
                snr = snr_dir.name if type_dir != root and _SNR_RE.match(snr_dir.name) else None
                label = "normal" if label_dir.name == "normal" else "anomaly"
                return Clip(path, type_dir.name, id_dir.name, "train" if label == "normal" else "test", label,
                            None, True, snr, "mimii")
        elif layout == "dcase2021":
            m = _DCASE2021_RE.search(stem)
            if m:
                machine_type, _ = _type_folder(path, root)
                return Clip(path, machine_type, m["section"], m["split"], m["label"], m["domain"], False, None,
                            "dcase2021")
        elif layout == "dcase2020":
            m = _DCASE2020_RE.match(stem)
            if m:
                machine_type, split_dir = _type_folder(path, root)
                if split_dir in ("train", "test"):
                    split, inferred = split_dir, False
                else:
                    split, inferred = ("train" if m["label"] == "normal" else "test"), True
                return Clip(path, machine_type, m["id"], split, m["label"], None, inferred, None, "dcase2020")
        else:
            raise DatasetLayoutError(f"unknown layout {layout!r}; use one of {list(FILE_LAYOUTS)}")
    return None


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DatasetLayoutError(f"{root}: no such folder; give the root of a MIMII, DCASE or synthetic data set")
    if not root.is_dir():
        raise DatasetLayoutError(f"{root}: not a folder; give the root folder of a data set (or a manifest .csv)")


def detect_layout(root: str | os.PathLike) -> str:
    """'manifest' when ``root/manifest.csv`` exists, else the file layout most files match
    ('mimii', 'dcase2021' or 'dcase2020'). Raises DatasetLayoutError when none matches."""
    root = Path(root)
    _check_root(root)
    if (root / MANIFEST_NAME).is_file():
        return "manifest"
    files = _audio_files(root)
    counts: Counter[str] = Counter()
    for path in files:
        clip = parse_clip_path(path, root)
        if clip is not None:
            counts[clip.layout] += 1
    if not counts:
        raise _no_match(root, files, FILE_LAYOUTS)
    # most files; ties broken by the order of FILE_LAYOUTS (deterministic)
    return max(FILE_LAYOUTS, key=lambda name: (counts[name], -FILE_LAYOUTS.index(name)))


def _no_match(root: Path, files: list[Path], tried: Iterable[str]) -> DatasetLayoutError:
    tried = list(tried)
    if not files:
        return DatasetLayoutError(f"{root}: holds no .wav or .flac files (layouts tried: {', '.join(tried)})")
    examples = ", ".join(str(p.relative_to(root)) for p in files[:3])
    return DatasetLayoutError(
        f"{root}: none of {len(files)} audio files matches a known layout (tried: {', '.join(tried)}); "
        f"e.g. {examples}. Expected MIMII <snr>/<type>/id_XX/normal|abnormal/*.wav, DCASE2020 "
        f"<type>/train|test/normal|anomaly_id_XX_*.wav, DCASE2021+ section_XX_source|target_train|test_"
        f"normal|anomaly_*.wav, or a {MANIFEST_NAME} with columns path,label")


def _assign_mimii_splits(clips: list[Clip]) -> list[Clip]:
    """Per (snr, type, id): the last N normal clips by name go to test, N = number of abnormal ones."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, clip in enumerate(clips):
        if clip.layout == "mimii":
            groups[(clip.snr, clip.machine_type, clip.machine_id)].append(i)
    out = list(clips)
    for indices in groups.values():
        normals = sorted((i for i in indices if clips[i].label == "normal"), key=lambda i: clips[i].path.name)
        n_abnormal = sum(1 for i in indices if clips[i].label == "anomaly")
        for i in normals[len(normals) - n_abnormal:] if n_abnormal else []:
            out[i] = replace(clips[i], split="test")
    return out


def read_manifest(csv_path: str | os.PathLike) -> list[Clip]:
    """Clips listed in a manifest CSV (columns ``path, label`` required; ``machine_type,
    machine_id, split, domain`` optional, inferred from the path when empty)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetLayoutError(f"{csv_path}: no such manifest file")
    base = csv_path.parent
    clips: list[Clip] = []
    missing: list[str] = []
    with csv_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or ())
        if not {"path", "label"} <= columns:
            raise DatasetLayoutError(f"{csv_path}: a manifest needs the columns path and label; "
                                     f"it has {sorted(columns)}")
        for line, row in enumerate(reader, start=2):
            rel = (row.get("path") or "").strip()
            if not rel:
                raise DatasetLayoutError(f"{csv_path} line {line}: empty path")
            path = Path(rel) if Path(rel).is_absolute() else base / rel
            if not path.is_file():
                missing.append(rel)
                continue
            label = (row.get("label") or "").strip().lower()
            label = {"abnormal": "anomaly"}.get(label, label)
            if label not in ("normal", "anomaly"):
                raise DatasetLayoutError(f"{csv_path} line {line}: label {label!r}; expected normal or anomaly")
            guess = parse_clip_path(path, base)
            machine_type = (row.get("machine_type") or "").strip() or (guess.machine_type if guess else path.parent.name)
            machine_id = (row.get("machine_id") or "").strip() or (guess.machine_id if guess else "")
            if not machine_id:
                raise DatasetLayoutError(f"{csv_path} line {line}: no machine_id, and the file name "
                                         f"{path.name} does not carry one; fill the machine_id column")
            split = (row.get("split") or "").strip().lower()
            inferred = False
            if not split:
                split, inferred = ("train" if label == "normal" else "test"), True
            if split not in ("train", "test"):
                raise DatasetLayoutError(f"{csv_path} line {line}: split {split!r}; expected train, test or empty")
            domain = (row.get("domain") or "").strip().lower() or None
            clips.append(Clip(path, machine_type, machine_id, split, label, domain, inferred, None, "manifest"))
    if missing:
        raise DatasetLayoutError(f"{csv_path}: {len(missing)} listed file(s) do not exist, e.g. {missing[:3]}; "
                                 "fix the paths (relative to the CSV's folder) or restore the files")
    return sorted(clips, key=lambda c: str(c.path))


def iter_clips(root: str | os.PathLike, layout: str = "auto",
               machine_types: Sequence[str] | None = None) -> list[Clip]:
    """All labelled clips under ``root``, sorted by path.

    ``layout``: 'auto' (``manifest.csv`` if present, else per-file detection over all file
    layouts), or one of 'mimii', 'dcase2020', 'dcase2021', 'manifest'.
    ``machine_types``: keep only these machine types.
    """
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".csv":
        clips = read_manifest(root)
        root = root.parent
    else:
        _check_root(root)
        if layout == "auto" and (root / MANIFEST_NAME).is_file():
            layout = "manifest"
        if layout == "manifest":
            clips = read_manifest(root / MANIFEST_NAME)
        else:
            if layout == "auto":
                layouts: Sequence[str] = FILE_LAYOUTS
            elif layout in FILE_LAYOUTS:
                layouts = (layout,)
            else:
                raise DatasetLayoutError(f"unknown layout {layout!r}; use auto or one of {list(LAYOUTS)}")
            files = _audio_files(root)
            parsed = [parse_clip_path(p, root, layouts) for p in files]
            clips = [c for c in parsed if c is not None]
            if not clips:
                raise _no_match(root, files, layouts)
            skipped = len(files) - len(clips)
            if skipped:
                log.info("%s: %d audio file(s) match no %s layout or carry no label; skipped",
                         root, skipped, "/".join(layouts))
            clips = _assign_mimii_splits(clips)
    if machine_types:
        wanted = set(machine_types)
        found = sorted({c.machine_type for c in clips})
        clips = [c for c in clips if c.machine_type in wanted]
        if not clips:
            raise DatasetLayoutError(f"{root}: no clips of machine type(s) {sorted(wanted)}; it holds {found}")
    return sorted(clips, key=lambda c: str(c.path))
