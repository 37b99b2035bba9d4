"""Acceptance benchmark: ensemble (cpu profile) vs AE baseline on a synthetic fleet.

    .venv/bin/python bench/model_quality.py OUT_DIR [--types fan pump slider] [--devices 4]
        [--n-train 24] [--n-test 10] [--seed 1] [--profile cpu] [--set SECTION.KEY=VALUE ...]

1. Writes a DCASE2020-layout synthetic data set with ``stream_asd.audio.synth_dataset.write_dataset``:
   >= 3 machine types x 4 devices; per device ``n_train`` normal training clips, ``n_test``
   normal and ``n_test`` anomalous test clips (faults bearing, imbalance, rubbing, drift,
   clogging cycled, severity uniform in [0.3, 1.0]). Test clips are rendered from stream times
   after the training part, so their noise realisations come from noise-segment seeds that no
   training clip used; fault choices and severities come from the data set's own generator.
2. Trains the ensemble (``asd-train fit --profile cpu``) and the AE baseline (``--model ae``) on
   the training split, evaluates both on the test split (``asd-train evaluate``).
3. Writes OUT_DIR/results.json and OUT_DIR/results.md (AUC/pAUC per machine type, both models,
   timings, the exact commands).

``--seeds N`` trains N training seeds (``--train-seed``, +1, ...) on the same data set, each in
OUT_DIR/seed-K/ (its own results.json/.md), and writes OUT_DIR/seeds.json and OUT_DIR/seeds.md:
per model part (ensemble, its fusion and statistics models alone, AE) the mean AUC/pAUC of each
seed and their mean, standard deviation (ddof 1) and min/max: the spread between training runs,
which the 95 % intervals of ``asd-train evaluate`` (test-set sampling) do not measure. A small
smoke run: ``--profile tiny --types fan --devices 2 --n-train 4 --n-test 3 --seconds 2 --seeds 2``.

Target (issue 3): ensemble mean AUC >= 0.90 and above the AE's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ("bearing", "imbalance", "rubbing", "drift", "clogging")


def _run(cmd: list[str], log_path: Path) -> float:
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}; see {log_path}")
    return time.perf_counter() - t0


def _cpu_seconds_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--types", nargs="+", default=["fan", "pump", "slider"])
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--n-train", type=int, default=24)
    ap.add_argument("--n-test", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=1, help="data set seed (devices and noise)")
    ap.add_argument("--level-db", type=float, default=6.0,
                    help="every clip at a random gain in [-DB, +DB] dB, so loudness carries no label (default 6; "
                         "0 reproduces the data of the runs before 2 Dec 2026)")
    ap.add_argument("--train-seed", type=int, default=0, help="training seed (the first one with --seeds)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="train this many training seeds (train-seed, train-seed+1, ...) into OUT_DIR/seed-K and "
                         "report the spread of the mean AUC per model part (OUT_DIR/seeds.json, seeds.md)")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--set", action="append", default=[], help="profile override for the ensemble")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-ae", action="store_true")
    ap.add_argument("--analyses-only", action="store_true",
                    help="only add the per-fault and window-level figures to an existing OUT_DIR/results.json")
    args = ap.parse_args(argv)

    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    out: Path = args.out.resolve()
    data = out / "data"
    seeds = list(range(args.train_seed, args.train_seed + args.seeds))
    runs = {seed: (out if args.seeds == 1 else out / f"seed-{seed}") for seed in seeds}
    if args.analyses_only:
        for run_dir in runs.values():
            _analyse_and_write(run_dir, json.loads((run_dir / "results.json").read_text()), data)
        if args.seeds > 1:
            _write_seed_summary(out, {s: json.loads((d / "results.json").read_text()) for s, d in runs.items()})
        return 0
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)})
    synth_s = _write_data(data, args)
    results = {}
    for seed, run_dir in runs.items():
        run_dir.mkdir(parents=True, exist_ok=True)
        results[seed] = _run_seed(run_dir, data, args, seed)
        if synth_s is not None:
            results[seed]["timings_s"]["synth_s"] = synth_s
        _analyse_and_write(run_dir, results[seed], data)
    if args.seeds > 1:
        _write_seed_summary(out, results)
    return 0 if all(r["target_met"] for r in results.values()) else 1


def _write_data(data: Path, args) -> float | None:
    """The synthetic data set (once: every seed trains on the same clips); seconds it took."""
    if not (data / "manifest.csv").exists():
        from stream_asd.audio.synth_dataset import write_dataset

        t0 = time.perf_counter()
        write_dataset(data, args.types, devices_per_type=args.devices, n_train=args.n_train,
                      n_test_normal=args.n_test, n_test_anomaly=args.n_test, seconds=args.seconds,
                      seed=args.seed, faults=FAULTS, severity=(0.3, 1.0), level_db=args.level_db)
        return round(time.perf_counter() - t0, 1)
    return None


def _run_seed(out: Path, data: Path, args, train_seed: int) -> dict:
    """Fit and evaluate both models with one training seed into ``out``; the result record."""
    py = sys.executable
    timings: dict[str, float] = {}
    sets = [f"--set={s}" for s in args.set] + [f"--set=run.threads={args.threads}"]
    commands = {
        "fit_ensemble": [py, "-m", "trainer.cli", "fit", "--data", str(data), "--out", str(out / "bundle-ensemble"),
                         "--profile", args.profile, "--model", "ensemble", "--seed", str(train_seed),
                         "--force", "--no-progress", "--report", str(out / "train-ensemble.json"), *sets],
        "eval_ensemble": [py, "-m", "trainer.cli", "evaluate", "--bundle", str(out / "bundle-ensemble"),
                          "--data", str(data), "--out", str(out / "report-ensemble"), "--no-progress"],
        "fit_ae": [py, "-m", "trainer.cli", "fit", "--data", str(data), "--out", str(out / "bundle-ae"),
                   "--profile", args.profile, "--model", "ae", "--seed", str(train_seed), "--force",
                   "--no-progress", "--report", str(out / "train-ae.json"), f"--set=run.threads={args.threads}"],
        "eval_ae": [py, "-m", "trainer.cli", "evaluate", "--bundle", str(out / "bundle-ae"), "--data", str(data),
                    "--out", str(out / "report-ae"), "--no-progress"],
        # the same bundles with the clip score = mean of the window scores, for comparison
        "eval_ensemble_mean": [py, "-m", "trainer.cli", "evaluate", "--bundle", str(out / "bundle-ensemble"),
                               "--data", str(data), "--out", str(out / "report-ensemble-mean"), "--no-progress",
                               "--clip-score", "mean"],
        "eval_ae_mean": [py, "-m", "trainer.cli", "evaluate", "--bundle", str(out / "bundle-ae"), "--data", str(data),
                         "--out", str(out / "report-ae-mean"), "--no-progress", "--clip-score", "mean"],
    }
    cpu: dict[str, float] = {}
    for name, cmd in commands.items():
        if args.skip_ae and "_ae" in name:
            continue
        before = _cpu_seconds_children()
        timings[name + "_s"] = round(_run(cmd, out / f"{name}.log"), 1)
        cpu[name + "_cpu_s"] = round(_cpu_seconds_children() - before, 1)

    ens = json.loads((out / "report-ensemble" / "metrics.json").read_text())
    ae = None if args.skip_ae else json.loads((out / "report-ae" / "metrics.json").read_text())
    ens_mean = json.loads((out / "report-ensemble-mean" / "metrics.json").read_text())
    ae_mean = None if args.skip_ae else json.loads((out / "report-ae-mean" / "metrics.json").read_text())
    result = {
        "data": {"types": args.types, "devices_per_type": args.devices, "n_train": args.n_train,
                 "n_test_normal": args.n_test, "n_test_anomaly": args.n_test, "seconds": args.seconds,
                 "seed": args.seed, "faults": list(FAULTS), "severity": [0.3, 1.0], "level_db": args.level_db},
        "profile": args.profile, "overrides": args.set, "train_seed": train_seed,
        "clip_score": "median",
        "ensemble": _summary(ens), "ae": _summary(ae) if ae else None,
        "per_model": {"ensemble": _parts(ens), "ae": _parts(ae) if ae else None},
        "clip_score_mean": {"ensemble": _summary(ens_mean), "ae": _summary(ae_mean) if ae_mean else None},
        "target_met": bool(ens["mean_auc"] >= 0.90 and (ae is None or ens["mean_auc"] > ae["mean_auc"])),
        "timings_s": timings, "cpu_s": cpu, "threads": args.threads,
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "load_avg_at_end": os.getloadavg()},
        "commands": {k: " ".join(v).replace(str(ROOT) + "/", "") for k, v in commands.items()},
    }
    return result


def _parts(m: dict) -> dict:
    """Mean AUC/pAUC of each model part alone (the report's per_model table)."""
    return {name: {"mean_auc": v["mean_auc"], "mean_pauc": v["mean_pauc"]} for name, v in m.get("per_model", {}).items()}


def seed_spread(results: dict) -> dict:
    """Per model part: the mean AUC / pAUC of every training seed and their mean, std (ddof 1;
    0 with one seed), min and max. Parts: ensemble, fusion, stats (the ensemble's models alone), ae."""
    import numpy as np

    per_part: dict[str, dict[str, dict]] = {}
    for seed, r in sorted(results.items()):
        figures = {"ensemble": r["ensemble"]}
        if r.get("ae"):
            figures["ae"] = r["ae"]
        for name, v in ((r.get("per_model") or {}).get("ensemble") or {}).items():
            figures[name] = v
        for part, v in figures.items():
            for metric in ("mean_auc", "mean_pauc"):
                per_part.setdefault(part, {}).setdefault(metric, {})[str(seed)] = v[metric]
    out = {}
    for part, metrics in per_part.items():
        out[part] = {}
        for metric, by_seed in metrics.items():
            vals = np.asarray(list(by_seed.values()), dtype=np.float64)
            out[part][metric] = {"by_seed": by_seed, "mean": float(vals.mean()),
                                 "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                                 "min": float(vals.min()), "max": float(vals.max()), "n_seeds": int(len(vals))}
    return out


def _write_seed_summary(out: Path, results: dict) -> dict:
    spread = seed_spread(results)
    first = results[min(results)]
    summary = {"train_seeds": sorted(int(s) for s in results), "data": first["data"], "profile": first["profile"],
               "overrides": first["overrides"], "parts": spread,
               "target_met": {str(s): r["target_met"] for s, r in sorted(results.items())}}
    (out / "seeds.json").write_text(json.dumps(summary, indent=2))
    (out / "seeds.md").write_text(_seed_markdown(summary))
    print(_seed_markdown(summary))
    return summary


def _seed_markdown(summary: dict) -> str:
    def pct(x):
        return f"{100 * x:.2f}"

    seeds = summary["train_seeds"]
    lines = [f"Training seeds {', '.join(map(str, seeds))} on the same data set (profile {summary['profile']}): "
             "mean AUC over machine types, each model part (median clip score).", "",
             "| part | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | std | min | max | mean pAUC (std) |",
             "|---|" + "---|" * len(seeds) + "---|---|---|---|---|"]
    for part, m in summary["parts"].items():
        a, p = m["mean_auc"], m["mean_pauc"]
        lines.append(f"| {part} | " + " | ".join(pct(a["by_seed"][str(s)]) if str(s) in a["by_seed"] else "-"
                                                 for s in seeds)
                     + f" | {pct(a['mean'])} | {pct(a['std'])} | {pct(a['min'])} | {pct(a['max'])} | "
                       f"{pct(p['mean'])} ({pct(p['std'])}) |")
    return "\n".join(lines) + "\n"


def _analyse_and_write(out: Path, result: dict, data: Path | None = None) -> None:
    """Add the per-fault, window-level and weight-sweep figures; write results.json / .md. Each
    bundle scores the test split once; every figure comes from those window scores."""
    data = data or out / "data"
    scored = {model: _window_parts(out / f"bundle-{model}", data)
              for model in ("ensemble", "ae") if (out / f"bundle-{model}").exists()}
    result["per_fault_auc"] = per_fault(scored, data)
    result["loudness_auc"] = loudness_auc(data)
    result["window_level_auc"] = {model: {"mean_auc": round(_type_mean_auc(per_dev, "score"), 4)}
                                  for model, per_dev in scored.items()}
    if "ensemble" in scored:
        result["weight_sweep"] = weight_sweep(scored["ensemble"])
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(_markdown(result))
    print(_markdown(result))


def loudness_auc(data: Path) -> dict:
    """How much label information loudness alone carries: per machine type, the AUC of a
    detector that scores a test clip by its RMS level (louder = more anomalous) and of one that
    scores by the distance of its level from the median level of its device's training normals
    (either direction). Both must sit near 0.5 for the benchmark to measure more than level."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from trainer.data import list_clips, load_wave

    def level_db(path) -> float:
        w = load_wave(path, 16000).numpy().astype(np.float64)
        return float(10 * np.log10(np.mean(w ** 2) + 1e-20))

    ref: dict = {}
    for c in list_clips(data, split="train"):
        ref.setdefault((c.machine_type, c.machine_id), []).append(level_db(c.path))
    out: dict = {"per_type": {}}
    for mtype in sorted({c.machine_type for c in list_clips(data, split="test")}):
        test = [c for c in list_clips(data, split="test") if c.machine_type == mtype]
        y = [int(c.label == "anomaly") for c in test]
        lv = np.array([level_db(c.path) for c in test])
        dev = np.abs(lv - np.array([np.median(ref[(c.machine_type, c.machine_id)]) for c in test]))
        out["per_type"][mtype] = {"rms_auc": round(float(roc_auc_score(y, lv)), 4),
                                  "level_deviation_auc": round(float(roc_auc_score(y, dev)), 4)}
    for key in ("rms_auc", "level_deviation_auc"):
        out[f"mean_{key}"] = round(float(np.mean([v[key] for v in out["per_type"].values()])), 4)
    return out


def _window_parts(bundle: Path, data: Path) -> dict:
    """Per device: {"label", "clip", "score": {part: ...}}, one entry per test window, scored by
    the runtime detector (part "score" is the model's score; the ensemble adds fusion, stats)."""
    import numpy as np
    import torch

    from stream_asd.model.detector import load_detector
    from stream_asd.model.windows import iter_windows
    from trainer.data import list_clips, load_wave

    det = load_detector(bundle, device="cpu", max_batch=32)
    window = det.feature_spec.window_samples
    per_dev: dict = {}
    for c in list_clips(data, split="test"):
        wave = load_wave(c.path, det.feature_spec.sample_rate).numpy()
        wins = np.stack([w.samples for w in iter_windows(wave, window, window)])
        with torch.no_grad():
            res = det.score_windows(wins, [c.machine_type] * len(wins), [f"{c.machine_type}-{c.machine_id}"] * len(wins))
        entry = per_dev.setdefault((c.machine_type, c.machine_id), {"label": [], "clip": [], "score": {}})
        entry["label"] += [int(c.label == "anomaly")] * len(res)
        entry["clip"] += [str(c.path)] * len(res)
        for name in ["score", *sorted(res[0].scores)]:
            entry["score"].setdefault(name, []).extend(r.score if name == "score" else r.scores[name] for r in res)
    return per_dev


def _window_scores(entry: dict, part):
    """A device's window scores of one part (name) or of a function of the entry (a weighting)."""
    import numpy as np

    return np.asarray(entry["score"][part] if isinstance(part, str) else part(entry), dtype=np.float64)


def _clip_scores(entry: dict, scores, clip_score):
    """(clip paths, labels, clip scores) of one device from its window scores."""
    import numpy as np

    clips, labels = np.asarray(entry["clip"]), np.asarray(entry["label"])
    names = sorted(set(entry["clip"]))
    return (names, np.asarray([labels[clips == n][0] for n in names]),
            np.asarray([clip_score(scores[clips == n]) for n in names]))


def _type_mean_auc(per_dev: dict, part, clip_score=None) -> float:
    """Mean over machine types of the mean over ids of the AUC of a part's window scores, or of
    its clip scores (``clip_score`` of each clip's windows) when given."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    types: dict[str, list[float]] = {}
    for (mtype, _), e in sorted(per_dev.items()):
        y, sc = np.asarray(e["label"]), _window_scores(e, part)
        if clip_score is not None:
            _, y, sc = _clip_scores(e, sc, clip_score)
        types.setdefault(mtype, []).append(roc_auc_score(y, sc))
    return float(np.mean([np.mean(v) for v in types.values()]))


def per_fault(scored: dict, data: Path) -> dict:
    """AUC of each device's test normals against its anomalies of one fault type, mean over the
    devices, for every model part (ensemble, fusion, stats; AE), median clip score."""
    import csv

    import numpy as np
    from sklearn.metrics import roc_auc_score

    fault = {str(data / r["path"]): r["fault"] for r in csv.DictReader(open(data / "manifest.csv"))}
    result: dict[str, dict[str, float]] = {}
    for model, per_dev in scored.items():
        parts = {model: "score", **({"fusion": "fusion", "stats": "stats"} if model == "ensemble" else {})}
        for name, part in parts.items():
            aucs: dict[str, list[float]] = {}
            for e in per_dev.values():
                names, y, sc = _clip_scores(e, _window_scores(e, part), np.median)
                kinds = np.asarray([fault.get(n) for n in names])
                for f in FAULTS:
                    sel = (y == 0) | (kinds == f)
                    if (y[sel] == 1).any() and (y[sel] == 0).any():
                        aucs.setdefault(f, []).append(roc_auc_score(y[sel], sc[sel]))
            result[name] = {f: round(float(np.mean(v)), 4) for f, v in aucs.items()}
    return result


def weight_sweep(per_dev: dict, grid=(1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)) -> dict:
    """Ensemble AUC for other (fusion, statistics) weights on the same bundle's standardised
    window scores: window level, clip median, clip mean. For choosing weights on a validation
    set (another seed), never on the benchmark itself."""
    import numpy as np

    rows = []
    for w in grid:
        def mix(e, w=w):
            return w * _window_scores(e, "fusion") + (1 - w) * _window_scores(e, "stats")
        rows.append({"weight_fusion": w, "window_auc": round(_type_mean_auc(per_dev, mix), 4),
                     "clip_median_auc": round(_type_mean_auc(per_dev, mix, np.median), 4),
                     "clip_mean_auc": round(_type_mean_auc(per_dev, mix, np.mean), 4)})
    return {"rows": rows}


def _summary(m: dict) -> dict:
    return {"mean_auc": m["mean_auc"], "mean_auc_ci95": m.get("mean_auc_ci95"), "mean_pauc": m["mean_pauc"],
            "mean_pauc_ci95": m.get("mean_pauc_ci95"), "mean_recall": m["mean_recall"], "mean_far": m["mean_far"],
            "per_type": {t: {k: v[k] for k in ("auc", "pauc", "min_auc", "min_pauc", "recall", "far")}
                         for t, v in m["machine_types"].items()}}


def _markdown(r: dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f}"

    lines = ["| machine type | ensemble AUC % | ensemble pAUC % | ensemble min AUC % | AE AUC % | AE pAUC % |",
             "|---|---|---|---|---|---|"]
    for t, e in r["ensemble"]["per_type"].items():
        a = (r["ae"] or {}).get("per_type", {}).get(t, {})
        lines.append(f"| {t} | {pct(e['auc'])} | {pct(e['pauc'])} | {pct(e['min_auc'])} | {pct(a.get('auc'))} | "
                     f"{pct(a.get('pauc'))} |")
    e, a = r["ensemble"], r["ae"] or {}
    lines.append(f"| **mean** | **{pct(e['mean_auc'])}** | **{pct(e['mean_pauc'])}** | | **{pct(a.get('mean_auc'))}** | "
                 f"**{pct(a.get('mean_pauc'))}** |")
    m = r["clip_score_mean"]
    lines += ["", f"Clip score = mean of the window scores instead of the median: ensemble {pct(m['ensemble']['mean_auc'])} %, "
              f"AE {pct((m['ae'] or {}).get('mean_auc'))} % mean AUC."]
    lines += ["", f"Recall at threshold / false-alarm rate: ensemble {pct(e['mean_recall'])} / {pct(e['mean_far'])} %, "
              f"AE {pct(a.get('mean_recall'))} / {pct(a.get('mean_far'))} %.",
              f"Target (mean AUC >= 90 % and above the AE): {'met' if r['target_met'] else 'NOT met'}.",
              f"Timings (s, wall): {r['timings_s']}; CPU seconds: {r['cpu_s']}."]
    wl = r.get("window_level_auc") or {}
    if wl:
        lines += ["", "Window-level AUC (every window scored alone, labelled as its clip): "
                  + ", ".join(f"{k} {pct(v['mean_auc'])} %" for k, v in wl.items()) + "."]
    sweep = (r.get("weight_sweep") or {}).get("rows") or []
    if sweep:
        lines += ["", "Other ensemble weights on the same window scores (AUC %; choose on a validation seed):", "",
                  "| weight fusion / statistics | window | clip median | clip mean |", "|---|---|---|---|"]
        for row in sweep:
            w = row["weight_fusion"]
            lines.append(f"| {w:.1f} / {1 - w:.1f} | {pct(row['window_auc'])} | {pct(row['clip_median_auc'])} | "
                         f"{pct(row['clip_mean_auc'])} |")
    la = r.get("loudness_auc")
    if la:
        lines += ["", f"Loudness alone (data level_db {r['data'].get('level_db', 0)}): clip-RMS detector "
                  f"{pct(la['mean_rms_auc'])} %, level-deviation detector {pct(la['mean_level_deviation_auc'])} % "
                  "mean AUC (near 50 %: level carries no label)."]
    pf = r.get("per_fault_auc") or {}
    if pf:
        lines += ["", "Per fault (each device's normals vs its anomalies of that fault, mean over devices, AUC %):", "",
                  "| model | " + " | ".join(FAULTS) + " |", "|---|" + "---|" * len(FAULTS)]
        for name, v in pf.items():
            lines.append(f"| {name} | " + " | ".join(pct(v.get(f)) for f in FAULTS) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
