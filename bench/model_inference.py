"""Per-window inference cost of the runtime model (paper sizes by default).

    python bench/model_inference.py OUT_DIR [--threads 2] [--batch 16] [--repeats 5] [--device cpu|cuda]

Builds the default ensemble (GhostNetV2 ghostnetv2_100, Table 1 TimeCNN, Table 2 fusion) with
random weights, fits GMMs on random embeddings (timing only: the scores are meaningless), saves
and loads it as a bundle, and times each stage and the whole ``Detector.score_windows`` on
batches of 10 s windows. Writes OUT_DIR/model_inference.json.
"""

from __future__ import annotations

import os

# Busy-waiting OpenMP threads make torch CPU inference ~10x slower on shared cores (measured
# here: 407 -> 40 ms per window end to end). Must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


CPU_TIMES: dict[str, float] = {}


def timed(fn, repeats: int, sync, name: str = "") -> list[float]:
    """Wall seconds per repeat; also records process CPU seconds per repeat in CPU_TIMES (all
    threads summed: on a shared box that is steadier than wall time)."""
    fn()  # warm-up
    sync()
    out = []
    c0 = time.process_time()
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    CPU_TIMES[name] = (time.process_time() - c0) / repeats
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (smoke run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from stream_asd.audio.features import FeatureSpec
    from stream_asd.model.detector import load_detector
    from stream_asd.model.ensemble import EnsembleConfig, EnsembleModel
    from stream_asd.model.networks import count_parameters
    from stream_asd.model.scoring import EnsembleGroup

    spec = FeatureSpec()
    torch.manual_seed(0)
    model = EnsembleModel(spec, EnsembleConfig.tiny() if args.tiny else EnsembleConfig()).eval()
    rng = np.random.default_rng(0)
    n_fit = 300
    group = EnsembleGroup.fit("fan", rng.standard_normal((n_fit, model.embedding_dim)),
                              np.abs(rng.standard_normal((n_fit, spec.n_mels))) + 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        path = model.to_bundle({"fan": group}).save(Path(tmp) / "b")
        bundle_bytes = sum(f.stat().st_size for f in path.iterdir())
        det = load_detector(path, device=args.device, max_batch=args.batch)
    dev = det.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    waves = (rng.standard_normal((args.batch, spec.window_samples)) * 0.1).astype(np.float32)
    x = torch.from_numpy(waves).to(dev)
    m = det.model
    res: dict[str, list[float]] = {}
    with torch.inference_mode():
        lm = m.frontend(x)
        f = m.encoder(lm)
        t = m.time_cnn(x)
        res["frontend"] = timed(lambda: m.frontend.forward_with_power(x), args.repeats, sync, "frontend")
        res["encoder"] = timed(lambda: m.encoder(lm), args.repeats, sync, "encoder")
        res["time_cnn"] = timed(lambda: m.time_cnn(x), args.repeats, sync, "time_cnn")
        res["fusion"] = timed(lambda: m.fusion(f, t), args.repeats, sync, "fusion")
    res["score_windows"] = timed(lambda: det.score_windows(waves, ["fan"] * args.batch, ["d"] * args.batch),
                                 args.repeats, sync, "score_windows")
    # the AE baseline (DCASE2020 style, 128 mels, one dense AE per group)
    from stream_asd.model.ensemble import AeModel
    from stream_asd.model.scoring import AeGroup

    ae = AeModel(group_names=["fan"]).eval()
    ag = AeGroup("fan", 0)
    ag.fit_standardisation(rng.uniform(1, 2, 100))
    ag.calibrate(rng.uniform(1, 2, 100))
    with tempfile.TemporaryDirectory() as tmp:
        ae_det = load_detector(ae.to_bundle({"fan": ag}).save(Path(tmp) / "ae"), device=args.device,
                               max_batch=args.batch)
    res["ae_score_windows"] = timed(lambda: ae_det.score_windows(waves, ["fan"] * args.batch, ["d"] * args.batch),
                                    args.repeats, sync, "ae_score_windows")
    per_window_ms = {k: 1000 * float(np.median(v)) / args.batch for k, v in res.items()}
    report = {
        "device": dev, "threads": args.threads, "batch": args.batch, "repeats": args.repeats,
        "sizes": "tiny" if args.tiny else "paper",
        "params": {"encoder": count_parameters(m.encoder), "time_cnn": count_parameters(m.time_cnn),
                   "fusion": count_parameters(m.fusion), "ae": count_parameters(ae_det.model)},
        "bundle_bytes": bundle_bytes,
        "per_window_ms_median": per_window_ms,
        "per_window_cpu_ms": {k: 1000 * v / args.batch for k, v in CPU_TIMES.items()},
        "windows_per_second": 1000.0 / per_window_ms["score_windows"],
        "python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_1m_at_end": os.getloadavg()[0],  # the CI/dev box is shared: read timings with it
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_inference.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
