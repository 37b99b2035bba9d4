"""Outputs of the processor: score records -> ``asd.scores``, alert changes -> ``asd.alerts``,
invalid input -> ``asd.audio.dlq`` (original key, value and headers, plus the reason headers of
:func:`stream_asd.wire.dlq_headers`).

Transport-agnostic: ``send(topic, key, value, headers)`` is a coroutine that queues one message
and returns an awaitable that resolves when the broker acknowledged it (Faust's
``app.producer.send`` in the app; a fake in tests). Callers wait on that before they count the
window as resolved, so an offset is never committed ahead of the record it produced.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from ..config import TopicSettings
from ..errors import WireFormatError
from ..metrics import ProcessorMetrics
from ..wire import AlertRecord, ScoreRecord, dlq_headers

log = logging.getLogger(__name__)

SendFn = Callable[[str, bytes | None, bytes | None, list], Awaitable[Awaitable[Any]]]
H_DLQ_VALUE_DROPPED = "asd_dlq_value_dropped"


class Sinks:
    def __init__(self, send: SendFn, topics: TopicSettings, metrics: ProcessorMetrics | None = None):
        self._send = send
        self.topics = topics
        self.metrics = metrics

    async def score(self, record: ScoreRecord) -> Awaitable[Any]:
        return await self._send(self.topics.scores, record.device_id.encode(), record.to_json(), [])

    async def alert(self, record: AlertRecord) -> Awaitable[Any]:
        return await self._send(self.topics.alerts, record.device_id.encode(), record.to_json(), [])

    async def dead_letter(self, key: bytes | None, value: bytes | None, headers: Any, error: WireFormatError,
                          topic: str, partition: int, offset: int) -> Awaitable[Any]:
        headers_out = dlq_headers(headers, error, topic=topic, partition=partition, offset=offset)
        if isinstance(key, str):
            key = key.encode()
        try:
            fut = await self._send(self.topics.dlq, key, value, headers_out)
        except Exception as exc:  # e.g. larger than the producer's max request: keep the evidence
            log.warning("dead letter of %s[%d]@%d too large or refused (%r); sending it without its value",
                        topic, partition, offset, exc)
            size = len(value) if value else 0
            fut = await self._send(self.topics.dlq, key, b"", headers_out + [(H_DLQ_VALUE_DROPPED, str(size).encode())])
        if self.metrics:
            self.metrics.dlq.labels(reason=error.reason).inc()
        return fut
