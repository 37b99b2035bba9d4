"""The Faust app of the stream processor: wiring of the parts in pipeline.py onto a Faust worker.

Run it with ``stream-asd process --bootstrap B --bundle PATH`` (see cli.py), from Python with
:func:`run_processor`, or as a plain Faust worker::

    ASD_KAFKA__BOOTSTRAP=127.0.0.1:9092 ASD_MODEL__BUNDLE=bundles/current \\
        faust -A stream_asd.processor.app worker -l info

(the module-level ``app`` is built on first access from ``ASD_*`` / ``ASD_CONFIG`` settings).

Offsets: the ``asd.audio`` topic is declared with ``acks=False`` so Faust neither tracks nor
commits its offsets; a timer commits the points computed by offsets.py (see there for why
Faust's own commit machinery is not used) through the consumer's ``_commit``. On a rebalance
the worker commits what is done, forgets the revoked partitions' devices, and Faust's recovery
seeks every assigned partition back to its committed offset, so windows are rebuilt from there.

Consumer lag: after each commit round the timer sets ``asd_consumer_lag_records`` per owned
partition from the high watermark aiokafka already holds (``app.consumer.highwater(tp)``, from
its fetch responses) minus the committed offset (pipeline.py ``refresh_lag``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import tempfile
from typing import Any

from ..config import Settings, load_settings
from ..metrics import ProcessorMetrics
from .pipeline import StreamProcessor
from .runner import ModelRunner

log = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 1.0
DRAIN_TIMEOUT_S = 15.0


def load_runner(settings: Settings, metrics: ProcessorMetrics, detector: Any = None) -> ModelRunner:
    if detector is None:
        from ..errors import ConfigError
        from ..model.detector import load_detector

        if settings.model.bundle is None and settings.model.registry:
            from .reload import load_current_detector  # learning part: start from the registry

            detector = load_current_detector(settings)
        elif settings.model.bundle is None:
            raise ConfigError("no model bundle: pass --bundle PATH (or set ASD_MODEL__BUNDLE), or a registry "
                              "(model.registry)")
        else:
            detector = load_detector(settings.model.bundle, device=settings.batch.device,
                                     max_batch=settings.batch.max_size)
    return ModelRunner(detector, metrics, window_samples=settings.window_chunks() * settings.chunk_samples())


def ensure_processor_topics(settings: Settings) -> None:
    from ..kafka import admin_conf, ensure_topics

    t = settings.topics
    ensure_topics(admin_conf(settings), {t.audio: t.partitions, t.scores: t.partitions, t.alerts: t.partitions,
                                         t.dlq: t.partitions}, replication_factor=t.replication_factor)


def create_app(settings: Settings, *, detector: Any = None, metrics: ProcessorMetrics | None = None,
               ensure_topics: bool = True):
    """Build the Faust app (not started). ``detector`` overrides the bundle (tests)."""
    import faust

    from ..kafka import faust_settings

    if metrics is None:
        from prometheus_client import CollectorRegistry

        metrics = ProcessorMetrics(CollectorRegistry())
    runner = load_runner(settings, metrics, detector)
    if ensure_topics:
        ensure_processor_topics(settings)
    session = settings.processor.session_timeout_seconds
    app = faust.App(
        settings.processor.group_id,  # Faust uses the app id as the consumer group id
        **faust_settings(
            settings,
            key_serializer="raw",
            value_serializer="raw",
            web_enabled=False,
            datadir=str(settings.processor.datadir or tempfile.mkdtemp(prefix="stream-asd-faust-")),
            stream_wait_empty=False,  # our events are never acked (acks=False); do not wait for them
            broker_session_timeout=session,
            broker_heartbeat_interval=max(0.5, session / 10),
            broker_rebalance_timeout=max(session, 10.0),
            topic_disable_leader=True,
            producer_linger=0.005,
        ),
    )

    async def send(topic: str, key: bytes | None, value: bytes | None, headers: list):
        return await app.producer.send(topic, key, value, None, None, headers or None)

    proc = StreamProcessor(settings, runner, send, metrics)
    app.asd_processor = proc  # for the registry/hot reload (app.asd_runner.swap_detector) and tests
    app.asd_runner = runner
    app.asd_metrics = metrics
    app.asd_settings = settings
    from .reload import attach_hot_reload  # learning part: registry watcher (no-op without model.registry)

    attach_hot_reload(app, settings, runner, metrics)
    audio = app.topic(settings.topics.audio, acks=False)

    @app.agent(audio, name="stream_asd.processor.audio")
    async def audio_chunks(stream):
        async for event in stream.events():
            msg = event.message
            await proc.on_message(msg.tp, msg.offset, msg.key, msg.value, msg.headers)

    async def commit(tps=None, *, during_rebalance: bool = False) -> None:
        if app.rebalancing and not during_rebalance:
            return
        due = proc.commits_due(tps)
        if not due:
            return
        try:
            ok = await asyncio.wait_for(app.consumer._commit(due), timeout=10.0)
        except Exception as exc:  # at-least-once: a failed commit only means more re-reads
            log.warning("offset commit failed: %r", exc)
            ok = False
        metrics.offset_commits.labels(result="ok" if ok else "failed").inc()
        if ok:
            proc.ledger.confirm(due)

    @app.task
    async def scoring() -> None:
        try:
            await proc.scoring_loop()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.exception("scoring failed; stopping the worker (a restart redoes the open windows)")
            await app.crash(exc)

    def highwater(tp) -> int | None:
        # The high watermark aiokafka took from its last fetch response for tp: no request.
        return app.consumer.highwater(tp)

    def group_committed(tp) -> int | None:
        # The group's committed offset Faust read when the partition was assigned (its seek).
        return getattr(app.consumer, "_committed_offset", {}).get(tp)

    @app.timer(interval=COMMIT_INTERVAL_S)
    async def housekeeping() -> None:
        if proc.failed is not None:
            await app.crash(proc.failed)
            return
        await proc.maintenance()
        await commit()
        proc.refresh_lag(highwater, group_committed)  # every commit interval, after the commit

    @app.on_partitions_revoked.connect
    async def on_revoked(sender, revoked, **kwargs) -> None:
        await commit(revoked, during_rebalance=True)
        proc.on_revoked(revoked)

    @app.on_partitions_assigned.connect
    async def on_assigned(sender, assigned, **kwargs) -> None:
        proc.on_assigned({tp for tp in assigned if tp.topic == settings.topics.audio})

    @app.on_before_shutdown.connect
    async def on_shutdown(sender, **kwargs) -> None:
        # The fetcher has stopped: score what is queued, wait for the broker's acks, commit.
        try:
            await asyncio.wait_for(proc.drain(), timeout=DRAIN_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("shutdown: windows still unscored after %.0f s; they are redone on restart", DRAIN_TIMEOUT_S)
        await commit(during_rebalance=True)
        runner.close()

    return app


def run_processor(settings: Settings, *, detector: Any = None, metrics: ProcessorMetrics | None = None,
                  serve_metrics: bool = True, print_config: bool = True) -> int:
    """Run a processor worker until SIGTERM/SIGINT (graceful: drain, commit). Returns the exit code."""
    import faust

    from ..metrics import serve

    if print_config:
        print(json.dumps({"stream-asd process": settings.redacted()}, indent=2), flush=True)
    from prometheus_client import REGISTRY

    # ProcessorMetrics(None) would register nothing: production uses the default registry.
    metrics = metrics or ProcessorMetrics(REGISTRY)
    app = create_app(settings, detector=detector, metrics=metrics)
    if serve_metrics:
        try:
            serve(settings.metrics.port, settings.metrics.host)
        except OSError as exc:
            from ..errors import ConfigError

            raise ConfigError(f"cannot serve /metrics on {settings.metrics.host}:{settings.metrics.port}: {exc}; "
                              "choose another port with --metrics-port (0 disables)") from None
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


_app = None


def __getattr__(name: str):
    # ``faust -A stream_asd.processor.app worker`` looks up ``app``: build it on first access.
    global _app
    if name == "app":
        if _app is None:
            from ..metrics import serve

            from prometheus_client import REGISTRY

            settings = load_settings()
            metrics = ProcessorMetrics(REGISTRY)
            _app = create_app(settings, metrics=metrics)
            serve(settings.metrics.port, settings.metrics.host)
        return _app
    raise AttributeError(name)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_processor(load_settings()))
