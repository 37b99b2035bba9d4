"""GPU training benchmark: the ``paper`` profile on a synthetic set, time per epoch and stage.

    python bench/gpu_train_bench.py OUT_DIR [--device cuda] [--devices 4] [--n-train 16]
        [--epochs-scale 0.1] [--max-steps 0] [--set SECTION.KEY=VALUE ...]

Made for one H200 with torch 2.11 / torchaudio 2.11 / timm preinstalled and no network; the
whole run is sized to finish in well under 10 minutes: the paper's sizes (224 mels, 10 s
windows, GhostNetV2 width 1.0, batches 128/64/128/128, the paper's optimisers) with the epoch
counts scaled by ``--epochs-scale`` (default 0.1: 5/5/20/2 of 50/50/200/20). Time per epoch is
what the paper profile costs; multiply by the full epoch counts for a full run.

Writes OUT_DIR/gpu_train_bench.json (per stage: epochs, steps, seconds, seconds per epoch, and
samples per second; data generation time; device name; torch version) and keeps the bundle.

Smoke check without a GPU: ``--device cpu --max-steps 2 --n-train 2 --devices 1`` (the JSON
then says device cpu: it is not a GPU figure).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import trainer  # noqa: E402,F401  (OMP settings before torch loads)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--types", nargs="+", default=["fan", "pump", "valve"])
    ap.add_argument("--devices", type=int, default=4, help="devices per machine type")
    ap.add_argument("--n-train", type=int, default=16, help="10 s training clips per device")
    ap.add_argument("--epochs-scale", type=float, default=0.1)
    ap.add_argument("--max-steps", type=int, default=0, help="cap per stage (smoke runs)")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from stream_asd.audio.synth_dataset import write_dataset
    from trainer.fit import fit
    from trainer.profiles import get_profile

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": args.device, "torch": torch.__version__, "python": platform.python_version()}
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --device cpu --max-steps 2 for a smoke check")
        result["gpu"] = torch.cuda.get_device_name(0)
        torch.backends.cudnn.benchmark = True

    t0 = time.perf_counter()
    data = out / "data"
    if not (data / "manifest.csv").exists():
        write_dataset(data, args.types, devices_per_type=args.devices, n_train=args.n_train, n_test_normal=0,
                      n_test_anomaly=0, seconds=10.0, seed=args.seed)
    result["data_seconds"] = round(time.perf_counter() - t0, 1)

    base = get_profile("paper")
    scaled = {
        "simsiam.epochs": max(1, math.ceil(base.simsiam.epochs * args.epochs_scale)),
        "finetune.epochs": max(1, math.ceil(base.finetune.epochs * args.epochs_scale)),
        "timecnn.epochs": max(1, math.ceil(base.timecnn.epochs * args.epochs_scale)),
        "fusion.epochs": max(1, math.ceil(base.fusion.epochs * args.epochs_scale)),
    }
    overrides = [f"{k}={v}" for k, v in scaled.items()] + [f"run.device={args.device}"]
    if args.max_steps:
        overrides.append(f"run.max_steps={args.max_steps}")
    overrides += args.set
    profile = get_profile("paper", overrides)
    t1 = time.perf_counter()
    report = fit(data, out / "bundle", profile=profile, seed=args.seed, progress=False, force=True)
    result["fit_seconds"] = round(time.perf_counter() - t1, 1)
    n_windows = report["n_windows"]
    stages = []
    for st in report["stages"]:
        row = dict(st)
        row.pop("losses", None)
        if st.get("epochs"):
            samples = n_windows * st["epochs"] if not args.max_steps else None
            row["samples_per_second"] = round(samples / st["seconds"], 1) if samples and st["seconds"] else None
            full = {"simsiam": base.simsiam.epochs, "finetune": base.finetune.epochs,
                    "timecnn": base.timecnn.epochs, "fusion": base.fusion.epochs}.get(st["name"])
            if full and st.get("seconds_per_epoch") and not args.max_steps:
                row["projected_seconds_full_paper_epochs"] = round(full * st["seconds_per_epoch"], 1)
        stages.append(row)
    result.update({"n_windows": n_windows, "window_seconds": profile.features.window_seconds,
                   "n_mels": profile.features.n_mels, "epochs": scaled, "max_steps": args.max_steps,
                   "stages": stages, "total_seconds": round(time.perf_counter() - t0, 1),
                   "note": ("GPU run" if args.device.startswith("cuda") else
                            "CPU smoke run: not a GPU figure")})
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        result["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    (out / "gpu_train_bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
