"""Producer agent: sources, exactly-once delivery with contiguous seqs, sample-exact payloads,
back-pressure without loss, flush on SIGTERM, metrics over HTTP, CLI errors.

Broker tests use the real Kafka broker of tests/conftest.py (``kafka_broker``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from stream_asd.config import load_settings
from stream_asd.producer.sources import (
    FileSource,
    SourceError,
    collect_clips,
    describe_clip,
    parse_fault,
    sources_from_paths,
)
from stream_asd.wire import decode_chunk, float_to_pcm16

SR = 16_000
N = SR  # 1 s chunks


# ----------------------------------------------------------------------------------------------
# helpers


def _write_pcm(path: Path, n_samples: int, seed: int, fmt: str = "WAV") -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = (np.random.default_rng(seed).standard_normal(n_samples) * 4000).clip(-32768, 32767).astype(np.int16)
    sf.write(str(path), pcm, SR, subtype="PCM_16", format=fmt)
    return pcm


def _consume_all(bootstrap: str, topic: str, timeout_s: float = 30.0):
    """Every message on the topic (all partitions, up to the high watermarks), decoded."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex}",
                  "enable.auto.commit": False, "auto.offset.reset": "earliest",
                  "fetch.max.bytes": 8 << 20, "max.partition.fetch.bytes": 2 << 20})
    try:
        md = c.list_topics(topic, timeout=10)
        parts = sorted(md.topics[topic].partitions)
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out, pos = [], {p: 0 for p in parts}
        deadline = time.monotonic() + timeout_s
        while any(pos[p] < ends[p] for p in parts) and time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is None or msg.error():
                continue
            pos[msg.partition()] = msg.offset() + 1
            out.append(decode_chunk(msg.key(), msg.value(), msg.headers()))
        assert all(pos[p] >= ends[p] for p in parts), f"did not read the whole topic: {pos} vs {ends}"
        return out
    finally:
        c.close()


def _by_device(chunks):
    out: dict[str, list] = {}
    for ch in chunks:
        out.setdefault(ch.device_id, []).append(ch)
    for v in out.values():
        v.sort(key=lambda c: c.seq)
    return out


def _settings(bootstrap: str, topic: str):
    return load_settings(overrides={"kafka": {"bootstrap": bootstrap}, "topics": {"audio": topic}})


def _cli(*args, timeout=60, env=None):
    return subprocess.run([sys.executable, "-m", "stream_asd.cli", "produce", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


# ----------------------------------------------------------------------------------------------
# sources, no broker


def test_device_ids_from_dataset_layouts(tmp_path):
    def describe(p):
        c = describe_clip(Path(p))
        return c.device_id, c.machine_type, c.label

    assert describe("d/fan/train/normal_id_02_00000007.wav") == ("fan-id_02", "fan", "normal")
    assert describe("d/pump/test/anomaly_id_04_00000001.wav") == ("pump-id_04", "pump", "anomaly")
    assert describe("d/valve/source_test/section_01_source_test_anomaly_0003_x.wav") == \
        ("valve-section_01", "valve", "anomaly")
    assert describe("m/-6dB/slider/id_06/abnormal/00000012.wav") == ("slider-id_06", "slider", "anomaly")
    assert describe("rec/line7/compressor-12.flac") == ("compressor-12", "line7", None)


def test_folder_sources_use_the_dataset_readers_and_skip_nothing(tmp_path):
    _write_pcm(tmp_path / "ds" / "valve" / "train" / "section_02_source_train_normal_0001_a.wav", 100, 1)
    _write_pcm(tmp_path / "ds" / "valve" / "train" / "section_02_source_train_normal_0002_a.wav", 100, 2)
    _write_pcm(tmp_path / "ds" / "-6_dB_fan" / "fan" / "id_04" / "abnormal" / "00000001.wav", 100, 3)
    _write_pcm(tmp_path / "ds" / "misc" / "line7-compressor.flac", 100, 4, fmt="FLAC")
    ids = {s.device_id: (s.machine_type, len(s.paths)) for s in sources_from_paths([tmp_path / "ds"], SR)}
    assert ids == {"valve-section_02": ("valve", 2), "fan-id_04": ("fan", 1), "line7-compressor": ("misc", 1)}
    # a split folder as the root: the type comes from the folder above it
    assert [s.device_id for s in sources_from_paths([tmp_path / "ds" / "valve" / "train"], SR)] == ["valve-section_02"]


def test_manifest_and_label_filter(tmp_path):
    _write_pcm(tmp_path / "a" / "x1.wav", 100, 1)
    _write_pcm(tmp_path / "a" / "x2.wav", 100, 2)
    _write_pcm(tmp_path / "b" / "y.wav", 100, 3)
    (tmp_path / "m.csv").write_text("path,device_id,machine_type,label\n"
                                    "a/x1.wav,fan-7,fan,normal\na/x2.wav,fan-7,fan,anomaly\n"
                                    "b/y.wav,,pump,normal\n")
    clips = collect_clips([tmp_path / "m.csv"])
    assert [(c.device_id, c.machine_type, c.label) for c in clips] == \
        [("fan-7", "fan", "normal"), ("fan-7", "fan", "anomaly"), ("y", "pump", "normal")]
    normal = sources_from_paths([tmp_path / "m.csv"], SR, label="normal")
    assert [(s.device_id, len(s.paths)) for s in normal] == [("fan-7", 1), ("y", 1)]


def test_file_source_is_sample_continuous_across_clips_and_loops(tmp_path):
    a = _write_pcm(tmp_path / "dev" / "a.wav", 10_000, 1)
    b = _write_pcm(tmp_path / "dev" / "b.flac", 13_000, 2, fmt="FLAC")
    src = FileSource("dev", "fan", [tmp_path / "dev" / "a.wav", tmp_path / "dev" / "b.flac"], SR, loop=True)
    got = np.concatenate([float_to_pcm16(src.next_chunk(7_000).samples) for _ in range(10)])  # 70,000 samples
    ref = np.tile(np.concatenate([a, b]), 4)[:70_000]
    np.testing.assert_array_equal(got, ref)
    assert src.loops == 3
    once = FileSource("dev", "fan", [tmp_path / "dev" / "a.wav"], SR)
    c1, c2 = once.next_chunk(6_000), once.next_chunk(6_000)
    assert once.next_chunk(6_000) is None and once.tail_samples == 4_000
    np.testing.assert_array_equal(float_to_pcm16(c2.samples), np.concatenate([a[6000:], np.zeros(2000, np.int16)]))


def test_fault_syntax():
    f = parse_fault("3:bearing:30:0.8")
    assert (f.device, f.fault_type, f.at_s, f.severity) == ("3", "bearing", 30.0, 0.8)
    assert parse_fault("fan-id_01:imbalance:2.5").severity is None
    for bad in ("3:bearing", "3:bearing:soon", "3:bearing:-1", ":bearing:3", "3:bearing:3:x", "1:2:3:4:5"):
        with pytest.raises(SourceError, match="DEVICE:TYPE:AT_SECONDS"):
            parse_fault(bad)


def test_cli_errors_tell_the_user_what_to_do(tmp_path):
    r = _cli("--bootstrap", "127.0.0.1:1", str(tmp_path / "nope.wav"))
    assert r.returncode == 2 and "no such file or folder" in r.stderr and "WAV/FLAC" in r.stderr
    r = _cli("--synthetic", "2", "--fault", "1:bearing")
    assert r.returncode == 2 and "DEVICE:TYPE:AT_SECONDS" in r.stderr and "--fault 3:bearing:30" in r.stderr
    r = _cli("--fault", "1:bearing:3")
    assert r.returncode == 2 and "add --synthetic N" in r.stderr
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really a wav")
    r = _cli(str(tmp_path / "bad.wav"))
    assert r.returncode == 2 and "not a readable WAV/FLAC" in r.stderr
    r = _cli()
    assert r.returncode == 2 and "nothing to stream" in r.stderr
    r = _cli("--synthetic", "4", "--fault", "1:click_loss:3")  # device 1 is a pump: no clicks to lose
    assert r.returncode == 2 and "no such fault for a pump" in r.stderr and "bearing" in r.stderr
    r = _cli("--synthetic", "4", "--fault", "9:bearing:3")
    assert r.returncode == 2 and "no such device" in r.stderr and "0..3" in r.stderr
    try:
        import sounddevice  # noqa: F401
    except (ImportError, OSError):
        r = _cli("--capture", "default")
        assert r.returncode == 2 and "pip install 'stream-asd[capture]'" in r.stderr


# ----------------------------------------------------------------------------------------------
# real broker


@pytest.mark.kafka
def test_files_every_chunk_once_contiguous_and_sample_exact(kafka_broker, make_topic, tmp_path):
    from prometheus_client import CollectorRegistry

    from stream_asd.metrics import ProducerMetrics, serve
    from stream_asd.producer.agent import ProducerAgent

    bootstrap = kafka_broker.bootstrap
    topic = make_topic(partitions=3)
    ref: dict[str, np.ndarray] = {}
    for dev in range(3):  # DCASE2020 names: 3 devices, 2 clips each, lengths not whole chunks
        clips = [_write_pcm(tmp_path / "fan" / "train" / f"normal_id_{dev:02d}_{j:08d}.wav", 2 * N + 777 * (dev + j), 10 * dev + j)
                 for j in range(2)]
        ref[f"fan-id_{dev:02d}"] = np.concatenate(clips)
    ref["pump7"] = _write_pcm(tmp_path / "pump" / "pump7.flac", 3 * N, 99, fmt="FLAC")
    sources = sources_from_paths([tmp_path / "fan", tmp_path / "pump" / "pump7.flac"], SR)
    registry = CollectorRegistry()
    metrics = ProducerMetrics(registry)
    server = serve(0 or _free_port(), "127.0.0.1", registry)
    try:
        report = ProducerAgent(_settings(bootstrap, topic), sources, realtime=False, metrics=metrics).run()
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()

    expected_chunks = {d: -(-len(pcm) // N) for d, pcm in ref.items()}
    assert report.ok and report.sent == report.delivered == sum(expected_chunks.values())
    chunks = _by_device(_consume_all(bootstrap, topic))
    assert set(chunks) == set(ref)
    for dev, got in chunks.items():
        seqs = [c.seq for c in got]
        assert seqs == list(range(seqs[0], seqs[0] + expected_chunks[dev])), f"{dev}: seqs not contiguous/once"
        counts = report.devices[dev]
        assert (counts.first_seq, counts.last_seq, counts.delivered) == (seqs[0], seqs[-1], len(seqs))
        caps = np.diff([c.header.capture_ns for c in got])
        assert np.all(caps == 1_000_000_000), f"{dev}: capture_ns must advance by one chunk"
        payload = np.concatenate([c.pcm for c in got])
        pcm = ref[dev]
        np.testing.assert_array_equal(payload[:len(pcm)], pcm)  # sample-exact
        assert not payload[len(pcm):].any() and len(payload) == expected_chunks[dev] * N  # zero-padded tail
    assert {c.machine_type for c in sources} == {"fan", "pump"}

    def metric(name, **labels):
        sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
        m = re.search(rf"^{name}{{{sel}}} ([0-9.e+]+)$" if sel else rf"^{name} ([0-9.e+]+)$", text, re.M)
        return float(m.group(1)) if m else None

    fan_chunks = sum(v for d, v in expected_chunks.items() if d.startswith("fan"))
    assert metric("asd_producer_chunks_total", machine_type="fan") == fan_chunks
    assert metric("asd_producer_delivered_total", machine_type="fan") == fan_chunks
    assert metric("asd_producer_delivered_total", machine_type="pump") == expected_chunks["pump7"]
    assert metric("asd_producer_bytes_total") == report.sent * N * 2
    assert metric("asd_producer_devices") == 4


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.kafka
def test_synthetic_fleet_sample_exact_with_fault(kafka_broker, make_topic):
    pytest.importorskip("stream_asd.audio.synth")
    from stream_asd.producer.agent import ProducerAgent
    from stream_asd.producer.sources import FaultSpec, synthetic_fleet

    bootstrap = kafka_broker.bootstrap
    topic = make_topic(partitions=3)
    faults = [FaultSpec("1", _a_fault_type(), 2.0, 1.0)]
    sources = synthetic_fleet(4, SR, seed=7, faults=faults)
    report = ProducerAgent(_settings(bootstrap, topic), sources, realtime=False, max_chunks=4).run()
    assert report.ok and report.delivered == 16
    chunks = _by_device(_consume_all(bootstrap, topic))
    fresh = synthetic_fleet(4, SR, seed=7, faults=faults)  # rendering is a pure function of time
    clean = synthetic_fleet(4, SR, seed=7)
    for i, src in enumerate(fresh):
        got = chunks[src.device_id]
        assert [c.seq for c in got] == list(range(got[0].seq, got[0].seq + 4))
        assert got[0].header.machine_type == src.machine_type
        for k, c in enumerate(got):
            np.testing.assert_array_equal(c.pcm, float_to_pcm16(src.render(k * N, N)))
        if i == 1:  # the fault starts at 2 s: chunks 0-1 as the clean device, 2-3 differ
            for k, c in enumerate(got):
                same = np.array_equal(c.pcm, float_to_pcm16(clean[1].render(k * N, N)))
                assert same == (k < 2), f"chunk {k}: fault onset at the wrong time"
    assert len({s.machine_type for s in fresh}) > 1  # round-robin machine types


def _a_fault_type() -> str:
    from stream_asd.producer.sources import known_fault_types

    types = known_fault_types()
    return types[0] if types else "bearing"


@pytest.mark.kafka
def test_back_pressure_tiny_queue_loses_nothing(kafka_broker, make_topic, tmp_path):
    from stream_asd.producer.agent import ProducerAgent

    bootstrap = kafka_broker.bootstrap
    topic = make_topic(partitions=3)
    for dev in range(20):
        _write_pcm(tmp_path / "fan" / "train" / f"normal_id_{dev:02d}_00000000.wav", 6 * N, dev)
    sources = sources_from_paths([tmp_path], SR)
    agent = ProducerAgent(_settings(bootstrap, topic), sources, realtime=False,
                          producer_overrides={"queue.buffering.max.messages": 4, "linger.ms": 5})
    report = agent.run()
    assert report.queue_full_waits > 0, "the tiny queue never filled: back-pressure path not exercised"
    assert report.ok and report.delivered == 120
    chunks = _by_device(_consume_all(bootstrap, topic))
    assert sorted(len(v) for v in chunks.values()) == [6] * 20
    for v in chunks.values():
        assert [c.seq for c in v] == list(range(v[0].seq, v[0].seq + 6))


@pytest.mark.kafka
def test_sigterm_flushes_and_reports(kafka_broker, make_topic, tmp_path):
    bootstrap = kafka_broker.bootstrap
    topic = make_topic(partitions=3)
    for dev in range(8):
        _write_pcm(tmp_path / "valve" / "train" / f"normal_id_{dev:02d}_00000000.wav", 3 * N, dev)
    summary = tmp_path / "summary.json"
    proc = subprocess.Popen([sys.executable, "-m", "stream_asd.cli", "produce", "--bootstrap", bootstrap,
                             "--topic", topic, "--realtime", "--loop", "--metrics-port", "0",
                             "--summary-json", str(summary), str(tmp_path / "valve")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(6.0)  # a few real-time chunks per device
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    m = re.search(r"produced (\d+) chunks from 8 devices .*delivered (\d+), failed (\d+), unacknowledged (\d+) "
                  r"\(stopped by signal\)", out)
    assert m, out + err
    sent, delivered, failed, unacked = map(int, m.groups())
    assert sent >= 16 and delivered == sent and failed == unacked == 0
    chunks = _by_device(_consume_all(bootstrap, topic))
    assert sum(len(v) for v in chunks.values()) == delivered  # every acknowledged chunk is on the topic
    per_device = json.loads(summary.read_text())["per_device"]
    for dev, v in chunks.items():
        assert [c.seq for c in v] == list(range(per_device[dev]["first_seq"], per_device[dev]["last_seq"] + 1))


@pytest.mark.kafka
def test_unknown_topic_is_a_clear_error(kafka_broker, tmp_path):
    _write_pcm(tmp_path / "a.wav", N, 1)
    r = _cli("--bootstrap", kafka_broker.bootstrap, "--topic", f"missing.{uuid.uuid4().hex[:8]}",
             "--fast", "--metrics-port", "0", str(tmp_path / "a.wav"))
    assert r.returncode == 2 and "is not available" in r.stderr and "--create-topic" in r.stderr


@pytest.mark.kafka
def test_realtime_pacing_sends_each_chunk_after_its_capture_ends(kafka_broker, make_topic, tmp_path):
    from stream_asd.producer.agent import ProducerAgent

    topic = make_topic(partitions=3)
    for dev in range(4):
        _write_pcm(tmp_path / "fan" / "train" / f"normal_id_{dev:02d}_00000000.wav", 2 * N, dev)
    sent = []  # (device, seq, capture_ns, wall ns at hand-over)
    agent = ProducerAgent(_settings(kafka_broker.bootstrap, topic), sources_from_paths([tmp_path], SR, loop=True),
                          realtime=True, duration_s=3,
                          on_chunk=lambda src, h: sent.append((src.device_id, h.seq, h.capture_ns, time.time_ns())))
    t0 = time.monotonic()
    report = agent.run()
    elapsed = time.monotonic() - t0
    assert report.ok and report.delivered == 12
    assert 3.0 <= elapsed < 8.0, elapsed
    late_ok = 1_500_000_000  # a loaded CI machine may lag; never early
    for dev, seq, capture_ns, wall_ns in sent:
        assert wall_ns >= capture_ns + 1_000_000_000 - 5_000_000, f"{dev} seq {seq} sent before it was captured"
        assert wall_ns - (capture_ns + 1_000_000_000) < late_ok
    # devices are phased over the chunk period: their first captures differ by ~1/4 s
    firsts = sorted(c for d, s, c, w in sent if s == min(x[1] for x in sent if x[0] == d))
    gaps = np.diff(firsts) / 1e9
    assert np.allclose(gaps, 0.25, atol=0.01), gaps
