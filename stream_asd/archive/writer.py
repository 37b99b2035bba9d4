"""The archiver: normal audio from ``asd.audio`` to FLAC segments, for retraining.

Which audio is kept (``mode``):

- ``normal-only`` (default): a chunk is kept when the windows that cover it have been scored
  (``asd.scores``) and none of them was anomalous (``is_anomaly`` false). A re-score of the
  same window (same ``window_id``) that disagrees counts as anomalous: doubt drops the chunk.
  A chunk is decided as soon as a window starting after it has been scored (the processor
  scores a device's windows in order), or after ``decision_timeout_s`` with what is known
  (no covering window then: dropped as ``unscored``, e.g. windows skipped by the gap policy).
- ``healthy-devices``: all audio of the devices named ``healthy``; no scores needed.
  In ``normal-only`` mode the devices named ``healthy`` are also kept without scores.

Durability and offsets (the no-loss rule): a chunk's offset is *outstanding* from the moment
it is consumed until it is either dropped (decided) or inside a FLAC segment that has been
written durably (temp file, fsync, rename, fsync the folder; or an acknowledged PUT) *and*
listed in the partition's manifest. Per partition the archiver commits the lowest outstanding
offset (or the next one when none is outstanding). A SIGKILL therefore loses nothing: what
was not durable is consumed again; what was durable but not committed is recognised from the
manifest (seq ranges per device and date) and not written twice.

Memory: pending chunks wait for their scores; past ``max_pending_bytes`` the audio consumer
pauses (scores keep flowing) until decisions free room.

Consumer lag: after every commit and every ``commit_interval_s`` the archiver sets
``asd_consumer_lag_records{component="archiver"}`` per owned partition of ``asd.audio``: the
high watermark librdkafka took from its last fetch (``get_watermark_offsets(cached=True)``, no
request) minus the committed offset (before the first commit: the first offset consumed). A
paused consumer fetches nothing, so while paused the periodic refresh asks the broker instead
(one ListOffsets per partition per interval, never per message).
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import logging
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import numpy as np

from ..errors import BrokerError, WireFormatError
from ..wire import AudioChunk, ScoreRecord, decode_chunk, processing_error
from .store import ENTRY_SCHEMA, ArchiveStore, partition_rel, segment_name

log = logging.getLogger(__name__)

MODE_NORMAL = "normal-only"
MODE_HEALTHY = "healthy-devices"
MODES = (MODE_NORMAL, MODE_HEALTHY)

KEEP = "kept"
DROP_ANOMALOUS = "dropped_anomalous"
DROP_UNSCORED = "dropped_unscored"
DROP_NOT_HEALTHY = "dropped_not_healthy"
DUPLICATE = "duplicate"
INVALID = "invalid"


@dataclass
class ArchiverOptions:
    mode: str = MODE_NORMAL
    healthy: frozenset[str] = frozenset()
    segment_seconds: float = 60.0  # longest FLAC segment
    flush_idle_s: float = 10.0  # close a device's open segment after this much quiet
    decision_timeout_s: float = 300.0  # longest wait for the scores of a chunk
    commit_interval_s: float = 2.0
    max_pending_bytes: int = 256 << 20
    max_age_days: float | None = None  # retention by age (whole date partitions)
    max_total_bytes: int | None = None  # retention by size (oldest segments first)
    retention_interval_s: float = 300.0
    scores_lookback_s: float = 3600.0  # on start, read scores from this far back


# ---------------------------------------------------------------------------------------------
# Keep-or-drop from scored windows


class WindowJudgements:
    """Scored windows per device (from ``asd.scores``), and the keep/drop rule for a chunk."""

    def __init__(self) -> None:
        self._windows: dict[str, dict[str, tuple[int, int, bool]]] = defaultdict(dict)
        self._max_first: dict[str, int] = {}

    def add(self, rec: ScoreRecord) -> None:
        old = self._windows[rec.device_id].get(rec.window_id)
        anomalous = bool(rec.is_anomaly) or (old is not None and old[2])
        self._windows[rec.device_id][rec.window_id] = (rec.first_seq, rec.last_seq, anomalous)
        self._max_first[rec.device_id] = max(self._max_first.get(rec.device_id, -1), rec.first_seq)

    def decide(self, device_id: str, seq: int, timed_out: bool) -> str | None:
        """KEEP / DROP_* once decidable, else None (wait for more scores)."""
        covering = [w for w in self._windows.get(device_id, {}).values() if w[0] <= seq <= w[1]]
        if any(w[2] for w in covering):
            return DROP_ANOMALOUS  # no later window can make it normal again
        complete = self._max_first.get(device_id, -1) > seq
        if not (complete or timed_out):
            return None
        return KEEP if covering else DROP_UNSCORED

    def prune(self, device_id: str, below_seq: int) -> None:
        wins = self._windows.get(device_id)
        if wins:
            for wid in [k for k, w in wins.items() if w[1] < below_seq]:
                del wins[wid]


# ---------------------------------------------------------------------------------------------
# Offsets


class OffsetTracker:
    """Lowest outstanding offset per partition (heap with lazy deletion)."""

    def __init__(self) -> None:
        self._heap: dict[int, list[int]] = defaultdict(list)
        self._done: dict[int, set[int]] = defaultdict(set)
        self._next: dict[int, int] = {}
        self._committed: dict[int, int] = {}
        self._first: dict[int, int] = {}  # first offset consumed: where the group's commit stood

    def consumed(self, partition: int, offset: int) -> None:
        self._first.setdefault(partition, offset)
        heapq.heappush(self._heap[partition], offset)
        self._next[partition] = max(self._next.get(partition, 0), offset + 1)

    def done(self, partition: int, offset: int) -> None:
        self._done[partition].add(offset)

    def position(self, partition: int) -> int | None:
        heap, done = self._heap[partition], self._done[partition]
        while heap and heap[0] in done:
            done.discard(heapq.heappop(heap))
        if heap:
            return heap[0]
        return self._next.get(partition)

    def to_commit(self) -> dict[int, int]:
        out = {}
        for p in list(self._next):
            pos = self.position(p)
            if pos is not None and pos != self._committed.get(p):
                out[p] = pos
        return out

    def committed(self, positions: dict[int, int]) -> None:
        self._committed.update(positions)

    def committed_or_start(self, partition: int) -> int | None:
        """The last offset committed here, else the first consumed; None before any message."""
        return self._committed.get(partition, self._first.get(partition))

    def forget(self, partition: int) -> None:
        for d in (self._heap, self._done, self._next, self._committed, self._first):
            d.pop(partition, None)

    def outstanding(self) -> int:
        return sum(len(h) - len(self._done[p]) for p, h in self._heap.items())


# ---------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    partition: int
    offset: int
    chunk: AudioChunk
    since: float


@dataclass
class _Segment:
    machine_type: str
    device_id: str
    date: str
    sample_rate: int
    chunks: list[_Pending] = field(default_factory=list)
    last_append: float = 0.0

    @property
    def last_seq(self) -> int:
        return self.chunks[-1].chunk.seq

    def samples(self) -> int:
        return sum(p.chunk.n_samples for p in self.chunks)


def _utc_date(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%d")


class SegmentWriter:
    """Open segments per device; durable FLAC + manifest writes; de-duplication by manifest."""

    def __init__(self, store: ArchiveStore, options: ArchiverOptions,
                 on_written: Callable[[list[_Pending]], None], metrics: Any = None):
        self.store = store
        self.options = options
        self.on_written = on_written
        self.metrics = metrics
        self.open: dict[str, _Segment] = {}
        self._manifests: dict[str, list[dict[str, Any]]] = {}
        self.files_written = 0
        self.bytes_written = 0

    def _entries(self, rel: str) -> list[dict[str, Any]]:
        if rel not in self._manifests:
            self._manifests[rel] = self.store.load_partition(rel)
        return self._manifests[rel]

    def already_archived(self, chunk: AudioChunk) -> bool:
        h = chunk.header
        rel = partition_rel(h.machine_type, h.device_id, _utc_date(h.capture_ns))
        seg = self.open.get(h.device_id)
        if seg is not None and any(p.chunk.seq == h.seq for p in seg.chunks):
            return True
        # The exact ids, not the folder: an archive written before archive_name() may hold
        # several devices' segments in one folder.
        return any(e["first_seq"] <= h.seq <= e["last_seq"] and e["device_id"] == h.device_id
                   and e["machine_type"] == h.machine_type for e in self._entries(rel))

    def add(self, p: _Pending, now: float) -> None:
        h = p.chunk.header
        date = _utc_date(h.capture_ns)
        seg = self.open.get(h.device_id)
        if seg is not None and (seg.date != date or seg.sample_rate != h.sample_rate or h.seq != seg.last_seq + 1
                                or seg.machine_type != h.machine_type):
            self.flush(h.device_id)
            seg = None
        if seg is None:
            seg = self.open[h.device_id] = _Segment(h.machine_type, h.device_id, date, h.sample_rate)
        seg.chunks.append(p)
        seg.last_append = now
        if seg.samples() >= self.options.segment_seconds * seg.sample_rate:
            self.flush(h.device_id)

    def flush_due(self, now: float) -> None:
        for dev in [d for d, s in self.open.items() if now - s.last_append >= self.options.flush_idle_s]:
            self.flush(dev)

    def flush_partitions(self, partitions: set[int]) -> None:
        for dev in [d for d, s in self.open.items() if s.chunks and s.chunks[0].partition in partitions]:
            self.flush(dev)

    def flush_all(self) -> None:
        for dev in list(self.open):
            self.flush(dev)

    def flush(self, device_id: str) -> None:
        seg = self.open.pop(device_id, None)
        if seg is None or not seg.chunks:
            return
        import soundfile as sf

        first, last = seg.chunks[0].chunk, seg.chunks[-1].chunk
        rel = partition_rel(seg.machine_type, seg.device_id, seg.date)
        name = segment_name(seg.device_id, first.seq, last.seq)
        pcm = np.concatenate([p.chunk.pcm for p in seg.chunks]).astype(np.int16, copy=False)
        entry: dict[str, Any] = {
            "schema": ENTRY_SCHEMA, "file": name, "device_id": seg.device_id, "machine_type": seg.machine_type,
            "date": seg.date, "first_seq": first.seq, "last_seq": last.seq, "n_chunks": len(seg.chunks),
            "samples": int(pcm.shape[0]), "sample_rate": seg.sample_rate,
            "capture_start_ns": first.header.capture_ns, "capture_end_ns": last.header.capture_ns
            + int(last.n_samples * 1e9 / seg.sample_rate),
            "chunk_samples": [p.chunk.n_samples for p in seg.chunks] if len({p.chunk.n_samples for p in seg.chunks}) > 1
            else seg.chunks[0].chunk.n_samples,
            "producer_id": first.header.producer_id,
        }
        buf = io.BytesIO()
        with sf.SoundFile(buf, "w", samplerate=seg.sample_rate, channels=1, format="FLAC", subtype="PCM_16") as f:
            f.comment = json.dumps(entry, separators=(",", ":"), sort_keys=True)  # self-describing file
            f.write(pcm)
        data = buf.getvalue()
        full = dict(entry, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
                    written_at=datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"))
        entries = self._entries(rel)
        self.store.write(f"{rel}/{name}", data)  # 1. the file, durable and atomic
        entries[:] = [e for e in entries if e["file"] != name] + [full]
        self.store.write_manifest(rel, entries)  # 2. the index
        self.files_written += 1
        self.bytes_written += len(data)
        if self.metrics is not None:
            self.metrics.segments.inc()
            self.metrics.bytes.inc(len(data))
        self.on_written(seg.chunks)  # 3. only now may the offsets move past these chunks

    def buffered_bytes(self) -> int:
        return sum(p.chunk.n_samples * 2 for s in self.open.values() for p in s.chunks)

    # -- retention -----------------------------------------------------------------------------

    def enforce_retention(self, now: datetime | None = None) -> dict[str, int]:
        """Delete whole date partitions older than ``max_age_days``, then the oldest segments
        until the archive holds at most ``max_total_bytes``. File first, then the manifest:
        a crash in between leaves a manifest entry without a file, which readers skip and
        the next load drops."""
        opts = self.options
        now = now or datetime.now(timezone.utc)
        removed = {"age": 0, "size": 0}
        open_rels = {partition_rel(s.machine_type, s.device_id, s.date) for s in self.open.values()}
        parts = list(self.store.partitions())
        if opts.max_age_days is not None:
            cutoff = (now - timedelta(days=opts.max_age_days)).strftime("%Y-%m-%d")
            for mt, dev, date in parts:
                rel = f"{mt}/{dev}/{date}"
                if date < cutoff and rel not in open_rels:
                    for e in self.store.load_partition(rel):
                        self.store.delete(f"{rel}/{e['file']}")
                        removed["age"] += 1
                    self.store.delete(f"{rel}/manifest.jsonl")
                    self.store.remove_empty_dirs(rel)
                    self._manifests.pop(rel, None)
            parts = list(self.store.partitions())
        if opts.max_total_bytes is not None:
            all_entries = []
            for mt, dev, date in parts:
                rel = f"{mt}/{dev}/{date}"
                for e in self.store.load_partition(rel):
                    all_entries.append((e["capture_start_ns"], rel, e))
            total = sum(e["bytes"] for _, _, e in all_entries)
            touched: dict[str, set[str]] = defaultdict(set)
            for _, rel, e in sorted(all_entries, key=lambda t: t[0]):
                if total <= opts.max_total_bytes:
                    break
                self.store.delete(f"{rel}/{e['file']}")
                touched[rel].add(e["file"])
                total -= e["bytes"]
                removed["size"] += 1
            for rel, files in touched.items():
                left = [e for e in self.store.read_manifest(rel) if e["file"] not in files]
                if left:
                    self.store.write_manifest(rel, left)
                else:
                    self.store.delete(f"{rel}/manifest.jsonl")
                    self.store.remove_empty_dirs(rel)
                self._manifests.pop(rel, None)
        if self.metrics is not None:
            for reason, n in removed.items():
                if n:
                    self.metrics.retention_deleted.labels(reason=reason).inc(n)
        if removed["age"] or removed["size"]:
            log.info("archive retention removed %d segments by age, %d by size", removed["age"], removed["size"])
        return removed


# ---------------------------------------------------------------------------------------------


class Archiver:
    """Consumes ``asd.audio`` (its own group) and ``asd.scores``; writes normal audio."""

    def __init__(self, kafka_conf: dict[str, Any], store: ArchiveStore, options: ArchiverOptions, *,
                 audio_topic: str = "asd.audio", scores_topic: str = "asd.scores",
                 group_id: str = "stream-asd-archiver", metrics: Any = None):
        if options.mode not in MODES:
            raise ValueError(f"mode {options.mode!r}: use one of {MODES}")
        self.kafka_conf = dict(kafka_conf)
        self.store = store
        self.options = options
        self.audio_topic = audio_topic
        self.scores_topic = scores_topic
        self.group_id = group_id
        self.metrics = metrics
        self.judgements = WindowJudgements()
        self.offsets = OffsetTracker()
        self.pending: dict[str, deque[_Pending]] = defaultdict(deque)
        self.pending_bytes = 0
        self.counts: dict[str, int] = defaultdict(int)
        self.writer = SegmentWriter(store, options, self._written, metrics)
        self._consumer: Any = None
        self._scores: Any = None
        self._paused = False
        self._stop = False

    # -- bookkeeping ---------------------------------------------------------------------------

    def _count(self, what: str, n: int = 1) -> None:
        self.counts[what] += n
        if self.metrics is not None:
            self.metrics.chunks.labels(result=what).inc(n)

    def _written(self, chunks: list[_Pending]) -> None:
        for p in chunks:
            self.offsets.done(p.partition, p.offset)
        self._count(KEEP, len(chunks))
        self._commit()

    def _commit(self) -> None:
        from confluent_kafka import TopicPartition

        positions = self.offsets.to_commit()
        if not positions or self._consumer is None:
            return
        tps = [TopicPartition(self.audio_topic, p, o) for p, o in positions.items()]
        try:
            self._consumer.commit(offsets=tps, asynchronous=False)
        except Exception as exc:  # noqa: BLE001 - e.g. during a rebalance; retried next interval
            log.warning("archiver: offset commit failed (%s); will retry", exc)
            return
        self.offsets.committed(positions)
        self._refresh_lag()

    def _refresh_lag(self, *, ask_broker_if_paused: bool = False) -> None:
        """``asd_consumer_lag_records`` of the owned partitions (see the module docstring)."""
        lag_metric = getattr(self.metrics, "consumer_lag", None)
        if lag_metric is None or self._consumer is None:
            return
        from ..metrics import lag_records

        try:
            tps = [tp for tp in self._consumer.assignment() if tp.topic == self.audio_topic]
        except Exception:  # noqa: BLE001 - consumer closing
            return
        lags: dict[tuple[str, int], int] = {}
        for tp in tps:
            high = None
            if ask_broker_if_paused and self._paused:
                try:
                    high = self._consumer.get_watermark_offsets(tp, timeout=1.0, cached=False)[1]
                except Exception:  # noqa: BLE001 - broker slow: the cached value below
                    high = None
            if high is None:
                try:
                    high = self._consumer.get_watermark_offsets(tp, cached=True)[1]
                except Exception:  # noqa: BLE001
                    high = None
            base = self.offsets.committed_or_start(tp.partition)
            if base is None and high == 0:
                base = 0  # an empty partition
            lag = lag_records(high, base)
            if lag is not None:
                lags[(tp.topic, tp.partition)] = lag
        lag_metric.update(lags, owned={(tp.topic, tp.partition) for tp in tps})

    # -- message handling ----------------------------------------------------------------------

    def handle_audio(self, partition: int, offset: int, key: Any, value: Any, headers: Any, now: float) -> None:
        self.offsets.consumed(partition, offset)
        try:
            chunk = decode_chunk(key, value, headers, expected_sample_rate=None)
            dev = chunk.device_id
            if self.options.mode == MODE_HEALTHY and dev not in self.options.healthy:
                self.offsets.done(partition, offset)
                self._count(DROP_NOT_HEALTHY)
                return
            pending = _Pending(partition, offset, chunk, now)
            size = len(value)
        except WireFormatError:
            self.offsets.done(partition, offset)  # the processor dead-letters it; nothing to archive
            self._count(INVALID)
            return
        except Exception as exc:  # a bug must not crash-loop the archiver on one message: skip it
            log.exception("archiver: %s[%d]@%d could not be handled (%s); skipped",
                          self.audio_topic, partition, offset, processing_error(exc).detail)
            self.offsets.done(partition, offset)
            self._count(INVALID)
            return
        self.pending[dev].append(pending)
        self.pending_bytes += size

    def handle_score(self, value: bytes) -> None:
        try:
            rec = ScoreRecord.from_json(value)
        except WireFormatError as exc:
            log.debug("archiver: ignoring a score record: %s", exc)
            return
        self.judgements.add(rec)

    def decide(self, now: float) -> None:
        """Drain each device's pending chunks in order while they are decidable."""
        for dev, queue in self.pending.items():
            while queue:
                p = queue[0]
                if self.writer.already_archived(p.chunk):
                    verdict = DUPLICATE
                elif dev in self.options.healthy:
                    verdict = KEEP
                else:
                    verdict = self.judgements.decide(dev, p.chunk.seq, now - p.since >= self.options.decision_timeout_s)
                if verdict is None:
                    break
                queue.popleft()
                self.pending_bytes -= p.chunk.n_samples * 2
                if verdict == KEEP:
                    self.writer.add(p, now)  # offset stays outstanding until the segment is durable
                else:
                    self.offsets.done(p.partition, p.offset)
                    self._count(verdict)
            if queue:
                self.judgements.prune(dev, queue[0].chunk.seq - 1000)

    # -- Kafka ---------------------------------------------------------------------------------

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        log.info("archiver: assigned %s", sorted(tp.partition for tp in partitions))
        lag_metric = getattr(self.metrics, "consumer_lag", None)
        if lag_metric is not None:
            lag_metric.remove(lag_metric.partitions() - {(tp.topic, tp.partition) for tp in partitions})

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        revoked = {tp.partition for tp in partitions}
        log.info("archiver: revoked %s", sorted(revoked))
        self.writer.flush_partitions(revoked)
        self._commit()
        for dev in list(self.pending):
            q = self.pending[dev]
            keep = deque(p for p in q if p.partition not in revoked)
            self.pending_bytes -= sum(p.chunk.n_samples * 2 for p in q if p.partition in revoked)
            self.pending[dev] = keep
        for p in revoked:
            self.offsets.forget(p)
        lag_metric = getattr(self.metrics, "consumer_lag", None)
        if lag_metric is not None:  # the partitions' new owner reports their lag
            lag_metric.remove((self.audio_topic, p) for p in revoked)

    def _open_scores(self) -> Any:
        from confluent_kafka import Consumer, KafkaException, TopicPartition

        conf = {k: v for k, v in self.kafka_conf.items() if k != "group.instance.id"}
        conf.update({"group.id": f"{self.group_id}-scores-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
                     "auto.offset.reset": "earliest"})
        c = Consumer(conf)
        try:
            md = c.list_topics(self.scores_topic, timeout=15)
        except KafkaException as exc:
            c.close()
            raise BrokerError(f"cannot reach Kafka at {conf.get('bootstrap.servers')} to read {self.scores_topic}: "
                              f"{exc.args[0].str() if exc.args else exc}; start a local broker with "
                              "`stream-asd broker start` or pass --bootstrap HOST:PORT") from None
        topic = md.topics.get(self.scores_topic)
        if topic is None or topic.error is not None or not topic.partitions:
            c.close()
            raise BrokerError(f"topic {self.scores_topic} not found; start the processor (or create topics) first")
        since_ms = int((time.time() - self.options.scores_lookback_s) * 1000)
        tps = [TopicPartition(self.scores_topic, p, since_ms) for p in topic.partitions]
        offsets = c.offsets_for_times(tps, timeout=15)
        c.assign([TopicPartition(self.scores_topic, tp.partition, tp.offset if tp.offset >= 0 else -1)
                  for tp in offsets])  # -1 (end) when nothing that recent
        return c

    def run(self, *, max_seconds: float | None = None, stop_when_idle_s: float | None = None) -> dict[str, Any]:
        """Archive until ``stop()`` (SIGTERM), ``max_seconds``, or no audio for ``stop_when_idle_s``."""
        from confluent_kafka import Consumer

        conf = dict(self.kafka_conf)
        conf.update({"group.id": self.group_id, "enable.auto.commit": False, "auto.offset.reset": "earliest",
                     "enable.partition.eof": False})
        self.store.sweep_temporary()
        self._consumer = Consumer(conf)
        self._consumer.subscribe([self.audio_topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        if self.options.mode == MODE_NORMAL:
            self._scores = self._open_scores()
        start = last_audio = last_commit = time.monotonic()
        last_retention = 0.0
        try:
            while not self._stop:
                now = time.monotonic()
                if max_seconds is not None and now - start > max_seconds:
                    break
                if stop_when_idle_s is not None and now - last_audio > stop_when_idle_s and not any(self.pending.values()):
                    break
                if self._scores is not None:
                    for _ in range(20):
                        batch = self._scores.consume(num_messages=1000, timeout=0.05)
                        for m in batch:
                            if m.error() is None:
                                self.handle_score(m.value())
                        if len(batch) < 1000:
                            break
                msgs = self._consumer.consume(num_messages=500, timeout=0.2)
                now = time.monotonic()
                for m in msgs:
                    if m.error() is not None:
                        log.warning("archiver: consume error %s", m.error())
                        continue
                    last_audio = now
                    self.handle_audio(m.partition(), m.offset(), m.key(), m.value(), m.headers(), now)
                self.decide(now)
                self.writer.flush_due(now)
                self._backpressure()
                if now - last_commit >= self.options.commit_interval_s:
                    self._commit()
                    self._refresh_lag(ask_broker_if_paused=True)
                    last_commit = now
                if (self.options.max_age_days is not None or self.options.max_total_bytes is not None) and \
                        now - last_retention >= self.options.retention_interval_s:
                    self.writer.enforce_retention()
                    last_retention = now
            self.writer.flush_all()
            self._commit()
        finally:
            for c in (self._consumer, self._scores):
                if c is not None:
                    try:
                        c.close()
                    except Exception:  # noqa: BLE001
                        pass
            self._consumer = self._scores = None
        return self.summary()

    def _backpressure(self) -> None:
        too_much = self.pending_bytes + self.writer.buffered_bytes() > self.options.max_pending_bytes
        if too_much and not self._paused:
            self._consumer.pause(self._consumer.assignment())
            self._paused = True
            log.warning("archiver: %d bytes waiting for scores; pausing asd.audio", self.pending_bytes)
        elif not too_much and self._paused:
            self._consumer.resume(self._consumer.assignment())
            self._paused = False

    def stop(self) -> None:
        self._stop = True

    def summary(self) -> dict[str, Any]:
        return {"chunks": dict(self.counts), "files_written": self.writer.files_written,
                "bytes_written": self.writer.bytes_written, "pending": sum(len(q) for q in self.pending.values())}
