"""``stream-asd score``: score audio files offline with a model bundle.

    stream-asd score --bundle B FILE_OR_DIR... [--hop-seconds S] [--format csv|json] [--out FILE]

Files of any length are cut into windows exactly as the stream processor cuts a device's stream
(``stream_asd.model.windows``: window = the bundle's FeatureSpec window, hop configurable; a file
shorter than one window is repeated to fill one and flagged ``padded``), scored in batches, and written
one row per window (file, window index, start/end, score, per-model scores, threshold,
is_anomaly) plus each file's maximum. Folders are searched recursively for .wav/.flac.

Machine type of a file (= model group): ``--machine-type``, else the bundle's only group, else a
folder name or file-name token equal to a group (DCASE layout ``<type>/test/x.wav``).
Device id (selects per-device GMMs and thresholds): ``--device-id``, else
``<machine_type>-<id_XX|section_XX>`` from the file name (the trainer's convention), else the
file's stem.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import AsdError, AudioFileError

log = logging.getLogger("stream_asd.model.score")

AUDIO_SUFFIXES = (".wav", ".flac")
_DEVICE_RE = re.compile(r"(id_\d+|section_\d+)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR", help="audio files or folders (.wav/.flac)")
    parser.add_argument("--bundle", required=True, metavar="DIR", help="model bundle folder (asd-train fit --out)")
    parser.add_argument("--hop-seconds", type=float, default=None,
                        help="hop between windows (default: one window, i.e. no overlap)")
    parser.add_argument("--format", choices=["csv", "json"], default="csv")
    parser.add_argument("--out", metavar="FILE", help="write here instead of stdout")
    parser.add_argument("--machine-type", help="model group for every file (default: inferred)")
    parser.add_argument("--device-id", help="device id for every file (default: from the file name)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="inference device")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per inference batch")
    parser.add_argument("--channel", type=int, default=0, help="channel of multichannel files (default 0)")


def find_audio_files(inputs: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                raise AudioFileError(f"{p}: no .wav or .flac files in this folder")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise AudioFileError(f"{p}: no such file or folder")
    return files


def infer_machine_type(path: Path, groups: Sequence[str]) -> str | None:
    if len(groups) == 1:
        return groups[0]
    tokens = [part for part in path.parent.parts[::-1]] + re.split(r"[_\-.]", path.stem)
    for tok in tokens:
        if tok in groups:
            return tok
    return None


def infer_device_id(path: Path, machine_type: str) -> str:
    """``<machine_type>-<id_XX|section_XX>`` (the data set readers' ``Clip.device_id``, which the
    trainer keys per-device GMMs and thresholds with), else the file's stem."""
    m = _DEVICE_RE.search(path.name)
    return f"{machine_type}-{m.group(1)}" if m else path.stem


def score_files(detector: Any, files: Sequence[Path], hop_samples: int, *, machine_type: str | None = None,
                device_id: str | None = None, batch_size: int = 16, channel: int | None = 0) -> list[dict[str, Any]]:
    """Score every window of every file. Returns one dict per file with its window rows."""
    import numpy as np

    from ..audio.io import read_audio
    from .windows import iter_windows

    spec = detector.feature_spec
    groups = sorted(detector.model_groups)
    results = []
    for path in files:
        mtype = machine_type or infer_machine_type(path, groups)
        if mtype is None:
            raise AsdError(f"{path}: cannot tell its machine type (bundle groups: {groups}); "
                           "pass --machine-type or use the <machine_type>/... folder layout")
        dev = device_id or infer_device_id(path, mtype)
        samples = read_audio(path, sample_rate=spec.sample_rate, channel=channel)
        windows = list(iter_windows(samples, detector.window_samples, hop_samples))
        rows = []
        for i in range(0, len(windows), batch_size):
            batch = windows[i:i + batch_size]
            scores = detector.score_windows(np.stack([w.samples for w in batch]), [mtype] * len(batch), [dev] * len(batch))
            for w, s in zip(batch, scores):
                rows.append({"file": str(path), "window": w.index, "start_s": w.start / spec.sample_rate,
                             "end_s": w.end / spec.sample_rate, "padded": w.padded, "machine_type": mtype,
                             "device_id": dev, "score": s.score, "scores": dict(s.scores),
                             "threshold": s.threshold, "is_anomaly": s.is_anomaly})
        best = max(rows, key=lambda r: r["score"])
        results.append({"file": str(path), "machine_type": mtype, "device_id": dev,
                        "duration_s": len(samples) / spec.sample_rate, "n_windows": len(rows),
                        "max_score": best["score"], "max_window": best["window"],
                        # the clip score of `asd-train evaluate` (median of the window scores)
                        "median_score": float(np.median([r["score"] for r in rows])),
                        "anomalous_windows": sum(r["is_anomaly"] for r in rows),
                        "is_anomaly": any(r["is_anomaly"] for r in rows), "windows": rows})
    return results


def to_csv(results: Sequence[dict[str, Any]], model_names: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "window", "start_s", "end_s", "padded", "machine_type", "device_id", "score",
                     *[f"score_{m}" for m in model_names], "threshold", "is_anomaly", "file_max_score",
                     "file_is_anomaly", "file_median_score"])
    for res in results:
        for r in res["windows"]:
            writer.writerow([r["file"], r["window"], f"{r['start_s']:.6f}", f"{r['end_s']:.6f}", int(r["padded"]),
                             r["machine_type"], r["device_id"], repr(r["score"]),
                             *[repr(r["scores"].get(m, float("nan"))) for m in model_names],
                             repr(r["threshold"]), int(r["is_anomaly"]), repr(res["max_score"]), int(res["is_anomaly"]),
                             repr(res["median_score"])])
    return buf.getvalue()


def run(args: argparse.Namespace) -> int:
    from .detector import load_detector
    from .windows import hop_samples_for

    detector = load_detector(args.bundle, device=args.device)
    spec = detector.feature_spec
    hop_s = args.hop_seconds if args.hop_seconds is not None else spec.window_seconds
    if args.batch_size < 1:
        raise AsdError("--batch-size must be >= 1")
    hop = hop_samples_for(hop_s, spec.sample_rate)
    files = find_audio_files(args.inputs)
    if args.machine_type and args.machine_type not in detector.model_groups:
        raise AsdError(f"--machine-type {args.machine_type!r} is not in the bundle (groups: {sorted(detector.model_groups)})")
    t0 = time.perf_counter()
    results = score_files(detector, files, hop, machine_type=args.machine_type, device_id=args.device_id,
                          batch_size=args.batch_size, channel=args.channel)
    elapsed = time.perf_counter() - t0
    model_names = ["fusion", "stats"] if detector.kind == "ensemble" else ["ae"]
    if args.format == "json":
        text = json.dumps({"bundle": str(args.bundle), "model": detector.describe(), "hop_seconds": hop_s,
                           "window_seconds": spec.window_seconds, "files": _finite(results)}, indent=2,
                          allow_nan=False)
        text += "\n"
    else:
        text = to_csv(results, model_names)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    else:
        sys.stdout.write(text)
    n_windows = sum(r["n_windows"] for r in results)
    print(f"scored {n_windows} window(s) of {len(results)} file(s) in {elapsed:.2f} s on {detector.device}; "
          f"{sum(r['is_anomaly'] for r in results)} file(s) with anomalous windows", file=sys.stderr)
    return 0


def _finite(obj: Any) -> Any:
    """JSON has no NaN/Infinity: an uncalibrated (infinite) threshold is written as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
