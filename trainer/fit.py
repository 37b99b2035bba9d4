"""``asd-train fit``: train the ensemble (or the AE baseline) on normal audio, write a bundle.

    asd-train fit --data DIR --out BUNDLE [--layout auto|dcase2020|dcase2021|mimii|archive]
                  [--profile paper|cpu|tiny] [--model ensemble|ae] [--seed N] [--set SECTION.KEY=VALUE]

Stages of the ensemble (method.md): read + window the training normals; fit the log-mel
normalisation; (1) SimSiam + auxiliary ArcFace; (2) eq. 6 fine-tuning with SF/SP negatives;
(3) TimeCNN with ArcFace; (4) FusionNet over the frozen encoders; (5) statistics lambda;
(6) GMMs per model group (machine type) on fusion embeddings and statistics features,
standardisation and thresholds (per type, per device with enough windows) on held-out
normals; write the bundle.

Nothing is written until training ends; the bundle is then saved atomically (temporary folder
+ rename): Ctrl-C or an error at any point leaves no bundle (and no temporary folder).
Runs are deterministic by ``--seed`` on a given machine and thread count.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stream_asd.errors import AsdError

from .data import LAYOUTS, WindowSet, fingerprint, list_clips, load_windows, split_calibration
from .profiles import PROFILES, TrainProfile, get_profile

log = logging.getLogger("trainer.fit")

CALIBRATION_FRACTION = 0.15


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="data set root (its train split's normal clips are used)")
    parser.add_argument("--out", required=True, help="bundle folder to write (must not exist unless --force)")
    parser.add_argument("--layout", default="auto", choices=list(LAYOUTS))
    parser.add_argument("--profile", default="paper", choices=list(PROFILES))
    parser.add_argument("--model", default="ensemble", choices=["ensemble", "ae"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a profile value, e.g. --set simsiam.epochs=5 (repeatable)")
    parser.add_argument("--machine-type", action="append", default=None, help="train only these machine types")
    parser.add_argument("--device", default=None, help="override run.device (cpu, cuda, cuda:N, auto)")
    parser.add_argument("--report", default=None, help="also write the training report JSON here")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.set)
    if args.device:
        overrides.append(f"run.device={args.device}")
    profile = get_profile(args.profile, overrides)
    report = fit(args.data, args.out, layout=args.layout, profile=profile, model=args.model, seed=args.seed,
                 machine_types=args.machine_type, progress=not args.no_progress, force=args.force)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
    log.info("bundle written to %s in %.1f s", args.out, report["seconds"])
    return 0


# --------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AsdError(f"run.device={name} but no CUDA device is available; use --device cpu")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise AsdError(f"{out} exists; choose another --out or pass --force to replace it")


@dataclass
class TrainingData:
    train: WindowSet          # every training normal window
    fit_mask: torch.Tensor    # windows of the fit clips: networks, normaliser, GMMs
    calib_mask: torch.Tensor  # held-out clips' windows: standardisation + thresholds only
    clips_info: dict = field(default_factory=dict)


def load_training_data(data: str | Path, layout: str, profile: TrainProfile, seed: int,
                       machine_types: list[str] | None, progress: bool) -> TrainingData:
    f = profile.features
    window = int(round(f.window_seconds * f.sample_rate))
    hop = max(1, int(round(window * f.train_hop_fraction)))
    clips = list_clips(data, layout=layout, split="train", labels=["normal"])
    if machine_types:
        clips = [c for c in clips if c.machine_type in machine_types]
    if not clips:
        raise AsdError(f"no normal training clips under {data} (layout {layout}); check --data/--layout")
    fit_clips, calib_clips = split_calibration(clips, CALIBRATION_FRACTION, seed)
    calib_paths = {c.path for c in calib_clips}
    ws = load_windows(clips, f.sample_rate, window, hop, progress=progress)
    calib_mask = torch.tensor([ws.clips[i].path in calib_paths for i in ws.clip_index.tolist()])
    log.info("training data: %d clips (%d held out for calibration), %d windows of %.2f s, %d classes over %d "
             "machine types", len(clips), len(calib_clips), len(ws), f.window_seconds, len(ws.classes),
             len({t for t, _ in ws.classes}))
    return TrainingData(ws, ~calib_mask, calib_mask, fingerprint(clips))


def fit(data: str | Path, out: str | Path, layout: str = "auto", profile: TrainProfile | None = None,
        model: str = "ensemble", seed: int = 0, machine_types: list[str] | None = None,
        progress: bool = True, force: bool = False) -> dict[str, Any]:
    """Train and write a bundle; returns the training report (also stored in the manifest)."""
    profile = profile or get_profile("paper")
    t0 = time.perf_counter()
    if profile.run.threads:
        torch.set_num_threads(profile.run.threads)
    torch.set_flush_denormal(True)
    device = resolve_device(profile.run.device)
    gen = seed_everything(seed)
    log.info("fit: model %s, profile %s, device %s, seed %d", model, profile.name, device, seed)
    out = Path(out)
    check_output(out, force)
    # Nothing is written before training ends: the bundle is assembled in memory and saved by
    # ModelBundle.save (temporary folder + rename), so Ctrl-C at any point leaves no bundle.
    td = load_training_data(data, layout, profile, seed, machine_types, progress)
    if model == "ensemble":
        from .train_ensemble import train_ensemble

        bundle, report = train_ensemble(td, profile, device, gen, seed, progress)
    elif model == "ae":
        from .train_ae import train_ae

        bundle, report = train_ae(td, profile, device, gen, seed, progress)
    else:
        raise AsdError(f"unknown --model {model!r}: ensemble or ae")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["data"] = {"root": str(data), "layout": layout, **td.clips_info}
    bundle.extra["training"] = report
    bundle.data_fingerprint = {"root": str(data), "layout": layout, **td.clips_info}
    bundle.save(out, overwrite=force)
    log.info("wrote %s bundle %s (version %s)", model, out, bundle.version)
    return report
