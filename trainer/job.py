"""``asd-train job``: the whole retraining cycle, for a Kubernetes CronJob.

    asd-train job --archive A --registry R --bootstrap B [--model-group G] [--profile tiny|cpu|paper]
                  [--machine-type T ...] [--since T] [--until T] [--max-hours H] [--min-hours H]
                  [--holdout-fraction 0.2] [--eval-data DIR] [--tolerance 0.02] [--work DIR] [--result FILE]

Stages: select (archive segments by machine type, time range, max hours; the newest part of
each device's audio is held out), fit (``trainer.fit`` on the training part), evaluate + gate
(``trainer.gate`` on the held-out part plus pseudo-anomalies, and labelled data when given),
publish (registry put, current pointer, announcement on ``asd.models``).

The result is one JSON document (stdout and ``--result``):
``{"status": "published"|"refused_gate"|"refused_invalid"|"skipped"|"failed", "stage": ...,
"version": ..., "reasons": [...], "data": {...}, "gate": {...}, "timings_s": {...}}``.
Exit codes: 0 published (or skipped: not enough new audio, by ``--min-hours``), 3 invalid bundle,
4 refused by the gate, 1 any other failure.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

log = logging.getLogger("trainer.job")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--archive", required=True, help="archive folder or URL written by `stream-asd archive`")
    parser.add_argument("--registry", required=True, help="registry folder or URL")
    parser.add_argument("--bootstrap", default=None, help="Kafka bootstrap for the asd.models announcement")
    parser.add_argument("--model-group", default=None, help="registry model group (default: model.model_group)")
    parser.add_argument("--profile", default="cpu", choices=["tiny", "cpu", "paper"])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="training profile override, e.g. simsiam.epochs=3")
    parser.add_argument("--machine-type", action="append", default=None, help="train only these machine types")
    parser.add_argument("--since", default=None, help="use audio captured from this time (ISO)")
    parser.add_argument("--until", default=None, help="... until this time (ISO)")
    parser.add_argument("--max-hours", type=float, default=None, help="at most this much audio (newest first)")
    parser.add_argument("--min-hours", type=float, default=0.0, help="skip the run with less audio than this")
    parser.add_argument("--holdout-fraction", type=float, default=0.2, help="held-out share for the gate")
    parser.add_argument("--eval-data", default=None, help="labelled data set for the gate (test split)")
    parser.add_argument("--eval-layout", default="auto")
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--min-auc", type=float, default=0.5)
    parser.add_argument("--far-tolerance", type=float, default=0.2,
                        help="refuse when the false alarm rate on normal audio rises by more than this (<0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="folder for the candidate bundle (default: a temp folder)")
    parser.add_argument("--keep-work", action="store_true", help="keep the work folder")
    parser.add_argument("--result", default=None, help="write the result JSON here")


def run_job(args: argparse.Namespace) -> dict[str, Any]:
    from stream_asd.archive.reader import iter_archive_clips, list_segments, segment_key, select_segments
    from stream_asd.config import load_settings

    from . import data as train_data
    from .fit import fit
    from .profiles import get_profile
    from .publish import publish_bundle

    settings = load_settings(getattr(args, "config", None), {"kafka": {"bootstrap": args.bootstrap}})
    group = args.model_group or settings.model.model_group
    doc: dict[str, Any] = {"status": "failed", "stage": "select", "model_group": group, "version": None,
                           "reasons": [], "timings_s": {}}
    t = time.perf_counter()
    selection = {"machine_types": args.machine_type, "since": args.since, "until": args.until,
                 "max_hours": args.max_hours}
    segments = select_segments(list_segments(args.archive, machine_types=args.machine_type, since=args.since,
                                             until=args.until), args.max_hours)
    hours = sum(s.seconds for s in segments) / 3600.0
    doc["data"] = {"segments": len(segments), "hours": round(hours, 4),
                   "devices": len({s.device_id for s in segments}),
                   "machine_types": sorted({s.machine_type for s in segments}), "selection": dict(selection),
                   "holdout_fraction": args.holdout_fraction}
    doc["timings_s"]["select"] = round(time.perf_counter() - t, 2)
    # Pin the segments: the archiver keeps writing while the job runs; fit and gate must see
    # the same set (else held-out audio could leak into training between the two listings).
    selection["only"] = [segment_key(s) for s in segments]
    if not segments or hours < args.min_hours:
        doc["status"] = "skipped"
        doc["reasons"].append(f"{hours:.3f} h of archived audio match the selection; --min-hours is {args.min_hours}")
        return doc

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="asd-train-job-"))
    work.mkdir(parents=True, exist_ok=True)
    bundle = work / "candidate"
    doc["stage"] = "fit"
    t = time.perf_counter()
    reader = functools.partial(iter_archive_clips, holdout_fraction=args.holdout_fraction, **selection)
    previous_reader = train_data.ARCHIVE_READER
    train_data.register_archive_reader(reader)
    try:
        profile = get_profile(args.profile, list(args.set))
        report = fit(args.archive, bundle, layout="archive", profile=profile, seed=args.seed,
                     machine_types=args.machine_type, progress=False, force=True)
    finally:
        train_data.ARCHIVE_READER = previous_reader
    doc["timings_s"]["fit"] = round(time.perf_counter() - t, 2)
    doc["training"] = {k: report[k] for k in ("seconds",) if k in report}

    doc["stage"] = "gate"
    t = time.perf_counter()
    outcome = publish_bundle(
        bundle, args.registry, group, archive=args.archive,
        archive_selection={k: v for k, v in selection.items()}, holdout_fraction=args.holdout_fraction,
        eval_data=args.eval_data, eval_layout=args.eval_layout, tolerance=args.tolerance, min_auc=args.min_auc,
        far_tolerance=args.far_tolerance if args.far_tolerance >= 0 else None,
        kafka_conf=settings.kafka.librdkafka() if args.bootstrap else None, topic=settings.topics.models,
        seed=args.seed)
    doc["timings_s"]["gate_publish"] = round(time.perf_counter() - t, 2)
    doc.update(status=outcome.status, version=outcome.version, previous=outcome.previous, gate=outcome.gate,
               announced=outcome.announced)
    doc["reasons"].extend(outcome.reasons)
    doc["stage"] = "done" if outcome.status in ("published", "already_current") else "gate"
    if not args.keep_work and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return doc


EXIT = {"published": 0, "already_current": 0, "skipped": 0, "refused_invalid": 3, "refused_gate": 4}


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        doc = run_job(args)
    except Exception as exc:  # noqa: BLE001 - a CronJob needs a result document whatever happens
        log.error("job failed: %s", exc)
        doc = {"status": "failed", "reasons": [f"{type(exc).__name__}: {exc}"],
               "traceback": traceback.format_exc(limit=8)}
    doc["seconds"] = round(time.perf_counter() - t0, 2)
    doc["exit_code"] = EXIT.get(doc["status"], 1)
    text = json.dumps(doc, indent=2, default=str)
    if args.result:
        Path(args.result).write_text(text + "\n")
    print(text)
    if doc["exit_code"]:
        print(f"asd-train job: {doc['status']}: " + "; ".join(doc.get("reasons", [])), file=sys.stderr)
    return doc["exit_code"]
