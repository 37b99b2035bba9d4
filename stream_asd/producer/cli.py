"""``stream-asd produce``: stream microphones (files, folders, manifests, synthetic, capture) to Kafka.

Examples::

    stream-asd produce --bootstrap 127.0.0.1:9092 data/fan/train            # replay a folder, real time
    stream-asd produce --fast --max-chunks 60 clips.csv                      # a manifest, as fast as possible
    stream-asd produce --synthetic 200 --machine-types fan,pump --fault 3:bearing:30 --duration 120
    stream-asd produce --capture default,line-7-fan,fan                      # a live sound device

Exit status: 0 when every chunk was acknowledged by the broker, 1 when some failed or were left
unacknowledged (the summary says how many), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..errors import AsdError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 2)[2]
    parser.add_argument("sources", nargs="*", metavar="SOURCE",
                        help="WAV/FLAC file, folder of them (DCASE/MIMII layouts give device ids), or manifest CSV "
                             "(columns path[,device_id,machine_type,machine_id,label])")
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (kafka.bootstrap, ASD_KAFKA__BOOTSTRAP)")
    parser.add_argument("--topic", help="audio topic (default topics.audio = asd.audio)")
    g = parser.add_argument_group("synthetic fleet")
    g.add_argument("--synthetic", type=int, metavar="N", help="add N synthetic microphones")
    g.add_argument("--machine-types", metavar="T1,T2", help="machine types of the synthetic fleet (round-robin)")
    g.add_argument("--seed", type=int, default=0, help="seed of the synthetic fleet")
    g.add_argument("--fault", action="append", default=[], metavar="DEVICE:TYPE:AT[:SEVERITY]",
                   help="inject a fault into a synthetic device (id or fleet index) from AT seconds of stream time")
    parser.add_argument("--capture", action="append", default=[], metavar="DEV[,DEVICE_ID[,MACHINE_TYPE]]",
                        help="live sound device (needs the 'capture' extra: pip install 'stream-asd[capture]')")
    parser.add_argument("--label", help="only files with this label (e.g. normal) from names or the manifest")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--realtime", dest="realtime", action="store_true", default=True,
                      help="send each chunk when it has been 'captured' (default)")
    pace.add_argument("--fast", dest="realtime", action="store_false", help="send as fast as the broker takes it")
    parser.add_argument("--loop", action="store_true", help="replay files forever (sample-continuous)")
    parser.add_argument("--duration", type=float, metavar="S", help="stop after S seconds of audio per device")
    parser.add_argument("--max-chunks", type=int, metavar="N", help="stop after N chunks per device")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics here (0: off; metrics.port)")
    parser.add_argument("--compression", choices=["none", "lz4", "zstd", "snappy", "gzip"], help="default lz4")
    parser.add_argument("--producer-conf", action="append", default=[], metavar="KEY=VALUE",
                        help="extra librdkafka producer setting, e.g. linger.ms=50 (repeatable)")
    parser.add_argument("--create-topic", action="store_true",
                        help="create the topic when it is missing (topics.partitions partitions)")
    parser.add_argument("--producer-id", help="producer id header (default host-pid)")
    parser.add_argument("--flush-timeout", type=float, default=30.0, metavar="S",
                        help="how long to wait for acknowledgements at the end")
    parser.add_argument("--summary-json", metavar="FILE", help="write the final counts (per device) as JSON")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any setting, e.g. --set audio.chunk_seconds=0.5")


def _conf_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        return text


def parse_producer_conf(pairs) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise AsdError(f"--producer-conf {pair!r}: expected KEY=VALUE, e.g. --producer-conf linger.ms=50")
        key, value = pair.split("=", 1)
        out[key.strip()] = _conf_value(value.strip())
    return out


def build_sources(args: argparse.Namespace, settings) -> list:
    from .sources import SourceSet, parse_capture, parse_fault, sources_from_paths, synthetic_fleet

    faults = [parse_fault(f) for f in args.fault]  # syntax errors first, before any I/O
    if faults and not args.synthetic:
        raise AsdError("--fault applies to the synthetic fleet: add --synthetic N")
    sr = settings.audio.sample_rate
    out = SourceSet()
    if args.sources:
        out.add(sources_from_paths(args.sources, sr, loop=args.loop, label=args.label))
    if args.synthetic:
        types = [t.strip() for t in args.machine_types.split(",") if t.strip()] if args.machine_types else None
        out.add(synthetic_fleet(args.synthetic, sr, types, seed=args.seed, faults=faults))
    for i, spec in enumerate(args.capture):
        out.add([parse_capture(spec, sr, settings.chunk_samples(), i)])
    if not out.sources:
        raise AsdError("nothing to stream: give audio files/folders/manifest CSVs, --synthetic N or --capture DEVICE "
                       "(see stream-asd produce --help)")
    return out.sources


def ensure_topic(settings, topic: str) -> None:
    """Create ``topic`` when missing (idempotent), with topics.partitions partitions."""
    from ..kafka import admin_conf, ensure_topics

    ensure_topics(admin_conf(settings), {topic: settings.topics.partitions},
                  replication_factor=settings.topics.replication_factor)


def run(args: argparse.Namespace) -> int:
    from ..cli import parse_set_options
    from ..config import load_settings

    overrides = parse_set_options(args.set)
    overrides.setdefault("kafka", {})["bootstrap"] = args.bootstrap
    overrides.setdefault("metrics", {})["port"] = args.metrics_port
    if args.topic:
        overrides.setdefault("topics", {})["audio"] = args.topic
    settings = load_settings(args.config, overrides)
    producer_overrides = parse_producer_conf(args.producer_conf)
    if args.compression:
        producer_overrides["compression.type"] = args.compression
    sources = build_sources(args, settings)

    from ..metrics import ProducerMetrics, serve
    from .agent import ProducerAgent

    if args.create_topic:
        ensure_topic(settings, settings.topics.audio)
    metrics = ProducerMetrics()
    try:
        server = serve(settings.metrics.port, settings.metrics.host)
    except OSError as exc:
        raise AsdError(f"cannot serve metrics on port {settings.metrics.port} ({exc.strerror}); "
                       "pass --metrics-port N (0 turns metrics off)") from None
    if server is not None:
        log.info("metrics on http://%s:%d/metrics", settings.metrics.host, server.server_port)
    agent = ProducerAgent(settings, sources, realtime=args.realtime, duration_s=args.duration,
                          max_chunks=args.max_chunks, producer_overrides=producer_overrides, metrics=metrics,
                          producer_id=args.producer_id, flush_timeout_s=args.flush_timeout)
    for s in sources[:10]:
        log.info("device %s", s.describe())
    if len(sources) > 10:
        log.info("... and %d more devices", len(sources) - 10)
    agent.install_signal_handlers()
    report = agent.run()
    print(report.summary_line(), flush=True)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(report.to_dict(), indent=2))
    if server is not None:
        server.shutdown()
    if report.stopped_by == "error":
        for err in report.errors[:3]:
            print(f"stream-asd produce: error: {err}", file=sys.stderr)
        return 1
    return 0 if report.ok else 1
