"""One exception hierarchy for the runtime; messages tell the user what to do."""

from __future__ import annotations


class AsdError(Exception):
    """Base of every error stream-asd raises on purpose."""


class ConfigError(AsdError):
    """A setting is missing or invalid."""


class WireFormatError(AsdError):
    """A Kafka message does not follow the stream-asd wire format.

    ``reason`` is a short, stable, machine-readable code (used as the DLQ reason header and as
    the ``reason`` label of ``asd_dlq_messages_total``); the message says what was wrong.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message


class AudioFileError(AsdError):
    """An audio file cannot be read or written."""


class DatasetLayoutError(AsdError):
    """A data folder does not match the requested layout."""


class BundleError(AsdError):
    """A model bundle is corrupt, incompatible or incomplete. A bundle that raises this is never used."""


class BrokerError(AsdError):
    """The local Kafka broker could not be provisioned, started or reached."""


class UnknownModelGroup(BundleError):
    """A window's machine type has no model group in the loaded bundle (train one, or map the
    device to a machine type the bundle covers)."""
