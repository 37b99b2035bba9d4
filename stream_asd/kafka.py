"""Kafka client settings with the audio size limits aligned, and explicit topic creation.

One limit runs through the whole path: :data:`stream_asd.wire.KAFKA_MAX_MESSAGE_BYTES`
(1 MiB of PCM payload + room for headers). The broker (``message.max.bytes``, see
:mod:`stream_asd.broker`), the topics (``max.message.bytes``), the producers
(``message.max.bytes`` / ``max_request_size``) and the consumers (``fetch.message.max.bytes``
/ ``max_partition_fetch_bytes``) all use it, so a chunk the producer accepts is one the broker
stores and every consumer can fetch; a larger one is refused at ``produce()`` time.

Builders (each returns a plain dict; ``overrides`` win):

- :func:`producer_conf` - confluent-kafka ``Producer``: idempotent, ``acks=all``, lz4, linger.
- :func:`consumer_conf` - confluent-kafka ``Consumer``: manual commit, earliest reset.
- :func:`aiokafka_producer_kwargs` / :func:`aiokafka_consumer_kwargs` - the same for aiokafka.
- :func:`faust_settings` - keyword arguments for ``faust.App`` (aiokafka transport).
- :func:`ensure_topics` - create topics that are missing (the broker never auto-creates).

librdkafka's own log lines go through Python logging (logger ``stream_asd.librdkafka``, set as
the confluent-kafka ``logger`` by every builder here), deduplicated: an unreachable broker
repeats "Connect to ... failed: Connection refused" every ~50 ms, which printed ~290 raw lines
before the clear error. Now the first of each kind is logged, then at most one per minute with
the count of those left out (:class:`RepeatFilter`). The lines are handed over when the client
is polled (``poll``/``flush``), never from librdkafka's own threads.

Compression: confluent-kafka compresses, aiokafka/Faust must decompress: aiokafka needs
``cramjam`` for lz4/zstd (pyproject pins ``aiokafka[lz4,zstd]``).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from typing import Any, Literal, Mapping

from .config import Settings
from .errors import BrokerError, ConfigError
from .wire import KAFKA_MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

Compression = Literal["lz4", "zstd", "snappy", "gzip", "none"]

# Topic-level limit, so that topics on a shared cluster accept audio chunks whatever the
# cluster's default (the broker default is 1 MiB, below a full chunk + headers).
DEFAULT_TOPIC_CONFIG: dict[str, str] = {"max.message.bytes": str(KAFKA_MAX_MESSAGE_BYTES)}
# Consumers fetch up to this much per partition and request; several chunks per fetch.
CONSUMER_PARTITION_FETCH_BYTES = 4 * KAFKA_MAX_MESSAGE_BYTES


LIBRDKAFKA_LOGGER = "stream_asd.librdkafka"


class RepeatFilter(logging.Filter):
    """Deduplicates and rate-limits log records.

    Records are alike when their level and message agree after volatile parts are blanked
    (``(after 12ms in state CONNECT)``, ``1/1 brokers``, counts of suppressed errors). The
    first of a kind passes; later ones pass at most once per ``interval_s``, carrying the
    number left out since. At most ``burst`` records of any kinds pass per ``interval_s`` (a
    cluster of many unreachable brokers), the rest are counted into the next that passes.
    """

    _VOLATILE = re.compile(r"\(after [^)]*\)|\d+ identical error\(s\) suppressed|\b\d+/\d+\b|\b\d+(?:\.\d+)?m?s\b")

    def __init__(self, interval_s: float = 60.0, burst: int = 10, max_kinds: int = 512):
        super().__init__()
        self.interval_s, self.burst, self.max_kinds = interval_s, burst, max_kinds
        self._kinds: OrderedDict[tuple[int, str], list[float | int]] = OrderedDict()  # key -> [last passed, left out]
        self._window_start = -float("inf")
        self._passed_in_window = 0
        self._left_out_over_burst = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        key = (record.levelno, self._VOLATILE.sub("#", message))
        now = time.monotonic()
        with self._lock:
            kind = self._kinds.get(key)
            if kind is not None and now - kind[0] < self.interval_s:
                kind[1] += 1
                return False
            if now - self._window_start >= self.interval_s:
                self._window_start, self._passed_in_window = now, 0
            if self._passed_in_window >= self.burst:
                self._left_out_over_burst += 1
                if kind is not None:
                    kind[1] += 1
                return False
            self._passed_in_window += 1
            left_out = int(kind[1]) if kind is not None else 0
            others, self._left_out_over_burst = self._left_out_over_burst, 0
            self._kinds[key] = [now, 0]
            self._kinds.move_to_end(key)
            while len(self._kinds) > self.max_kinds:
                self._kinds.popitem(last=False)
        notes = []
        if left_out:
            notes.append(f"{left_out} more like it left out")
        if others:
            notes.append(f"{others} other librdkafka line(s) left out")
        if notes:
            record.msg, record.args = f"{message} ({'; '.join(notes)})", None
        return True


_logger_lock = threading.Lock()


def librdkafka_logger() -> logging.Logger:
    """The logger given to every confluent-kafka client (``"logger"`` in the configs built
    here): librdkafka's lines as ``stream_asd.librdkafka`` records, through a
    :class:`RepeatFilter`."""
    logger = logging.getLogger(LIBRDKAFKA_LOGGER)
    with _logger_lock:
        if not any(isinstance(f, RepeatFilter) for f in logger.filters):
            logger.addFilter(RepeatFilter())
    return logger


def with_logger(conf: Mapping[str, Any]) -> dict[str, Any]:
    """``conf`` with librdkafka's logs routed through :func:`librdkafka_logger` (unless it
    already names a ``logger``)."""
    out = dict(conf)
    out.setdefault("logger", librdkafka_logger())
    return out


def producer_conf(settings: Settings, *, compression: Compression = "lz4", linger_ms: float = 20.0,
                  **overrides: Any) -> dict[str, Any]:
    """confluent-kafka ``Producer`` config for audio chunks.

    Idempotent (no duplicates from retries, per-partition order kept), ``acks=all``,
    compressed batches, ``linger_ms`` to fill batches. ``message.max.bytes`` is the aligned
    limit: a larger message raises ``KafkaException`` (``MSG_SIZE_TOO_LARGE``) in ``produce()``.
    Pass librdkafka keys with dots via a dict: ``producer_conf(s, **{"client.id": "x"})``.
    """
    conf = settings.kafka.librdkafka()
    conf.update({
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": compression,
        "linger.ms": linger_ms,
        "batch.size": KAFKA_MAX_MESSAGE_BYTES,
        "message.max.bytes": KAFKA_MAX_MESSAGE_BYTES,
        "logger": librdkafka_logger(),
    })
    conf.update(overrides)
    return conf


def consumer_conf(settings: Settings, group_id: str, *, auto_offset_reset: str = "earliest",
                  **overrides: Any) -> dict[str, Any]:
    """confluent-kafka ``Consumer`` config: manual commits (``enable.auto.commit=false``:
    commit with ``consumer.commit(...)`` once the messages are processed), earliest reset,
    fetch sizes that hold whole audio chunks."""
    conf = settings.kafka.librdkafka()
    conf.update({
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": auto_offset_reset,
        "fetch.message.max.bytes": CONSUMER_PARTITION_FETCH_BYTES,  # alias max.partition.fetch.bytes
        "fetch.max.bytes": 16 * CONSUMER_PARTITION_FETCH_BYTES,
        "enable.partition.eof": False,
        "logger": librdkafka_logger(),
    })
    conf.update(overrides)
    return conf


def admin_conf(settings: Settings, **overrides: Any) -> dict[str, Any]:
    conf = settings.kafka.librdkafka()
    conf["logger"] = librdkafka_logger()
    conf.update(overrides)
    return conf


def _aiokafka_security(settings: Settings) -> dict[str, Any]:
    k = settings.kafka
    out: dict[str, Any] = {"bootstrap_servers": k.bootstrap, "client_id": k.client_id,
                           "security_protocol": k.security_protocol}
    if k.sasl_mechanism:
        out["sasl_mechanism"] = k.sasl_mechanism
        out["sasl_plain_username"] = k.sasl_username
        out["sasl_plain_password"] = k.password()
    if k.security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        out["ssl_context"] = create_ssl_context(
            cafile=str(k.ssl_ca_location) if k.ssl_ca_location else None,
            certfile=str(k.ssl_certificate_location) if k.ssl_certificate_location else None,
            keyfile=str(k.ssl_key_location) if k.ssl_key_location else None,
            password=k.ssl_key_password.get_secret_value() if k.ssl_key_password else None,
        )
    return out


def aiokafka_producer_kwargs(settings: Settings, *, compression: Compression = "lz4", linger_ms: float = 20.0,
                             **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``aiokafka.AIOKafkaProducer`` (aligned limits, idempotent)."""
    kwargs = _aiokafka_security(settings)
    kwargs.update({
        "acks": "all",
        "enable_idempotence": True,
        "compression_type": None if compression == "none" else compression,
        "linger_ms": linger_ms,
        "max_request_size": KAFKA_MAX_MESSAGE_BYTES,
        # aiokafka's default batch is 16 KiB: less than one 1 s chunk (32 KB).
        "max_batch_size": KAFKA_MAX_MESSAGE_BYTES,
    })
    kwargs.update(overrides)
    return kwargs


def aiokafka_consumer_kwargs(settings: Settings, group_id: str | None, *, auto_offset_reset: str = "earliest",
                             **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``aiokafka.AIOKafkaConsumer``: manual commit, large fetches."""
    kwargs = _aiokafka_security(settings)
    kwargs.update({
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": auto_offset_reset,
        "max_partition_fetch_bytes": CONSUMER_PARTITION_FETCH_BYTES,
        "fetch_max_bytes": 16 * CONSUMER_PARTITION_FETCH_BYTES,
        "max_poll_records": 500,
    })
    kwargs.update(overrides)
    return kwargs


def faust_settings(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``faust.App(id, **faust_settings(s))`` with aligned limits.

    Sets the broker URL, credentials, producer request/batch sizes, consumer fetch size and
    ``consumer_auto_offset_reset='earliest'``. The caller adds its own (``store``,
    ``web_enabled``, ``processing_guarantee``...) through ``overrides``.
    """
    import faust

    k = settings.kafka
    servers = ";".join(f"kafka://{s.strip()}" for s in k.bootstrap.split(",") if s.strip())
    out: dict[str, Any] = {
        "broker": servers,
        "broker_client_id": k.client_id,
        "producer_acks": -1,
        "producer_max_request_size": KAFKA_MAX_MESSAGE_BYTES,
        "producer_max_batch_size": KAFKA_MAX_MESSAGE_BYTES,
        "producer_compression_type": "lz4",
        "consumer_max_fetch_size": CONSUMER_PARTITION_FETCH_BYTES,
        "consumer_auto_offset_reset": "earliest",
        "broker_max_poll_records": 500,
    }
    if k.security_protocol != "PLAINTEXT":
        sec = _aiokafka_security(settings)
        if k.sasl_mechanism:
            if k.sasl_mechanism != "PLAIN" and not k.sasl_mechanism.startswith("SCRAM"):
                raise ConfigError(f"Faust does not support SASL mechanism {k.sasl_mechanism}")
            out["broker_credentials"] = faust.SASLCredentials(
                username=k.sasl_username, password=k.password(), ssl_context=sec.get("ssl_context"),
                mechanism=k.sasl_mechanism)
        else:
            out["broker_credentials"] = faust.SSLCredentials(sec["ssl_context"])
    out.update(overrides)
    return out


def ensure_topics(bootstrap: str | Mapping[str, Any], topics: Mapping[str, int], *,
                  config: Mapping[str, str] | None = None, replication_factor: int = 1,
                  timeout: float = 30.0) -> dict[str, int]:
    """Create the topics that are missing; return ``{name: partition count}`` of all of them.

    ``bootstrap`` is ``"host:port"`` or a librdkafka config dict (for SASL/TLS, e.g.
    :func:`admin_conf`). ``config`` is the topic config for new topics (default
    :data:`DEFAULT_TOPIC_CONFIG`). Existing topics are left as they are (partition counts are
    never changed: that would move devices between partitions); a topic with fewer
    partitions than asked is logged. Waits until every partition has a leader, so producing
    right after returns works.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    conf = with_logger({"bootstrap.servers": bootstrap} if isinstance(bootstrap, str) else bootstrap)
    admin = AdminClient(conf)
    topic_config = {k: str(v) for k, v in (DEFAULT_TOPIC_CONFIG if config is None else config).items()}
    try:
        existing = admin.list_topics(timeout=timeout).topics
    except KafkaException as exc:
        admin.poll(0)  # hand over librdkafka's queued log lines (deduplicated) before the clear error
        raise BrokerError(f"cannot reach Kafka at {conf.get('bootstrap.servers')}: {exc}; start a local broker "
                          "with `stream-asd broker start` or pass --bootstrap HOST:PORT") from None
    new = [NewTopic(name, num_partitions=int(n), replication_factor=replication_factor, config=topic_config)
           for name, n in topics.items() if name not in existing]
    if new:
        for name, future in admin.create_topics(new, request_timeout=timeout).items():
            try:
                future.result(timeout=timeout)
                log.info("created topic %s", name)
            except KafkaException as exc:
                err = exc.args[0]
                if getattr(err, "code", lambda: None)() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise BrokerError(f"cannot create topic {name!r}: {err}") from None
    deadline = time.monotonic() + timeout
    while True:
        md = admin.list_topics(timeout=timeout).topics
        counts: dict[str, int] = {}
        ready = True
        for name in topics:
            t = md.get(name)
            if t is None or t.error is not None or not t.partitions or any(p.leader < 0 for p in t.partitions.values()):
                ready = False
                break
            counts[name] = len(t.partitions)
        if ready:
            break
        if time.monotonic() > deadline:
            raise BrokerError(f"topics {sorted(topics)} did not get partition leaders within {timeout:.0f} s")
        time.sleep(0.1)
    for name, wanted in topics.items():
        if counts[name] < wanted:
            log.warning("topic %s exists with %d partitions (< %d asked); left unchanged", name, counts[name], wanted)
    return counts


def delete_topics(bootstrap: str | Mapping[str, Any], names: list[str], timeout: float = 30.0) -> None:
    """Delete topics (missing ones are ignored)."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    if not names:
        return
    conf = with_logger({"bootstrap.servers": bootstrap} if isinstance(bootstrap, str) else bootstrap)
    admin = AdminClient(conf)
    for name, future in admin.delete_topics(list(names), request_timeout=timeout).items():
        try:
            future.result(timeout=timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise BrokerError(f"cannot delete topic {name!r}: {exc.args[0]}") from None
