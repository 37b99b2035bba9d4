"""``asd-train publish``: quality-gate a bundle against the registry's current model, then
publish it (registry put, current pointer, announcement on ``asd.models``).

    asd-train publish --bundle B --registry R [--model-group G] [--archive A] [--eval-data DIR]
                      [--tolerance 0.02] [--bootstrap B] [--result FILE]

Refusals (non-zero exit, reason printed):
- exit 3: the bundle is corrupt or incomplete (``ModelBundle.load`` fails), or incompatible
  with the current model (another feature spec, or missing a model group it serves); a
  deliberate feature-spec change needs ``--allow-spec-change`` and a processor redeploy;
- exit 4: the quality gate (``trainer.gate``): worse than the current model beyond the
  tolerance on held-out archive audio + pseudo-anomalies, or on labelled data.
Exit 0: published (or already current). An announcement that cannot be delivered is a
warning only: processors also poll the registry.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stream_asd.errors import BundleError
from stream_asd.registry import Registry, RegistryError, announce, default_compatibility

log = logging.getLogger("trainer.publish")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 3
EXIT_GATE = 4


@dataclass
class PublishOutcome:
    status: str  # published | already_current | refused_invalid | refused_gate
    model_group: str
    version: str | None = None
    previous: str | None = None
    reasons: list[str] = field(default_factory=list)
    gate: dict[str, Any] | None = None
    announced: bool = False
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return {"published": EXIT_OK, "already_current": EXIT_OK, "refused_invalid": EXIT_INVALID,
                "refused_gate": EXIT_GATE}.get(self.status, EXIT_FAILED)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()} | {"exit_code": self.exit_code}


def publish_bundle(bundle: str | Path, registry: Registry | str, model_group: str = "default", *,
                   archive: str | Path | None = None, archive_selection: dict[str, Any] | None = None,
                   holdout_fraction: float = 0.2, eval_data: str | Path | None = None, eval_layout: str = "auto",
                   tolerance: float = 0.02, min_auc: float = 0.5, far_tolerance: float | None = 0.2,
                   no_gate: bool = False, allow_spec_change: bool = False,
                   kafka_conf: dict[str, Any] | None = None, topic: str = "asd.models",
                   seed: int = 0) -> PublishOutcome:
    """Validate, gate and publish ``bundle``. Never raises for a refusal: see ``status``."""
    from stream_asd.model.detector import load_detector

    from .gate import archive_eval_set, labelled_eval_set, run_gate

    t0 = time.perf_counter()
    reg = registry if isinstance(registry, Registry) else Registry(registry)
    out = PublishOutcome("refused_invalid", model_group)
    try:
        candidate = load_detector(bundle, device="cpu")
    except (BundleError, OSError, ValueError) as exc:
        out.reasons.append(f"candidate bundle {bundle} is not usable: {exc}")
        return _done(out, t0)
    pointer = reg.current(model_group)
    current = None
    if pointer is not None:
        out.previous = pointer.version
        try:
            current = load_detector(reg.fetch(model_group, pointer.version), device="cpu")
        except (BundleError, RegistryError) as exc:  # the baseline itself is broken: gate on data only
            log.warning("current model %s/%s cannot be loaded (%s); gating against the data only",
                        model_group, pointer.version, exc)
    if current is not None and not allow_spec_change:
        try:
            default_compatibility(candidate, current)
        except BundleError as exc:
            out.reasons.append(f"candidate is incompatible with the current model {pointer.version}: {exc}")
            return _done(out, t0)
    if not no_gate:
        sr = candidate.feature_spec.sample_rate
        sets = []
        if archive is not None:
            sets.append(archive_eval_set(archive, sr, holdout_fraction=holdout_fraction, seed=seed,
                                         **(archive_selection or {})))
        if eval_data is not None:
            sets.append(labelled_eval_set(eval_data, sr, layout=eval_layout, seed=seed,
                                          machine_types=(archive_selection or {}).get("machine_types")))
        result = run_gate(candidate, current, sets, tolerance=tolerance, min_auc=min_auc, far_tolerance=far_tolerance)
        out.gate = result.to_dict() | {"sets": {s.name: s.counts() for s in sets}}
        if not result.passed:
            out.status = "refused_gate"
            out.reasons.extend(result.reasons)
            return _done(out, t0)
    # The registry version is the bundle's own version: score records (model_version) and the
    # registry then name a model the same way.
    version = reg.put(bundle, model_group, version=candidate.version,
                      meta={"bundle_version": candidate.version, "gate": out.gate, "source": str(bundle)})
    out.version = version
    if pointer is not None and pointer.version == version:
        out.status = "already_current"
        return _done(out, t0)
    new_pointer = reg.set_current(model_group, version, action="publish", reason="passed the quality gate"
                                  if not no_gate else "published without gate (--no-gate)")
    out.status = "published"
    if kafka_conf is not None:
        try:
            announce(kafka_conf, topic, reg.announcement(model_group, new_pointer))
            out.announced = True
        except (RegistryError, Exception) as exc:  # noqa: BLE001 - polling is the fallback
            out.reasons.append(f"warning: announcement failed ({exc}); processors will find it by polling")
    return _done(out, t0)


def _done(out: PublishOutcome, t0: float) -> PublishOutcome:
    out.seconds = round(time.perf_counter() - t0, 2)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="candidate bundle folder (from asd-train fit)")
    parser.add_argument("--registry", required=True, help="registry folder or URL (s3://...)")
    parser.add_argument("--model-group", default=None, help="registry model group (default: model.model_group)")
    parser.add_argument("--archive", default=None, help="archive with held-out normal audio for the gate")
    parser.add_argument("--holdout-fraction", type=float, default=0.2,
                        help="newest share of each device's archived audio used as held-out data")
    parser.add_argument("--machine-type", action="append", default=None, help="restrict the evaluation")
    parser.add_argument("--since", default=None, help="archive selection start (ISO time)")
    parser.add_argument("--until", default=None, help="archive selection end (ISO time)")
    parser.add_argument("--eval-data", default=None, help="labelled data set (test split) for the gate")
    parser.add_argument("--eval-layout", default="auto")
    parser.add_argument("--tolerance", type=float, default=0.02, help="allowed AUC drop vs the current model")
    parser.add_argument("--min-auc", type=float, default=0.5, help="AUC floor for any evaluated machine type")
    parser.add_argument("--far-tolerance", type=float, default=0.2,
                        help="also refuse when the false alarm rate on normal audio rises by more than this "
                             "(a negative value turns the check off)")
    parser.add_argument("--no-gate", action="store_true", help="publish without evaluation (first model, tests)")
    parser.add_argument("--allow-spec-change", action="store_true",
                        help="accept another feature spec (processors refuse to hot-swap it: redeploy them)")
    parser.add_argument("--bootstrap", default=None, help="Kafka bootstrap for the asd.models announcement")
    parser.add_argument("--result", default=None, help="write the outcome as JSON here")


def _settings(args: argparse.Namespace):
    from stream_asd.config import load_settings

    return load_settings(getattr(args, "config", None), {"kafka": {"bootstrap": getattr(args, "bootstrap", None)}})


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    group = args.model_group or settings.model.model_group
    selection = {"machine_types": args.machine_type, "since": args.since, "until": args.until}
    outcome = publish_bundle(
        args.bundle, args.registry, group, archive=args.archive, archive_selection=selection,
        holdout_fraction=args.holdout_fraction, eval_data=args.eval_data, eval_layout=args.eval_layout,
        tolerance=args.tolerance, min_auc=args.min_auc,
        far_tolerance=args.far_tolerance if args.far_tolerance >= 0 else None, no_gate=args.no_gate,
        allow_spec_change=args.allow_spec_change,
        kafka_conf=settings.kafka.librdkafka() if args.bootstrap else None, topic=settings.topics.models)
    return report(outcome, args.result)


def report(outcome: PublishOutcome, result_file: str | None, extra: dict[str, Any] | None = None) -> int:
    doc = outcome.to_dict() | (extra or {})
    text = json.dumps(doc, indent=2, default=str)
    if result_file:
        Path(result_file).write_text(text + "\n")
    print(text)
    if outcome.status.startswith("refused"):
        print(f"asd-train publish: REFUSED ({outcome.status}):", file=sys.stderr)
        for r in outcome.reasons:
            print(f"  - {r}", file=sys.stderr)
    else:
        for r in outcome.reasons:
            print(f"asd-train publish: {r}", file=sys.stderr)
    return outcome.exit_code
