"""``stream-asd process``: run the stream processor (a Faust worker)."""

from __future__ import annotations

import argparse

DESCRIPTION = """Consume audio chunks, assemble per-device windows, score them in micro-batches,
publish scores, alerts and dead letters. Settings: flags > ASD_* environment > --config file >
defaults (print them with `stream-asd config`). Stops gracefully on SIGTERM/SIGINT."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (kafka.bootstrap)")
    parser.add_argument("--bundle", help="model bundle folder (model.bundle)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (metrics.port; 0 disables)")
    parser.add_argument("--group-id", help="consumer group id (processor.group_id)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any setting, e.g. --set window.hop_seconds=2 --set batch.max_size=64")


def run(args: argparse.Namespace) -> int:
    from ..cli import parse_set_options
    from ..config import load_settings
    from .app import run_processor

    overrides = parse_set_options(args.set)
    for section, key, value in (("kafka", "bootstrap", args.bootstrap), ("model", "bundle", args.bundle),
                                ("metrics", "port", args.metrics_port), ("processor", "group_id", args.group_id)):
        if value is not None:  # a flag given beats --set, an absent one must not erase it
            overrides.setdefault(section, {})[key] = value
    if args.log_level:
        overrides["log_level"] = args.log_level
    settings = load_settings(args.config, overrides)
    return run_processor(settings)
