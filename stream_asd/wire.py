"""The wire format: audio chunks on ``asd.audio``, score and alert records (JSON).

Audio chunks follow the CloudEvents Kafka binding in binary mode: the event attributes travel
as ``ce_*`` headers, the value is the raw payload (PCM signed 16-bit little-endian, mono).
Extension attribute names are lower-case alphanumerics, as CloudEvents requires.

A schema change is a new version; readers reject versions they do not know with a clear error.
Every validation failure raises :class:`~stream_asd.errors.WireFormatError` whose ``reason`` is
one of :data:`REASONS` (the DLQ reason header and metric label).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import WireFormatError

CHUNK_SCHEMA_VERSION = 1
SUPPORTED_CHUNK_VERSIONS = frozenset({1})
CE_TYPE_CHUNK = "io.stream-asd.audio.chunk"
ENCODING_PCM_S16LE = "pcm_s16le"
SUPPORTED_ENCODINGS = frozenset({ENCODING_PCM_S16LE})
BYTES_PER_SAMPLE = {ENCODING_PCM_S16LE: 2}
DEFAULT_SAMPLE_RATE = 16_000
# Aligned with the broker (message.max.bytes), producer and consumer limits: 1 MiB of payload.
DEFAULT_MAX_CHUNK_BYTES = 1 << 20
# Headers add at most a few hundred bytes; the Kafka limits leave room for them.
KAFKA_MAX_MESSAGE_BYTES = DEFAULT_MAX_CHUNK_BYTES + 64 * 1024

# Header names (CloudEvents binary mode for Kafka).
H_SPECVERSION = "ce_specversion"
H_ID = "ce_id"
H_SOURCE = "ce_source"
H_TYPE = "ce_type"
H_TIME = "ce_time"
H_CONTENT_TYPE = "content-type"
H_SCHEMA = "ce_asdschema"
H_DEVICE = "ce_deviceid"
H_MACHINE_TYPE = "ce_machinetype"
H_SAMPLE_RATE = "ce_samplerate"
H_CHANNELS = "ce_channels"
H_ENCODING = "ce_encoding"
H_SEQ = "ce_seq"
H_CAPTURE_NS = "ce_capturens"
H_PRODUCER = "ce_producerid"
REQUIRED_HEADERS = (
    H_SCHEMA, H_DEVICE, H_MACHINE_TYPE, H_SAMPLE_RATE, H_CHANNELS, H_ENCODING, H_SEQ,
    H_CAPTURE_NS, H_PRODUCER,
)

# DLQ headers added to the original message.
H_DLQ_REASON = "asd_dlq_reason"
H_DLQ_DETAIL = "asd_dlq_detail"
H_DLQ_TOPIC = "asd_dlq_topic"
H_DLQ_PARTITION = "asd_dlq_partition"
H_DLQ_OFFSET = "asd_dlq_offset"

# Stable reason codes.
R_MISSING_KEY = "missing_key"
R_KEY_MISMATCH = "key_mismatch"
R_MISSING_HEADER = "missing_header"
R_BAD_HEADER = "bad_header"
R_UNKNOWN_SCHEMA = "unknown_schema_version"
R_BAD_ENCODING = "unsupported_encoding"
R_BAD_SAMPLE_RATE = "wrong_sample_rate"
R_BAD_CHANNELS = "unsupported_channels"
R_EMPTY = "empty_payload"
R_TRUNCATED = "truncated_payload"
R_OVERSIZE = "oversize_payload"
R_NON_FINITE = "non_finite_samples"
R_BAD_JSON = "bad_json"
R_BAD_RECORD = "bad_record"
# Valid chunks the stream processor still cannot use (it dead-letters them too).
R_BAD_CHUNK_LENGTH = "wrong_chunk_length"  # sample count differs from audio.chunk_seconds
R_UNKNOWN_MACHINE_TYPE = "unknown_machine_type"  # the model bundle has no model for it
R_PROCESSING_ERROR = "processing_error"  # unexpected error handling this message (a bug)
R_INT_RANGE = "integer_out_of_range"  # an integer header does not fit in int64
REASONS = (
    R_MISSING_KEY, R_KEY_MISMATCH, R_MISSING_HEADER, R_BAD_HEADER, R_UNKNOWN_SCHEMA,
    R_BAD_ENCODING, R_BAD_SAMPLE_RATE, R_BAD_CHANNELS, R_EMPTY, R_TRUNCATED, R_OVERSIZE,
    R_NON_FINITE, R_BAD_JSON, R_BAD_RECORD, R_BAD_CHUNK_LENGTH, R_UNKNOWN_MACHINE_TYPE,
    R_PROCESSING_ERROR, R_INT_RANGE,
)
# Integer headers (seq, capture time, sample rate, channels) are int64 on every reader.
INT64_MAX = (1 << 63) - 1
# Longest digit string that may still be an int64 (19 digits, plus a sign).
_INT_MAX_CHARS = len(str(INT64_MAX)) + 1
DETAIL_MAX_CHARS = 300  # exception text kept in a processing_error detail

HeaderList = Sequence[tuple[str, bytes | str | None]]


def _header_map(headers: HeaderList | Mapping[str, Any] | None) -> dict[str, bytes]:
    """Normalise confluent-kafka / aiokafka / Faust header shapes to {name: bytes}."""
    if headers is None:
        return {}
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, bytes] = {}
    for name, value in items:
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        if value is None:
            value = b""
        elif isinstance(value, str):
            value = value.encode()
        out.setdefault(name, bytes(value))  # first occurrence wins, like most clients
    return out


@dataclass(frozen=True)
class ChunkHeader:
    """Everything about an audio chunk except its samples."""

    device_id: str
    machine_type: str
    seq: int
    capture_ns: int
    producer_id: str
    sample_rate: int = DEFAULT_SAMPLE_RATE
    channels: int = 1
    encoding: str = ENCODING_PCM_S16LE
    schema_version: int = CHUNK_SCHEMA_VERSION


@dataclass(frozen=True)
class AudioChunk:
    """A decoded, validated chunk: header + int16 samples (mono)."""

    header: ChunkHeader
    pcm: np.ndarray  # int16, shape (n,)

    @property
    def device_id(self) -> str:
        return self.header.device_id

    @property
    def seq(self) -> int:
        return self.header.seq

    @property
    def n_samples(self) -> int:
        return int(self.pcm.shape[0])

    def to_float(self) -> np.ndarray:
        """Samples as float32 in [-1, 1) (the scale every model in stream-asd expects)."""
        return pcm16_to_float(self.pcm)


def float_to_pcm16(samples: np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> int16 (clipped, rounded). Raises on NaN/Inf: they would be silently lost."""
    samples = np.asarray(samples, dtype=np.float64)
    if not np.all(np.isfinite(samples)):
        raise WireFormatError(R_NON_FINITE, "audio contains NaN or Inf; fix the source before sending")
    return np.clip(np.rint(samples * 32768.0), -32768, 32767).astype("<i2")


def pcm16_to_float(pcm: np.ndarray) -> np.ndarray:
    return (np.asarray(pcm, dtype=np.float32) / np.float32(32768.0)).astype(np.float32)


def _iso_time(ns: int) -> str:
    # Integer arithmetic: ns / 1e9 as a float rounds (and can lose microseconds near 2e18).
    sec, rem = divmod(int(ns), 1_000_000_000)
    dt = datetime.fromtimestamp(sec, tz=timezone.utc).replace(microsecond=rem // 1000)
    return dt.isoformat().replace("+00:00", "Z")


def encode_chunk(header: ChunkHeader, pcm: np.ndarray, *,
                 max_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """Return (key, value, headers) ready for ``Producer.produce``.

    ``pcm`` is int16 (use :func:`float_to_pcm16` for float audio).
    """
    pcm = np.asarray(pcm)
    if pcm.dtype != np.int16:
        raise WireFormatError(R_BAD_ENCODING, f"encode_chunk needs int16 samples, got {pcm.dtype}")
    if pcm.ndim != 1:
        raise WireFormatError(R_BAD_CHANNELS, f"encode_chunk needs mono 1-D samples, got shape {pcm.shape}")
    if not header.device_id:
        raise WireFormatError(R_MISSING_KEY, "device_id must not be empty")
    # Refuse here what every reader would refuse (decode_chunk), so the producer learns early.
    if header.encoding not in SUPPORTED_ENCODINGS:
        raise WireFormatError(R_BAD_ENCODING, f"encoding {header.encoding!r} is not supported (use {sorted(SUPPORTED_ENCODINGS)})")
    if header.channels != 1:
        raise WireFormatError(R_BAD_CHANNELS, f"header says {header.channels} channels; chunks are mono")
    if header.seq < 0 or header.capture_ns < 0:
        raise WireFormatError(R_BAD_HEADER, f"seq ({header.seq}) and capture_ns ({header.capture_ns}) must be >= 0")
    if header.seq > INT64_MAX or header.capture_ns > INT64_MAX:
        raise WireFormatError(R_INT_RANGE, f"seq ({header.seq}) and capture_ns ({header.capture_ns}) must fit in int64")
    if pcm.size == 0:
        raise WireFormatError(R_EMPTY, "no samples to send")
    if pcm.nbytes > max_bytes:
        raise WireFormatError(R_OVERSIZE, f"payload is {pcm.nbytes} bytes, the limit is {max_bytes}; send shorter chunks")
    value = pcm.astype("<i2", copy=False).tobytes()
    headers = [
        (H_SPECVERSION, b"1.0"),
        (H_ID, f"{header.device_id}/{header.seq}".encode()),
        (H_SOURCE, f"stream-asd/producer/{header.producer_id}".encode()),
        (H_TYPE, CE_TYPE_CHUNK.encode()),
        (H_TIME, _iso_time(header.capture_ns).encode()),
        (H_CONTENT_TYPE, f"audio/L16;rate={header.sample_rate};channels={header.channels}".encode()),
        (H_SCHEMA, str(header.schema_version).encode()),
        (H_DEVICE, header.device_id.encode()),
        (H_MACHINE_TYPE, header.machine_type.encode()),
        (H_SAMPLE_RATE, str(header.sample_rate).encode()),
        (H_CHANNELS, str(header.channels).encode()),
        (H_ENCODING, header.encoding.encode()),
        (H_SEQ, str(header.seq).encode()),
        (H_CAPTURE_NS, str(header.capture_ns).encode()),
        (H_PRODUCER, header.producer_id.encode()),
    ]
    return header.device_id.encode(), value, headers


def _text(h: dict[str, bytes], name: str) -> str:
    if name not in h:
        raise WireFormatError(R_MISSING_HEADER, f"header {name!r} is missing; producers must send all of {list(REQUIRED_HEADERS)}")
    try:
        text = h[name].decode("utf-8")
    except UnicodeDecodeError:
        raise WireFormatError(R_BAD_HEADER, f"header {name!r} is not UTF-8") from None
    if not text:
        raise WireFormatError(R_BAD_HEADER, f"header {name!r} is empty")
    return text


_INT_RE = re.compile(r"-?[0-9]+")


def _int(h: dict[str, bytes], name: str, minimum: int = 0) -> int:
    text = _text(h, name)
    # ASCII digits only: int() would also take ' 7', '+7', '1_000' and non-ASCII digits.
    if not _INT_RE.fullmatch(text):
        raise WireFormatError(R_BAD_HEADER, f"header {name!r}={text[:40]!r} is not an integer")
    if len(text) > _INT_MAX_CHARS:  # before int(): it raises a plain ValueError past 4,300 digits
        raise WireFormatError(R_INT_RANGE, f"header {name!r} has {len(text)} digits; an int64 has at most 19")
    value = int(text, 10)
    if not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise WireFormatError(R_INT_RANGE, f"header {name!r}={value} does not fit in int64")
    if value < minimum:
        raise WireFormatError(R_BAD_HEADER, f"header {name!r}={value} is below {minimum}")
    return value


def decode_chunk(
    key: bytes | str | None,
    value: bytes | None,
    headers: HeaderList | Mapping[str, Any] | None,
    *,
    expected_sample_rate: int | None = DEFAULT_SAMPLE_RATE,
    max_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> AudioChunk:
    """Validate and decode one ``asd.audio`` message. Raises :class:`WireFormatError` and
    nothing else: any other exception becomes ``processing_error``, so a caller that
    dead-letters WireFormatError never lets one odd message crash it."""
    try:
        return _decode_chunk(key, value, headers, expected_sample_rate, max_bytes)
    except WireFormatError:
        raise
    except Exception as exc:
        raise processing_error(exc) from exc


def processing_error(exc: BaseException) -> WireFormatError:
    """An unexpected exception as a ``processing_error`` (class name and bounded message)."""
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not hide the error it describes
        text = "<unprintable>"
    if len(text) > DETAIL_MAX_CHARS:
        text = text[:DETAIL_MAX_CHARS] + "..."
    return WireFormatError(R_PROCESSING_ERROR, f"{type(exc).__name__}: {text}")


def _decode_chunk(key: bytes | str | None, value: bytes | None, headers: HeaderList | Mapping[str, Any] | None,
                  expected_sample_rate: int | None, max_bytes: int) -> AudioChunk:
    h = _header_map(headers)
    if H_SCHEMA not in h:
        raise WireFormatError(R_MISSING_HEADER, f"header {H_SCHEMA!r} is missing: not a stream-asd audio chunk")
    version_text = _text(h, H_SCHEMA)
    try:
        version = int(version_text)
    except ValueError:
        raise WireFormatError(R_UNKNOWN_SCHEMA, f"schema version {version_text[:40]!r} is not a number") from None
    if version not in SUPPORTED_CHUNK_VERSIONS:
        raise WireFormatError(
            R_UNKNOWN_SCHEMA,
            f"schema version {version} is not supported (this reader knows {sorted(SUPPORTED_CHUNK_VERSIONS)}); upgrade the processor",
        )
    device_id = _text(h, H_DEVICE)
    machine_type = _text(h, H_MACHINE_TYPE)
    producer_id = _text(h, H_PRODUCER)
    sample_rate = _int(h, H_SAMPLE_RATE, minimum=1)
    channels = _int(h, H_CHANNELS, minimum=1)
    seq = _int(h, H_SEQ)
    capture_ns = _int(h, H_CAPTURE_NS)
    encoding = _text(h, H_ENCODING)

    if key is None or key == b"" or key == "":
        raise WireFormatError(R_MISSING_KEY, "message has no key; the key must be the device_id")
    key_text = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
    if key_text != device_id:
        raise WireFormatError(R_KEY_MISMATCH, f"key {key_text!r} differs from header {H_DEVICE}={device_id!r}")
    if encoding not in SUPPORTED_ENCODINGS:
        raise WireFormatError(R_BAD_ENCODING, f"encoding {encoding!r} is not supported (use {sorted(SUPPORTED_ENCODINGS)})")
    if channels != 1:
        raise WireFormatError(R_BAD_CHANNELS, f"{channels} channels; stream-asd takes mono chunks (downmix in the producer)")
    if expected_sample_rate is not None and sample_rate != expected_sample_rate:
        raise WireFormatError(R_BAD_SAMPLE_RATE, f"sample rate {sample_rate} Hz, expected {expected_sample_rate} Hz; resample in the producer")
    if not value:
        raise WireFormatError(R_EMPTY, "payload is empty")
    if len(value) > max_bytes:
        raise WireFormatError(R_OVERSIZE, f"payload is {len(value)} bytes, the limit is {max_bytes}")
    width = BYTES_PER_SAMPLE[encoding] * channels
    if len(value) % width:
        raise WireFormatError(R_TRUNCATED, f"payload of {len(value)} bytes is not a whole number of {width}-byte samples")
    pcm = np.frombuffer(value, dtype="<i2").astype(np.int16, copy=False)
    header = ChunkHeader(
        device_id=device_id, machine_type=machine_type, seq=seq, capture_ns=capture_ns,
        producer_id=producer_id, sample_rate=sample_rate, channels=channels, encoding=encoding,
        schema_version=version,
    )
    return AudioChunk(header=header, pcm=pcm)


def dlq_headers(original: HeaderList | Mapping[str, Any] | None, error: WireFormatError | str, detail: str = "",
                topic: str = "", partition: int = -1, offset: int = -1) -> list[tuple[str, bytes]]:
    """Original headers plus the reason: a DLQ message keeps the original bytes untouched."""
    reason = error.reason if isinstance(error, WireFormatError) else str(error)
    detail = error.detail if isinstance(error, WireFormatError) else detail
    out = [(k, v) for k, v in _header_map(original).items()]
    out += [
        (H_DLQ_REASON, reason.encode()),
        (H_DLQ_DETAIL, detail.encode()[:1024]),
        (H_DLQ_TOPIC, topic.encode()),
        (H_DLQ_PARTITION, str(partition).encode()),
        (H_DLQ_OFFSET, str(offset).encode()),
    ]
    return out


# ---------------------------------------------------------------------------------------------
# Score and alert records (JSON, versioned)

SCORE_SCHEMA = "asd.score/1"
ALERT_SCHEMA = "asd.alert/1"


def window_id(device_id: str, first_seq: int, last_seq: int) -> str:
    """Deterministic id of a window: a re-score of the same samples has the same id."""
    return f"{device_id}:{first_seq}-{last_seq}"


def _finite(name: str, x: Any) -> float:
    try:
        value = float(x)
    except (TypeError, ValueError):
        raise WireFormatError(R_BAD_RECORD, f"{name} must be a number, got {x!r}") from None
    if not math.isfinite(value):
        raise WireFormatError(R_NON_FINITE, f"{name} is {value}")
    return value


@dataclass
class ScoreRecord:
    """One scored window, as published on ``asd.scores``."""

    device_id: str
    machine_type: str
    window_id: str
    first_seq: int
    last_seq: int
    window_start_ns: int
    window_end_ns: int
    score: float  # ensemble score (standardised NLL units)
    scores: dict[str, float]  # per-model scores, e.g. {"fusion": .., "statistics": ..}
    threshold: float
    is_anomaly: bool
    model_version: str
    scored_at_ns: int
    capture_to_score_s: float
    flags: list[str] = field(default_factory=list)  # e.g. ["gap_zero_filled"]
    schema: str = SCORE_SCHEMA

    def to_json(self) -> bytes:
        return _dump_record(self.__dict__)

    @classmethod
    def from_json(cls, data: bytes | str) -> "ScoreRecord":
        obj = _load_record(data, SCORE_SCHEMA)
        try:
            rec = cls(**obj)
        except TypeError as exc:
            raise WireFormatError(R_BAD_RECORD, f"score record fields do not match {SCORE_SCHEMA}: {exc}") from None
        _finite("score", rec.score)
        _finite("threshold", rec.threshold)
        return rec


@dataclass
class AlertRecord:
    """An alert state change on ``asd.alerts``: ``raised`` after k of n windows over the
    threshold, ``cleared`` after the device has been normal again for long enough."""

    alert_id: str
    device_id: str
    machine_type: str
    state: str  # "raised" | "cleared"
    window_id: str
    score: float
    threshold: float
    windows_over: int  # k: anomalous windows among the last n
    windows_seen: int  # n
    model_version: str
    at_ns: int
    # optional (asd.alert/1 stays): on a raise by an ensemble model, the alerted window's compact
    # explanation (stream_asd.model.explain.Explanation.to_dict: top bands with z-scores, most
    # deviant seconds). Absent from the JSON when None, so records without one are unchanged.
    explanation: dict[str, Any] | None = None
    schema: str = ALERT_SCHEMA

    def to_json(self) -> bytes:
        obj = dict(self.__dict__)
        if obj.get("explanation") is None:
            obj.pop("explanation", None)
        return _dump_record(obj)

    @classmethod
    def from_json(cls, data: bytes | str) -> "AlertRecord":
        obj = _load_record(data, ALERT_SCHEMA)
        try:
            rec = cls(**obj)
        except TypeError as exc:
            raise WireFormatError(R_BAD_RECORD, f"alert record fields do not match {ALERT_SCHEMA}: {exc}") from None
        if rec.state not in ("raised", "cleared"):
            raise WireFormatError(R_BAD_RECORD, f"alert state {rec.state!r} is not 'raised' or 'cleared'")
        if rec.explanation is not None and not isinstance(rec.explanation, dict):
            raise WireFormatError(R_BAD_RECORD, f"alert explanation must be a JSON object, got "
                                  f"{type(rec.explanation).__name__}")
        return rec


def _dump_record(obj: dict[str, Any]) -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:  # NaN/Inf: JSON has no such numbers and readers would reject them
        bad = sorted(k for k, v in obj.items() if isinstance(v, float) and not math.isfinite(v))
        raise WireFormatError(R_NON_FINITE, f"record has non-finite numbers in {bad or 'a nested field'}") from None


def new_alert_id() -> str:
    return uuid.uuid4().hex


def _load_record(data: bytes | str, schema: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireFormatError(R_BAD_JSON, f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise WireFormatError(R_BAD_RECORD, "record must be a JSON object")
    found = obj.get("schema")
    if found != schema:
        raise WireFormatError(R_UNKNOWN_SCHEMA, f"record schema {found!r} is not {schema!r}; upgrade the reader")
    return obj

