"""Issue 11: one poison message must not pin offsets for good.

A CloudEvents integer header of 5,000 digits made ``decode_chunk`` raise a plain ``ValueError``
(Python's int-string conversion limit), which the processor and the archiver did not catch: the
Faust agent crashed, the message never reached the DLQ and its offset was never marked done.

- real broker: a ``stream-asd process`` worker (RMS stand-in detector) dead-letters the poison
  message with its reason, keeps scoring the device, and commits past it;
- the archiver counts such a message (or any unexpected error on one message) as invalid and
  marks its offset done instead of crash-looping.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import processor_support as ps  # noqa: E402

from stream_asd.archive.store import ArchiveStore  # noqa: E402
from stream_asd.archive.writer import INVALID, Archiver, ArchiverOptions  # noqa: E402
from stream_asd.wire import H_CAPTURE_NS, H_DLQ_DETAIL, H_DLQ_OFFSET, H_DLQ_REASON, ScoreRecord  # noqa: E402


def poison_message(m: ps.Machine, seq: int) -> tuple:
    key, value, headers = ps.chunk_message(m, seq)
    return key, value, [(k, b"7" * 5000 if k == H_CAPTURE_NS else v) for k, v in headers]


def test_poison_capture_time_is_dead_lettered_and_committed_past(kafka_bootstrap, tmp_path):
    from stream_asd.kafka import ensure_topics

    u = uuid.uuid4().hex[:8]
    n = {k: f"poison-{k}-{u}" for k in ("audio", "scores", "alerts", "dlq", "group")}
    ensure_topics(kafka_bootstrap, {n[k]: 1 for k in ("audio", "scores", "alerts", "dlq")})
    sets = {
        "topics.audio": n["audio"], "topics.scores": n["scores"], "topics.alerts": n["alerts"],
        "topics.dlq": n["dlq"], "topics.partitions": 1, "processor.group_id": n["group"],
        "processor.session_timeout_seconds": 6, "processor.datadir": tmp_path / "w",
        "audio.chunk_seconds": ps.CHUNK_S, "window.seconds": ps.WINDOW_S, "window.hop_seconds": ps.HOP_S,
        "window.idle_evict_seconds": 5, "batch.max_size": 8, "batch.max_wait_ms": 50,
    }
    m = ps.fleet(1, faulty=())[0]
    poison = poison_message(m, 4)
    # offsets 0..3: seqs 0..3; offset 4: the poison message; offsets 5..8: seqs 4..7
    items = [ps.chunk_message(m, s) for s in range(4)] + [poison] + [ps.chunk_message(m, s) for s in range(4, 8)]
    worker = ps.Worker(kafka_bootstrap, sets, tmp_path / "worker.log")
    try:
        worker.wait_metrics()
        ps.wait_group_members(kafka_bootstrap, n["group"], 1)
        ps.produce_chunks(kafka_bootstrap, n["audio"], items)
        # the last chunks wait for window [6,10) until the device is evicted (5 s idle)
        committed = ps.wait_committed_to_end(kafka_bootstrap, n["group"], n["audio"], 1, timeout=90)
        dlq = ps.read_topic(kafka_bootstrap, n["dlq"], min_count=1, timeout=30, idle=1)
        scores = [ScoreRecord.from_json(x.value()) for x in
                  ps.read_topic(kafka_bootstrap, n["scores"], min_count=3, timeout=30, idle=1)]
        alive = worker.proc.poll() is None
        metrics = worker.metrics() if alive else {}
    finally:
        worker.kill()
    assert alive, f"the worker died on the poison message:\n{worker.tail()}"
    assert committed == {0: len(items)}  # past the poison message (offset 4) and the rest
    assert len(dlq) == 1, worker.tail()
    got = ps.header_dict(dlq[0])
    assert got[H_DLQ_REASON] == b"integer_out_of_range"
    assert H_CAPTURE_NS.encode() in got[H_DLQ_DETAIL] and len(got[H_DLQ_DETAIL]) < 200
    assert got[H_DLQ_OFFSET] == b"4"
    assert dlq[0].value() == poison[1] and got[H_CAPTURE_NS] == b"7" * 5000  # original bytes kept
    assert sorted(r.window_id for r in scores) == sorted(f"{m.device_id}:{a}-{a + 3}" for a in (0, 2, 4))
    assert ps.metric_sum(metrics, "asd_dlq_messages_total", reason="integer_out_of_range") == 1


def make_archiver(tmp_path) -> Archiver:
    return Archiver({}, ArchiveStore(tmp_path / "arch"), ArchiverOptions())


def test_archiver_skips_a_poison_message_and_its_offset_is_done(tmp_path):
    a = make_archiver(tmp_path)
    m = ps.fleet(1, faulty=())[0]
    a.handle_audio(0, 0, *ps.chunk_message(m, 0), now=0.0)
    a.handle_audio(0, 1, *poison_message(m, 1), now=0.0)  # must not raise
    assert a.counts[INVALID] == 1
    assert a.offsets.to_commit() == {0: 0}  # offset 0 waits for its scores; 1 is done
    a.offsets.done(0, 0)
    assert a.offsets.to_commit() == {0: 2}


def test_archiver_survives_an_unexpected_error_on_one_message(tmp_path, monkeypatch):
    import stream_asd.archive.writer as writer

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in decoding")

    a = make_archiver(tmp_path)
    m = ps.fleet(1, faulty=())[0]
    monkeypatch.setattr(writer, "decode_chunk", broken)
    a.handle_audio(0, 0, *ps.chunk_message(m, 0), now=0.0)  # must not raise
    assert a.counts[INVALID] == 1 and a.offsets.to_commit() == {0: 1}
