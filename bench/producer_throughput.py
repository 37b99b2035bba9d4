"""Throughput of one producer process (one confluent-kafka producer, many devices).

    .venv/bin/python bench/producer_throughput.py [--devices 200] [--chunks 20] [--realtime-devices 500]

Starts a local broker, writes one WAV of random int16 noise per
device with ``--chunks`` seconds, streams them ``--fast`` and reports chunks/s and MB/s; then
(optionally) streams ``--realtime-devices`` looped devices in real time for ``--realtime-seconds``
and reports the CPU time the producer used per second of wall time. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_asd.broker import LocalBroker  # noqa: E402
from stream_asd.config import load_settings  # noqa: E402
from stream_asd.kafka import ensure_topics  # noqa: E402
from stream_asd.producer.agent import ProducerAgent  # noqa: E402
from stream_asd.producer.sources import sources_from_paths  # noqa: E402


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--realtime-devices", type=int, default=500)
    p.add_argument("--realtime-seconds", type=float, default=20.0)
    p.add_argument("--compression", default="lz4")
    args = p.parse_args()
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp, LocalBroker() as broker:
        broker.start()
        root = Path(tmp)
        rng = np.random.default_rng(0)
        n = max(args.devices, args.realtime_devices)
        for d in range(n):
            folder = root / "fan" / "train"
            folder.mkdir(parents=True, exist_ok=True)
            pcm = (rng.standard_normal(16_000 * args.chunks) * 3000).astype(np.int16)
            sf.write(str(folder / f"normal_id_{d:03d}_00000000.wav"), pcm, 16_000, subtype="PCM_16")
        ensure_topics(broker.bootstrap, {"bench.fast": 12, "bench.rt": 12})

        settings = load_settings(overrides={"kafka": {"bootstrap": broker.bootstrap}, "topics": {"audio": "bench.fast"}})
        sources = sources_from_paths([root], 16_000)[: args.devices]
        cpu0, t0 = _cpu(), time.monotonic()
        report = ProducerAgent(settings, sources, realtime=False,
                               producer_overrides={"compression.type": args.compression}).run()
        wall, cpu = time.monotonic() - t0, _cpu() - cpu0
        out["fast"] = {"devices": args.devices, "chunks": report.sent, "delivered": report.delivered,
                       "wall_s": round(wall, 2), "chunks_per_s": round(report.sent / wall, 1),
                       "payload_MB_per_s": round(report.sent * 32_000 / wall / 1e6, 1),
                       "cpu_s": round(cpu, 2), "compression": args.compression}

        if args.realtime_devices:
            settings = load_settings(overrides={"kafka": {"bootstrap": broker.bootstrap}, "topics": {"audio": "bench.rt"}})
            sources = sources_from_paths([root], 16_000, loop=True)[: args.realtime_devices]
            cpu0, t0 = _cpu(), time.monotonic()
            report = ProducerAgent(settings, sources, realtime=True, duration_s=args.realtime_seconds).run()
            wall, cpu = time.monotonic() - t0, _cpu() - cpu0
            out["realtime"] = {"devices": args.realtime_devices, "seconds": args.realtime_seconds,
                               "chunks": report.sent, "delivered": report.delivered, "failed": report.failed,
                               "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                               "cpu_cores_used": round(cpu / wall, 3)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
