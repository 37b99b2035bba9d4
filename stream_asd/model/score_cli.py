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

Usage errors are found before anything is scored: a --hop-seconds that is not a positive number
of seconds (or under one sample), an --out that is a folder, sits under a file or cannot be
created or written (missing parent folders are created), a FIFO, device or socket given as input.
The output file is written atomically (a temporary file beside it, renamed at the end), so a
failed run never leaves a truncated file.

A file that cannot be read or scored (corrupt, truncated, unreadable, a FIFO or broken link
found in a folder) does not stop the run: the rest is scored, each failure is printed on stderr
and is in the output (CSV: one row per failed file at the end, with the ``error`` column set and
the score columns empty; JSON: ``errors: [{file, error}]``).

Progress: a log line on stderr every ``--progress-seconds`` (default 5; 0: after every file),
plain lines (no carriage returns), so logs of 10,000-file runs stay readable.

Exit status: 0 every file scored; 1 some files could not be scored (the output holds the rest
and the reasons); 2 usage error (nothing scored, no output written).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import re
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..errors import AsdError, AudioFileError

log = logging.getLogger("stream_asd.model.score")

AUDIO_SUFFIXES = (".wav", ".flac")
_DEVICE_RE = re.compile(r"(id_\d+|section_\d+)")

EXIT_OK = 0
EXIT_SOME_FAILED = 1  # the output holds every file that could be scored, and the reasons for the rest
EXIT_USAGE = 2  # nothing scored (raised as AsdError; stream_asd.cli turns it into 2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "Exit status: 0 every file scored; 1 some files could not be scored (the output holds " \
                    "the rest,\nand one error row/entry per failed file); 2 usage error (nothing scored)."
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
    parser.add_argument("--progress-seconds", type=float, default=5.0, metavar="S",
                        help="log a progress line on stderr every S seconds (default 5; 0: after every file)")


def describe_special(path: Path) -> str | None:
    """What ``path`` is when it is neither a regular file nor a folder (None when it is one, or
    when nothing is there at all): a FIFO, a device, a socket, a broken symbolic link."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return f"is a broken symbolic link (to {target}, which does not exist)"
        return None
    except OSError as exc:
        return f"cannot be examined ({exc.strerror})"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    for test, what in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            break
    else:
        what = "not a regular file"
    return (f"is {what}, not a regular file: score recorded .wav/.flac files "
            "(e.g. copy the stream to a file first)")


def collect_inputs(inputs: Iterable[str | Path]) -> tuple[list[Path], list[dict[str, str]]]:
    """Files to score, and ``{file, error}`` for the entries of folders that cannot be (a FIFO or
    broken link named like audio). A command-line path that is missing or not a regular file or
    folder is a usage error (AudioFileError)."""
    files: list[Path] = []
    problems: list[dict[str, str]] = []
    for item in inputs:
        p = Path(item)
        special = describe_special(p)
        if special is not None:
            raise AudioFileError(f"{p}: {special}")
        if p.is_dir():
            found, bad = [], []
            for f in sorted(p.rglob("*")):
                if f.suffix.lower() not in AUDIO_SUFFIXES or f.is_dir():
                    continue
                why = describe_special(f)
                if why is None and f.is_file():
                    found.append(f)
                else:
                    bad.append({"file": str(f), "error": why or "vanished while the folder was read"})
            if not found and not bad:
                raise AudioFileError(f"{p}: no .wav or .flac files in this folder")
            files.extend(found)
            problems.extend(bad)
        elif p.is_file():
            files.append(p)
        else:
            raise AudioFileError(f"{p}: no such file or folder")
    return files, problems


def find_audio_files(inputs: Iterable[str | Path]) -> list[Path]:
    """The regular audio files of ``inputs`` (folders searched recursively)."""
    return collect_inputs(inputs)[0]


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
                device_id: str | None = None, batch_size: int = 16, channel: int | None = 0,
                failures: list[dict[str, str]] | None = None,
                progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Score every window of every file. Returns one dict per file with its window rows.

    ``failures``: when a list, a file that cannot be read or scored (an ``AsdError`` or
    ``OSError``) is appended to it as ``{file, error}`` and the others are still scored; when
    None, the first such file raises. ``progress(files_done, windows_done)`` after each file.
    """
    results = []
    n_windows = 0
    for done, path in enumerate(files, 1):
        try:
            res = _score_one(detector, path, hop_samples, machine_type, device_id, batch_size, channel)
        except (AsdError, OSError) as exc:
            if failures is None:
                raise
            failures.append({"file": str(path), "error": _reason(path, exc)})
        else:
            results.append(res)
            n_windows += res["n_windows"]
        if progress is not None:
            progress(done, n_windows)
    return results


def _reason(path: Path, exc: BaseException) -> str:
    """The message of ``exc`` without a leading ``<path>: `` (the file is its own column)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot read: {exc.strerror}"
    text = str(exc)
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def _score_one(detector: Any, path: Path, hop_samples: int, machine_type: str | None, device_id: str | None,
               batch_size: int, channel: int | None) -> dict[str, Any]:
    import numpy as np

    from ..audio.io import read_audio
    from .windows import iter_windows

    spec = detector.feature_spec
    groups = sorted(detector.model_groups)
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
    return {"file": str(path), "machine_type": mtype, "device_id": dev,
            "duration_s": len(samples) / spec.sample_rate, "n_windows": len(rows),
            "max_score": best["score"], "max_window": best["window"],
            # the clip score of `asd-train evaluate` (median of the window scores)
            "median_score": float(np.median([r["score"] for r in rows])),
            "anomalous_windows": sum(r["is_anomaly"] for r in rows),
            "is_anomaly": any(r["is_anomaly"] for r in rows), "windows": rows}


CSV_COLUMNS_HEAD = ["file", "window", "start_s", "end_s", "padded", "machine_type", "device_id", "score"]
CSV_COLUMNS_TAIL = ["threshold", "is_anomaly", "file_max_score", "file_is_anomaly", "file_median_score", "error"]


def to_csv(results: Sequence[dict[str, Any]], model_names: Sequence[str],
           failures: Sequence[dict[str, str]] = ()) -> str:
    """One row per window; then one row per file that could not be scored (``error`` set, the
    other columns empty). ``error`` is empty on every window row."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = [*CSV_COLUMNS_HEAD, *[f"score_{m}" for m in model_names], *CSV_COLUMNS_TAIL]
    writer.writerow(header)
    for res in results:
        for r in res["windows"]:
            writer.writerow([r["file"], r["window"], f"{r['start_s']:.6f}", f"{r['end_s']:.6f}", int(r["padded"]),
                             r["machine_type"], r["device_id"], repr(r["score"]),
                             *[repr(r["scores"].get(m, float("nan"))) for m in model_names],
                             repr(r["threshold"]), int(r["is_anomaly"]), repr(res["max_score"]), int(res["is_anomaly"]),
                             repr(res["median_score"]), ""])
    for f in failures:
        writer.writerow([f["file"], *[""] * (len(header) - 2), f["error"]])
    return buf.getvalue()


class OutputFile:
    """``--out FILE``, checked before anything is scored and written atomically at the end.

    Missing parent folders are created now (and removed again by :meth:`discard`); a temporary
    file is opened beside the target now, which proves the folder is writable, and renamed
    over the target by :meth:`write`. A target that exists and is not a regular file (e.g.
    ``/dev/stdout``, a FIFO), or a writable file in a folder that is not, is written in place.
    """

    def __init__(self, path: str | Path):
        self.path = p = Path(path)
        self._created: list[Path] = []
        self._tmp: Path | None = None
        self._direct = False
        if p.is_dir():
            raise AsdError(f"--out {p}: is a folder; give a file name, e.g. --out {p / 'scores.csv'}")
        if p.exists():
            if not os.access(p, os.W_OK):
                raise AsdError(f"--out {p}: cannot write this file (permission denied); choose another --out")
            if not p.is_file():
                self._direct = True
                return
        missing = []
        anc = p.parent
        while not anc.exists() and not anc.is_symlink() and anc != anc.parent:
            missing.append(anc)
            anc = anc.parent
        if not anc.is_dir():
            raise AsdError(f"--out {p}: {anc} is not a folder; choose an --out inside a folder")
        for d in reversed(missing):
            try:
                d.mkdir()
            except OSError as exc:
                self.discard()
                raise AsdError(f"--out {p}: cannot create the folder {d} ({exc.strerror}); "
                               "choose an --out in a folder you can write") from None
            self._created.append(d)
        try:
            fd, name = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".partial")
        except OSError as exc:
            if p.is_file() and os.access(p, os.W_OK):  # a writable file in a read-only folder: in place
                self._direct = True
                return
            self.discard()
            raise AsdError(f"--out {p}: cannot write into {p.parent} ({exc.strerror}); "
                           "choose an --out in a folder you can write") from None
        os.close(fd)
        self._tmp = Path(name)

    def write(self, text: str | bytes) -> None:
        """Write ``text`` (str, or bytes for binary output such as a PNG) and rename into place."""
        how = "wb" if isinstance(text, bytes) else "w"
        try:
            if self._direct:
                with open(self.path, how) as fh:
                    fh.write(text)
                return
            assert self._tmp is not None
            with open(self._tmp, how) as fh:
                fh.write(text)
            try:
                mode = stat.S_IMODE(self.path.stat().st_mode)
            except FileNotFoundError:
                umask = os.umask(0)
                os.umask(umask)
                mode = 0o666 & ~umask
            os.chmod(self._tmp, mode)
            os.replace(self._tmp, self.path)
            self._tmp = None
        except OSError as exc:
            self.discard()
            raise AsdError(f"--out {self.path}: writing failed ({exc.strerror}); nothing was written") from None

    def discard(self) -> None:
        """Remove the temporary file and the folders this created (a failed run leaves nothing)."""
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
        for d in reversed(self._created):
            try:
                d.rmdir()
            except OSError:
                break
        self._created = []


class Progress:
    """A plain log line every ``every_s`` seconds (0: after every file) and at the end when any
    line was logged: files done of all, windows, failures, elapsed time and an estimate of the
    rest. Lines, never carriage-return frames, so that logs stay readable."""

    def __init__(self, total: int, every_s: float, failures: Sequence[Any] = ()):
        self.total, self.every_s, self.failures = total, every_s, failures
        self.t0 = self.last = time.monotonic()
        self.logged_any = False

    def __call__(self, done: int, n_windows: int) -> None:
        now = time.monotonic()
        final = done == self.total
        if not (now - self.last >= self.every_s or (final and self.logged_any)):
            return
        self.last, self.logged_any = now, True
        elapsed = now - self.t0
        left = elapsed / done * (self.total - done) if done else float("nan")
        log.info("progress: %d/%d files done (%d windows, %d failed) in %.0f s%s", done, self.total, n_windows,
                 len(self.failures), elapsed, "" if final else f", about {left:.0f} s left")


def _positive_seconds(flag: str, value: float, example: str, *, zero_ok: bool = False) -> None:
    ok = math.isfinite(value) and (value >= 0 if zero_ok else value > 0)
    if not ok:
        what = "zero or a positive" if zero_ok else "a positive"
        raise AsdError(f"{flag} {value:g}: give {what} number of seconds, e.g. {flag} {example}")


def run(args: argparse.Namespace) -> int:
    # usage errors first: before the model loads, before anything is scored
    if args.hop_seconds is not None:
        _positive_seconds("--hop-seconds", args.hop_seconds, "5 (default: one window, no overlap)")
    _positive_seconds("--progress-seconds", args.progress_seconds, "30 (0: a line after every file)", zero_ok=True)
    if args.batch_size < 1:
        raise AsdError("--batch-size must be >= 1")
    files, failures = collect_inputs(args.inputs)
    out = OutputFile(args.out) if args.out else None
    try:
        code = _run(args, files, failures, out)
    except BaseException:
        if out is not None:
            out.discard()
        raise
    return code


def _run(args: argparse.Namespace, files: list[Path], failures: list[dict[str, str]], out: OutputFile | None) -> int:
    from .detector import load_detector
    from .windows import hop_samples_for

    detector = load_detector(args.bundle, device=args.device)
    spec = detector.feature_spec
    hop_s = args.hop_seconds if args.hop_seconds is not None else spec.window_seconds
    try:
        hop = hop_samples_for(hop_s, spec.sample_rate)
    except ValueError:
        raise AsdError(f"--hop-seconds {hop_s:g}: shorter than one sample at {spec.sample_rate} Hz; "
                       f"e.g. --hop-seconds {spec.window_seconds / 2:g} (half a window)") from None
    groups = sorted(detector.model_groups)
    if args.machine_type and args.machine_type not in detector.model_groups:
        raise AsdError(f"--machine-type {args.machine_type!r} is not in the bundle (groups: {groups})")
    if not args.machine_type:
        unknown = [f for f in files if infer_machine_type(f, groups) is None]
        if unknown:
            more = f" (and {len(unknown) - 1} more file(s))" if len(unknown) > 1 else ""
            raise AsdError(f"{unknown[0]}{more}: cannot tell its machine type (bundle groups: {groups}); "
                           "pass --machine-type or use the <machine_type>/... folder layout")
    reported = 0

    def report_failures() -> None:  # each failure on stderr as soon as it happens
        nonlocal reported
        for f in failures[reported:]:
            print(f"stream-asd score: {f['file']}: {f['error']}", file=sys.stderr)
        reported = len(failures)

    report_failures()  # found while listing the folders
    t0 = time.perf_counter()
    progress = Progress(len(files), args.progress_seconds, failures)

    def on_file(done: int, n_windows: int) -> None:
        report_failures()
        progress(done, n_windows)

    results = score_files(detector, files, hop, machine_type=args.machine_type, device_id=args.device_id,
                          batch_size=args.batch_size, channel=args.channel, failures=failures, progress=on_file)
    elapsed = time.perf_counter() - t0
    model_names = ["fusion", "stats"] if detector.kind == "ensemble" else ["ae"]
    if args.format == "json":
        text = json.dumps({"bundle": str(args.bundle), "model": detector.describe(), "hop_seconds": hop_s,
                           "window_seconds": spec.window_seconds, "files": _finite(results),
                           "errors": failures}, indent=2, allow_nan=False)
        text += "\n"
    else:
        text = to_csv(results, model_names, failures)
    if out is not None:
        out.write(text)
    else:
        sys.stdout.write(text)
    n_windows = sum(r["n_windows"] for r in results)
    failed = f"; {len(failures)} file(s) could not be scored (reasons above and in the output)" if failures else ""
    print(f"scored {n_windows} window(s) of {len(results)} file(s) in {elapsed:.2f} s on {detector.device}; "
          f"{sum(r['is_anomaly'] for r in results)} file(s) with anomalous windows{failed}", file=sys.stderr)
    return EXIT_SOME_FAILED if failures else EXIT_OK


def _finite(obj: Any) -> Any:
    """JSON has no NaN/Infinity: an uncalibrated (infinite) threshold is written as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
