"""``asd-train rollback``: move a model group's current pointer back (and announce it).

    asd-train rollback --registry R --model-group G [--to VERSION] [--bootstrap B]

Without ``--to`` the pointer goes back to the version that was current before this one
(repeat to go further back). Processors hot-swap to it like to a new version; the bundle is
verified again on their side.
"""

from __future__ import annotations

import argparse
import json

from stream_asd.registry import Registry, RegistryError, announce


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", required=True, help="registry folder or URL")
    parser.add_argument("--model-group", default=None, help="model group (default: model.model_group)")
    parser.add_argument("--to", default=None, metavar="VERSION", help="version to return to (default: the previous)")
    parser.add_argument("--reason", default="", help="recorded in the registry history")
    parser.add_argument("--bootstrap", default=None, help="Kafka bootstrap for the asd.models announcement")
    parser.add_argument("--list", action="store_true", help="only print the versions and history")


def run(args: argparse.Namespace) -> int:
    from stream_asd.config import load_settings

    settings = load_settings(args.config, {"kafka": {"bootstrap": args.bootstrap}})
    group = args.model_group or settings.model.model_group
    reg = Registry(args.registry)
    if args.list:
        cur = reg.current(group)
        print(json.dumps({"current": cur.version if cur else None,
                          "versions": [v.version for v in reg.versions(group)],
                          "history": reg.history(group)}, indent=2))
        return 0
    pointer = reg.rollback(group, args.to, reason=args.reason)
    doc = {"status": "rolled_back", "model_group": group, "version": pointer.version, "previous": pointer.previous,
           "announced": False}
    if args.bootstrap:
        try:
            announce(settings.kafka.librdkafka(), settings.topics.models, reg.announcement(group, pointer))
            doc["announced"] = True
        except RegistryError as exc:
            doc["warning"] = str(exc)
    print(json.dumps(doc, indent=2))
    return 0
