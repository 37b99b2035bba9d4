"""Producer agents: audio sources (files, folders, manifests, synthetic fleet, capture devices)
cut into chunks and sent to ``asd.audio`` by one confluent-kafka producer per process.

- :mod:`.sources`: where the audio of each microphone comes from (:class:`DeviceSource`).
- :mod:`.agent`: :class:`ProducerAgent`, pacing, the Kafka producer, delivery accounting.
- :mod:`.cli`: ``stream-asd produce``.
"""

from .sources import (
    CaptureSource,
    DeviceSource,
    FaultSpec,
    FileSource,
    SyntheticSource,
    parse_fault,
    sources_from_paths,
    synthetic_fleet,
)

__all__ = [
    "CaptureSource", "DeviceSource", "FaultSpec", "FileSource", "SyntheticSource", "parse_fault",
    "sources_from_paths", "synthetic_fleet", "ProducerAgent", "ProducerReport", "DeviceCounts",
]


def __getattr__(name):  # the agent imports confluent_kafka: load it only when asked for
    if name in ("ProducerAgent", "ProducerReport", "DeviceCounts"):
        from . import agent

        return getattr(agent, name)
    raise AttributeError(name)
