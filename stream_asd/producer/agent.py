"""The producer agent: many microphones, one confluent-kafka producer, nothing dropped.

Scheduling: every device has a capture timeline ``t0 + phase + k * chunk``; chunk ``k`` is due
when it has been captured (its end, in real time) or at once (``realtime=False``). A heap orders
all devices' chunks by due time, so hundreds of devices interleave in one thread; the phases
spread the devices evenly over a chunk period so the broker sees a steady flow rather than a
burst every second.

Sequence numbers: ``seq = t0 // chunk_ns + k`` (the chunk's index on the wall-clock grid when
the producer started), so a restarted producer continues above the seqs it sent before and the
processor's duplicate filter never swallows fresh audio. Within one run they are contiguous.

Delivery: idempotent producer (``enable.idempotence``, ``acks=all``) with compression and
batching; every chunk gets a delivery report, counted per device. A full local queue raises
``BufferError``: the agent serves delivery reports and retries (back-pressure, never a drop).
On stop (``stop()``, SIGTERM, SIGINT) it stops reading sources, flushes, and reports what the
broker never acknowledged; a second signal abandons the flush.
"""

from __future__ import annotations

import heapq
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

from confluent_kafka import KafkaError, KafkaException, Producer

from ..config import Settings
from ..errors import AsdError
from ..metrics import ProducerMetrics
from ..kafka import producer_conf
from ..wire import ChunkHeader, encode_chunk, float_to_pcm16
from .sources import DeviceSource

log = logging.getLogger(__name__)

# Safe defaults on top of stream_asd.kafka.producer_conf (idempotence, acks=all, lz4, linger,
# aligned message size); any of them can be overridden with producer_overrides.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "queue.buffering.max.messages": 100_000,
    "queue.buffering.max.kbytes": 512 * 1024,  # ~16,000 chunks of 1 s in flight at most
    "message.timeout.ms": 300_000,  # retries for 5 min, then a counted failure
}


class ProducerError(AsdError):
    """The producer cannot reach Kafka or its topic."""


def producer_config(settings: Settings, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """librdkafka configuration: the shared audio producer config, our defaults, then overrides."""
    conf = producer_conf(settings)
    conf.update(PRODUCER_DEFAULTS)
    conf.update(overrides or {})
    return conf


@dataclass
class DeviceCounts:
    device_id: str
    machine_type: str
    sent: int = 0  # handed to the Kafka client
    delivered: int = 0  # acknowledged by the broker
    failed: int = 0  # delivery report with an error (after the client's retries)
    first_seq: int | None = None
    last_seq: int | None = None  # last seq handed to the client
    last_delivered_seq: int | None = None

    @property
    def unacknowledged(self) -> int:
        return self.sent - self.delivered - self.failed


@dataclass
class ProducerReport:
    devices: dict[str, DeviceCounts]
    elapsed_s: float
    stopped_by: str  # "end" (sources/limits exhausted) | "signal" | "stop" | "error"
    queue_full_waits: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(d.sent for d in self.devices.values())

    @property
    def delivered(self) -> int:
        return sum(d.delivered for d in self.devices.values())

    @property
    def failed(self) -> int:
        return sum(d.failed for d in self.devices.values())

    @property
    def unacknowledged(self) -> int:
        return sum(d.unacknowledged for d in self.devices.values())

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.unacknowledged == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent, "delivered": self.delivered, "failed": self.failed,
            "unacknowledged": self.unacknowledged, "devices": len(self.devices),
            "elapsed_s": round(self.elapsed_s, 3),
            "chunks_per_s": round(self.sent / self.elapsed_s, 1) if self.elapsed_s > 0 else None,
            "stopped_by": self.stopped_by, "queue_full_waits": self.queue_full_waits, "errors": self.errors,
            "per_device": {k: {**asdict(v), "unacknowledged": v.unacknowledged} for k, v in self.devices.items()},
        }

    def summary_line(self) -> str:
        rate = f" ({self.sent / self.elapsed_s:.1f} chunks/s)" if self.elapsed_s > 0 else ""
        return (f"produced {self.sent} chunks from {len(self.devices)} devices in {self.elapsed_s:.1f} s{rate}: "
                f"delivered {self.delivered}, failed {self.failed}, unacknowledged {self.unacknowledged} "
                f"(stopped by {self.stopped_by})")


class ProducerAgent:
    """Streams the chunks of many :class:`DeviceSource` objects to one Kafka topic.

    >>> agent = ProducerAgent(settings, sources, realtime=False, max_chunks=30)
    >>> report = agent.run()          # blocks; agent.stop() from another thread ends it early
    >>> report.devices["fan-id_00"].delivered
    30
    """

    def __init__(self, settings: Settings, sources: Sequence[DeviceSource], *, topic: str | None = None,
                 realtime: bool = True, duration_s: float | None = None, max_chunks: int | None = None,
                 producer_overrides: dict[str, Any] | None = None, metrics: ProducerMetrics | None = None,
                 producer_id: str | None = None, start_ns: int | None = None, seq_start: int | None = None,
                 flush_timeout_s: float = 30.0, check_topic: bool = True,
                 on_chunk: Callable[[DeviceSource, ChunkHeader], None] | None = None):
        if not sources:
            raise AsdError("no sources: give audio files/folders, --synthetic N or --capture DEVICE")
        ids = [s.device_id for s in sources]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise AsdError(f"device ids must be unique, repeated: {dup[:5]}")
        self.settings = settings
        self.sources = list(sources)
        self.topic = topic or settings.topics.audio
        self.realtime = realtime
        self.chunk_samples = settings.chunk_samples()
        self.chunk_ns = int(round(settings.audio.chunk_seconds * 1e9))
        self.sample_rate = settings.audio.sample_rate
        self.limit = self._chunk_limit(duration_s, max_chunks, settings.audio.chunk_seconds)
        self.conf = producer_config(settings, producer_overrides)
        self.metrics = metrics
        self.producer_id = producer_id or f"{socket.gethostname()}-{os.getpid()}"
        self.start_ns = start_ns
        self.seq_start = seq_start
        self.flush_timeout_s = flush_timeout_s
        self.check_topic = check_topic
        self.on_chunk = on_chunk
        self.counts = {s.device_id: DeviceCounts(s.device_id, s.machine_type) for s in self.sources}
        self.queue_full_waits = 0
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._stopped_by = "end"
        self._errors: list[str] = []
        self.producer: Producer | None = None

    @staticmethod
    def _chunk_limit(duration_s: float | None, max_chunks: int | None, chunk_s: float) -> int | None:
        limits = []
        if duration_s is not None:
            if duration_s <= 0:
                raise AsdError("--duration must be > 0 seconds")
            limits.append(max(1, int(round(duration_s / chunk_s + 0.4999))))  # ceil, tolerant of float noise
        if max_chunks is not None:
            if max_chunks <= 0:
                raise AsdError("--max-chunks must be > 0")
            limits.append(int(max_chunks))
        return min(limits) if limits else None

    # -- control ------------------------------------------------------------------------------

    def stop(self, reason: str = "stop") -> None:
        """Stop reading sources, flush, return from :meth:`run`. A second call abandons the flush."""
        if self._stop.is_set():
            self._abort.set()
        else:
            self._stopped_by = reason
            self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT -> stop and flush; a second one -> stop waiting for acknowledgements."""

        def handler(signum, _frame):
            name = signal.Signals(signum).name
            if self._stop.is_set():
                log.warning("%s again: abandoning the flush", name)
            else:
                log.info("%s: stopping, flushing unacknowledged chunks (send it again to abandon)", name)
            self.stop("signal")

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    # -- Kafka ----------------------------------------------------------------------------------

    def _open(self) -> Producer:
        errors: list[str] = []

        def on_error(err):  # connection errors arrive here; keep the first few for the message
            if len(errors) < 5:
                errors.append(str(err))

        conf = dict(self.conf)
        conf.setdefault("error_cb", on_error)
        producer = Producer(conf)
        if self.check_topic:
            try:
                md = producer.list_topics(self.topic, timeout=15)
            except KafkaException as exc:
                producer.poll(0)  # serve the queued error callbacks and (deduplicated) librdkafka log lines
                seen = f" ({'; '.join(errors[:2])})" if errors else ""
                raise ProducerError(f"cannot reach Kafka at {self.conf.get('bootstrap.servers')}: {exc}{seen}; "
                                    "start a local broker with `stream-asd broker start` "
                                    "or pass --bootstrap HOST:PORT") from None
            tmd = md.topics.get(self.topic)
            if tmd is None or tmd.error is not None:
                why = tmd.error.str() if tmd is not None and tmd.error is not None else "not in metadata"
                raise ProducerError(f"topic {self.topic!r} is not available ({why}); create it first "
                                    "(e.g. `stream-asd produce --create-topic ...` or the broker's ensure_topics)")
        return producer

    def _on_delivery(self, counts: DeviceCounts, seq: int, err: KafkaError | None, _msg) -> None:
        if err is not None:
            counts.failed += 1
            if len(self._errors) < 20:
                self._errors.append(f"{counts.device_id} seq {seq}: {err.str()}")
            if len(self._errors) <= 3:
                log.error("chunk %s seq %d not delivered: %s", counts.device_id, seq, err.str())
            if self.metrics:
                self.metrics.delivery_failures.labels(reason=err.name()).inc()
            return
        counts.delivered += 1
        if counts.last_delivered_seq is None or seq > counts.last_delivered_seq:
            counts.last_delivered_seq = seq
        if self.metrics:
            self.metrics.chunks_delivered.labels(machine_type=counts.machine_type).inc()

    def _produce(self, producer: Producer, key: bytes, value: bytes, headers, callback) -> bool:
        """Hand one message to the client; on a full queue serve deliveries and retry (never drop).
        Returns False only when a second stop request abandoned the wait."""
        while True:
            try:
                producer.produce(self.topic, value=value, key=key, headers=headers, on_delivery=callback)
                return True
            except BufferError:
                self.queue_full_waits += 1
                if self.metrics:
                    self.metrics.queue_full_waits.inc()
                producer.poll(0.05)
                if self._abort.is_set():
                    return False

    # -- main loop ------------------------------------------------------------------------------

    def run(self) -> ProducerReport:
        producer = self.producer = self._open()
        n_dev = len(self.sources)
        t0_ns = self.start_ns if self.start_ns is not None else time.time_ns()
        seq0 = self.seq_start if self.seq_start is not None else t0_ns // self.chunk_ns
        m0 = time.monotonic_ns()
        if self.metrics:
            self.metrics.devices.set(n_dev)
        # (due monotonic ns, chunk index k, device index i); phase spreads devices over a period.
        phase = [i * self.chunk_ns // n_dev for i in range(n_dev)]
        heap = [(m0 + phase[i] + (self.chunk_ns if self.realtime else 0), 0, i) for i in range(n_dev)]
        heapq.heapify(heap)
        started = time.monotonic()
        log.info("producing %d device(s) to %s on %s (%s, chunk %g s, limit %s chunks/device)", n_dev, self.topic,
                 self.conf.get("bootstrap.servers"), "real time" if self.realtime else "as fast as possible",
                 self.settings.audio.chunk_seconds, self.limit)
        try:
            while heap and not self._stop.is_set():
                due, k, i = heap[0]
                if self.realtime:
                    now = time.monotonic_ns()
                    if now < due:
                        producer.poll(min((due - now) / 1e9, 0.05))  # serve deliveries while waiting
                        continue
                heapq.heappop(heap)
                source = self.sources[i]
                if self.limit is not None and k >= self.limit:
                    continue
                chunk = source.next_chunk(self.chunk_samples)
                if chunk is None:  # source exhausted
                    continue
                capture_ns = chunk.capture_ns if chunk.capture_ns is not None else t0_ns + phase[i] + k * self.chunk_ns
                header = ChunkHeader(device_id=source.device_id, machine_type=source.machine_type, seq=seq0 + k,
                                     capture_ns=capture_ns, producer_id=self.producer_id,
                                     sample_rate=self.sample_rate)
                key, value, headers = encode_chunk(header, float_to_pcm16(chunk.samples))
                counts = self.counts[source.device_id]
                if not self._produce(producer, key, value, headers, partial(self._on_delivery, counts, header.seq)):
                    break
                counts.sent += 1
                if counts.first_seq is None:
                    counts.first_seq = header.seq
                counts.last_seq = header.seq
                if self.metrics:
                    self.metrics.chunks_sent.labels(machine_type=source.machine_type).inc()
                    self.metrics.bytes_sent.inc(len(value))
                if self.on_chunk is not None:
                    self.on_chunk(source, header)
                producer.poll(0)
                next_due = due + self.chunk_ns if self.realtime else due
                heapq.heappush(heap, (next_due, k + 1, i))
        except AsdError as exc:
            self._stopped_by = "error"
            self._errors.append(str(exc))
            log.error("%s", exc)
        finally:
            self._flush(producer)
            for source in self.sources:
                source.close()
            self.producer = None  # the client's threads end with it (no reconnect noise later)
        return ProducerReport(self.counts, time.monotonic() - started, self._stopped_by, self.queue_full_waits,
                              list(self._errors))

    def _flush(self, producer: Producer) -> None:
        """Wait for delivery reports in short slices so that a second signal can cut it short."""
        deadline = time.monotonic() + self.flush_timeout_s
        remaining = len(producer)
        while remaining and not self._abort.is_set() and time.monotonic() < deadline:
            remaining = producer.flush(0.2)
        if remaining:
            log.warning("%d chunk(s) left unacknowledged after the flush", remaining)
