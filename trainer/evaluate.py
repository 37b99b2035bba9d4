"""``asd-train evaluate``: AUC, pAUC, recall at threshold per machine type and id, plots, report.

Metrics follow the DCASE evaluator: AUC and pAUC with ``sklearn.metrics.roc_auc_score``
(pAUC = ``max_fpr=0.1``, scikit-learn's McClish-standardised partial AUC, as the DCASE2020
Task 2 baseline evaluator computes it). Recall at threshold = share of anomalous clips whose
score exceeds the bundle's decision threshold for their machine type / device; false-alarm
rate (FAR) = share of normal clips above it. A machine type's AUC/pAUC is the mean over its
machine ids (DCASE convention); ``min_*`` is the worst id; ``pooled_*`` pools all ids.

Output folder: ``metrics.json`` (every figure), ``summary.md`` (tables), ``scores.csv`` (one
row per clip), ``roc_<type>.png`` and ``far_frr_<type>.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger("trainer.evaluate")

MAX_FPR = 0.1


@dataclass
class ScoredClip:
    path: str
    machine_type: str
    machine_id: str
    label: int          # 1 = anomaly, 0 = normal
    score: float
    threshold: float
    parts: dict[str, float] | None = None  # per-model scores ({'fusion', 'stats'} or {'ae'})


def _auc(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import roc_auc_score

    if labels.min() == labels.max():
        return float("nan"), float("nan")
    return (float(roc_auc_score(labels, scores)),
            float(roc_auc_score(labels, scores, max_fpr=MAX_FPR)))


def _rates(labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray) -> dict[str, float]:
    above = scores > thresholds
    anomalies, normals = labels == 1, labels == 0
    recall = float(above[anomalies].mean()) if anomalies.any() else float("nan")
    far = float(above[normals].mean()) if normals.any() else float("nan")
    return {"recall": recall, "far": far, "n_normal": int(normals.sum()), "n_anomaly": int(anomalies.sum())}


def _nanmean(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _nanmin(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.min(vals)) if vals else float("nan")


def compute_metrics(clips: Sequence[ScoredClip]) -> dict:
    """All figures for a list of scored clips (see module doc)."""
    by_type: dict[str, list[ScoredClip]] = {}
    for c in clips:
        by_type.setdefault(c.machine_type, []).append(c)
    result: dict = {"max_fpr": MAX_FPR, "machine_types": {}}
    for mtype in sorted(by_type):
        rows = by_type[mtype]
        ids: dict[str, dict] = {}
        for mid in sorted({c.machine_id for c in rows}):
            sub = [c for c in rows if c.machine_id == mid]
            labels = np.array([c.label for c in sub])
            scores = np.array([c.score for c in sub], dtype=np.float64)
            thr = np.array([c.threshold for c in sub], dtype=np.float64)
            auc, pauc = _auc(labels, scores)
            ids[mid] = {"auc": auc, "pauc": pauc, **_rates(labels, scores, thr)}
        labels = np.array([c.label for c in rows])
        scores = np.array([c.score for c in rows], dtype=np.float64)
        thr = np.array([c.threshold for c in rows], dtype=np.float64)
        pooled_auc, pooled_pauc = _auc(labels, scores)
        rates = _rates(labels, scores, thr)
        result["machine_types"][mtype] = {
            "auc": _nanmean(v["auc"] for v in ids.values()),
            "pauc": _nanmean(v["pauc"] for v in ids.values()),
            "min_auc": _nanmin(v["auc"] for v in ids.values()),
            "min_pauc": _nanmin(v["pauc"] for v in ids.values()),
            "pooled_auc": pooled_auc,
            "pooled_pauc": pooled_pauc,
            **rates,
            "ids": ids,
        }
    types = result["machine_types"].values()
    result["mean_auc"] = _nanmean(t["auc"] for t in types)
    result["mean_pauc"] = _nanmean(t["pauc"] for t in types)
    result["mean_recall"] = _nanmean(t["recall"] for t in types)
    result["mean_far"] = _nanmean(t["far"] for t in types)
    result["n_clips"] = len(clips)
    return result


def per_model_metrics(clips: Sequence[ScoredClip]) -> dict:
    """AUC/pAUC of each model of the ensemble alone (its standardised score), for diagnosis."""
    names = sorted({k for c in clips for k in (c.parts or {})})
    out = {}
    for name in names:
        sub = [ScoredClip(c.path, c.machine_type, c.machine_id, c.label, c.parts[name], math.inf)
               for c in clips if c.parts and name in c.parts]
        m = compute_metrics(sub)
        out[name] = {"mean_auc": m["mean_auc"], "mean_pauc": m["mean_pauc"],
                     "auc": {t: v["auc"] for t, v in m["machine_types"].items()},
                     "pauc": {t: v["pauc"] for t, v in m["machine_types"].items()}}
    return out


# --- plots ----------------------------------------------------------------------------------

def plot_curves(clips: Sequence[ScoredClip], out_dir: Path) -> list[Path]:
    """ROC per machine type (one curve per id) and FAR-FRR against the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    written: list[Path] = []
    for mtype in sorted({c.machine_type for c in clips}):
        rows = [c for c in clips if c.machine_type == mtype]
        fig, ax = plt.subplots(figsize=(5, 5))
        for mid in sorted({c.machine_id for c in rows}):
            sub = [c for c in rows if c.machine_id == mid]
            labels = np.array([c.label for c in sub])
            if labels.min() == labels.max():
                continue
            fpr, tpr, _ = roc_curve(labels, [c.score for c in sub])
            auc, _ = _auc(labels, np.array([c.score for c in sub]))
            ax.plot(fpr, tpr, label=f"{mid} (AUC {auc:.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.axvline(MAX_FPR, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC: {mtype}",
               xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right", fontsize=8)
        path = out_dir / f"roc_{_safe(mtype)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

        labels = np.array([c.label for c in rows])
        scores = np.array([c.score for c in rows])
        if labels.min() == labels.max():
            continue
        grid = np.linspace(scores.min(), scores.max(), 200)
        far = [(scores[labels == 0] > t).mean() for t in grid]
        frr = [(scores[labels == 1] <= t).mean() for t in grid]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(grid, far, label="FAR (normals above threshold)")
        ax.plot(grid, frr, label="FRR (anomalies below threshold)")
        thr = sorted({c.threshold for c in rows})
        for t in thr[:8]:
            ax.axvline(t, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="anomaly score threshold", ylabel="rate", title=f"FAR-FRR: {mtype} (dashed: bundle thresholds)")
        ax.legend(fontsize=8)
        path = out_dir / f"far_frr_{_safe(mtype)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def summary_markdown(metrics: dict, title: str = "Evaluation") -> str:
    lines = [f"# {title}", ""]
    if metrics.get("bundle"):
        lines += [f"Bundle: `{metrics['bundle']}` ({metrics.get('model_kind', '?')}), data: `{metrics.get('data', '?')}`", ""]
    lines += [f"Mean over machine types: AUC {_fmt(metrics['mean_auc'])} %, pAUC {_fmt(metrics['mean_pauc'])} %, "
              f"recall at threshold {_fmt(metrics['mean_recall'])} %, false alarms {_fmt(metrics['mean_far'])} % "
              f"({metrics['n_clips']} clips).", "",
              "| machine type | AUC % | pAUC % | min AUC % (id) | min pAUC % | recall % | FAR % | normal | anomaly |",
              "|---|---|---|---|---|---|---|---|---|"]
    for mtype, m in metrics["machine_types"].items():
        worst = min(m["ids"].items(), key=lambda kv: kv[1]["auc"] if not math.isnan(kv[1]["auc"]) else 2)[0]
        lines.append(f"| {mtype} | {_fmt(m['auc'])} | {_fmt(m['pauc'])} | {_fmt(m['min_auc'])} ({worst}) | "
                     f"{_fmt(m['min_pauc'])} | {_fmt(m['recall'])} | {_fmt(m['far'])} | {m['n_normal']} | {m['n_anomaly']} |")
    if len(metrics.get("per_model", {})) > 1:
        lines += ["", "## Each model alone (its standardised score)", "",
                  "| model | mean AUC % | mean pAUC % | " + " | ".join(f"{t} AUC %" for t in metrics["machine_types"]) + " |",
                  "|---|---|---|" + "---|" * len(metrics["machine_types"])]
        for name, pm in metrics["per_model"].items():
            lines.append(f"| {name} | {_fmt(pm['mean_auc'])} | {_fmt(pm['mean_pauc'])} | "
                         + " | ".join(_fmt(pm["auc"].get(t, float('nan'))) for t in metrics["machine_types"]) + " |")
    lines += ["", "## Per machine id", "", "| machine type | id | AUC % | pAUC % | recall % | FAR % |", "|---|---|---|---|---|---|"]
    for mtype, m in metrics["machine_types"].items():
        for mid, v in m["ids"].items():
            lines.append(f"| {mtype} | {mid} | {_fmt(v['auc'])} | {_fmt(v['pauc'])} | {_fmt(v['recall'])} | {_fmt(v['far'])} |")
    lines += ["", f"pAUC: scikit-learn roc_auc_score(max_fpr={MAX_FPR}) as the DCASE evaluator. "
              "A type's AUC is the mean over its ids.", ""]
    return "\n".join(lines)


def write_report(clips: Sequence[ScoredClip], out_dir: Path, extra: dict | None = None,
                 title: str = "Evaluation") -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = compute_metrics(clips)
    metrics["per_model"] = per_model_metrics(clips)
    if extra:
        metrics.update(extra)
    with open(out_dir / "scores.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "machine_type", "machine_id", "label", "score", "threshold"])
        for c in clips:
            w.writerow([c.path, c.machine_type, c.machine_id, c.label, f"{c.score:.6f}", f"{c.threshold:.6f}"])
    metrics["plots"] = [p.name for p in plot_curves(clips, out_dir)]
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True))
    (out_dir / "summary.md").write_text(summary_markdown(metrics, title))
    return metrics


# --- scoring a data set with a bundle -------------------------------------------------------

# How a clip's window scores become its score. ``median`` (default) is the clip-level form of
# the processor's alert rule (k of n windows): the median exceeds a threshold exactly when most
# windows do, so one window with a passing noise (a door, a forklift) does not decide the clip.
CLIP_SCORES = {"median": np.median, "mean": np.mean, "max": np.max}
DEFAULT_CLIP_SCORE = "median"


def score_dataset(bundle: str | Path, data: str | Path, layout: str = "auto", split: str = "test",
                  device: str = "cpu", batch_size: int = 16, machine_types: Sequence[str] | None = None,
                  progress: bool = True, clip_score: str = DEFAULT_CLIP_SCORE) -> list[ScoredClip]:
    """Score every clip of ``split`` with the bundle; a clip's score (and each model's part) is
    the ``clip_score`` (median, mean or max) of its window scores."""
    from stream_asd.model.detector import load_detector

    import torch

    from stream_asd.model.windows import iter_windows

    from .data import list_clips, load_wave

    if clip_score not in CLIP_SCORES:
        raise ValueError(f"clip_score {clip_score!r}: use one of {', '.join(CLIP_SCORES)}")
    agg = CLIP_SCORES[clip_score]
    detector = load_detector(bundle, device=device, max_batch=batch_size)
    window = detector.feature_spec.window_samples
    clips = [c for c in list_clips(data, layout=layout, split=split)
             if machine_types is None or c.machine_type in machine_types]
    out: list[ScoredClip] = []
    iterator = _progress(clips, "scoring", progress)
    pending: list = []

    def flush() -> None:
        waves = torch.cat([w for _, w in pending])
        types = [c.machine_type for c, w in pending for _ in range(w.shape[0])]
        ids = [f"{c.machine_type}-{c.machine_id}" for c, w in pending for _ in range(w.shape[0])]
        result = detector.score_windows(waves.numpy(), types, ids)
        scores = np.asarray([r.score for r in result], dtype=np.float64)
        thresholds = np.asarray([r.threshold for r in result], dtype=np.float64)
        part_names = sorted(result[0].scores) if result else []
        parts = {k: np.asarray([r.scores[k] for r in result], dtype=np.float64) for k in part_names}
        pos = 0
        for clip, w in pending:
            n = w.shape[0]
            out.append(ScoredClip(str(clip.path), clip.machine_type, clip.machine_id,
                                  1 if clip.label == "anomaly" else 0,
                                  float(agg(scores[pos:pos + n])), float(thresholds[pos]),
                                  {k: float(agg(v[pos:pos + n])) for k, v in parts.items()}))
            pos += n
        pending.clear()

    for clip in iterator:
        if clip.label not in ("normal", "anomaly"):
            continue
        wave = load_wave(clip.path, detector.feature_spec.sample_rate)
        # same window rule as `stream-asd score` (stream_asd.model.windows), hop = one window
        wins = [torch.from_numpy(ws.samples) for ws in iter_windows(wave.numpy(), window, window)]
        pending.append((clip, torch.stack(wins)))
        if sum(w.shape[0] for _, w in pending) >= batch_size:
            flush()
    if pending:
        flush()
    return out


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit="clip", leave=False)
    except ImportError:  # pragma: no cover
        return items


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="model bundle folder")
    parser.add_argument("--data", required=True, help="data set root (test split is scored)")
    parser.add_argument("--out", required=True, help="report folder (metrics.json, summary.md, plots)")
    parser.add_argument("--layout", default="auto", choices=["auto", "dcase2020", "dcase2021", "mimii", "manifest", "archive"])
    parser.add_argument("--split", default="test", help="which split to score (default test)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--machine-type", action="append", default=None, help="only these machine types")
    parser.add_argument("--clip-score", default=DEFAULT_CLIP_SCORE, choices=sorted(CLIP_SCORES),
                        help="a clip's score from its window scores (default median: the clip-level form of "
                             "the k-of-n alert rule)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    clips = score_dataset(args.bundle, args.data, args.layout, args.split, args.device, args.batch_size,
                          args.machine_type, progress=not args.no_progress, clip_score=args.clip_score)
    if not clips:
        from stream_asd.errors import DatasetLayoutError

        raise DatasetLayoutError(f"no labelled clips in split {args.split!r} under {args.data}")
    from stream_asd.model.bundle import ModelBundle

    kind = "?"
    try:
        kind = ModelBundle.read_manifest(args.bundle).get("kind", "?")
    except Exception:  # noqa: BLE001 - the report still works without the kind
        pass
    metrics = write_report(clips, Path(args.out), {"bundle": str(args.bundle), "data": str(args.data),
                                                    "model_kind": kind, "clip_score": args.clip_score,
                                                    "seconds": round(time.perf_counter() - t0, 1)})
    log.info("mean AUC %.4f, pAUC %.4f over %d clips -> %s", metrics["mean_auc"], metrics["mean_pauc"],
             metrics["n_clips"], args.out)
    for mtype, m in metrics["machine_types"].items():
        log.info("  %-12s AUC %.4f pAUC %.4f min AUC %.4f recall %.3f FAR %.3f", mtype, m["auc"], m["pauc"],
                 m["min_auc"], m["recall"], m["far"])
    return 0
