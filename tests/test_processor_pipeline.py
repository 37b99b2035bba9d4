"""The composed pipeline without Kafka: offsets advance only past chunks whose windows are
scored and acknowledged (or dead-lettered and acknowledged); model errors never stall it."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent))
import processor_support as ps  # noqa: E402

from stream_asd.config import load_settings  # noqa: E402
from stream_asd.metrics import ProcessorMetrics  # noqa: E402
from stream_asd.processor.pipeline import StreamProcessor  # noqa: E402
from stream_asd.processor.runner import ModelRunner  # noqa: E402
from stream_asd.wire import H_CAPTURE_NS, H_DLQ_DETAIL, H_DLQ_REASON, ScoreRecord  # noqa: E402

TP = ("asd.audio", 0)


class FakeBroker:
    """``send`` returns a future the test acknowledges when it wants."""

    def __init__(self):
        self.sent: list[tuple[str, bytes, bytes, list, asyncio.Future]] = []

    async def send(self, topic, key, value, headers):
        fut = asyncio.get_running_loop().create_future()
        self.sent.append((topic, key, value, headers, fut))
        return fut

    def ack_all(self):
        for *_, fut in self.sent:
            if not fut.done():
                fut.set_result(None)

    def of(self, topic):
        return [s for s in self.sent if s[0] == topic]


def make(detector=None, clock=None, registry=None, **sections):
    settings = load_settings(None, {"audio": {"chunk_seconds": 1.0}, "window": {"seconds": 4, "hop_seconds": 2},
                                    "batch": {"max_size": 8, "max_wait_ms": 0}, **sections})
    metrics = ProcessorMetrics(registry or CollectorRegistry())
    runner = ModelRunner(detector or ps.RmsDetector(), metrics, window_samples=4 * ps.SR)
    broker = FakeBroker()
    kw = {"clock": clock} if clock is not None else {}
    return StreamProcessor(settings, runner, broker.send, metrics, **kw), broker


async def settle(proc):
    for _ in range(50):
        await asyncio.sleep(0.01)
        while proc.batcher.pending():
            await proc.score_batch(proc.batcher.drain_nowait())
    await asyncio.sleep(0.01)


def test_commit_waits_for_score_acks_and_dlq_acks():
    async def main():
        proc, broker = make()
        m = ps.fleet(1, faulty=())[0]
        offset = 0
        for seq in range(6):  # offsets 0..5: windows [0,4) and [2,6)
            await proc.on_message(TP, offset, *ps.chunk_message(m, seq))
            offset += 1
        await proc.on_message(TP, offset, b"junk", b"\x00" * 7, [])  # offset 6: invalid
        await settle(proc)
        assert len(broker.of("asd.scores")) == 2 and len(broker.of("asd.audio.dlq")) == 1
        assert proc.commits_due() == {TP: 0}  # nothing acknowledged yet: nothing may be committed
        broker.ack_all()
        await settle(proc)
        # windows [0,4) and [2,6) done: chunks 0..3 released; 4,5 wait for window [4,8)
        due = proc.commits_due()
        assert due == {TP: 4}
        proc.ledger.confirm(due)
        for seq in range(6, 8):
            await proc.on_message(TP, offset + 1, *ps.chunk_message(m, seq))
            offset += 1
        await settle(proc)
        broker.ack_all()
        await settle(proc)
        # offsets 4, 5 (seqs 4, 5) and the dead letter (6) done; offset 7 (seq 6) is needed by [6,10)
        assert proc.commits_due() == {TP: 7}
        recs = [ScoreRecord.from_json(s[2]) for s in broker.of("asd.scores")]
        assert [r.window_id for r in recs] == [f"{m.device_id}:0-3", f"{m.device_id}:2-5", f"{m.device_id}:4-7"]

    asyncio.run(main())


class FlakyDetector(ps.RmsDetector):
    """Fails on any batch holding a 'pump' window (like a swapped-in model missing a group)."""

    def score_windows(self, waves, machine_types, device_ids):
        if "pump" in machine_types:
            raise KeyError("no model group for pump")
        return super().score_windows(waves, machine_types, device_ids)


def test_unscorable_window_is_skipped_not_a_crash_loop():
    async def main():
        proc, broker = make(FlakyDetector())
        fan, pump = ps.fleet(2, faulty=())
        offset = 0
        for seq in range(4):
            for m in (fan, pump):
                await proc.on_message(TP, offset, *ps.chunk_message(m, seq))
                offset += 1
        await settle(proc)
        broker.ack_all()
        await settle(proc)
        recs = [ScoreRecord.from_json(s[2]) for s in broker.of("asd.scores")]
        assert [r.device_id for r in recs] == [fan.device_id]
        assert proc.metrics.windows_skipped.labels(reason="score_error")._value.get() == 1
        # the pump window counts as resolved: its first hop of chunks (and the fan's) are done
        assert proc.commits_due() == {TP: 4}

    asyncio.run(main())


def test_swap_detector_between_batches_and_reject_unfit():
    proc, _ = make()
    new = ps.RmsDetector(version="rms-2")
    proc.runner.swap_detector(new)
    assert proc.runner.version == "rms-2"
    try:
        proc.runner.swap_detector(ps.RmsDetector(window_samples=123, version="bad"))
    except Exception:
        pass
    assert proc.runner.version == "rms-2"
    _, res = proc.runner.score(np.zeros((1, 4 * ps.SR), np.float32), ["fan"], ["d"])
    assert res[0].score == 0.0


def dlq_reasons(broker) -> list[tuple[str, str]]:
    out = []
    for _, _, _, headers, _ in broker.of("asd.audio.dlq"):
        h = dict(headers)
        out.append((h[H_DLQ_REASON].decode(), h[H_DLQ_DETAIL].decode()))
    return out


def test_huge_integer_header_is_dead_lettered_and_its_offset_done():
    """Issue 11: a 5,000-digit ce_capturens made decode_chunk raise a plain ValueError, which
    crashed the handler: no dead letter, offset pinned for good."""
    async def main():
        proc, broker = make()
        m = ps.fleet(1, faulty=())[0]
        for seq in range(4):  # offsets 0..3: window [0,4)
            await proc.on_message(TP, seq, *ps.chunk_message(m, seq))
        key, value, headers = ps.chunk_message(m, 4)
        poison = [(k, b"7" * 5000 if k == H_CAPTURE_NS else v) for k, v in headers]
        await proc.on_message(TP, 4, key, value, poison)  # must not raise
        for seq in range(4, 6):  # the device goes on: offsets 5, 6 are seqs 4, 5
            await proc.on_message(TP, seq + 1, *ps.chunk_message(m, seq))
        await settle(proc)
        broker.ack_all()
        await settle(proc)
        assert [r for r, _ in dlq_reasons(broker)] == ["integer_out_of_range"]
        assert broker.of("asd.audio.dlq")[0][2] == value  # original bytes kept
        # windows [0,4) and [2,6) scored: chunks 0..3 and the dead letter (offset 4) are done
        assert proc.commits_due() == {TP: 5}

    asyncio.run(main())


class BrokenGroups:
    """A model_groups whose membership test fails: a bug in the check after decoding."""

    def __iter__(self):
        return iter(("fan", "pump"))

    def __contains__(self, item):
        raise RuntimeError("groups table is broken " + "x" * 5000)


def test_unexpected_error_while_validating_is_dead_lettered_not_raised():
    async def main():
        det = ps.RmsDetector()
        det.model_groups = BrokenGroups()
        proc, broker = make(det)
        m = ps.fleet(1, faulty=())[0]
        await proc.on_message(TP, 0, *ps.chunk_message(m, 0))  # must not raise
        await settle(proc)
        assert proc.commits_due() == {TP: 0}  # the dead letter is not acknowledged yet
        broker.ack_all()
        await settle(proc)
        [(reason, detail)] = dlq_reasons(broker)
        assert reason == "processing_error" and detail.startswith("RuntimeError: groups table is broken")
        assert len(detail) < 400  # the exception text is bounded
        assert proc.metrics.dlq.labels(reason="processing_error")._value.get() == 1
        assert proc.commits_due() == {TP: 1}

    asyncio.run(main())


def test_stray_of_an_evicted_device_does_not_pin_the_offset():
    """Issue 11: a far-behind chunk held at idle eviction was never marked done, so the
    partition's commit point stayed below it for good."""
    async def main():
        now = [0.0]
        proc, broker = make(clock=lambda: now[0])
        m = ps.fleet(1, faulty=())[0]
        offset = 0
        for seq in range(20, 32):  # offsets 0..11; windows [20,24) .. [28,32) are complete
            await proc.on_message(TP, offset, *ps.chunk_message(m, seq))
            offset += 1
        await proc.on_message(TP, offset, *ps.chunk_message(m, 0))  # offset 12: far behind seq 31, held
        await settle(proc)
        broker.ack_all()
        await settle(proc)
        assert proc.commits_due() == {TP: 10}  # seqs 30, 31 wait for window [30,34)
        now[0] = proc.settings.window.idle_evict_seconds + 1.0
        await proc.maintenance()  # the device is evicted: [30,34) skipped, the stray is late
        await settle(proc)
        broker.ack_all()
        await settle(proc)
        assert len(proc.assembler) == 0
        assert proc.commits_due() == {TP: 13}
        assert proc.metrics.chunks_late._value.get() == 1

    asyncio.run(main())


# -- per-device series (issue 11: unbounded cardinality) --------------------------------------

def device_series(samples: dict[str, float]) -> dict[str, set[str]]:
    """Series name -> device ids it has, from a scrape."""
    out: dict[str, set[str]] = {}
    for key in samples:
        name = key.split("{", 1)[0]
        if name in ("asd_device_last_score", "asd_device_threshold"):
            out.setdefault(name, set()).add(key.split('device_id="', 1)[1].split('"', 1)[0])
    return out


async def feed_windows(proc, broker, machines, first_seq, offset):
    """Two windows per device ([s, s+4), [s+2, s+6)), scored and acknowledged."""
    for seq in range(first_seq, first_seq + 6):
        for m in machines:
            await proc.on_message(TP, offset, *ps.chunk_message(m, seq))
            offset += 1
    await settle(proc)
    broker.ack_all()
    await settle(proc)
    return offset


def test_device_series_are_removed_at_eviction_and_capped():
    """Over HTTP, as Prometheus sees it: with metrics.max_device_series = 3 and 5 devices, 3
    have series and the dropped counter says 2 (once per device, not per window); once they
    are evicted every per-device series is gone and new devices get the freed places."""
    from stream_asd.metrics import serve

    async def main():
        now = [0.0]
        registry = CollectorRegistry()
        proc, broker = make(clock=lambda: now[0], registry=registry, metrics={"max_device_series": 3})
        port = ps.free_port()
        server = serve(port, "127.0.0.1", registry)
        try:
            machines = [ps.Machine(f"dev-{i}", "fan", 110.0 + 7 * i, seed=i) for i in range(5)]
            offset = await feed_windows(proc, broker, machines, 0, 0)
            assert len(broker.of("asd.scores")) == 10  # every device is scored; only its series are capped
            got = ps.scrape(port)
            series = device_series(got)
            assert series["asd_device_last_score"] == series["asd_device_threshold"] == {"dev-0", "dev-1", "dev-2"}
            assert got["asd_device_series_dropped_total"] == 2
            # idle eviction: the open windows are decided, acknowledged, then the device is gone
            now[0] = proc.settings.window.idle_evict_seconds + 1.0
            await proc.maintenance()
            await settle(proc)
            broker.ack_all()
            await settle(proc)
            await proc.maintenance()
            got = ps.scrape(port)
            assert device_series(got) == {} and got["asd_active_devices"] == 0
            # the places are free again: 3 of 4 new devices get series, the 4th is counted
            new = [ps.Machine(f"new-{i}", "pump", 180.0 + 7 * i, seed=10 + i) for i in range(4)]
            await feed_windows(proc, broker, new, 100, offset)
            got = ps.scrape(port)
            assert device_series(got)["asd_device_last_score"] == {"new-0", "new-1", "new-2"}
            assert got["asd_device_series_dropped_total"] == 3
        finally:
            server.shutdown()
            server.server_close()

    asyncio.run(main())


def test_device_series_of_revoked_partitions_are_removed():
    async def main():
        proc, broker = make()
        m = ps.fleet(1, faulty=())[0]
        await feed_windows(proc, broker, [m], 0, 0)
        assert len(proc.device_series) == 1
        proc.on_revoked([TP])
        assert len(proc.device_series) == 0
        assert not any(s.samples for s in proc.metrics.last_score.collect())

    asyncio.run(main())


# -- explanations on raised alerts (issue 14 item 2) ----------------------------------------------

def _rms_ensemble():
    """A real tiny ensemble Detector (4 s windows, 64 bands) whose statistics are fitted on the
    fan's normal sound, alerting by RMS like ps.RmsDetector (the plumbing stays predictable);
    its band statistics explain the alerts."""
    import torch

    from stream_asd.audio.features import FeatureSpec
    from stream_asd.model.detector import Detector
    from stream_asd.model.ensemble import EnsembleConfig, EnsembleModel
    from stream_asd.model.scoring import EnsembleGroup

    class RmsEnsemble(Detector):
        def score_windows(self, waves, machine_types, device_ids):
            return ps.RmsDetector(self.window_samples, version=self.version).score_windows(
                waves, machine_types, device_ids)

    torch.manual_seed(0)
    spec = FeatureSpec(sample_rate=ps.SR, window_seconds=ps.WINDOW_S, n_mels=64, n_fft=512, hop_length=512)
    model = EnsembleModel(spec, EnsembleConfig.tiny()).eval()
    normal = ps.Machine("fan-00", "fan", 110.0, seed=1000)
    waves = np.stack([normal.signal(s, 4) for s in range(0, 60, 2)])  # 30 normal windows
    with torch.no_grad():
        e = model.embed(torch.from_numpy(waves))
    groups = {t: EnsembleGroup.fit(t, e.fusion, e.band_means, reg_covar=1e-2, stats_log=True) for t in ("fan", "pump")}
    return RmsEnsemble(model.to_bundle(groups, version="ens-1"), device="cpu")


def test_raised_alert_carries_an_explanation_cleared_does_not():
    from stream_asd.model.explain import mel_band_edges
    from stream_asd.wire import AlertRecord

    async def main():
        det = _rms_ensemble()
        proc, broker = make(det, alerts={"k": 1, "n": 1, "clear_after": 1})
        faulty = ps.Machine("fan-00", "fan", 110.0, seed=1000, fault_at=4)  # the same device, faulty
        healthy = ps.Machine("fan-00", "fan", 110.0, seed=1000)                # in chunks 4-7 only
        for seq in range(12):  # window [0,4) normal, [2,6)..[6,10) faulty, [8,12) normal again
            await proc.on_message(TP, seq, *ps.chunk_message(faulty if seq < 8 else healthy, seq))
        await settle(proc)
        broker.ack_all()
        await settle(proc)
        alerts = [AlertRecord.from_json(s[2]) for s in broker.of("asd.alerts")]
        assert [a.state for a in alerts][:2] == ["raised", "cleared"], alerts
        raised, cleared = alerts[0], alerts[1]
        assert cleared.explanation is None and b"explanation" not in broker.of("asd.alerts")[1][2]
        x = raised.explanation
        assert x["version"] == 1 and x["profile"] == "group"
        top = x["top_bands"][0]
        edges = mel_band_edges(det.feature_spec)
        assert top["f_low_hz"] < 3150 < top["f_high_hz"], x  # the bearing whine's band
        assert edges[top["band"], 0] == pytest.approx(top["f_low_hz"], abs=0.1)
        assert top["z"] > 10 and 0 <= x["segment"]["start_s"] < x["segment"]["end_s"] <= ps.WINDOW_S
        assert AlertRecord.from_json(raised.to_json()) == raised

    asyncio.run(main())


def test_alert_without_explanation_is_unchanged_on_the_wire():
    from stream_asd.errors import WireFormatError
    from stream_asd.wire import AlertRecord

    async def main():
        proc, broker = make(alerts={"k": 1, "n": 1, "clear_after": 1})  # RmsDetector: not an ensemble
        fan = ps.fleet(4, faulty=(3,), fault_at=0)[3]
        for seq in range(4):
            await proc.on_message(TP, seq, *ps.chunk_message(fan, seq))
        await settle(proc)
        raw = broker.of("asd.alerts")[0][2]
        assert b"explanation" not in raw
        rec = AlertRecord.from_json(raw)
        assert rec.state == "raised" and rec.explanation is None
        # the record as written before the field existed reads the same
        old = json.loads(raw)
        assert set(old) == {"alert_id", "device_id", "machine_type", "state", "window_id", "score", "threshold",
                            "windows_over", "windows_seen", "model_version", "at_ns", "schema"}
        bad = dict(old, explanation=[1, 2])
        with pytest.raises(WireFormatError):
            AlertRecord.from_json(json.dumps(bad))

    asyncio.run(main())
