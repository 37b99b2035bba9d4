"""Prometheus metrics of stream-asd: one place where every ``asd_*`` series is defined.

Conventions: base units (seconds, bytes), ``_total`` counters, histograms for latencies, no
``device_id`` label on histograms (cardinality). The per-device gauges go through
:class:`DeviceSeries`: removed when the processor forgets a device, and capped at
``metrics.max_device_series`` devices (device ids come straight from the messages). Faust's
own sensor names break Prometheus conventions, so we define ours.

Consumer lag (``asd_consumer_lag_records``): the processor and the archiver each export their
own, per partition, through :class:`ConsumerLag`, from the high watermarks their Kafka client
already holds (no broker round trip per message); a revoked partition's series is removed.

Each process builds its own :class:`ProducerMetrics` / :class:`ProcessorMetrics` on a registry
(the default one in production; a fresh one per test) and serves it with :func:`serve`.
"""

from __future__ import annotations

import weakref

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120)
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _registry(registry: CollectorRegistry | None) -> CollectorRegistry:
    # prometheus_client reads registry=None as "do not register": default to the process registry.
    return REGISTRY if registry is None else registry


class ProducerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = _registry(registry)
        self.chunks_sent = Counter("asd_producer_chunks_total", "Audio chunks handed to the Kafka client",
                                   ["machine_type"], registry=r)
        self.chunks_delivered = Counter("asd_producer_delivered_total",
                                        "Audio chunks acknowledged by the broker (delivery reports)",
                                        ["machine_type"], registry=r)
        self.delivery_failures = Counter("asd_producer_delivery_failures_total",
                                         "Audio chunks the broker did not acknowledge after retries",
                                         ["reason"], registry=r)
        self.bytes_sent = Counter("asd_producer_bytes_total", "Payload bytes handed to the Kafka client", registry=r)
        self.queue_full_waits = Counter("asd_producer_queue_full_total",
                                        "Times the producer waited on a full local queue (back-pressure)", registry=r)
        self.devices = Gauge("asd_producer_devices", "Microphones served by this producer", registry=r)


CONSUMER_LAG_HELP = ("Records of the partition not yet committed by this consumer: the partition's high "
                     "watermark as last seen by the client minus the committed offset (before the first "
                     "commit, the offset the consumer started at)")


_LAG_GAUGES: "weakref.WeakKeyDictionary[CollectorRegistry, Gauge]" = weakref.WeakKeyDictionary()


def _consumer_lag_gauge(r: CollectorRegistry) -> Gauge:
    # One gauge per registry, shared by the components of one process (label ``component``):
    # a processor and an archiver on the same registry must not register the name twice.
    gauge = _LAG_GAUGES.get(r)
    if gauge is None:
        gauge = _LAG_GAUGES[r] = Gauge("asd_consumer_lag_records", CONSUMER_LAG_HELP,
                                       ["component", "topic", "partition"], registry=r)
    return gauge


class ConsumerLag:
    """``asd_consumer_lag_records{component, topic, partition}`` of one consumer.

    :meth:`update` sets the lag of the partitions given and removes the series of partitions
    the consumer no longer owns; :meth:`remove` drops partitions at revocation. Lag is
    ``max(0, high watermark - committed offset)`` (see :func:`lag_records`).
    """

    def __init__(self, gauge: Gauge, component: str):
        self.gauge = gauge
        self.component = component
        self._series: set[tuple[str, int]] = set()

    def set(self, topic: str, partition: int, lag: int) -> None:
        self.gauge.labels(component=self.component, topic=topic, partition=str(partition)).set(lag)
        self._series.add((topic, int(partition)))

    def update(self, lags: dict[tuple[str, int], int], owned: set[tuple[str, int]] | None = None) -> None:
        """Set the lags given. The series of partitions not in ``owned`` (default: the keys of
        ``lags``) go; an owned partition whose lag is unknown just now keeps its last value."""
        owned = set(lags) if owned is None else owned | set(lags)
        self.remove(self._series - owned)
        for (topic, partition), lag in lags.items():
            self.set(topic, partition, lag)

    def remove(self, partitions) -> None:
        for topic, partition in list(partitions):
            key = (topic, int(partition))
            if key in self._series:
                self._series.discard(key)
                try:
                    self.gauge.remove(self.component, topic, str(partition))
                except KeyError:
                    pass

    def partitions(self) -> set[tuple[str, int]]:
        return set(self._series)


def lag_records(high_watermark: int | None, base: int | None) -> int | None:
    """Records from ``base`` (committed offset) up to the high watermark; None when either is unknown."""
    if high_watermark is None or base is None or high_watermark < 0 or base < 0:
        return None
    return max(0, int(high_watermark) - int(base))


class ProcessorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = _registry(registry)
        self.chunks_consumed = Counter("asd_chunks_consumed_total", "Audio chunks read from asd.audio",
                                       ["machine_type"], registry=r)
        self.chunks_duplicate = Counter("asd_chunks_duplicate_total", "Chunks dropped as duplicates (seq seen)",
                                        registry=r)
        self.chunks_late = Counter("asd_chunks_late_total", "Chunks older than the window being assembled",
                                   registry=r)
        self.windows_scored = Counter("asd_windows_scored_total", "Windows scored",
                                      ["machine_type"], registry=r)
        self.windows_skipped = Counter("asd_windows_skipped_total", "Windows not scored, by reason (gap policy)",
                                       ["reason"], registry=r)
        self.windows_gap_filled = Counter("asd_windows_gap_filled_total", "Windows scored with zero-filled gaps",
                                          registry=r)
        self.batch_size = Histogram("asd_batch_size_windows", "Windows per inference batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.inference_seconds = Histogram("asd_inference_seconds", "Model time per inference batch",
                                           ["device"], buckets=INFERENCE_BUCKETS, registry=r)
        self.capture_to_score = Histogram("asd_capture_to_score_seconds",
                                          "From capture of a window's last chunk to its score",
                                          ["machine_type"], buckets=LATENCY_BUCKETS, registry=r)
        self.anomalies = Counter("asd_anomalous_windows_total", "Windows over their threshold",
                                 ["machine_type"], registry=r)
        self.alerts = Counter("asd_alerts_total", "Alert state changes", ["machine_type", "state"], registry=r)
        self.alerts_active = Gauge("asd_alerts_active", "Devices currently in alert", ["machine_type"], registry=r)
        self.dlq = Counter("asd_dlq_messages_total", "Messages sent to the dead-letter topic", ["reason"], registry=r)
        self.active_devices = Gauge("asd_active_devices", "Devices with buffered state on this worker", registry=r)
        self.last_score = Gauge("asd_device_last_score", "Last ensemble score per device",
                                ["device_id", "machine_type"], registry=r)
        self.threshold = Gauge("asd_device_threshold", "Decision threshold in force per device",
                               ["device_id", "machine_type"], registry=r)
        self.device_series_dropped = Counter(
            "asd_device_series_dropped_total", "Devices given no asd_device_* series because "
            "metrics.max_device_series devices already had them", registry=r)
        self.model_info = Info("asd_model", "Model bundle in use", registry=r)
        self.model_loaded_at = Gauge("asd_model_loaded_timestamp_seconds", "When the model in use was loaded",
                                     registry=r)
        self.model_reloads = Counter("asd_model_reloads_total", "Model reload attempts by result: ok (swapped in), failure (could not be loaded or verified), rejected (loaded but does not fit this processor)",
                                     ["result"], registry=r)
        # Offset accounting (processor/offsets.py).
        self.chunks_head = Counter("asd_chunks_head_total",
                                   "Chunks before the first window of a device this worker just began "
                                   "reading (re-reads after a restart or rebalance)", registry=r)
        self.chunks_uncommitted = Gauge("asd_chunks_uncommitted",
                                        "Chunks read whose offsets cannot be committed yet (windows not scored)",
                                        registry=r)
        self.offset_commits = Counter("asd_offset_commits_total", "Offset commits by result", ["result"],
                                      registry=r)
        self.windows_in_flight = Gauge("asd_windows_in_flight", "Windows decided but not yet scored and acknowledged",
                                       registry=r)
        self.consumer_lag = ConsumerLag(_consumer_lag_gauge(r), "processor")


class DeviceSeries:
    """The per-device gauges (``asd_device_last_score``, ``asd_device_threshold``) of at most
    ``limit`` devices.

    A device gets its series on its first score while fewer than ``limit`` devices have them;
    past that it gets none and ``asd_device_series_dropped_total`` counts it once (until it is
    removed). :meth:`remove` drops a device's series when the processor forgets the device
    (idle eviction, revoked partition), which frees its place.
    """

    def __init__(self, metrics: ProcessorMetrics, limit: int):
        self.metrics = metrics
        self.limit = limit
        self._machine_type: dict[str, str] = {}  # device -> machine_type label of its series
        self._refused: set[str] = set()  # devices counted as dropped (no series)

    def set(self, device_id: str, machine_type: str, score: float, threshold: float) -> None:
        old = self._machine_type.get(device_id)
        if old is None:
            if len(self._machine_type) >= self.limit:
                if device_id not in self._refused:
                    self._refused.add(device_id)
                    self.metrics.device_series_dropped.inc()
                return
            self._refused.discard(device_id)
        elif old != machine_type:
            self._remove_labels(device_id, old)
        self._machine_type[device_id] = machine_type
        self.metrics.last_score.labels(device_id=device_id, machine_type=machine_type).set(score)
        self.metrics.threshold.labels(device_id=device_id, machine_type=machine_type).set(threshold)

    def remove(self, device_id: str) -> None:
        self._refused.discard(device_id)
        machine_type = self._machine_type.pop(device_id, None)
        if machine_type is not None:
            self._remove_labels(device_id, machine_type)

    def _remove_labels(self, device_id: str, machine_type: str) -> None:
        for gauge in (self.metrics.last_score, self.metrics.threshold):
            try:
                gauge.remove(device_id, machine_type)
            except KeyError:
                pass

    def __len__(self) -> int:
        return len(self._machine_type)


def serve(port: int, host: str = "0.0.0.0", registry: CollectorRegistry | None = None):
    """Serve /metrics over HTTP in a background thread; port 0 disables. Returns the server or None."""
    if not port:
        return None
    kwargs = {"registry": registry} if registry is not None else {}
    server, _thread = start_http_server(port, addr=host, **kwargs)
    return server


class ArchiverMetrics:
    """The archiver's series (added by the learning part; additive to the contract above)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = _registry(registry)
        self.chunks = Counter("asd_archive_chunks_total", "Audio chunks the archiver decided on, by result "
                              "(kept, dropped_anomalous, dropped_unscored, dropped_not_healthy, duplicate, invalid)",
                              ["result"], registry=r)
        self.segments = Counter("asd_archive_segments_total", "FLAC segments written durably", registry=r)
        self.bytes = Counter("asd_archive_bytes_total", "FLAC bytes written durably", registry=r)
        self.retention_deleted = Counter("asd_archive_retention_deleted_total", "Segments deleted by retention",
                                         ["reason"], registry=r)
        self.consumer_lag = ConsumerLag(_consumer_lag_gauge(r), "archiver")
