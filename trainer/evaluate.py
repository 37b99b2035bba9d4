"""``asd-train evaluate``: AUC, pAUC, recall at threshold per machine type and id, plots, report.

Metrics follow the DCASE evaluator: AUC and pAUC with ``sklearn.metrics.roc_auc_score``
(pAUC = ``max_fpr=0.1``, scikit-learn's McClish-standardised partial AUC, as the DCASE2020
Task 2 baseline evaluator computes it). Recall at threshold = share of anomalous clips whose
score exceeds the bundle's decision threshold for their machine type / device; false-alarm
rate (FAR) = share of normal clips above it. A machine type's AUC/pAUC is the mean over its
machine ids (DCASE convention); ``min_*`` is the worst id; ``pooled_*`` pools all ids.

Every AUC/pAUC (per id, per type, pooled, the means; the domain figures) carries a 95 %
interval ``*_ci95: [lo, hi]``: a stratified percentile bootstrap over clips (trainer/roc.py;
``--bootstrap N`` resamples, 0 = none). Clips with a domain (DCASE2021+ / MIMII DUE layouts)
add per section and type ``domains`` (AUC/pAUC within source and within target) and ``dcase``
(AUC source, AUC target, pAUC, and the official score, their harmonic mean), and the report
adds the official score over all sections (:func:`section_domain_metrics` says which clips).

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

from .roc import (DEFAULT_LEVEL, DEFAULT_RESAMPLES, DEFAULT_SEED, MAX_FPR, StratifiedBootstrap, bootstrap_areas,
                  harmonic_mean, interval, nanmean_rows)

log = logging.getLogger("trainer.evaluate")


@dataclass
class ScoredClip:
    path: str
    machine_type: str
    machine_id: str
    label: int          # 1 = anomaly, 0 = normal
    score: float
    threshold: float
    parts: dict[str, float] | None = None  # per-model scores ({'fusion', 'stats'} or {'ae'})
    domain: str = ""    # 'source' | 'target' (DCASE2021+ / MIMII DUE layouts), else ''
    n_windows: int = 0     # windows scored
    windows_over: int = 0  # of them over the threshold the detector applied (the processor's flag)


def _auc(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import roc_auc_score

    if len(labels) == 0 or labels.min() == labels.max():
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


# --- intervals (trainer/roc.py; docs/training.md "Intervals") -------------------------------

class _Areas:
    """AUC/pAUC of chosen clips: the point (scikit-learn, as the DCASE evaluator) and, when
    intervals are on, the bootstrap replicates from the report's one stratified bootstrap."""

    def __init__(self, clips: Sequence[ScoredClip], n_resamples: int, seed: int):
        self.labels = np.array([c.label for c in clips], dtype=np.int64)
        self.scores = np.array([c.score for c in clips], dtype=np.float64)
        self.boot = (StratifiedBootstrap([(c.machine_type, c.machine_id, c.domain, c.label) for c in clips],
                                         n_resamples, seed) if n_resamples > 0 and clips else None)

    def __call__(self, negatives: np.ndarray, positives: np.ndarray) -> tuple[float, float, np.ndarray | None,
                                                                                np.ndarray | None]:
        sel = np.concatenate([negatives, positives])
        auc, pauc = _auc(self.labels[sel], self.scores[sel])
        if self.boot is None or math.isnan(auc):
            return auc, pauc, None, None
        reps = bootstrap_areas(self.boot, self.scores, negatives, positives, MAX_FPR)
        return auc, pauc, reps[0], reps[1]


def _ci(point: float, reps: np.ndarray | None) -> list[float] | None:
    return None if reps is None else interval(point, reps)


def _mean_reps(reps: Iterable[np.ndarray | None]) -> np.ndarray | None:
    reps = [r for r in reps if r is not None]
    return nanmean_rows(reps) if reps else None


def _hmean(values: Sequence[float]) -> float:
    return float(harmonic_mean(list(values))[0]) if values else float("nan")


def _hmean_reps(reps: Sequence[np.ndarray | None]) -> np.ndarray | None:
    reps = [r for r in reps if r is not None]
    return harmonic_mean(reps) if reps else None


def intervals_info(n_resamples: int, seed: int) -> dict:
    """How the report's ``*_ci95`` fields were computed (stored in metrics.json)."""
    if n_resamples <= 0:
        return {"method": "none (--bootstrap 0)"}
    return {"method": "stratified percentile bootstrap over clips (trainer/roc.py)", "level": DEFAULT_LEVEL,
            "resamples": n_resamples, "seed": seed, "strata": "machine type, machine id/section, domain, label"}


# --- source / target domains and the DCASE score (DCASE2021+ / MIMII DUE layouts) -----------

DOMAINS = ("source", "target")


def section_domain_metrics(areas: _Areas, items: np.ndarray, domains: np.ndarray,
                           pauc: tuple[float, np.ndarray | None]) -> tuple[dict, dict]:
    """Domain figures of one section (machine id) whose clips carry a domain, and their
    replicates. ``domains``: every clip's domain; ``pauc``: the section's pAUC over all its
    clips (point, replicates).

    - ``domains.{source,target}``: that domain's normals against that domain's anomalies (the
      DCASE2021 evaluator's AUC and pAUC per domain).
    - ``dcase``: the DCASE2022-2024 evaluators' figures: ``auc_source`` / ``auc_target`` = that
      domain's normals against *all* anomalies of the section, ``pauc`` over all clips of the
      section, ``score`` = their harmonic mean; ``score_2021`` = the harmonic mean of the four
      per-domain figures above (DCASE2021's official score)."""
    labels = areas.labels
    normal, anomaly = items[labels[items] == 0], items[labels[items] == 1]
    values: dict[str, float] = {}
    reps: dict[str, np.ndarray | None] = {}
    out: dict = {"domains": {}, "dcase": {}}
    for d in DOMAINS:
        neg, pos = normal[domains[normal] == d], anomaly[domains[anomaly] == d]
        auc, p, ra, rp = areas(neg, pos)
        out["domains"][d] = {"auc": auc, "auc_ci95": _ci(auc, ra), "pauc": p, "pauc_ci95": _ci(p, rp),
                             "n_normal": int(len(neg)), "n_anomaly": int(len(pos))}
        values[f"{d}_auc"], values[f"{d}_pauc"], reps[f"{d}_auc"], reps[f"{d}_pauc"] = auc, p, ra, rp
        auc, _, ra, _ = areas(neg, anomaly)
        values[f"auc_{d}"], reps[f"auc_{d}"] = auc, ra
    values["pauc"], reps["pauc"] = pauc
    official = ("auc_source", "auc_target", "pauc")
    values["score"], reps["score"] = _hmean([values[k] for k in official]), _hmean_reps([reps[k] for k in official])
    old = ("source_auc", "source_pauc", "target_auc", "target_pauc")
    values["score_2021"], reps["score_2021"] = _hmean([values[k] for k in old]), _hmean_reps([reps[k] for k in old])
    for k in (*official, "score", "score_2021"):
        out["dcase"][k] = values[k]
        out["dcase"][k + "_ci95"] = _ci(values[k], reps[k])
    return out, {"values": values, "reps": reps}


def combine_dcase(sections: Sequence[dict]) -> dict:
    """The DCASE figures of several sections (a machine type's, or all of them): harmonic means
    over the sections of AUC source, AUC target and pAUC, and ``score`` = the harmonic mean of
    all those values together (the official score is this over every section of every type);
    ``score_2021`` likewise over the per-domain AUCs and pAUCs."""
    def pool(keys):
        vals = [s["values"][k] for s in sections for k in keys]
        return _hmean(vals), _hmean_reps([s["reps"][k] for s in sections for k in keys])

    out: dict = {"n_sections": len(sections)}
    for name, keys in (("auc_source", ["auc_source"]), ("auc_target", ["auc_target"]), ("pauc", ["pauc"]),
                       ("score", ["auc_source", "auc_target", "pauc"]),
                       ("score_2021", ["source_auc", "source_pauc", "target_auc", "target_pauc"])):
        value, reps = pool(keys)
        out[name], out[name + "_ci95"] = value, _ci(value, reps)
    return out


def combine_domains(sections: Sequence[dict]) -> dict:
    """A machine type's per-domain figures: the mean over its sections (as its AUC is the mean
    over its ids), with the interval of that mean."""
    out = {}
    for d in DOMAINS:
        entry = {}
        for k in ("auc", "pauc"):
            vals = [s["values"][f"{d}_{k}"] for s in sections]
            reps = _mean_reps([s["reps"][f"{d}_{k}"] for s in sections])
            entry[k] = _nanmean(vals)
            entry[k + "_ci95"] = _ci(entry[k], reps)
        out[d] = entry
    return out


def compute_metrics(clips: Sequence[ScoredClip], n_resamples: int = DEFAULT_RESAMPLES,
                    seed: int = DEFAULT_SEED) -> dict:
    """All figures for a list of scored clips (see module doc); ``*_ci95`` intervals from one
    stratified bootstrap of ``n_resamples`` resamples (0: no intervals, the fields are null)."""
    areas = _Areas(clips, n_resamples, seed)
    types_of = np.array([c.machine_type for c in clips], dtype=object)
    ids_of = np.array([c.machine_id for c in clips], dtype=object)
    domains = np.array([c.domain or "" for c in clips], dtype=object)
    labels = areas.labels
    result: dict = {"max_fpr": MAX_FPR, "intervals": intervals_info(n_resamples, seed), "machine_types": {}}
    type_reps: dict[str, tuple] = {}
    all_sections: list[dict] = []
    for mtype in sorted(set(types_of.tolist())):
        in_type = np.flatnonzero(types_of == mtype)
        rows = [clips[i] for i in in_type]
        ids: dict[str, dict] = {}
        id_reps: list[tuple] = []
        sections: list[dict] = []
        for mid in sorted(set(ids_of[in_type].tolist())):
            items = in_type[ids_of[in_type] == mid]
            neg, pos = items[labels[items] == 0], items[labels[items] == 1]
            auc, pauc, ra, rp = areas(neg, pos)
            thr = np.array([clips[i].threshold for i in items], dtype=np.float64)
            ids[mid] = {"auc": auc, "auc_ci95": _ci(auc, ra), "pauc": pauc, "pauc_ci95": _ci(pauc, rp),
                        **_rates(labels[items], areas.scores[items], thr)}
            id_reps.append((ra, rp))
            if any(d in DOMAINS for d in domains[items]):
                figures, section = section_domain_metrics(areas, items, domains, (pauc, rp))
                ids[mid].update(figures)
                sections.append(section)
        auc_reps = _mean_reps(r[0] for r in id_reps)
        pauc_reps = _mean_reps(r[1] for r in id_reps)
        neg, pos = in_type[labels[in_type] == 0], in_type[labels[in_type] == 1]
        pooled_auc, pooled_pauc, pra, prp = areas(neg, pos)
        thr = np.array([c.threshold for c in rows], dtype=np.float64)
        rates = _rates(labels[in_type], areas.scores[in_type], thr)
        auc = _nanmean(v["auc"] for v in ids.values())
        pauc = _nanmean(v["pauc"] for v in ids.values())
        entry = {
            "auc": auc, "auc_ci95": _ci(auc, auc_reps),
            "pauc": pauc, "pauc_ci95": _ci(pauc, pauc_reps),
            "min_auc": _nanmin(v["auc"] for v in ids.values()),
            "min_pauc": _nanmin(v["pauc"] for v in ids.values()),
            "pooled_auc": pooled_auc, "pooled_auc_ci95": _ci(pooled_auc, pra),
            "pooled_pauc": pooled_pauc, "pooled_pauc_ci95": _ci(pooled_pauc, prp),
            **rates,
        }
        if sections:
            entry["domains"] = combine_domains(sections)
            entry["dcase"] = combine_dcase(sections)
            all_sections += sections
        entry["ids"] = ids
        result["machine_types"][mtype] = entry
        type_reps[mtype] = (auc_reps, pauc_reps)
    types = result["machine_types"].values()
    result["mean_auc"] = _nanmean(t["auc"] for t in types)
    result["mean_auc_ci95"] = _ci(result["mean_auc"], _mean_reps(r[0] for r in type_reps.values()))
    result["mean_pauc"] = _nanmean(t["pauc"] for t in types)
    result["mean_pauc_ci95"] = _ci(result["mean_pauc"], _mean_reps(r[1] for r in type_reps.values()))
    result["mean_recall"] = _nanmean(t["recall"] for t in types)
    result["mean_far"] = _nanmean(t["far"] for t in types)
    if all_sections:
        result["dcase"] = combine_dcase(all_sections)
    result["n_clips"] = len(clips)
    return result


def per_model_metrics(clips: Sequence[ScoredClip], n_resamples: int = DEFAULT_RESAMPLES,
                      seed: int = DEFAULT_SEED) -> dict:
    """AUC/pAUC of each model of the ensemble alone (its standardised score), for diagnosis;
    the same bootstrap resamples as the ensemble's figures (same strata and seed)."""
    names = sorted({k for c in clips for k in (c.parts or {})})
    out = {}
    for name in names:
        sub = [ScoredClip(c.path, c.machine_type, c.machine_id, c.label, c.parts[name], math.inf, None, c.domain)
               for c in clips if c.parts and name in c.parts]
        m = compute_metrics(sub, n_resamples, seed)
        out[name] = {"mean_auc": m["mean_auc"], "mean_auc_ci95": m["mean_auc_ci95"],
                     "mean_pauc": m["mean_pauc"], "mean_pauc_ci95": m["mean_pauc_ci95"],
                     "auc": {t: v["auc"] for t, v in m["machine_types"].items()},
                     "auc_ci95": {t: v["auc_ci95"] for t, v in m["machine_types"].items()},
                     "pauc": {t: v["pauc"] for t, v in m["machine_types"].items()},
                     "pauc_ci95": {t: v["pauc_ci95"] for t, v in m["machine_types"].items()}}
        if "dcase" in m:
            out[name]["dcase_score"] = m["dcase"]["score"]
            out[name]["dcase_score_ci95"] = m["dcase"]["score_ci95"]
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


def _fmt_ci(ci: Sequence[float] | None) -> str:
    """A 95 % interval in percent, ``[lo, hi]``; '-' when intervals are off or undefined."""
    if ci is None or any(v is None or math.isnan(v) for v in ci):
        return "-"
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _with_ci(value: float, ci: Sequence[float] | None) -> str:
    text = _fmt_ci(ci)
    return _fmt(value) if text == "-" else f"{_fmt(value)} {text}"


def summary_markdown(metrics: dict, title: str = "Evaluation") -> str:
    lines = [f"# {title}", ""]
    if metrics.get("bundle"):
        lines += [f"Bundle: `{metrics['bundle']}` ({metrics.get('model_kind', '?')}), data: `{metrics.get('data', '?')}`", ""]
    lines += [f"Mean over machine types: AUC {_with_ci(metrics['mean_auc'], metrics.get('mean_auc_ci95'))} %, "
              f"pAUC {_with_ci(metrics['mean_pauc'], metrics.get('mean_pauc_ci95'))} %, "
              f"recall at threshold {_fmt(metrics['mean_recall'])} %, false alarms {_fmt(metrics['mean_far'])} % "
              f"({metrics['n_clips']} clips).", ""]
    if metrics.get("dcase"):
        d = metrics["dcase"]
        lines += [f"DCASE official score (harmonic mean of AUC source, AUC target and pAUC over "
                  f"{d['n_sections']} section(s)): {_with_ci(d['score'], d.get('score_ci95'))} %.", ""]
    lines += ["| machine type | AUC % | AUC 95 % CI | pAUC % | pAUC 95 % CI | min AUC % (id) | min pAUC % | recall % | "
              "FAR % | normal | anomaly |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mtype, m in metrics["machine_types"].items():
        worst = min(m["ids"].items(), key=lambda kv: kv[1]["auc"] if not math.isnan(kv[1]["auc"]) else 2)[0]
        lines.append(f"| {mtype} | {_fmt(m['auc'])} | {_fmt_ci(m.get('auc_ci95'))} | {_fmt(m['pauc'])} | "
                     f"{_fmt_ci(m.get('pauc_ci95'))} | {_fmt(m['min_auc'])} ({worst}) | "
                     f"{_fmt(m['min_pauc'])} | {_fmt(m['recall'])} | {_fmt(m['far'])} | {m['n_normal']} | {m['n_anomaly']} |")
    if len(metrics.get("per_model", {})) > 1:
        lines += ["", "## Each model alone (its standardised score)", "",
                  "| model | mean AUC % | 95 % CI | mean pAUC % | 95 % CI | "
                  + " | ".join(f"{t} AUC %" for t in metrics["machine_types"]) + " |",
                  "|---|---|---|---|---|" + "---|" * len(metrics["machine_types"])]
        for name, pm in metrics["per_model"].items():
            lines.append(f"| {name} | {_fmt(pm['mean_auc'])} | {_fmt_ci(pm.get('mean_auc_ci95'))} | "
                         f"{_fmt(pm['mean_pauc'])} | {_fmt_ci(pm.get('mean_pauc_ci95'))} | "
                         + " | ".join(_with_ci(pm["auc"].get(t, float('nan')), pm.get("auc_ci95", {}).get(t))
                                      for t in metrics["machine_types"]) + " |")
    lines += ["", "## Per machine id", "",
              "| machine type | id | AUC % | AUC 95 % CI | pAUC % | pAUC 95 % CI | recall % | FAR % |",
              "|---|---|---|---|---|---|---|---|"]
    for mtype, m in metrics["machine_types"].items():
        for mid, v in m["ids"].items():
            lines.append(f"| {mtype} | {mid} | {_fmt(v['auc'])} | {_fmt_ci(v.get('auc_ci95'))} | {_fmt(v['pauc'])} | "
                         f"{_fmt_ci(v.get('pauc_ci95'))} | {_fmt(v['recall'])} | {_fmt(v['far'])} |")
    lines += dcase_markdown(metrics)
    if metrics.get("alerting"):
        from .operating_point import alerting_markdown

        lines += alerting_markdown(metrics["alerting"])
    lines += ["", f"pAUC: scikit-learn roc_auc_score(max_fpr={MAX_FPR}) as the DCASE evaluator. "
              "A type's AUC is the mean over its ids.", intervals_note(metrics), ""]
    return "\n".join(lines)


def intervals_note(metrics: dict) -> str:
    info = metrics.get("intervals") or {}
    if not info.get("resamples"):
        return "No intervals (--bootstrap 0)."
    return (f"95 % CI: stratified percentile bootstrap over clips ({info['resamples']} resamples, seed "
            f"{info['seed']}; normal and anomalous clips of each id and domain resampled separately); "
            "it measures test-set sampling, not training-seed spread.")


def dcase_markdown(metrics: dict) -> list[str]:
    """The source/target table of a DCASE2021+ / MIMII DUE report (nothing for other layouts)."""
    if not metrics.get("dcase"):
        return []
    lines = ["", "## Domains and DCASE score (DCASE2021+ / MIMII DUE layouts)", "",
             "AUC source/target: that domain's normals against all anomalies of the section, pAUC: all clips of "
             "the section, score: their harmonic mean (DCASE2022-2024 evaluators; a type's row and the total "
             "are harmonic means over sections). Within domain: that domain's normals against that domain's "
             "anomalies (DCASE2021 evaluator, whose score is `score_2021`). A type's within-domain figure is "
             "the mean over its sections.", "",
             "| machine type | section | AUC source % | AUC target % | pAUC % | score % | within source AUC % | "
             "within target AUC % |",
             "|---|---|---|---|---|---|---|---|"]

    def row(mtype: str, section: str, dc: dict, dom: dict) -> str:
        return (f"| {mtype} | {section} | {_with_ci(dc['auc_source'], dc.get('auc_source_ci95'))} | "
                f"{_with_ci(dc['auc_target'], dc.get('auc_target_ci95'))} | {_with_ci(dc['pauc'], dc.get('pauc_ci95'))} | "
                f"{_with_ci(dc['score'], dc.get('score_ci95'))} | "
                f"{_with_ci(dom['source']['auc'], dom['source'].get('auc_ci95'))} | "
                f"{_with_ci(dom['target']['auc'], dom['target'].get('auc_ci95'))} |")

    for mtype, m in metrics["machine_types"].items():
        if "dcase" not in m:
            continue
        for mid, v in m["ids"].items():
            if "dcase" in v:
                lines.append(row(mtype, mid, v["dcase"], v["domains"]))
        lines.append(row(f"**{mtype}**", "all", m["dcase"], m["domains"]))
    d = metrics["dcase"]
    lines += ["", f"Official score {_with_ci(d['score'], d.get('score_ci95'))} %; DCASE2021 definition "
              f"{_with_ci(d['score_2021'], d.get('score_2021_ci95'))} %."]
    return lines


def write_report(clips: Sequence[ScoredClip], out_dir: Path, extra: dict | None = None,
                 title: str = "Evaluation", n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = compute_metrics(clips, n_resamples, seed)
    metrics["per_model"] = per_model_metrics(clips, n_resamples, seed)
    if extra:
        metrics.update(extra)
    with open(out_dir / "scores.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "machine_type", "machine_id", "label", "score", "threshold", "domain"])
        for c in clips:
            w.writerow([c.path, c.machine_type, c.machine_id, c.label, f"{c.score:.6f}", f"{c.threshold:.6f}",
                        c.domain])
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
                                  {k: float(agg(v[pos:pos + n])) for k, v in parts.items()},
                                  clip.domain or "", n, int(np.sum(scores[pos:pos + n] > thresholds[pos:pos + n]))))
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
    from .progress import progress_bar  # tqdm on a terminal, plain log lines otherwise

    return progress_bar(items, desc=desc, unit="clip")


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
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, metavar="N",
                        help=f"resamples of the stratified bootstrap behind the 95 %% intervals (default "
                             f"{DEFAULT_RESAMPLES}; 0: no intervals)")
    parser.add_argument("--bootstrap-seed", type=int, default=DEFAULT_SEED, help="seed of the bootstrap (default 0)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    clips = score_dataset(args.bundle, args.data, args.layout, args.split, args.device, args.batch_size,
                          args.machine_type, progress=not args.no_progress, clip_score=args.clip_score)
    if not clips:
        from stream_asd.errors import DatasetLayoutError

        raise DatasetLayoutError(f"no labelled clips in split {args.split!r} under {args.data}")
    from stream_asd.model.bundle import ModelBundle

    from stream_asd.model.alert_rate import group_calibrations

    from .operating_point import alerting_figures, alerting_lines

    manifest: dict = {}
    try:
        manifest = ModelBundle.read_manifest(args.bundle)
    except Exception:  # noqa: BLE001 - the report still works without the kind and calibration
        pass
    kind = manifest.get("kind", "?")
    alerting = alerting_figures(clips, group_calibrations(manifest))
    metrics = write_report(clips, Path(args.out), {"bundle": str(args.bundle), "data": str(args.data),
                                                    "model_kind": kind, "clip_score": args.clip_score,
                                                    "seconds": round(time.perf_counter() - t0, 1),
                                                    "alerting": alerting},
                           n_resamples=args.bootstrap, seed=args.bootstrap_seed)
    for line in summary_lines(metrics) + alerting_lines(alerting):
        log.info("%s", line)
    log.info("report -> %s", args.out)
    return 0


def summary_lines(metrics: dict) -> list[str]:
    """The log lines of ``asd-train evaluate`` (figures in %, 95 % intervals in brackets)."""
    lines = [f"mean AUC {_with_ci(metrics['mean_auc'], metrics.get('mean_auc_ci95'))} %, pAUC "
             f"{_with_ci(metrics['mean_pauc'], metrics.get('mean_pauc_ci95'))} % over {metrics['n_clips']} clips"]
    if metrics.get("dcase"):
        d = metrics["dcase"]
        lines.append(f"DCASE score {_with_ci(d['score'], d.get('score_ci95'))} % (AUC source "
                     f"{_with_ci(d['auc_source'], d.get('auc_source_ci95'))}, AUC target "
                     f"{_with_ci(d['auc_target'], d.get('auc_target_ci95'))}, pAUC {_with_ci(d['pauc'], d.get('pauc_ci95'))})")
    for mtype, m in metrics["machine_types"].items():
        line = (f"  {mtype:<12} AUC {_with_ci(m['auc'], m.get('auc_ci95'))} pAUC {_with_ci(m['pauc'], m.get('pauc_ci95'))} "
                f"min AUC {_fmt(m['min_auc'])} recall {_fmt(m['recall'])} FAR {_fmt(m['far'])}")
        if "dcase" in m:
            line += f" DCASE score {_with_ci(m['dcase']['score'], m['dcase'].get('score_ci95'))}"
        lines.append(line)
    return lines
