"""Issue 11, deliverable 2: consumer lag as the components' own metric.

``asd_consumer_lag_records{component, topic, partition}`` = the high watermark the Kafka client
last saw for the partition minus the committed offset (before the first commit, the offset the
consumer began at). No lag exporter needed.

- fast (no broker): the processor's and the archiver's series follow partition ownership
  (set from the client's high watermark, lowered by commits, removed at revocation; the
  archiver asks the broker only while it is paused and fetches nothing);
- real broker: a backlog is produced before the component starts; /metrics scraped over HTTP
  shows the lag of each partition above 0 while the backlog is worked off, then 0 once every
  offset is committed. Processor: a ``stream-asd process`` worker whose stand-in detector
  sleeps per batch (so the backlog lasts seconds); archiver: ``stream-asd archive``, whose
  chunks stay uncommitted until their FLAC segment is written (``--flush-idle``).

This file is also the slow processor worker: ``python tests/test_consumer_lag.py --bootstrap B
--set k=v ...``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import processor_support as ps  # noqa: E402

LAG = "asd_consumer_lag_records"
SLOW_BATCH_S = 0.3  # model time per batch of the slow stand-in detector
PARTITIONS = 2
DEVICES_PER_PARTITION = 2
BACKLOG_CHUNKS = 24  # per device: 48 per partition


class SlowRmsDetector(ps.RmsDetector):
    """The RMS stand-in, slower than the backlog arrives: each batch takes SLOW_BATCH_S."""

    def score_windows(self, waves, machine_types, device_ids):
        time.sleep(SLOW_BATCH_S)
        return super().score_windows(waves, machine_types, device_ids)


def lag_samples(samples: dict[str, float], component: str, topic: str) -> dict[int, float]:
    """{partition: lag} of one component's series in a scrape."""
    out = {}
    for key, value in samples.items():
        if key.startswith(LAG + "{") and f'component="{component}"' in key and f'topic="{topic}"' in key:
            out[int(key.split('partition="', 1)[1].split('"', 1)[0])] = value
    return out


def produce_backlog(bootstrap: str, topic: str, machines_by_partition: dict[int, list[ps.Machine]]) -> int:
    """BACKLOG_CHUNKS chunks of every device, each device on its given partition; returns the count."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 5,
                  "message.max.bytes": 2 * 1024 * 1024})
    errors: list = []
    n = 0
    for seq in range(BACKLOG_CHUNKS):
        for partition, machines in machines_by_partition.items():
            for m in machines:
                key, value, headers = ps.chunk_message(m, seq)
                p.produce(topic, key=key, value=value, headers=headers, partition=partition,
                          on_delivery=lambda err, msg: errors.append(err) if err else None)
                n += 1
        p.poll(0)
    assert p.flush(60) == 0 and not errors, errors
    return n


def watch_lag(scrape, component: str, topic: str, *, timeout: float, proc: subprocess.Popen | None = None,
              interval: float = 0.2) -> list[tuple[float, dict[int, float]]]:
    """Scrape /metrics until every partition was seen above 0 and then at 0; the timeline."""
    timeline: list[tuple[float, dict[int, float]]] = []
    seen_lag: set[int] = set()
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{component} exited with {proc.returncode}")
        try:
            lags = lag_samples(scrape(), component, topic)
        except OSError:  # /metrics not up yet
            lags = {}
        timeline.append((round(time.monotonic() - t0, 2), lags))
        seen_lag |= {p for p, v in lags.items() if v > 0}
        if seen_lag == set(range(PARTITIONS)) and len(lags) == PARTITIONS and not any(lags.values()):
            return timeline
        time.sleep(interval)
    raise AssertionError(f"{component}: lag never went above 0 and back to 0 on every partition; "
                         f"timeline {compact(timeline)}")


def compact(timeline: list[tuple[float, dict[int, float]]]) -> list:
    """The timeline without repeats (for messages and the printed figures)."""
    out, last = [], None
    for t, lags in timeline:
        if lags != last:
            out.append((t, {p: int(v) for p, v in sorted(lags.items())}))
            last = lags
    return out


# -- fast: series follow ownership ------------------------------------------------------------------
def make_processor():
    from prometheus_client import CollectorRegistry

    from stream_asd.config import load_settings
    from stream_asd.metrics import ProcessorMetrics
    from stream_asd.processor.pipeline import StreamProcessor
    from stream_asd.processor.runner import ModelRunner

    settings = load_settings(None, {"audio": {"chunk_seconds": 1.0}, "window": {"seconds": 4, "hop_seconds": 2},
                                    "batch": {"max_size": 8, "max_wait_ms": 0}})
    registry = CollectorRegistry()
    metrics = ProcessorMetrics(registry)
    runner = ModelRunner(ps.RmsDetector(), metrics, window_samples=4 * ps.SR)

    async def send(topic, key, value, headers):
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    return StreamProcessor(settings, runner, send, metrics), registry


def gauge(registry, component: str, topic: str, partition: int):
    return registry.get_sample_value(LAG, {"component": component, "topic": topic, "partition": str(partition)})


def test_processor_lag_follows_watermark_commits_and_ownership():
    async def main():
        proc, registry = make_processor()
        tp0, tp1, tp2 = ("asd.audio", 0), ("asd.audio", 1), ("asd.audio", 2)
        proc.on_assigned([tp0, tp1, tp2])
        m = ps.fleet(1, faulty=())[0]
        for offset in range(3):  # the worker began reading tp0 at offset 5 (the group's commit)
            await proc.on_message(tp0, 5 + offset, *ps.chunk_message(m, offset))
        highs = {tp0: 20, tp1: 0, tp2: None}  # tp1 empty; tp2 nothing fetched yet
        proc.refresh_lag(highs.get)
        assert gauge(registry, "processor", "asd.audio", 0) == 15  # 20 - 5 (no commit of ours yet)
        assert gauge(registry, "processor", "asd.audio", 1) == 0
        assert gauge(registry, "processor", "asd.audio", 2) is None  # unknown: no series
        proc.refresh_lag(highs.get, committed={tp2: 7}.get)  # the group's commit Faust read at assignment
        assert gauge(registry, "processor", "asd.audio", 2) is None  # high watermark still unknown
        highs[tp2] = 9
        proc.refresh_lag(highs.get, committed={tp2: 7}.get)
        assert gauge(registry, "processor", "asd.audio", 2) == 2
        proc.ledger.confirm({tp0: 7})  # a commit of ours
        proc.refresh_lag(highs.get)
        assert gauge(registry, "processor", "asd.audio", 0) == 13
        highs[tp0] = None  # e.g. the consumer mid-rebalance: the last value stays
        proc.refresh_lag(highs.get)
        assert gauge(registry, "processor", "asd.audio", 0) == 13
        proc.on_revoked([tp0])
        assert gauge(registry, "processor", "asd.audio", 0) is None  # its new owner reports it
        assert gauge(registry, "processor", "asd.audio", 1) == 0
        proc.on_assigned([tp1])  # a new assignment without tp2
        assert gauge(registry, "processor", "asd.audio", 2) is None
        assert gauge(registry, "processor", "asd.audio", 1) == 0

    asyncio.run(main())


class FakeConsumer:
    """The confluent-kafka calls the archiver's lag uses, recording whether it asked the broker."""

    def __init__(self, topic: str, highs: dict[int, int]):
        from confluent_kafka import TopicPartition

        self.tps = [TopicPartition(topic, p) for p in sorted(highs)]
        self.cached_highs = dict(highs)
        self.broker_highs = dict(highs)
        self.asked_broker = 0
        self.commits: list = []

    def assignment(self):
        return list(self.tps)

    def get_watermark_offsets(self, tp, timeout=None, cached=False):
        if not cached:
            self.asked_broker += 1
            return 0, self.broker_highs[tp.partition]
        return 0, self.cached_highs[tp.partition]

    def commit(self, offsets=None, asynchronous=True):
        self.commits.append({tp.partition: tp.offset for tp in offsets})

    def pause(self, tps):
        pass

    def resume(self, tps):
        pass


def test_archiver_lag_follows_watermark_commits_and_ownership(tmp_path):
    from confluent_kafka import TopicPartition
    from prometheus_client import CollectorRegistry

    from stream_asd.archive.store import ArchiveStore
    from stream_asd.archive.writer import Archiver, ArchiverOptions
    from stream_asd.metrics import ArchiverMetrics

    registry = CollectorRegistry()
    a = Archiver({}, ArchiveStore(tmp_path / "arch"), ArchiverOptions(), audio_topic="audio",
                 metrics=ArchiverMetrics(registry))
    a._consumer = consumer = FakeConsumer("audio", {0: 30, 1: 0})
    m = ps.fleet(1, faulty=())[0]
    for offset in range(10, 13):  # began at offset 10 of partition 0
        a.handle_audio(0, offset, *ps.chunk_message(m, offset), now=0.0)
    a._refresh_lag(ask_broker_if_paused=True)
    assert gauge(registry, "archiver", "audio", 0) == 20 and gauge(registry, "archiver", "audio", 1) == 0
    assert consumer.asked_broker == 0  # fetching: the cached high watermark is fresh
    a.offsets.done(0, 10)
    a._commit()  # a commit refreshes the lag at once
    assert consumer.commits[-1] == {0: 11}
    assert gauge(registry, "archiver", "audio", 0) == 19
    a._paused = True  # a paused consumer fetches nothing: its cached watermark stops moving
    consumer.broker_highs[0] = 45
    a._refresh_lag()  # on a commit: never a broker request
    assert consumer.asked_broker == 0 and gauge(registry, "archiver", "audio", 0) == 19
    a._refresh_lag(ask_broker_if_paused=True)  # the periodic refresh while paused asks
    assert consumer.asked_broker == 2 and gauge(registry, "archiver", "audio", 0) == 34
    a._on_revoke(consumer, [TopicPartition("audio", 0)])
    assert gauge(registry, "archiver", "audio", 0) is None and gauge(registry, "archiver", "audio", 1) == 0
    a._on_assign(consumer, [])
    assert gauge(registry, "archiver", "audio", 1) is None


# -- real broker: a backlog, scraped over HTTP --------------------------------------------------------
def names(prefix: str) -> dict[str, str]:
    u = uuid.uuid4().hex[:8]
    return {k: f"{prefix}-{k}-{u}" for k in ("audio", "scores", "alerts", "dlq", "group")}


def backlog_fleet() -> dict[int, list[ps.Machine]]:
    machines = ps.fleet(PARTITIONS * DEVICES_PER_PARTITION, faulty=())
    return {p: machines[p * DEVICES_PER_PARTITION:(p + 1) * DEVICES_PER_PARTITION] for p in range(PARTITIONS)}


def test_processor_reports_its_lag_during_a_backlog(kafka_bootstrap, tmp_path):
    from stream_asd.kafka import ensure_topics

    n = names("lagproc")
    ensure_topics(kafka_bootstrap, {n[k]: PARTITIONS for k in ("audio", "scores", "alerts", "dlq")})
    produced = produce_backlog(kafka_bootstrap, n["audio"], backlog_fleet())  # before the worker starts
    per_partition = produced // PARTITIONS
    port = ps.free_port()
    sets = {
        "topics.audio": n["audio"], "topics.scores": n["scores"], "topics.alerts": n["alerts"],
        "topics.dlq": n["dlq"], "topics.partitions": PARTITIONS, "processor.group_id": n["group"],
        "processor.session_timeout_seconds": 6, "processor.datadir": tmp_path / "w",
        "audio.chunk_seconds": ps.CHUNK_S, "window.seconds": ps.WINDOW_S, "window.hop_seconds": ps.HOP_S,
        "window.idle_evict_seconds": 2, "batch.max_size": 2, "batch.max_wait_ms": 20,
        "metrics.port": port, "metrics.host": "127.0.0.1",
    }
    cmd = [sys.executable, __file__, "--bootstrap", kafka_bootstrap]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    timeline, took, committed, final, _ = run_watching_lag(
        cmd, dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"), tmp_path / "worker.log", port,
        "processor", n, kafka_bootstrap, timeout=75)
    peak = {p: max(lags.get(p, 0) for _, lags in timeline) for p in range(PARTITIONS)}
    behind = sum(1 for _, lags in timeline if any(v > 0 for v in lags.values()))
    print(f"processor lag: backlog {per_partition} chunks per partition, peak {peak}, {behind} scrapes "
          f"behind, caught up {took:.1f} s after start; timeline {compact(timeline)}")
    assert all(0 < peak[p] <= per_partition for p in range(PARTITIONS)), peak
    assert committed == {p: per_partition for p in range(PARTITIONS)}
    windows_per_device = (BACKLOG_CHUNKS - int(ps.WINDOW_S)) // int(ps.HOP_S) + 1  # the last 2 chunks: evicted
    assert ps.metric_sum(final, "asd_windows_scored_total") == PARTITIONS * DEVICES_PER_PARTITION * windows_per_device
    assert lag_samples(final, "processor", n["audio"]) == {p: 0.0 for p in range(PARTITIONS)}


def run_watching_lag(cmd, env, log_path: Path, port: int, component: str, n: dict, bootstrap: str, *,
                     timeout: float):
    """Start ``cmd``, scrape its lag until caught up, wait for the commits to reach the end, stop
    it. Returns (timeline, seconds to catch up, committed offsets, last scrape, exit code)."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=ps.REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    t_start = time.monotonic()
    try:
        try:
            timeline = watch_lag(lambda: ps.scrape(port), component, n["audio"], timeout=timeout, proc=proc)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log_path.read_text(errors='replace')[-3000:]}") from None
        took = time.monotonic() - t_start
        committed = ps.wait_committed_to_end(bootstrap, n["group"], n["audio"], PARTITIONS, timeout=20)
        final = ps.scrape(port)
    finally:
        rc = ps.stop(proc)
    return timeline, took, committed, final, rc


def test_archiver_reports_its_lag_during_a_backlog(kafka_bootstrap, tmp_path):
    from stream_asd.kafka import ensure_topics

    n = names("lagarch")
    ensure_topics(kafka_bootstrap, {n["audio"]: PARTITIONS})
    fleet_by_partition = backlog_fleet()
    produced = produce_backlog(kafka_bootstrap, n["audio"], fleet_by_partition)
    per_partition = produced // PARTITIONS
    port = ps.free_port()
    healthy = [m.device_id for ms in fleet_by_partition.values() for m in ms]
    # healthy-devices: every chunk is kept at once, but stays uncommitted until its segment is
    # written, FLUSH_IDLE s after the device's last chunk (the whole backlog is one segment each).
    flush_idle = 5
    cmd = [sys.executable, "-m", "stream_asd.cli", "archive", "--bootstrap", kafka_bootstrap,
           "--to", str(tmp_path / "archive"), "--mode", "healthy-devices", "--healthy", *healthy,
           "--group-id", n["group"], "--segment-seconds", "60", "--flush-idle", str(flush_idle),
           "--metrics-port", str(port), "--log-level", "WARNING"]
    env = dict(os.environ, ASD_TOPICS__AUDIO=n["audio"], ASD_METRICS__HOST="127.0.0.1")
    log_path = tmp_path / "archiver.log"
    timeline, took, committed, _, rc = run_watching_lag(cmd, env, log_path, port, "archiver", n, kafka_bootstrap,
                                                        timeout=60)
    peak = {p: max(lags.get(p, 0) for _, lags in timeline) for p in range(PARTITIONS)}
    behind = sum(1 for _, lags in timeline if any(v > 0 for v in lags.values()))
    print(f"archiver lag: backlog {per_partition} chunks per partition, peak {peak}, {behind} scrapes behind, "
          f"caught up {took:.1f} s after start; timeline {compact(timeline)}")
    # Nothing is committed before the segments are written: the whole backlog is the lag.
    assert peak == {p: per_partition for p in range(PARTITIONS)}
    assert committed == {p: per_partition for p in range(PARTITIONS)}
    assert rc == 0, log_path.read_text(errors="replace")[-3000:]
    assert len(list((tmp_path / "archive").rglob("*.flac"))) == len(healthy)


# -- the slow processor worker ----------------------------------------------------------------------
def main() -> int:
    from processor_worker import main as worker_main

    return worker_main(SlowRmsDetector)


if __name__ == "__main__":
    sys.exit(main())
