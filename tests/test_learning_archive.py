"""Archiver: keep/drop rule, retention, and the crash test on the real broker (SIGKILL during
writes leaves no partial file visible and loses no audio)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from stream_asd.archive.store import ArchiveStore, entry_from_flac
from stream_asd.archive.writer import (DROP_ANOMALOUS, DROP_UNSCORED, KEEP, ArchiverOptions, OffsetTracker,
                                       SegmentWriter, WindowJudgements, _Pending)
from stream_asd.wire import ChunkHeader, ScoreRecord, decode_chunk, encode_chunk, window_id

SR = 16_000
CHUNK = SR  # 1 s chunks


def chunk_pcm(device: str, seq: int) -> np.ndarray:
    rng = np.random.default_rng(abs(hash((device, seq))) % (2**32))
    return (rng.standard_normal(CHUNK) * 2000).astype(np.int16)


def score(device: str, first: int, last: int, anomalous: bool) -> ScoreRecord:
    return ScoreRecord(device_id=device, machine_type="fan", window_id=window_id(device, first, last),
                       first_seq=first, last_seq=last, window_start_ns=0, window_end_ns=0,
                       score=3.0 if anomalous else 0.1, scores={}, threshold=1.0, is_anomaly=anomalous,
                       model_version="v0", scored_at_ns=0, capture_to_score_s=0.1)


def test_window_judgements_rule():
    j = WindowJudgements()
    j.add(score("d", 0, 9, False))
    assert j.decide("d", 3, timed_out=False) is None  # the next window may cover seq 3 too: wait
    j.add(score("d", 5, 14, True))
    assert j.decide("d", 3, False) == KEEP
    assert j.decide("d", 7, False) == DROP_ANOMALOUS  # covered by a normal and an anomalous window
    assert j.decide("d", 12, False) == DROP_ANOMALOUS  # decided at once: nothing can clear it
    assert j.decide("d", 16, False) is None
    assert j.decide("d", 20, True) == DROP_UNSCORED
    j.add(score("e", 0, 9, False))
    j.add(score("e", 0, 9, True))  # a disagreeing re-score of the same window: doubt drops
    assert j.decide("e", 1, True) == DROP_ANOMALOUS


def test_offset_tracker_commits_lowest_outstanding():
    t = OffsetTracker()
    for o in range(5):
        t.consumed(0, o)
    t.done(0, 0)
    t.done(0, 2)
    assert t.to_commit() == {0: 1}
    t.done(0, 1)
    t.committed(t.to_commit())
    assert t.position(0) == 3
    t.done(0, 3)
    t.done(0, 4)
    assert t.to_commit() == {0: 5}


def _pending(device, seq, capture_ns, partition=0):
    key, value, headers = encode_chunk(ChunkHeader(device, "fan", seq, capture_ns, "p"), chunk_pcm(device, seq))
    return _Pending(partition, seq, decode_chunk(key, value, headers), 0.0)


def test_retention_by_age_and_size(tmp_path):
    store = ArchiveStore(tmp_path / "arch")
    written = []
    writer = SegmentWriter(store, ArchiverOptions(segment_seconds=2), written.extend)
    now = datetime.now(timezone.utc)
    for days_ago in (10, 3, 0):
        t0 = int((now - timedelta(days=days_ago)).timestamp() * 1e9)
        for seq in range(4):
            writer.add(_pending(f"dev{days_ago}", seq, t0 + seq * 10**9), 0.0)
    writer.flush_all()
    assert len(written) == 12
    parts = sorted(store.partitions())
    assert len(parts) == 3 and all(len(store.read_manifest("/".join(p))) == 2 for p in parts)
    writer.options.max_age_days = 5
    assert writer.enforce_retention() == {"age": 2, "size": 0}
    assert len(list(store.partitions())) == 2
    one = store.read_manifest("/".join(sorted(store.partitions())[0]))[0]["bytes"]
    writer.options.max_total_bytes = int(2.5 * one)
    assert writer.enforce_retention()["size"] == 2  # 4 segments -> the 2 newest stay
    left = [e for p in store.partitions() for e in store.read_manifest("/".join(p))]
    assert sorted((e["device_id"], e["first_seq"]) for e in left) == [("dev0", 0), ("dev0", 2)]
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "arch").rglob("*"))


def expected_kept(devices, n_chunks, scores):
    """The keep rule, written independently: kept iff covered by >= 1 scored window and none anomalous."""
    out = set()
    for d in devices:
        for s in range(n_chunks):
            cov = [r for r in scores if r.device_id == d and r.first_seq <= s <= r.last_seq]
            if cov and not any(r.is_anomaly for r in cov):
                out.add((d, s))
    return out


def archive_contents(root: Path):
    """(device, seq) -> pcm from the manifests; asserts every visible file is whole and listed."""
    got: dict[tuple[str, int], np.ndarray] = {}
    store = ArchiveStore(root)
    for mt, dev, date in store.partitions():
        rel = f"{mt}/{dev}/{date}"
        for e in store.read_manifest(rel):
            path = root / rel / e["file"]
            data = path.read_bytes()
            import hashlib

            assert hashlib.sha256(data).hexdigest() == e["sha256"]
            pcm, sr = sf.read(path, dtype="int16")
            assert sr == SR and len(pcm) == e["samples"] == e["n_chunks"] * CHUNK
            for i, seq in enumerate(range(e["first_seq"], e["last_seq"] + 1)):
                assert (e["device_id"], seq) not in got, f"{e['device_id']}:{seq} archived twice"
                got[(e["device_id"], seq)] = pcm[i * CHUNK:(i + 1) * CHUNK]
    return got


def visible_files_whole(root: Path) -> int:
    """Every visible (non-temporary) FLAC decodes completely and carries its own entry."""
    n = 0
    for p in root.rglob("*.flac"):
        if p.name.startswith("."):
            continue
        entry = entry_from_flac(p.read_bytes())
        assert entry is not None, f"{p} has no segment metadata"
        assert sf.info(str(p)).frames == entry["samples"], f"{p} is partial"
        n += 1
    return n


@pytest.mark.slow
def test_archiver_sigkill_loses_nothing_and_shows_no_partial_file(tmp_path, kafka_bootstrap, make_topic, unique_name):
    from confluent_kafka import Consumer, Producer, TopicPartition

    from stream_asd.config import load_settings
    from stream_asd.kafka import producer_conf

    audio = make_topic(unique_name("audio"), partitions=2)
    scores_topic = make_topic(unique_name("scores"), partitions=1)
    group = unique_name("archiver")
    devices = [f"fan-{i:02d}" for i in range(4)]
    n_chunks = 40
    settings = load_settings(None, {"kafka": {"bootstrap": kafka_bootstrap}})
    prod = Producer(producer_conf(settings))
    t0 = time.time_ns() - n_chunks * 10**9
    for seq in range(n_chunks):
        for d in devices:
            key, value, headers = encode_chunk(ChunkHeader(d, "fan", seq, t0 + seq * 10**9, "test"), chunk_pcm(d, seq))
            prod.produce(audio, key=key, value=value, headers=headers)
        prod.poll(0)
    # one garbage message: not archived, offset still passes it
    prod.produce(audio, key=b"fan-00", value=b"\x00\x01\x02", headers=[("ce_asdschema", b"1")])
    recs = []
    for d in devices:
        for first in range(0, n_chunks - 9, 5):
            if d == "fan-03" and first >= 25:
                continue  # the tail of fan-03 never scored (e.g. skipped): dropped after the timeout
            recs.append(score(d, first, first + 9, anomalous=(d == "fan-01" and first == 10)))
    recs.append(score("fan-02", 20, 29, anomalous=False))  # a duplicate re-score
    for r in recs:
        prod.produce(scores_topic, key=r.device_id.encode(), value=r.to_json())
    assert prod.flush(30) == 0
    expected = expected_kept(devices, n_chunks, recs)
    assert 80 < len(expected) < 4 * n_chunks

    root = tmp_path / "archive"
    env = dict(os.environ, ASD_TOPICS__AUDIO=audio, ASD_TOPICS__SCORES=scores_topic, ASD_METRICS__PORT="0")
    cmd = [sys.executable, "-m", "stream_asd.cli", "archive", "--bootstrap", kafka_bootstrap, "--to", str(root),
           "--group-id", group, "--instance-id", "archiver-0", "--segment-seconds", "3", "--flush-idle", "1",
           "--decision-timeout", "4", "--stop-when-idle", "8", "--summary", str(tmp_path / "summary.json"),
           "--log-level", "WARNING"]
    rng = random.Random(7)
    kills = 0
    for _ in range(3):  # kill it three times while it writes
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        before = visible_files_whole(root) if root.exists() else 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            n = sum(1 for p in root.rglob("*.flac") if not p.name.startswith(".")) if root.exists() else 0
            if n >= before + rng.randint(1, 4):
                break
            time.sleep(0.02)
        if proc.poll() is not None:
            break  # finished before we could kill it
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        kills += 1
        visible_files_whole(root)  # right after the kill: only whole files are visible
    assert kills >= 2
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]

    got = archive_contents(root)
    assert set(got) == expected  # nothing lost, nothing extra, nothing twice
    for (d, s), pcm in got.items():
        assert np.array_equal(pcm, chunk_pcm(d, s))
    assert visible_files_whole(root) == sum(len(ArchiveStore(root).read_manifest("/".join(p)))
                                           for p in ArchiveStore(root).partitions())
    assert not [p for p in root.rglob(".tmp-*")]
    # offsets: the group has committed past every message
    c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    committed = c.committed([TopicPartition(audio, p) for p in range(2)], timeout=10)
    ends = [c.get_watermark_offsets(TopicPartition(audio, p), timeout=10)[1] for p in range(2)]
    c.close()
    assert sum(ends) == 4 * n_chunks + 1
    assert [tp.offset if end else 0 for tp, end in zip(committed, ends)] == ends
    summary = json.loads((tmp_path / "summary.json").read_text())
    print(f"archiver crash test: {kills} SIGKILLs, {len(expected)} chunks expected and archived once, "
          f"last run summary {summary}")


def test_reader_selection_holdout_and_max_hours(tmp_path):
    from stream_asd.archive.reader import iter_archive_clips

    store = ArchiveStore(tmp_path / "arch")
    writer = SegmentWriter(store, ArchiverOptions(segment_seconds=2), lambda chunks: None)
    day = datetime(2026, 11, 20, tzinfo=timezone.utc)
    for dev, mt in (("fan-a", "fan"), ("fan-b", "fan"), ("pump-a", "pump")):
        for seq in range(8):  # 4 segments of 2 s per device, one per day
            t = int((day + timedelta(days=seq // 2, seconds=seq)).timestamp() * 1e9)
            key, value, headers = encode_chunk(ChunkHeader(dev, mt, seq, t, "p"), chunk_pcm(dev, seq))
            writer.add(_Pending(0, seq, decode_chunk(key, value, headers), 0.0), 0.0)
    writer.flush_all()
    all_clips = list(iter_archive_clips(tmp_path / "arch"))
    assert len(all_clips) == 12 and {c.label for c in all_clips} == {"normal"}
    fans = list(iter_archive_clips(tmp_path / "arch", machine_types=["fan"]))
    assert {c.machine_id for c in fans} == {"fan-a", "fan-b"}
    ranged = list(iter_archive_clips(tmp_path / "arch", since="2026-11-21", until="2026-11-22T12:00:00Z"))
    assert len(ranged) == 6  # days 21 and 22, three devices
    capped = list(iter_archive_clips(tmp_path / "arch", max_hours=12 / 3600))  # 12 s: 6 newest segments
    assert len(capped) == 6 and {c.machine_id for c in capped} == {"fan-a", "fan-b", "pump-a"}
    split = list(iter_archive_clips(tmp_path / "arch", holdout_fraction=0.25))
    test = [c for c in split if c.split == "test"]
    assert len(test) == 3 and all("2026-11-23" in str(c.path) for c in test)  # newest of each device
    assert len(list(iter_archive_clips(tmp_path / "arch", holdout_fraction=0.25, split="train"))) == 9
