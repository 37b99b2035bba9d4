"""Hot reload of the processor's model from the registry (learning part).

When ``model.registry`` is set, :func:`attach_hot_reload` starts a
:class:`~stream_asd.registry.RegistryWatcher` with the worker: it follows the model group's
``current`` pointer (announcements on ``asd.models``, polling every ``model.poll_seconds`` as
a fallback), loads a new bundle in its own thread, verifies it (registry checksums, bundle
checksums, same FeatureSpec and model groups as the running model) and hands it to
:meth:`ModelRunner.swap_detector`, which swaps between batches. A batch in flight finishes with
the model it started with; score records carry the version that scored them. A bundle that
fails any check is never used: the old model keeps scoring and
``asd_model_reloads_total{result="failure"}`` counts it.

Without ``model.bundle``, the processor starts from the registry's current version
(:func:`load_current_detector`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import Settings
from ..errors import ConfigError
from ..registry import LoadedModel, Registry, RegistryWatcher, bundle_sha256

log = logging.getLogger(__name__)


def _loader(settings: Settings, expected_spec: Any = None):
    from ..model.detector import load_detector

    def load(path: Path) -> Any:
        return load_detector(path, device=settings.batch.device, max_batch=settings.batch.max_size,
                             expected_feature_spec=expected_spec)

    return load


def load_current_detector(settings: Settings) -> Any:
    """The registry's current version of ``model.model_group``, verified and loaded."""
    reg = Registry(settings.model.registry)
    group = settings.model.model_group
    pointer = reg.current(group)
    if pointer is None:
        raise ConfigError(f"registry {settings.model.registry} has no current version of model group {group!r}: "
                          f"publish one (`asd-train publish`) or pass --bundle")
    detector = _loader(settings)(reg.fetch(group, pointer.version))
    detector.registry_version = pointer.version  # so the watcher knows what is running
    log.info("model %s/%s loaded from the registry %s", group, pointer.version, settings.model.registry)
    return detector


def _running_version(reg: Registry, group: str, detector: Any) -> str | None:
    """Registry version of the running detector: set by load_current_detector, or found by
    comparing the bundle folder's checksum with the current pointer's."""
    version = getattr(detector, "registry_version", None)
    if version:
        return version
    pointer = reg.current(group)
    path = getattr(detector, "path", None)
    if pointer is not None and path is not None:
        try:
            if bundle_sha256(path) == pointer.sha256:
                return pointer.version
        except Exception:  # noqa: BLE001 - not a folder we can read: treat as unknown
            pass
    return None


def start_watcher(settings: Settings, runner: Any, metrics: Any = None) -> RegistryWatcher | None:
    """Start following the registry (None when ``model.registry`` is not set)."""
    if not settings.model.registry:
        return None
    from ..kafka import consumer_conf

    reg = Registry(settings.model.registry)
    group = settings.model.model_group
    running = runner.detector

    def swap(loaded: LoadedModel) -> None:
        loaded.detector.registry_version = loaded.version
        runner.swap_detector(loaded.detector)  # raises (and keeps the old model) if unfit

    try:  # subscribe to an existing topic, so the first announcement is not missed
        from ..kafka import admin_conf, ensure_topics

        ensure_topics(admin_conf(settings), {settings.topics.models: 1}, config={},
                      replication_factor=settings.topics.replication_factor)
    except Exception as exc:  # noqa: BLE001 - polling still works without announcements
        log.warning("hot reload: cannot ensure topic %s (%s); relying on polling", settings.topics.models, exc)
    kafka = consumer_conf(settings, "unused")
    del kafka["group.id"]  # the watcher picks a per-process group: every worker sees every announcement
    watcher = RegistryWatcher(
        reg, group, swap, running_version=_running_version(reg, group, running), running_detector=running,
        loader=_loader(settings, getattr(running, "feature_spec", None)), poll_seconds=settings.model.poll_seconds,
        kafka_conf=kafka, topic=settings.topics.models, metrics=metrics, report_swaps=False)
    log.info("hot reload: following %s/%s (running %s; %s announcements, poll every %.0f s)",
             settings.model.registry, group, watcher.running_version, settings.topics.models,
             settings.model.poll_seconds)
    return watcher.start()


def attach_hot_reload(app: Any, settings: Settings, runner: Any, metrics: Any = None) -> None:
    """Start the watcher with the Faust worker and stop it on shutdown (no-op without a registry)."""
    if not settings.model.registry:
        return
    state: dict[str, RegistryWatcher | None] = {"watcher": None}

    @app.task
    async def model_watch() -> None:
        state["watcher"] = start_watcher(settings, runner, metrics)
        app.asd_model_watcher = state["watcher"]

    @app.on_before_shutdown.connect
    async def stop_model_watch(sender, **kwargs) -> None:
        if state["watcher"] is not None:
            state["watcher"].stop(timeout=5.0)
