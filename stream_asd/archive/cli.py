"""``stream-asd archive``: keep normal audio from ``asd.audio`` as FLAC for retraining."""

from __future__ import annotations

import argparse
import json
import logging
import signal

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (default: kafka.bootstrap setting)")
    parser.add_argument("--to", required=True, metavar="DIR_OR_URL",
                        help="archive folder, or an fsspec URL such as s3://bucket/archive")
    parser.add_argument("--mode", choices=["normal-only", "healthy-devices"], default="normal-only",
                        help="normal-only: audio of windows scored normal (joins asd.scores); "
                             "healthy-devices: all audio of the devices given with --healthy")
    parser.add_argument("--healthy", nargs="*", default=[], metavar="DEVICE",
                        help="devices known to be healthy: all their audio is kept")
    parser.add_argument("--group-id", default="stream-asd-archiver", help="consumer group on asd.audio")
    parser.add_argument("--instance-id", default=None,
                        help="static group membership (e.g. the pod name): a restarted archiver gets its "
                             "partitions back at once instead of after the session timeout")
    parser.add_argument("--segment-seconds", type=float, default=60.0, help="longest FLAC segment")
    parser.add_argument("--flush-idle", type=float, default=10.0, metavar="S",
                        help="close a device's segment after this much silence")
    parser.add_argument("--decision-timeout", type=float, default=300.0, metavar="S",
                        help="longest wait for the scores of a chunk before deciding with what is known")
    parser.add_argument("--max-age-days", type=float, default=None, help="retention: delete older date partitions")
    parser.add_argument("--max-total-gb", type=float, default=None, help="retention: keep at most this much")
    parser.add_argument("--retention-interval", type=float, default=300.0, metavar="S")
    parser.add_argument("--scores-lookback", type=float, default=3600.0, metavar="S",
                        help="at start, read asd.scores from this far back")
    parser.add_argument("--max-pending-mb", type=float, default=256.0,
                        help="pause asd.audio when this much audio waits for scores")
    parser.add_argument("--stop-when-idle", type=float, default=None, metavar="S",
                        help="exit after this long without audio (batch runs, tests)")
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (default metrics.port; 0 off)")
    parser.add_argument("--summary", metavar="FILE", help="write the final counts as JSON here")


def run(args: argparse.Namespace) -> int:
    from ..config import load_settings
    from ..kafka import consumer_conf
    from ..metrics import ArchiverMetrics, serve
    from .store import ArchiveStore
    from .writer import Archiver, ArchiverOptions

    settings = load_settings(args.config, {"kafka": {"bootstrap": args.bootstrap},
                                           "metrics": {"port": args.metrics_port}})
    if args.mode == "healthy-devices" and not args.healthy:
        print("stream-asd archive: --mode healthy-devices needs --healthy DEVICE ...")
        return 2
    options = ArchiverOptions(
        mode=args.mode, healthy=frozenset(args.healthy), segment_seconds=args.segment_seconds,
        flush_idle_s=args.flush_idle, decision_timeout_s=args.decision_timeout, max_age_days=args.max_age_days,
        max_total_bytes=int(args.max_total_gb * 1e9) if args.max_total_gb else None,
        retention_interval_s=args.retention_interval, scores_lookback_s=args.scores_lookback,
        max_pending_bytes=int(args.max_pending_mb * (1 << 20)))
    from prometheus_client import REGISTRY

    metrics = ArchiverMetrics(REGISTRY)  # registry=None would register nothing
    serve(settings.metrics.port, settings.metrics.host)
    conf = consumer_conf(settings, args.group_id)
    if args.instance_id:
        conf["group.instance.id"] = args.instance_id
    archiver = Archiver(conf, ArchiveStore(args.to), options,
                        audio_topic=settings.topics.audio, scores_topic=settings.topics.scores,
                        group_id=args.group_id, metrics=metrics)

    def _stop(signum, frame):  # finish the open segments, commit, exit
        log.info("archiver: signal %d, flushing and stopping", signum)
        archiver.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("archiver: %s -> %s (mode %s, healthy %s)", settings.topics.audio, args.to, args.mode,
             sorted(args.healthy))
    summary = archiver.run(stop_when_idle_s=args.stop_when_idle)
    text = json.dumps(summary, sort_keys=True)
    print(text)
    if args.summary:
        with open(args.summary, "w") as f:
            f.write(text + "\n")
    return 0
