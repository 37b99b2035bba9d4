"""Read the archive back as training clips (``asd-train fit --layout archive``).

Selection: machine types, devices, a capture-time range, and at most ``max_hours`` of audio
(newest first, spread evenly over devices so one chatty device does not crowd out the rest).
``holdout_fraction`` marks the newest part of each device's segments as ``split="test"``:
held-out normal audio for the publishing gate, never trained on.

Records are :class:`stream_asd.audio.datasets.Clip` (``machine_id`` = the device id,
``label`` = ``normal``, ``layout`` = ``archive``). Segments of an object-store archive are
downloaded to ``cache_dir`` first (the trainer reads local files).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ..errors import DatasetLayoutError
from .store import ArchiveStore, archive_name, legacy_name

log = logging.getLogger(__name__)


def parse_time(value: str | datetime | int | float | None) -> int | None:
    """ISO date/time (UTC if no zone), datetime, or epoch seconds -> epoch ns."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return int(value * 1e9)
    if isinstance(value, str):
        text = value.strip().replace("Z", "+00:00")
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise DatasetLayoutError(f"time {text!r} is not ISO 8601 (e.g. 2026-11-28 or 2026-11-28T12:00:00Z)") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(value.timestamp() * 1e9)


@dataclass(frozen=True)
class Segment:
    """One archived FLAC segment (a manifest entry with where it lives)."""

    rel: str  # partition folder, relative to the archive root
    entry: dict[str, Any]

    @property
    def device_id(self) -> str:
        return self.entry["device_id"]

    @property
    def machine_type(self) -> str:
        return self.entry["machine_type"]

    @property
    def seconds(self) -> float:
        return self.entry["samples"] / self.entry["sample_rate"]

    @property
    def start_ns(self) -> int:
        return int(self.entry["capture_start_ns"])


def segment_key(s: Segment) -> str:
    return f"{s.rel}/{s.entry['file']}"


def list_segments(root: str | Path, *, machine_types: Sequence[str] | None = None,
                  devices: Sequence[str] | None = None, since: Any = None, until: Any = None,
                  storage_options: dict[str, Any] | None = None) -> list[Segment]:
    """Manifest entries matching the selection, oldest first. Date partitions outside the
    range, and folders of other machine types and devices, are not opened; the selection is
    then checked on the exact ids each entry records (folder names are never parsed)."""
    store = ArchiveStore(root, storage_options)
    since_ns, until_ns = parse_time(since), parse_time(until)
    want_types = set(machine_types) if machine_types else None
    want_devs = set(devices) if devices else None
    types = {f(t) for t in want_types for f in (archive_name, legacy_name)} if want_types else None
    devs = {f(d) for d in want_devs for f in (archive_name, legacy_name)} if want_devs else None
    since_day = datetime.fromtimestamp(since_ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%d") if since_ns else None
    until_day = datetime.fromtimestamp(until_ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%d") if until_ns else None
    out = []
    for mt, dev, date in store.partitions():
        if (types and mt not in types) or (devs and dev not in devs):
            continue
        if (since_day and date < since_day) or (until_day and date > until_day):
            continue
        rel = f"{mt}/{dev}/{date}"
        for e in store.read_manifest(rel):
            if (want_types and e["machine_type"] not in want_types) or (want_devs and e["device_id"] not in want_devs):
                continue  # an old archive's folder shared by ids its names did not tell apart
            start = int(e["capture_start_ns"])
            end = int(e.get("capture_end_ns", start))
            if (since_ns is not None and end <= since_ns) or (until_ns is not None and start >= until_ns):
                continue
            out.append(Segment(rel, e))
    return sorted(out, key=lambda s: (s.start_ns, s.device_id))


def select_segments(segments: list[Segment], max_hours: float | None) -> list[Segment]:
    """Newest first, round-robin over devices, until ``max_hours`` of audio."""
    if max_hours is None:
        return segments
    budget = max_hours * 3600.0
    by_device: dict[str, list[Segment]] = {}
    for s in sorted(segments, key=lambda s: s.start_ns, reverse=True):
        by_device.setdefault(s.device_id, []).append(s)
    chosen: list[Segment] = []
    total = 0.0
    queues = [q for _, q in sorted(by_device.items())]
    while queues and total < budget:
        nxt = []
        for q in queues:
            if total >= budget:
                break
            s = q.pop(0)
            chosen.append(s)
            total += s.seconds
            if q:
                nxt.append(q)
        queues = nxt
    return sorted(chosen, key=lambda s: (s.start_ns, s.device_id))


def holdout_split(segments: list[Segment], fraction: float) -> dict[str, str]:
    """file -> 'train' | 'test': the newest ``fraction`` of each device's audio is 'test'."""
    split: dict[str, str] = {}
    by_device: dict[str, list[Segment]] = {}
    for s in segments:
        by_device.setdefault(s.device_id, []).append(s)
    for segs in by_device.values():
        segs = sorted(segs, key=lambda s: s.start_ns)
        total = sum(s.seconds for s in segs)
        held = 0.0
        for s in reversed(segs):
            if fraction > 0 and held < fraction * total and len(segs) > 1 and s is not segs[0]:
                split[f"{s.rel}/{s.entry['file']}"] = "test"
                held += s.seconds
            else:
                split[f"{s.rel}/{s.entry['file']}"] = "train"
    return split


def iter_archive_clips(root: str | Path, *, machine_types: Sequence[str] | None = None,
                       devices: Sequence[str] | None = None, since: Any = None, until: Any = None,
                       max_hours: float | None = None, holdout_fraction: float = 0.0, split: str | None = None,
                       cache_dir: str | Path | None = None, only: Iterable[str] | None = None,
                       storage_options: dict[str, Any] | None = None, **_ignored: Any) -> Iterator[Any]:
    """Clips (``stream_asd.audio.datasets.Clip``) of the selected archive segments.

    ``split``: None yields both splits (each clip says which); 'train' / 'test' filters.
    ``only``: restrict to these segments ('<partition>/<file>', see :func:`segment_key`), so
    that training and evaluation of one job see the same segments while the archiver goes on
    writing.
    """
    from ..audio.datasets import Clip

    store = ArchiveStore(root, storage_options)
    segments = list_segments(root, machine_types=machine_types, devices=devices, since=since, until=until,
                             storage_options=storage_options)
    if only is not None:
        keep = set(only)
        segments = [s for s in segments if segment_key(s) in keep]
    segments = select_segments(segments, max_hours)
    if not segments:
        raise DatasetLayoutError(f"archive {root}: no segments match (machine types {machine_types}, devices "
                                 f"{devices}, since {since}, until {until}); is the archiver running?")
    splits = holdout_split(segments, holdout_fraction)
    if not store.is_local:
        cache = Path(cache_dir or Path(tempfile.gettempdir()) / "stream-asd-archive-cache")
    for s in segments:
        rel = f"{s.rel}/{s.entry['file']}"
        clip_split = splits[rel]
        if split is not None and clip_split != split:
            continue
        if store.is_local:
            path = store.path / rel
            if not path.exists():  # deleted by retention since the manifest was read
                continue
        else:
            path = cache / rel
            if not path.exists():
                data = store.read(rel)
                if data is None:
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}")
                tmp.write_bytes(data)
                os.replace(tmp, path)
        yield Clip(path=Path(path), machine_type=s.machine_type, machine_id=s.device_id, split=clip_split,
                   label="normal", layout="archive")


def archive_hours(clips: Iterable[Any]) -> float:
    import soundfile as sf

    return sum(sf.info(str(c.path)).duration for c in clips) / 3600.0
