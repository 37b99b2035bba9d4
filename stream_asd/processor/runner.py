"""The model runner: scores a micro-batch of windows off the event loop.

One worker thread runs the detector (torch releases the GIL, so the event loop keeps consuming
meanwhile). The detector in use is swapped atomically between batches by
:meth:`ModelRunner.swap_detector` (hot reload): a batch holds the detector it started with.

The detector contract (stream_asd/model/detector.py): ``version``, ``window_samples``,
``model_groups`` (machine types it can score), ``score_windows(waves (B, N) float32,
machine_types, device_ids) -> [WindowScore(score, scores, threshold, is_anomaly)]``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from ..errors import BundleError, ConfigError
from ..metrics import ProcessorMetrics

log = logging.getLogger(__name__)


def detector_device(detector: Any) -> str:
    dev = getattr(detector, "device", "cpu")
    return str(getattr(dev, "type", dev))


class ModelRunner:
    def __init__(self, detector: Any, metrics: ProcessorMetrics | None, window_samples: int):
        self.window_samples = window_samples
        self.metrics = metrics
        self._check(detector)
        self._detector = detector
        self._swap_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asd-model")
        self._publish_info(detector)

    # -- detector in use -----------------------------------------------------------------------
    @property
    def detector(self) -> Any:
        return self._detector

    @property
    def version(self) -> str:
        return str(self._detector.version)

    def can_score(self, machine_type: str) -> bool:
        groups = getattr(self._detector, "model_groups", None)
        return groups is None or machine_type in groups

    def _check(self, detector: Any) -> None:
        for attr in ("version", "score_windows"):
            if not hasattr(detector, attr):
                raise BundleError(f"detector {detector!r} has no {attr!r}: not a stream-asd detector")
        n = getattr(detector, "window_samples", None)
        if n is not None and int(n) != self.window_samples:
            raise ConfigError(
                f"the model bundle scores windows of {n} samples but the processor assembles "
                f"{self.window_samples} (window.seconds x audio.sample_rate); set window.seconds to "
                f"match the bundle")

    def swap_detector(self, new_detector: Any) -> None:
        """Use ``new_detector`` from the next batch on. Raises (and keeps the old one) if unfit."""
        try:
            self._check(new_detector)
        except Exception:
            if self.metrics:
                self.metrics.model_reloads.labels(result="rejected").inc()
            raise
        with self._swap_lock:
            old, self._detector = self._detector, new_detector
        self._publish_info(new_detector)
        if self.metrics:
            self.metrics.model_reloads.labels(result="ok").inc()
        log.info("model swapped: %s -> %s", getattr(old, "version", "?"), new_detector.version)

    def _publish_info(self, detector: Any) -> None:
        if not self.metrics:
            return
        groups = getattr(detector, "model_groups", None)
        self.metrics.model_info.info({
            "version": str(detector.version),
            "device": detector_device(detector),
            "machine_types": ",".join(sorted(groups)) if groups is not None else "*",
        })
        self.metrics.model_loaded_at.set(time.time())

    # -- scoring -------------------------------------------------------------------------------
    def score(self, waves: np.ndarray, machine_types: Sequence[str], device_ids: Sequence[str]):
        """Score a batch in the calling thread: returns (model_version, [WindowScore])."""
        with self._swap_lock:
            detector = self._detector
        t0 = time.perf_counter()
        results = detector.score_windows(waves, list(machine_types), list(device_ids))
        elapsed = time.perf_counter() - t0
        if len(results) != len(machine_types):
            raise RuntimeError(f"detector returned {len(results)} scores for {len(machine_types)} windows")
        if self.metrics:
            self.metrics.inference_seconds.labels(device=detector_device(detector)).observe(elapsed)
            self.metrics.batch_size.observe(len(machine_types))
        return str(detector.version), results

    async def score_async(self, waves: np.ndarray, machine_types: Sequence[str], device_ids: Sequence[str]):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.score, waves, machine_types, device_ids)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
