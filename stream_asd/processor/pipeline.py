"""The processor's parts composed in one place, independent of Faust (the app feeds it).

message -> decode/validate (DLQ on error) -> window assembly -> micro-batcher -> model runner
(thread) -> score record (+ alert change) -> broker ack -> window resolved -> offsets done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Hashable, Iterable

import numpy as np

from ..config import Settings
from ..errors import WireFormatError
from ..metrics import DeviceSeries, ProcessorMetrics, lag_records
from ..wire import R_BAD_CHUNK_LENGTH, R_UNKNOWN_MACHINE_TYPE, ScoreRecord, decode_chunk, processing_error
from .alerts import AlertTracker
from .batcher import MicroBatcher
from .offsets import OffsetLedger, WindowAccounting
from .runner import ModelRunner
from .sinks import SendFn, Sinks
from .windows import DROP_DUPLICATE, DROP_HEAD, DROP_LATE, AddResult, Window, WindowAssembler

log = logging.getLogger(__name__)


def _tp_fields(tp: Any) -> tuple[str, int]:
    if not hasattr(tp, "topic") and isinstance(tp, tuple) and len(tp) == 2:
        return str(tp[0]), int(tp[1])  # a plain (topic, partition)
    return str(getattr(tp, "topic", tp)), int(getattr(tp, "partition", -1))


class StreamProcessor:
    """State and logic of one processor worker (one event loop)."""

    def __init__(self, settings: Settings, runner: ModelRunner, send: SendFn, metrics: ProcessorMetrics,
                 *, clock: Callable[[], float] = time.monotonic, wall_ns: Callable[[], int] = time.time_ns):
        w = settings.window
        self.settings = settings
        self.chunk_samples = settings.chunk_samples()
        self.assembler = WindowAssembler(
            win=settings.window_chunks(), hop=settings.hop_chunks(), chunk_samples=self.chunk_samples,
            sample_rate=settings.audio.sample_rate, gap_policy=w.gap_policy, max_gap_chunks=w.max_gap_chunks,
            reorder_tolerance=w.reorder_tolerance_chunks, idle_evict_seconds=w.idle_evict_seconds)
        self.ledger = OffsetLedger()
        self.accounting = WindowAccounting()
        self.batcher: MicroBatcher[Window] = MicroBatcher(
            settings.batch.max_size, settings.batch.max_wait_ms / 1000.0, settings.processor.max_pending_windows)
        self.alerts = AlertTracker(settings.alerts.k, settings.alerts.n, settings.alerts.clear_after)
        self.runner = runner
        self.sinks = Sinks(send, settings.topics, metrics)
        self.metrics = metrics
        self.device_series = DeviceSeries(metrics, settings.metrics.max_device_series)
        self.clock, self.wall_ns = clock, wall_ns
        self.device_part: dict[str, Hashable] = {}
        self.assigned: set | None = None  # None: accept every partition (no group protocol)
        self.failed: BaseException | None = None
        self._deliveries: set[asyncio.Task] = set()
        self._scoring = False
        self.windows_scored = 0

    # -- intake ------------------------------------------------------------------------------
    async def on_message(self, tp: Hashable, offset: int, key: Any, value: bytes | None, headers: Any) -> None:
        if self.assigned is not None and tp not in self.assigned:
            return  # fetched before a revocation: the partition's new owner reads it again
        self.ledger.track(tp, offset)
        ref = (tp, offset)
        try:
            chunk = decode_chunk(key, value, headers, expected_sample_rate=self.settings.audio.sample_rate,
                                 max_bytes=self.settings.audio.max_chunk_bytes)
            if chunk.n_samples != self.chunk_samples:
                raise WireFormatError(R_BAD_CHUNK_LENGTH, f"{chunk.n_samples} samples, expected {self.chunk_samples} "
                                      f"(audio.chunk_seconds={self.settings.audio.chunk_seconds})")
            if not self.runner.can_score(chunk.header.machine_type):
                raise WireFormatError(R_UNKNOWN_MACHINE_TYPE,
                                      f"machine type {chunk.header.machine_type!r} is not in model bundle "
                                      f"{self.runner.version}; train a model for it")
        except WireFormatError as err:
            await self._dead_letter(tp, offset, key, value, headers, err)
            return
        except Exception as exc:  # a bug must not stop the stream (nor pin the offset): dead-letter it
            log.exception("validating %s[%s]@%d failed", *_tp_fields(tp), offset)
            await self._dead_letter(tp, offset, key, value, headers, processing_error(exc))
            return
        self.metrics.chunks_consumed.labels(machine_type=chunk.header.machine_type).inc()
        try:
            result = self.assembler.add(chunk, ref, self.clock(), part=tp)
        except Exception as exc:  # a bug must not stop the stream: dead-letter the message
            log.exception("window assembly failed for %s[%s]@%d", *_tp_fields(tp), offset)
            await self._dead_letter(tp, offset, key, value, headers, processing_error(exc))
            return
        self.device_part[chunk.device_id] = tp
        if result.dropped == DROP_DUPLICATE:
            self.metrics.chunks_duplicate.inc()
        elif result.dropped == DROP_LATE:
            self.metrics.chunks_late.inc()
        elif result.dropped == DROP_HEAD:
            self.metrics.chunks_head.inc()
        await self._settle(result)

    async def _settle(self, result: AddResult) -> None:
        """Chunks in no window are done at once; decided windows go on to scoring or accounting."""
        if result.late_strays:
            self.metrics.chunks_late.inc(result.late_strays)
        self.ledger.mark_all_done(result.released)
        await self._decided(result.windows)

    async def _dead_letter(self, tp, offset, key, value, headers, err: WireFormatError) -> None:
        topic, partition = _tp_fields(tp)
        fut = await self.sinks.dead_letter(key, value, headers, err, topic, partition, offset)
        self._track_delivery([fut], lambda: self.ledger.mark_done((tp, offset)))

    async def _decided(self, windows: Iterable[Window]) -> None:
        for w in windows:
            if w.scored:
                self.accounting.decided(w.device_id, w.serial, w.releases)
                await self.batcher.put(w)
            else:
                self.metrics.windows_skipped.labels(reason=w.skip_reason).inc()
                self.ledger.mark_all_done(self.accounting.decided(w.device_id, w.serial, w.releases, resolved=True))

    # -- scoring -----------------------------------------------------------------------------
    async def scoring_loop(self) -> None:
        while True:
            batch = await self.batcher.next_batch()
            self._scoring = True
            try:
                await self.score_batch(batch)
            finally:
                self._scoring = False

    async def drain(self) -> None:
        """Wait until every queued window is scored and every record acknowledged."""
        while self.batcher.pending() or self._scoring:
            if self.failed is not None:
                return
            await asyncio.sleep(0.05)
        await self.wait_deliveries()

    async def score_batch(self, batch: list[Window]) -> None:
        batch = [w for w in batch if self.accounting.knows(w.serial)]  # drop windows of revoked partitions
        if not batch:
            return
        waves = np.stack([w.samples for w in batch]).astype(np.float32, copy=False)
        try:
            version, results = await self.runner.score_async(
                waves, [w.machine_type for w in batch], [w.device_id for w in batch])
            scored = list(zip(batch, results))
        except Exception:
            log.exception("scoring a batch of %d windows failed; scoring them one by one", len(batch))
            scored, version = await self._score_singly(batch)
        now_ns = self.wall_ns()
        m = self.metrics
        for w, r in scored:
            latency = max(0.0, (now_ns - w.end_ns) / 1e9)
            rec = ScoreRecord(
                device_id=w.device_id, machine_type=w.machine_type, window_id=w.window_id,
                first_seq=w.first_seq, last_seq=w.last_seq, window_start_ns=w.start_ns, window_end_ns=w.end_ns,
                score=float(r.score), scores={k: float(v) for k, v in dict(r.scores).items()},
                threshold=float(r.threshold), is_anomaly=bool(r.is_anomaly), model_version=version,
                scored_at_ns=now_ns, capture_to_score_s=latency, flags=list(w.flags))
            futs = [await self.sinks.score(rec)]
            mt = w.machine_type
            m.windows_scored.labels(machine_type=mt).inc()
            m.capture_to_score.labels(machine_type=mt).observe(latency)
            if w.device_id in self.device_part:  # not revoked while the batch was scored
                self.device_series.set(w.device_id, mt, rec.score, rec.threshold)
            if w.flags:
                m.windows_gap_filled.inc()
            if rec.is_anomaly:
                m.anomalies.labels(machine_type=mt).inc()
            alert = self.alerts.observe(
                device_id=w.device_id, machine_type=mt, window_index=w.index, window_id=w.window_id,
                score=rec.score, threshold=rec.threshold, is_anomaly=rec.is_anomaly, model_version=version,
                at_ns=now_ns)
            if alert is not None:
                if alert.state == "raised":
                    alert.explanation = await self._explain(w, version)
                futs.append(await self.sinks.alert(alert))
                m.alerts.labels(machine_type=mt, state=alert.state).inc()
                m.alerts_active.labels(machine_type=mt).inc(1 if alert.state == "raised" else -1)
            serial = w.serial
            self._track_delivery(futs, lambda s=serial: self.ledger.mark_all_done(self.accounting.resolved(s)))
            self.windows_scored += 1

    async def _explain(self, w: Window, version: str) -> dict[str, Any] | None:
        """The compact explanation of an alerted window (``stream_asd.model.explain``), computed
        in a worker thread only when an alert is raised; None when the model in use is not an
        ensemble, was swapped since the window was scored, or explaining fails (the alert is
        never held back by its explanation)."""
        det = self.runner.detector
        if getattr(det, "kind", None) != "ensemble" or str(det.version) != version:
            return None
        try:
            from ..model.explain import explain_window

            e = await asyncio.to_thread(explain_window, det, w.samples, w.machine_type, w.device_id)
            return e.to_dict()
        except Exception:
            log.warning("explaining alerted window %s failed; the alert goes out without an explanation",
                        w.window_id, exc_info=True)
            return None

    async def _score_singly(self, batch: list[Window]) -> tuple[list, str]:
        """Isolate the windows the model cannot score: they are skipped (``score_error``), the
        rest scored, so one bad window (or a swapped-in model missing a group) never stalls the
        stream in a crash loop."""
        out, version = [], self.runner.version
        for w in batch:
            try:
                version, res = await self.runner.score_async(w.samples[None, :], [w.machine_type], [w.device_id])
                out.append((w, res[0]))
            except Exception as exc:
                log.error("window %s cannot be scored (%r): skipped", w.window_id, exc)
                self.metrics.windows_skipped.labels(reason="score_error").inc()
                self.ledger.mark_all_done(self.accounting.resolved(w.serial))
        return out, version

    def _track_delivery(self, futs: list, on_ok: Callable[[], None]) -> None:
        async def wait() -> None:
            try:
                for f in futs:
                    await f
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # the broker refused a record: stop, a restart redoes it
                log.error("delivery failed: %r; the worker stops so that its windows are redone", exc)
                self.failed = self.failed or exc
                return
            on_ok()

        task = asyncio.ensure_future(wait())
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def wait_deliveries(self) -> None:
        while self._deliveries:
            await asyncio.gather(*list(self._deliveries), return_exceptions=True)

    # -- housekeeping and rebalancing --------------------------------------------------------
    async def maintenance(self) -> None:
        """Evict idle devices and refresh gauges (call every second or so)."""
        await self._settle(self.assembler.evict_idle(self.clock()))
        live = set(self.assembler.devices)
        for d in [d for d in self.device_part if d not in live and not self.accounting.has_device(d)]:
            del self.device_part[d]  # evicted and its last window resolved: the device is gone
            self.device_series.remove(d)
        self.metrics.active_devices.set(len(self.assembler))
        self.metrics.chunks_uncommitted.set(self.ledger.outstanding())
        self.metrics.windows_in_flight.set(self.accounting.in_flight())

    def refresh_lag(self, highwater: Callable[[Hashable], int | None],
                    committed: Callable[[Hashable], int | None] | None = None) -> None:
        """``asd_consumer_lag_records`` of every partition this worker owns: the high watermark
        the consumer last saw for it (``highwater(tp)``, from fetch responses: no broker round
        trip) minus its committed offset (the ledger's last confirmed commit, else where this
        worker began reading, else ``committed(tp)``, what the consumer was told at assignment).
        A partition whose lag is unknown (nothing fetched yet) keeps its last value."""
        tps = list(self.assigned if self.assigned is not None else self.ledger.parts)
        lags: dict[tuple[str, int], int] = {}
        for tp in tps:
            try:
                high = highwater(tp)
            except Exception:  # e.g. not assigned any more in the consumer (a rebalance under way)
                high = None
            base = self.ledger.committed_or_start(tp)
            if base is None and committed is not None:
                try:
                    base = committed(tp)
                except Exception:
                    base = None
            if base is None and high == 0:
                base = 0  # an empty partition: nothing to be behind on
            lag = lag_records(high, base)
            if lag is not None:
                lags[_tp_fields(tp)] = lag
        self.metrics.consumer_lag.update(lags, owned={_tp_fields(tp) for tp in tps})

    def commits_due(self, tps: Iterable | None = None) -> dict:
        due = self.ledger.to_commit()
        if tps is not None:
            keep = set(tps)
            due = {tp: o for tp, o in due.items() if tp in keep}
        return due

    def on_revoked(self, tps: Iterable) -> None:
        """Forget every device of the revoked partitions; their new owner rebuilds the windows."""
        revoked = set(tps)
        devices = [d for d, tp in self.device_part.items() if tp in revoked]
        self.assembler.drop_where(lambda dev: dev.part in revoked)
        self.accounting.forget(devices)
        for d in devices:
            self.device_part.pop(d, None)
            self.device_series.remove(d)  # its new owner reports it
        self.ledger.drop(revoked)
        self.metrics.consumer_lag.remove(_tp_fields(tp) for tp in revoked)  # its new owner reports it
        if self.assigned is not None:
            self.assigned -= revoked

    def on_assigned(self, tps: Iterable) -> None:
        self.assigned = set(tps)
        owned = {_tp_fields(tp) for tp in self.assigned}
        self.metrics.consumer_lag.remove(self.metrics.consumer_lag.partitions() - owned)
