"""Step 5: the fleet streams: one producer agent on a thread of the demo, with its /metrics."""

from __future__ import annotations

import threading
import time
from typing import Callable

from ..config import Settings
from .errors import DemoError
from .fleet import FleetPlan

OnFaultOnset = Callable[[str, str, int], None]  # device id, fault label, capture time (ns) of the first faulty chunk


class FleetStream:
    """Use with ``with``: on exit the agent is stopped (flushing) and /metrics closed."""

    def __init__(self, settings: Settings, plan: FleetPlan, run_id: str, duration_s: float | None, metrics_port: int):
        self.settings, self.plan, self.run_id = settings, plan, run_id
        self.duration_s = duration_s
        self.metrics_port = metrics_port
        self.start_ns = time.time_ns()
        self.report = None  # the agent's ProducerReport once it returns
        self.error: Exception | None = None
        self._agent = None
        self._thread: threading.Thread | None = None
        self._server = None

    def __enter__(self) -> "FleetStream":
        return self

    def __exit__(self, *_exc) -> None:
        self.stop("stop")
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def serve_metrics(self) -> None:
        from prometheus_client import CollectorRegistry

        from ..metrics import ProducerMetrics, serve

        self._registry = CollectorRegistry()
        self._metrics = ProducerMetrics(self._registry)
        if self.metrics_port:
            self._server = serve(self.metrics_port, "127.0.0.1", self._registry)

    def start(self, on_fault_onset: OnFaultOnset) -> None:
        from ..producer.agent import ProducerAgent

        chunk_s = self.settings.audio.chunk_seconds
        seq0 = self.start_ns // int(chunk_s * 1e9)
        onset_seq = {dev: (label, seq0 + int(round(at_s / chunk_s))) for dev, (label, at_s) in self.plan.faults().items()}

        def on_chunk(source, header):  # the capture time of the first faulty chunk is the fault's onset
            plan = onset_seq.get(source.device_id)
            if plan is not None and header.seq == plan[1]:
                on_fault_onset(source.device_id, plan[0], header.capture_ns)

        self._agent = ProducerAgent(self.settings, self.plan.sources, realtime=True, duration_s=self.duration_s,
                                    metrics=self._metrics, start_ns=self.start_ns, seq_start=seq0, on_chunk=on_chunk,
                                    producer_id=f"demo-{self.run_id}",
                                    # librdkafka warns while a fresh broker loads its coordinator: expected here
                                    producer_overrides={"log_level": 3})
        self._thread = threading.Thread(target=self._produce, name="producer", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            self.report = self._agent.run()
        except Exception as exc:  # raised on the demo's thread by check()
            self.error = exc

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def check(self) -> None:
        if self.error is not None:
            raise DemoError(f"the producer failed: {self.error}")

    def stop(self, reason: str) -> None:
        """Stop reading the sources and wait for the agent's flush."""
        if self.running:
            self._agent.stop(reason)
            self._thread.join(60)
