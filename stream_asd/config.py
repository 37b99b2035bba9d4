"""Typed configuration: every setting from a CLI flag, the environment (``ASD_...``) or a file.

Precedence, highest first: CLI flag > environment > config file (``--config`` or
``ASD_CONFIG``, TOML or JSON) > default. Nested sections use ``__`` in environment names:
``ASD_KAFKA__BOOTSTRAP=broker:9092``, ``ASD_WINDOW__HOP_SECONDS=5``. Only those names (a known
section, or a top-level field such as ``ASD_LOG_LEVEL``) are read; other ``ASD_*`` variables
belong to something else and are ignored, while a typo inside a known section is an error.
Secrets (SASL password, TLS key password) come from the environment or a mounted Kubernetes
secret file (``ASD_KAFKA__SASL_PASSWORD_FILE``); they are never printed.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from .errors import ConfigError

log = logging.getLogger(__name__)

ENV_PREFIX = "ASD_"
ENV_CONFIG_FILE = "ASD_CONFIG"


class _Section(BaseModel):
    # A typo in a file or an ASD_* variable is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class KafkaSettings(_Section):
    bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma separated")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = Field(None, description="file holding the SASL password (Kubernetes secret mount)")
    ssl_ca_location: Path | None = None
    ssl_certificate_location: Path | None = None
    ssl_key_location: Path | None = None
    ssl_key_password: SecretStr | None = None
    client_id: str = "stream-asd"

    @model_validator(mode="after")
    def _sasl_needs_credentials(self) -> "KafkaSettings":
        if self.security_protocol.startswith("SASL") and not self.sasl_mechanism:
            raise ValueError("security_protocol SASL_* needs kafka.sasl_mechanism (e.g. SCRAM-SHA-512)")
        return self

    def password(self) -> str | None:
        if self.sasl_password is not None:
            return self.sasl_password.get_secret_value()
        if self.sasl_password_file is not None:
            try:
                return self.sasl_password_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read kafka.sasl_password_file {self.sasl_password_file}: {exc}") from None
        return None

    def librdkafka(self) -> dict[str, Any]:
        """Connection/security settings in confluent-kafka (librdkafka) form."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "security.protocol": self.security_protocol.lower(),
            "client.id": self.client_id,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
            if self.sasl_username:
                conf["sasl.username"] = self.sasl_username
            password = self.password()
            if password is not None:
                conf["sasl.password"] = password
        for key, value in (
            ("ssl.ca.location", self.ssl_ca_location),
            ("ssl.certificate.location", self.ssl_certificate_location),
            ("ssl.key.location", self.ssl_key_location),
        ):
            if value is not None:
                conf[key] = str(value)
        if self.ssl_key_password is not None:
            conf["ssl.key.password"] = self.ssl_key_password.get_secret_value()
        return conf


class TopicSettings(_Section):
    audio: str = "asd.audio"
    scores: str = "asd.scores"
    alerts: str = "asd.alerts"
    dlq: str = "asd.audio.dlq"
    models: str = "asd.models"
    partitions: int = Field(12, ge=1, description="partitions when stream-asd creates asd.audio (>= max workers)")
    replication_factor: int = Field(1, ge=1)


class AudioSettings(_Section):
    sample_rate: int = Field(16_000, gt=0)
    chunk_seconds: float = Field(1.0, gt=0, description="producer chunk length")
    max_chunk_bytes: int = Field(1 << 20, gt=0, description="largest accepted chunk payload")


class WindowSettings(_Section):
    seconds: float = Field(10.0, gt=0, description="scored window length (paper: 10 s)")
    hop_seconds: float = Field(5.0, gt=0, description="hop between consecutive windows")
    gap_policy: Literal["skip", "zero_fill"] = Field(
        "zero_fill", description="missing chunks: zero-fill and flag the window, or skip windows that need them")
    max_gap_chunks: int = Field(2, ge=0, description="zero_fill at most this many missing chunks per window, else skip")
    reorder_tolerance_chunks: int = Field(4, ge=0, description="wait this many chunks past a gap for late arrivals")
    idle_evict_seconds: float = Field(300.0, gt=0, description="drop a device's buffered state after this much silence")

    @model_validator(mode="after")
    def _hop_fits(self) -> "WindowSettings":
        if self.hop_seconds > self.seconds:
            raise ValueError("window.hop_seconds must not exceed window.seconds (chunks would go unscored)")
        return self


class BatchSettings(_Section):
    max_size: int = Field(32, ge=1, description="windows per inference micro-batch")
    max_wait_ms: float = Field(200.0, ge=0, description="longest wait to fill a batch")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class AlertSettings(_Section):
    k: int = Field(3, ge=1, description="raise after k anomalous windows ...")
    n: int = Field(5, ge=1, description="... among the last n")
    clear_after: int = Field(5, ge=1, description="clear after this many consecutive normal windows")

    @model_validator(mode="after")
    def _k_le_n(self) -> "AlertSettings":
        if self.k > self.n:
            raise ValueError("alerts.k must be <= alerts.n")
        return self


class ModelSettings(_Section):
    bundle: Path | None = Field(None, description="model bundle folder to score with")
    registry: str | None = Field(None, description="model registry folder or URL (hot reload)")
    model_group: str = "default"
    poll_seconds: float = Field(60.0, gt=0, description="registry poll interval (fallback to asd.models)")


class MetricsSettings(_Section):
    port: int = Field(9108, ge=0, le=65535, description="Prometheus /metrics port (0: disabled)")
    host: str = "0.0.0.0"
    max_device_series: int = Field(
        1000, ge=0, description="most devices with asd_device_last_score/asd_device_threshold series per "
        "processor worker; devices beyond get none and are counted in asd_device_series_dropped_total")


class ProcessorSettings(_Section):
    group_id: str = "stream-asd-processor"
    app_id: str = "stream-asd"
    workers_web_port: int = Field(6066, ge=0, le=65535)
    session_timeout_seconds: float = Field(
        30.0, gt=0, description="consumer group session timeout: how soon a dead worker's partitions move")
    max_pending_windows: int = Field(1024, ge=1, description="windows queued for scoring before intake waits")
    datadir: Path | None = Field(None, description="Faust data folder (default: a temporary folder)")


class Settings(_Section):
    """All of stream-asd's settings. Build it with :func:`load_settings` (flags, env, file)."""

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    audio: AudioSettings = AudioSettings()
    window: WindowSettings = WindowSettings()
    batch: BatchSettings = BatchSettings()
    alerts: AlertSettings = AlertSettings()
    model: ModelSettings = ModelSettings()
    metrics: MetricsSettings = MetricsSettings()
    processor: ProcessorSettings = ProcessorSettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def chunk_samples(self) -> int:
        return int(round(self.audio.chunk_seconds * self.audio.sample_rate))

    def window_chunks(self) -> int:
        return max(1, int(round(self.window.seconds / self.audio.chunk_seconds)))

    def hop_chunks(self) -> int:
        return max(1, int(round(self.window.hop_seconds / self.audio.chunk_seconds)))

    def redacted(self) -> dict[str, Any]:
        """The resolved settings as plain data, secrets masked (for printing at start)."""
        return json.loads(self.model_dump_json())  # SecretStr dumps as '**********'


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        return tomllib.loads(text) if path.suffix != ".json" else json.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from None


def _env_overrides() -> dict[str, Any]:
    """ASD_SECTION__KEY=value environment variables as a nested dict (env beats the file).

    Only stream-asd's own names are read: ``ASD_<SECTION>__<KEY>`` for a section of
    :class:`Settings` and ``ASD_<FIELD>`` for a top-level field (``ASD_LOG_LEVEL``), plus
    ``ASD_CONFIG``. An unknown key inside a known section stays an error (typo protection);
    any other ``ASD_*`` name (``ASD_HOME``, ``ASD_BROKER_CACHE``...) belongs to something else and
    is ignored: a warning when its first part is close to a section name, else a debug line.
    """
    sections = {name for name, f in Settings.model_fields.items() if _is_section(f.annotation)}
    scalars = set(Settings.model_fields) - sections
    out: dict[str, Any] = {}
    for name, value in os.environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG_FILE:
            continue
        parts = name[len(ENV_PREFIX):].lower().split("__")
        if len(parts) > 1 and parts[0] in sections or len(parts) == 1 and parts[0] in scalars:
            node = out
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
            continue
        close = difflib.get_close_matches(parts[0], sorted(sections), n=1, cutoff=0.75) if len(parts) > 1 else []
        if close:
            log.warning("ignoring %s: no settings section %r (did you mean ASD_%s__%s?)", name, parts[0],
                        close[0].upper(), "__".join(parts[1:]).upper())
        else:
            log.debug("ignoring %s: not a stream-asd setting (ASD_<SECTION>__<KEY>)", name)
    return out


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def load_settings(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Resolve settings: ``overrides`` (CLI, nested dict; None values ignored) > env > file > defaults."""
    data: dict[str, Any] = {}
    path = config_file or os.environ.get(ENV_CONFIG_FILE)
    if path:
        data = _read_file(Path(path))
    data = _deep_merge(data, _env_overrides())
    if overrides:
        data = _deep_merge(data, _drop_none(overrides))
    try:
        return Settings(**data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("invalid settings (flag, ASD_* environment variable or config file):\n" + "\n".join(lines)) from None


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _drop_none(v)
            if v:
                out[k] = v
        elif v is not None:
            out[k] = v
    return out

