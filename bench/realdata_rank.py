"""Real-data sanity check: where does the one real anomaly of shared/realdata rank?

    .venv/bin/python bench/realdata_rank.py OUT_DIR [--realdata /work/shared/realdata]
        [--profile cpu] [--n-train 50] [--set SECTION.KEY=VALUE ...]

``dcase2020/unknown_zyy438`` holds 75 normal clips and 1 anomaly of one machine (id_00). The
first ``n_train`` normals (by file name) train a bundle; the other normals and the anomaly are
scored and the anomaly's rank among them is reported (1 = highest score = the goal), for each
clip score (``median`` of the window scores: ``asd-train evaluate``'s default; ``mean``). Both the ensemble and the AE baseline are run.
The clips are linked (not copied) into a DCASE2020 layout under OUT_DIR/data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import trainer  # noqa: F401  (OMP settings before torch loads)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--realdata", type=Path, default=Path("/work/shared/realdata"))
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--n-train", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--models", nargs="+", default=["ensemble", "ae"])
    args = ap.parse_args(argv)

    src = args.realdata / "clips" / "dcase2020" / "unknown_zyy438"
    normals = sorted(src.glob("normal_id_00_*.wav"))
    anomalies = sorted(src.glob("anomaly_id_00_*.wav"))
    if len(normals) <= args.n_train or not anomalies:
        sys.exit(f"{src}: expected more than {args.n_train} normal clips and an anomaly")
    out = args.out.resolve()
    data = out / "data" / "unknown"
    for split in ("train", "test"):
        (data / split).mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(normals):
        split = "train" if i < args.n_train else "test"
        link = data / split / p.name
        if not link.exists():
            link.symlink_to(p)
    for p in anomalies:
        link = data / "test" / p.name
        if not link.exists():
            link.symlink_to(p)

    from trainer.evaluate import score_dataset
    from trainer.fit import fit
    from trainer.profiles import get_profile

    results = {"source": str(src), "n_train": args.n_train, "n_test_normal": len(normals) - args.n_train,
               "n_anomaly": len(anomalies), "profile": args.profile, "overrides": args.set, "models": {}}
    for model in args.models:
        t0 = time.perf_counter()
        bundle = out / f"bundle-{model}"
        fit(out / "data", bundle, layout="dcase2020", profile=get_profile(args.profile, args.set), model=model,
            seed=args.seed, progress=False, force=True)
        train_s = time.perf_counter() - t0
        results["models"][model] = {"train_seconds": round(train_s, 1)}
        for agg in ("median", "mean"):
            clips = score_dataset(bundle, out / "data", layout="dcase2020", progress=False, clip_score=agg)
            ranked = sorted(clips, key=lambda c: c.score, reverse=True)
            ranks = [i + 1 for i, c in enumerate(ranked) if c.label == 1]
            normals = sorted((c for c in clips if c.label == 0), key=lambda c: c.score)
            results["models"][model][f"clip_score_{agg}"] = {
                "anomaly_rank": ranks[0] if len(ranks) == 1 else ranks, "of": len(clips),
                "anomaly_score": [c.score for c in clips if c.label == 1][0],
                "max_normal_score": normals[-1].score, "max_normal_clip": Path(normals[-1].path).name,
                "median_normal_score": normals[len(normals) // 2].score,
                "threshold": clips[0].threshold,
            }
            # the anomaly's rank under each model of the ensemble alone (fusion, stats) or the AE
            anomaly = next(c for c in clips if c.label == 1)
            results["models"][model][f"clip_score_{agg}"]["per_model_anomaly_rank"] = {
                k: 1 + sum(c.parts[k] > v for c in normals) for k, v in (anomaly.parts or {}).items()}
        print(model, json.dumps(results["models"][model]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
