"""Step 1: the run's Kafka, a broker found or started, this run's topics, and their cleanup."""

from __future__ import annotations

import logging
import shutil

from ..config import Settings, load_settings
from .console import Console, Workspace
from .errors import DemoError

log = logging.getLogger(__name__)


class DemoKafka:
    """Use with ``with``: on exit a broker the demo started is stopped, on a reused one the run's
    topics are deleted (runs never see each other's data, and leave none behind)."""

    def __init__(self, console: Console, ws: Workspace, bootstrap: str | None, config_file: str | None):
        self.console, self.ws = console, ws
        self.requested = bootstrap
        self.config_file = config_file
        self.bootstrap: str | None = None
        self.broker = None  # the LocalBroker this run started

    def __enter__(self) -> "DemoKafka":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def start(self) -> Settings:
        """Find or start a broker, create the run's topics; the run's settings."""
        self.bootstrap = self._find_or_start()
        settings = self.settings()
        self._create_topics(settings)
        return settings

    def settings(self, window_s: float | None = None, hop_s: float | None = None) -> Settings:
        """The demo's settings: --config / ASD_* as usual, with this run's broker, topics and windows."""
        r = self.ws.run_id
        topics = {"audio": f"asd.audio.{r}", "scores": f"asd.scores.{r}", "alerts": f"asd.alerts.{r}",
                  "dlq": f"asd.audio.dlq.{r}", "models": f"asd.models.{r}", "partitions": 4}
        return load_settings(self.config_file, {
            "kafka": {"bootstrap": self.bootstrap}, "topics": topics,
            "window": {"seconds": window_s, "hop_seconds": hop_s},
        })

    def _find_or_start(self) -> str:
        from ..broker import LocalBroker, daemon_status, default_state_dir, metadata_ready

        say = self.console.say
        if self.requested:
            if not metadata_ready(self.requested, timeout=10):
                raise DemoError(f"no Kafka answers at {self.requested}; drop --bootstrap to start a local one")
            say(f"using Kafka at {self.requested}")
            return self.requested
        status = daemon_status(default_state_dir())
        if status.running and status.ready:
            say(f"reusing the running local broker at {status.bootstrap} (stream-asd broker start)")
            return status.bootstrap
        say("starting a local Apache Kafka broker (first run resolves the jars from Maven Central)")
        self.broker = LocalBroker(self.ws.logs / "broker")
        self.broker.start(port=0)
        say(f"Kafka ready at {self.broker.bootstrap}")
        return self.broker.bootstrap

    @staticmethod
    def _create_topics(settings: Settings) -> None:
        from ..kafka import admin_conf, ensure_topics

        t = settings.topics
        # The processor keys scores/alerts/DLQ by device like the audio: same partition count.
        ensure_topics(admin_conf(settings), {t.audio: t.partitions, t.scores: t.partitions, t.alerts: t.partitions,
                                             t.dlq: t.partitions, t.models: 1})

    def close(self) -> None:
        if self.broker is not None:
            self.broker.stop()
            shutil.rmtree(self.broker.state_dir, ignore_errors=True)
        elif self.bootstrap:
            try:
                from ..kafka import delete_topics

                t = self.settings().topics
                delete_topics(self.bootstrap, [t.audio, t.scores, t.alerts, t.dlq, t.models])
            except Exception as exc:  # cleanup must not hide the result
                log.warning("could not delete the demo topics: %s", exc)
