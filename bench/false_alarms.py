"""False alarms an operator would see, and faults caught, on audio the model never saw (issue 10).

What it measures, for a bundle trained the way ``stream-asd demo`` trains one:

1. Healthy streams: every synthetic device streams ``--hours`` of its normal sound from stream
   time 0 (training clips are rendered from ``TRAIN_START_S``, far later, so no window was
   trained on), and a real machine (shared/realdata ``unknown_zyy438``) replays its held-out
   normal clips, never trained on, back to back. Every window is scored by the detector the
   processor loads, and the processor's own ``AlertTracker`` (k of n, clear after) turns the
   flags into raises. Per model group: windows, exceedances, the measured per-window
   exceedance beside the one the thresholds were set at, false alerts and device-hours, the
   measured false alerts per device-day beside the bundle's predicted rate.
2. Faults: every synthetic device streams 30 s of normal sound and then each fault its machine
   type can have, at each ``--severities`` value, for ``--fault-seconds``; a fault is caught
   when an alert is raised after its onset; the delay is from the onset to the end of the
   window that completed the k-of-n rule.

Run from the repository root (about 15 minutes on 2 cores with the defaults):

    .venv/bin/python bench/false_alarms.py --out /tmp/false-alarms --seed 0

and it writes OUT/results.json and OUT/false_alarms.md (copied to bench/ for the record).
``--seed`` picks the fleet (devices and noise); choices are made on seed 0 (validation) and
seed 1 is run once per claimed change (test).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REAL_FOLDER = "clips/dcase2020/unknown_zyy438"
REAL_TYPE = "realmachine"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--profile", default="tiny", choices=["tiny", "cpu"])
    ap.add_argument("--types", default="fan,pump,slider,valve,gearbox")
    ap.add_argument("--devices-per-type", type=int, default=4)
    ap.add_argument("--train-clips", type=int, default=12, help="10 s training clips per synthetic device")
    ap.add_argument("--hours", type=float, default=0.5, help="healthy stream per synthetic device")
    ap.add_argument("--real-train", type=int, default=40, help="real normal clips trained on (the rest replay)")
    ap.add_argument("--realdata", type=Path, default=ROOT.parent / "shared" / "realdata")
    ap.add_argument("--severities", default="0.3,0.6,1.0")
    ap.add_argument("--fault-seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0, help="fleet seed (0 validation, 1 test)")
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="extra training override (asd-train fit --set)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args(argv)

    os.environ.update({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)})
    import torch

    torch.set_num_threads(args.threads)
    from stream_asd.config import AlertSettings
    from stream_asd.demo.cache import CLIP_SECONDS, train_overrides

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    alerts = AlertSettings()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    fleet, real_train, real_replay = write_training_data(out / "data", args)
    timings["data_s"] = round(time.perf_counter() - t0, 1)

    demo_args = argparse.Namespace(train_set=args.set, device_thresholds=False)
    overrides = [*train_overrides(demo_args), f"alerts.k={alerts.k}", f"alerts.n={alerts.n}",
                 f"run.threads={args.threads}"]
    bundle = out / "bundle"
    cmd = [sys.executable, "-m", "trainer.cli", "fit", "--data", str(out / "data"), "--out", str(bundle),
           "--profile", args.profile, "--seed", str(args.train_seed), "--force", "--no-progress",
           *[x for s in overrides for x in ("--set", s)]]
    t0 = time.perf_counter()
    with (out / "train.log").open("w") as fh:
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    timings["train_s"] = round(time.perf_counter() - t0, 1)

    from stream_asd.model.alert_rate import group_calibrations
    from stream_asd.model.detector import load_detector

    detector = load_detector(bundle, "cpu", max_batch=args.batch)
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = manifest["feature_spec"]
    sr, window_s = int(spec["sample_rate"]), float(spec["window_seconds"])
    calibration = group_calibrations(manifest)
    rule = next(iter(calibration.values()))["alert_rule"]
    scorer = StreamScorer(detector, sr, window_s, float(rule["hop_s"]), alerts, args.batch)

    t0 = time.perf_counter()
    healthy = score_healthy(scorer, fleet, real_replay, args, sr)
    timings["healthy_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    faults = score_faults(scorer, fleet, args, sr)
    timings["faults_s"] = round(time.perf_counter() - t0, 1)

    result = {
        "command": "python bench/false_alarms.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "profile": args.profile, "fleet_seed": args.seed, "train_seed": args.train_seed,
        "training_overrides": overrides, "alert_settings": alerts.model_dump(), "alert_rule": rule,
        "train_clips_per_device": args.train_clips, "clip_seconds": CLIP_SECONDS, "real_train_clips": len(real_train),
        "real_replay_clips": len(real_replay),
        "calibration": calibration, "healthy": healthy, "faults": faults, "timings_s": timings,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "false_alarms.md").write_text(markdown(result))
    print(markdown(result))
    return 0


# -- data -----------------------------------------------------------------------------------


def write_training_data(root: Path, args) -> tuple[list, list[Path], list[Path]]:
    """The demo's layout: synthetic clips rendered from TRAIN_START_S, real clips copied."""
    import shutil

    from stream_asd.audio.datasets import iter_clips
    from stream_asd.demo.cache import write_synthetic_clips
    from stream_asd.producer.sources import synthetic_fleet

    types = args.types.split(",")
    fleet = synthetic_fleet(args.devices_per_type * len(types), 16000, types, seed=args.seed)
    real = sorted(c.path for c in iter_clips(args.realdata / REAL_FOLDER) if c.label == "normal") \
        if (args.realdata / REAL_FOLDER).is_dir() else []
    rng = np.random.default_rng(args.seed)
    real = [real[i] for i in rng.permutation(len(real))]
    real_train, real_replay = real[:args.real_train], real[args.real_train:]
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        write_synthetic_clips(root, fleet, args.train_clips, 16000)
        folder = root / REAL_TYPE / "train"
        folder.mkdir(parents=True, exist_ok=True)
        for i, clip in enumerate(real_train):
            shutil.copyfile(clip, folder / f"normal_id_00_{i:08d}.wav")
        (root / "done").write_text("")
    return fleet, real_train, real_replay


# -- scoring a stream -----------------------------------------------------------------------


class StreamScorer:
    """Windows of a long wave, scored in batches, through the processor's alert tracker."""

    def __init__(self, detector, sr: int, window_s: float, hop_s: float, alerts, batch: int):
        self.detector, self.sr, self.batch, self.alerts = detector, sr, batch, alerts
        self.win, self.hop = int(round(window_s * sr)), int(round(hop_s * sr))
        self.window_s, self.hop_s = window_s, hop_s

    def scores(self, wave: np.ndarray, machine_type: str, device_id: str) -> tuple[np.ndarray, np.ndarray]:
        from stream_asd.model.windows import iter_windows

        waves = [w.samples for w in iter_windows(wave, self.win, self.hop)]
        score, thr = [], []
        for i in range(0, len(waves), self.batch):
            part = np.stack(waves[i:i + self.batch])
            for ws in self.detector.score_windows(part, [machine_type] * len(part), [device_id] * len(part)):
                score.append(ws.score)
                thr.append(ws.threshold)
        return np.asarray(score), np.asarray(thr)

    def raises(self, over: np.ndarray, device_id: str, machine_type: str) -> list[int]:
        """Window indices at which the processor's tracker raises an alert."""
        from stream_asd.processor.alerts import AlertTracker

        tracker = AlertTracker(self.alerts.k, self.alerts.n, self.alerts.clear_after)
        out = []
        for i, flag in enumerate(over):
            rec = tracker.observe(device_id=device_id, machine_type=machine_type, window_index=i, window_id=str(i),
                                  score=0.0, threshold=0.0, is_anomaly=bool(flag), model_version="bench", at_ns=0)
            if rec is not None and rec.state == "raised":
                out.append(i)
        return out

    def window_end_s(self, i: int) -> float:
        return i * self.hop_s + self.window_s


def score_healthy(scorer: StreamScorer, fleet, real_replay: list[Path], args, sr: int) -> dict:
    from stream_asd.audio.io import read_audio

    groups: dict[str, dict] = {}
    devices = []
    block_s = 600.0  # rendered and scored in blocks that overlap by one window (no window lost)
    for src in fleet:
        clean = type(src)(src.profile, sr, None)
        total = args.hours * 3600
        over_all, scores_all = [], []
        start = 0.0
        while start + scorer.window_s <= total:
            seconds = min(block_s, total - start)
            wave = clean.render(int(round(start * sr)), int(round(seconds * sr)))
            s, t = scorer.scores(wave, src.machine_type, src.device_id)
            over_all.append(s > t)
            scores_all.append(s - t)
            start += len(s) * scorer.hop_s
        _tally(groups, devices, scorer, src.device_id, src.machine_type, np.concatenate(over_all),
               np.concatenate(scores_all), total / 3600, "synthetic")
    if real_replay:
        wave = np.concatenate([read_audio(p, sr) for p in real_replay]).astype(np.float32)
        s, t = scorer.scores(wave, REAL_TYPE, f"{REAL_TYPE}-id_00")
        _tally(groups, devices, scorer, f"{REAL_TYPE}-id_00", REAL_TYPE, s > t, s - t, len(wave) / sr / 3600,
               f"real: {len(real_replay)} held-out clips back to back")
    for g in groups.values():
        g["exceedance"] = g["exceeding"] / max(1, g["windows"])
        g["false_alerts_per_device_day"] = g["false_alerts"] / (g["device_hours"] / 24)
    total = {k: sum(g[k] for g in groups.values()) for k in ("windows", "exceeding", "false_alerts", "device_hours")}
    return {"groups": groups, "devices": devices, "total": total}


def _tally(groups, devices, scorer, device_id, mtype, over, margin, hours, source) -> None:
    raises = scorer.raises(over, device_id, mtype)
    g = groups.setdefault(mtype, {"windows": 0, "exceeding": 0, "false_alerts": 0, "device_hours": 0.0,
                                  "devices": 0})
    g["windows"] += int(len(over))
    g["exceeding"] += int(over.sum())
    g["false_alerts"] += len(raises)
    g["device_hours"] += hours
    g["devices"] += 1
    devices.append({"device_id": device_id, "machine_type": mtype, "source": source, "hours": round(hours, 3),
                    "windows": int(len(over)), "exceeding": int(over.sum()), "false_alerts": len(raises),
                    "raised_at_s": [round(scorer.window_end_s(i), 1) for i in raises],
                    "max_margin": float(np.max(margin)) if len(margin) else None})


def score_faults(scorer: StreamScorer, fleet, args, sr: int) -> dict:
    from stream_asd.audio.synth import FAULTS_BY_TYPE, Fault

    lead_s = 30.0
    base_s = 50_000.0  # stream time never trained on nor streamed healthy
    rows = []
    for severity in (float(x) for x in args.severities.split(",")):
        for src in fleet:
            for fault_type in FAULTS_BY_TYPE[src.machine_type]:
                onset = base_s + lead_s
                fault = Fault(fault_type, severity, start_s=onset, ramp_s=1.0)
                faulty = type(src)(src.profile, sr, fault)
                wave = faulty.render(int(round(base_s * sr)), int(round((lead_s + args.fault_seconds) * sr)))
                s, t = scorer.scores(wave, src.machine_type, src.device_id)
                raises = scorer.raises(s > t, src.device_id, src.machine_type)
                after = [scorer.window_end_s(i) for i in raises if scorer.window_end_s(i) > lead_s]
                rows.append({"device_id": src.device_id, "machine_type": src.machine_type, "fault": fault_type,
                             "severity": severity, "caught": bool(after),
                             "delay_s": round(after[0] - lead_s, 2) if after else None,
                             "alerts_before_onset": sum(scorer.window_end_s(i) <= lead_s for i in raises)})
    summary: dict = {}
    for sev in sorted({r["severity"] for r in rows}):
        sub = [r for r in rows if r["severity"] == sev]
        delays = [r["delay_s"] for r in sub if r["caught"]]
        by_fault = {}
        for f in sorted({r["fault"] for r in sub}):
            fs = [r for r in sub if r["fault"] == f]
            by_fault[f] = sum(r["caught"] for r in fs) / len(fs)
        summary[str(sev)] = {"streams": len(sub), "caught": sum(r["caught"] for r in sub),
                             "rate": sum(r["caught"] for r in sub) / len(sub),
                             "median_delay_s": float(np.median(delays)) if delays else None,
                             "p90_delay_s": float(np.quantile(delays, 0.9)) if delays else None,
                             "by_fault": by_fault}
    return {"lead_s": lead_s, "fault_seconds": args.fault_seconds, "summary": summary, "streams": rows}


# -- report ---------------------------------------------------------------------------------


def markdown(r: dict) -> str:
    h = r["healthy"]
    tot = h["total"]
    rule = r["alert_rule"]
    lines = ["# False alarms and detection on unseen audio", "",
             f"Command: `{r['command']}`", "",
             f"Profile {r['profile']}, fleet seed {r['fleet_seed']}, training seed {r['train_seed']}; alert rule "
             f"{rule['k']} of {rule['n']} windows of {rule['window_s']:g} s every {rule['hop_s']:g} s; "
             f"{r['train_clips_per_device']} training clips of {r.get('clip_seconds', 5):g} s per synthetic device, "
             f"{r['real_train_clips']} real clips trained on, {r['real_replay_clips']} held out and replayed.", "",
             "## Healthy streams", "",
             f"{tot['device_hours']:.2f} device-hours, {tot['windows']} windows, {tot['exceeding']} over threshold, "
             f"**{tot['false_alerts']} false alerts** (predicted at the target: "
             f"{_predicted_total(r):.3f}).", "",
             "| group | devices | device-hours | windows | exceedance measured | exceedance set | false alerts | "
             "per device-day measured | predicted |", "|---|---|---|---|---|---|---|---|---|"]
    for name, g in h["groups"].items():
        cal = r["calibration"].get(name, {})
        lines.append(f"| {name} | {g['devices']} | {g['device_hours']:.2f} | {g['windows']} | {g['exceedance']:.2e} | "
                     f"{_num(cal.get('window_exceedance'))} | {g['false_alerts']} | "
                     f"{g['false_alerts_per_device_day']:.3f} | {_num(cal.get('predicted_false_alerts_per_device_day'))} |")
    noisy = [d for d in h["devices"] if d["false_alerts"]]
    if noisy:
        lines += ["", "Devices that alerted while healthy:", ""]
        lines += [f"- {d['device_id']} ({d['source']}): {d['false_alerts']} at {d['raised_at_s']} s, "
                  f"{d['exceeding']}/{d['windows']} windows over" for d in noisy]
    lines += ["", "## Faults", "", f"{r['faults']['lead_s']:g} s of normal sound, then the fault for "
              f"{r['faults']['fault_seconds']:g} s; caught = an alert raised after the onset.", "",
              "| severity | streams | caught | rate | median delay s | p90 delay s | by fault |", "|---|---|---|---|---|---|---|"]
    for sev, s in r["faults"]["summary"].items():
        by = ", ".join(f"{f} {100 * v:.0f} %" for f, v in s["by_fault"].items())
        lines.append(f"| {sev} | {s['streams']} | {s['caught']} | {100 * s['rate']:.0f} % | {_num(s['median_delay_s'])} | "
                     f"{_num(s['p90_delay_s'])} | {by} |")
    lines += ["", "Timings: " + ", ".join(f"{k} {v} s" for k, v in r["timings_s"].items()), ""]
    return "\n".join(lines)


def _predicted_total(r: dict) -> float:
    return sum(r["calibration"].get(name, {}).get("predicted_false_alerts_per_device_day", math.nan)
               * g["device_hours"] / 24 for name, g in r["healthy"]["groups"].items())


def _num(x) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2e}" if abs(x) < 0.01 and x != 0 else f"{x:.3g}"


if __name__ == "__main__":
    raise SystemExit(main())
