"""Integration against the real Apache Kafka broker (issue 2, item 7).

A 6-partition topic gets 2,000 one-second audio chunks (16 kHz PCM, stream_asd.wire) from 20
devices, produced with confluent-kafka. aiokafka and a Faust agent (a worker subprocess) each
consume them; every chunk must arrive exactly once, bit-exact, in per-device seq order. A
broker restart in the middle keeps the data and the committed offsets. Chunks at the size
limit go through; larger ones are refused with MSG_SIZE_TOO_LARGE.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from stream_asd.broker import LocalBroker
from stream_asd.config import load_settings
from stream_asd.kafka import aiokafka_consumer_kwargs, consumer_conf, ensure_topics, producer_conf
from stream_asd.wire import (
    DEFAULT_MAX_CHUNK_BYTES, KAFKA_MAX_MESSAGE_BYTES, ChunkHeader, decode_chunk, encode_chunk,
)

pytestmark = pytest.mark.kafka

N_DEVICES = 20
N_CHUNKS = 2_000
PER_DEVICE = N_CHUNKS // N_DEVICES
PARTITIONS = 6
RATE = 16_000
TESTS_DIR = Path(__file__).parent


def device_name(i: int) -> str:
    return f"dev-{i:02d}"


def chunk_pcm(device: int, seq: int) -> np.ndarray:
    """1 s of deterministic 'machine sound' per (device, seq): a hum plus noise."""
    rng = np.random.default_rng(device * 100_003 + seq)
    t = np.arange(RATE) / RATE
    x = 0.3 * np.sin(2 * np.pi * (50 + device) * t + seq) + 0.05 * rng.standard_normal(RATE)
    return np.clip(np.rint(x * 32767), -32768, 32767).astype(np.int16)


def produce_fleet(producer: Producer, topic: str, seqs: range) -> dict[tuple[str, int], dict]:
    """Produce seqs for all devices (interleaved, like a live fleet); return delivery facts."""
    delivered: dict[tuple[str, int], dict] = {}
    errors: list[str] = []

    def reporter(device: str, seq: int):
        # Delivery reports carry no headers: the closure remembers which chunk this was.
        def on_delivery(err, msg):
            if err is not None:
                errors.append(f"{device}/{seq}: {err}")
            else:
                delivered[(device, seq)] = {"partition": msg.partition(), "offset": msg.offset(),
                                            "crc": zlib.crc32(msg.value())}
        return on_delivery

    t0 = 1_800_000_000_000_000_000
    for seq in seqs:
        for d in range(N_DEVICES):
            header = ChunkHeader(device_id=device_name(d), machine_type="fan", seq=seq,
                                 capture_ns=t0 + seq * 1_000_000_000, producer_id="itest")
            key, value, headers = encode_chunk(header, chunk_pcm(d, seq))
            while True:
                try:
                    producer.produce(topic, key=key, value=value, headers=headers,
                                     on_delivery=reporter(header.device_id, seq))
                    break
                except BufferError:
                    producer.poll(0.1)
            producer.poll(0)
    assert producer.flush(60) == 0, "messages left undelivered"
    assert not errors, errors[:3]
    assert len(delivered) == N_DEVICES * len(seqs)
    return delivered


def check_exactly_once_in_order(records: list[dict], expected: dict[tuple[str, int], dict]) -> None:
    """records: arrival order, each {"device","seq","crc","partition"}."""
    seen = defaultdict(int)
    last_seq: dict[str, int] = {}
    partition_of: dict[str, set] = defaultdict(set)
    for r in records:
        assert "error" not in r, r
        k = (r["device"], r["seq"])
        seen[k] += 1
        assert k in expected, f"unexpected chunk {k}"
        assert r["crc"] == expected[k]["crc"], f"payload of {k} changed"
        if r["device"] in last_seq:
            assert r["seq"] > last_seq[r["device"]], f"{r['device']}: seq {r['seq']} after {last_seq[r['device']]}"
        last_seq[r["device"]] = r["seq"]
        partition_of[r["device"]].add(r["partition"])
    dups = [k for k, n in seen.items() if n > 1]
    missing = set(expected) - set(seen)
    assert not dups, f"{len(dups)} duplicated, e.g. {dups[:3]}"
    assert not missing, f"{len(missing)} missing, e.g. {sorted(missing)[:3]}"
    assert all(len(p) == 1 for p in partition_of.values()), "a device's chunks spread over partitions"


@pytest.fixture(scope="module")
def fleet(kafka_broker):
    """One 6-partition topic with the 2,000 chunks, produced once for the module."""
    settings = load_settings(None, {"kafka": {"bootstrap": kafka_broker.bootstrap}})
    topic = f"fleet-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    assert ensure_topics(kafka_broker.bootstrap, {topic: PARTITIONS}) == {topic: PARTITIONS}
    producer = Producer(producer_conf(settings))
    t = time.monotonic()
    delivered = produce_fleet(producer, topic, range(PER_DEVICE))
    produce_s = time.monotonic() - t
    del producer
    print(f"\nproduced {N_CHUNKS} chunks ({N_CHUNKS * 32_000 / 1e6:.0f} MB PCM) in {produce_s:.1f} s")
    return settings, topic, delivered


def test_produced_fleet_is_spread_and_ordered(fleet):
    _, _, delivered = fleet
    by_device = defaultdict(list)
    for (dev, seq), d in delivered.items():
        by_device[dev].append((seq, d["partition"], d["offset"]))
    assert len(by_device) == N_DEVICES
    partitions = set()
    for dev, rows in by_device.items():
        rows.sort()
        assert [r[0] for r in rows] == list(range(PER_DEVICE))
        assert len({r[1] for r in rows}) == 1, f"{dev} on several partitions"
        offsets = [r[2] for r in rows]
        assert offsets == sorted(offsets) and len(set(offsets)) == PER_DEVICE
        partitions.add(rows[0][1])
    assert len(partitions) >= 4, f"20 keys landed on only {sorted(partitions)} of 6 partitions"


async def consume_aiokafka(settings, topic: str, group: str, want: int, *, linger_s: float = 1.5,
                           timeout_s: float = 90.0, commit: bool = True) -> list[dict]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, **aiokafka_consumer_kwargs(settings, group))
    await consumer.start()
    records: list[dict] = []
    try:
        deadline = time.monotonic() + timeout_s
        quiet_until = None
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=500)
            for tp, msgs in batches.items():
                for m in msgs:
                    chunk = decode_chunk(m.key, m.value, m.headers)
                    assert np.array_equal(chunk.pcm, chunk_pcm(int(chunk.device_id[4:]), chunk.seq))
                    records.append({"device": chunk.device_id, "seq": chunk.seq, "crc": zlib.crc32(m.value),
                                    "partition": tp.partition, "offset": m.offset})
            if batches and commit:
                await consumer.commit()
            if len(records) >= want:
                # keep polling a little: a duplicate would show up now
                quiet_until = quiet_until or time.monotonic() + linger_s
                if time.monotonic() > quiet_until:
                    break
    finally:
        await consumer.stop()
    return records


def test_aiokafka_consumes_every_chunk_once_in_order(fleet, unique_name):
    settings, topic, delivered = fleet
    t = time.monotonic()
    records = asyncio.run(consume_aiokafka(settings, topic, unique_name("aio"), N_CHUNKS))
    print(f"aiokafka consumed {len(records)} in {time.monotonic() - t:.1f} s")
    check_exactly_once_in_order(records, delivered)


def test_faust_agent_consumes_every_chunk_once_in_order(fleet, unique_name, tmp_path):
    settings, topic, delivered = fleet
    out = tmp_path / "faust.jsonl"
    out.touch()
    log_path = tmp_path / "faust-worker.log"
    env = dict(os.environ, FLEET_BOOTSTRAP=settings.kafka.bootstrap, FLEET_TOPIC=topic, FLEET_OUT=str(out),
               FLEET_APP_ID=unique_name("faust"), FLEET_PARTITIONS=str(PARTITIONS),
               PYTHONPATH=os.pathsep.join([str(TESTS_DIR.parent), os.environ.get("PYTHONPATH", "")]))
    t = time.monotonic()
    with open(log_path, "wb") as log_fh:
        proc = subprocess.Popen([sys.executable, str(TESTS_DIR / "faust_fleet_worker.py"), "worker",
                                 "-l", "warn", "--without-web"],
                                env=env, stdout=log_fh, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 150
        n = 0
        while time.monotonic() < deadline and proc.poll() is None:
            n = sum(1 for _ in out.open())
            if n >= N_CHUNKS:
                break
            time.sleep(0.5)
        assert proc.poll() is None, f"Faust worker exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"
        assert n >= N_CHUNKS, f"Faust agent saw {n}/{N_CHUNKS} in time:\n{log_path.read_text()[-3000:]}"
        elapsed = time.monotonic() - t
        time.sleep(1.5)  # a duplicate would arrive now
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    print(f"Faust worker (start + consume) {len(records)} in {elapsed:.1f} s")
    check_exactly_once_in_order(records, delivered)


def committed_offsets(consumer: Consumer, tps: list[TopicPartition], timeout_s: float = 30.0):
    """committed() once the group coordinator answers: right after a broker (re)start it may
    still be loading __consumer_offsets (NOT_COORDINATOR / COORDINATOR_LOAD_IN_PROGRESS)."""
    retriable = {KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                 KafkaError.COORDINATOR_NOT_AVAILABLE}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return consumer.committed(tps, timeout=10)
        except KafkaException as exc:
            if exc.args[0].code() not in retriable or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_broker_restart_keeps_data_and_committed_offsets(tmp_path, unique_name):
    """Own broker: produce half, consume part and commit, restart, then finish the job."""
    with LocalBroker(tmp_path / "restart-broker") as broker:
        settings = load_settings(None, {"kafka": {"bootstrap": broker.bootstrap}})
        topic, group = unique_name("restart"), unique_name("grp")
        ensure_topics(broker.bootstrap, {topic: PARTITIONS})
        producer = Producer(producer_conf(settings))
        first = produce_fleet(producer, topic, range(PER_DEVICE // 2))

        # Consume about 60 % of the first half, committing as we go.
        part1 = asyncio.run(consume_aiokafka(settings, topic, group, 600, linger_s=0.0))
        assert 600 <= len(part1) <= len(first)
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        probe = Consumer(consumer_conf(settings, group))
        committed_before = {tp.partition: tp.offset for tp in committed_offsets(probe, tps)}
        probe.close()
        # (a partition that gave nothing yet has no commit: OFFSET_INVALID, -1001)
        assert sum(max(o, 0) for o in committed_before.values()) == len(part1), "commits != consumed"

        t = time.monotonic()
        broker.restart()
        restart_s = time.monotonic() - t
        print(f"\nbroker restart (stop + start) {restart_s:.1f} s")
        assert restart_s < 30

        probe = Consumer(consumer_conf(settings, group))
        committed_after = {tp.partition: tp.offset for tp in committed_offsets(probe, tps)}
        watermarks = [probe.get_watermark_offsets(tp, timeout=10) for tp in tps]
        probe.close()
        assert committed_after == committed_before, "committed offsets lost in the restart"
        assert sum(hi - lo for lo, hi in watermarks) == len(first) and all(lo == 0 for lo, _ in watermarks)

        # The same producer goes on after the restart (reconnects; idempotence: no duplicates).
        second = produce_fleet(producer, topic, range(PER_DEVICE // 2, PER_DEVICE))
        expected = {**first, **second}
        part2 = asyncio.run(consume_aiokafka(settings, topic, group, N_CHUNKS - len(part1)))
        # Exactly the rest: together every chunk once, in order per device.
        check_exactly_once_in_order(part1 + part2, expected)
        # And the data from before the restart is all there for a new group.
        everything = asyncio.run(consume_aiokafka(settings, topic, unique_name("fresh"), N_CHUNKS, commit=False))
        check_exactly_once_in_order(everything, expected)
        del producer  # before the broker goes: no reconnect noise


def _consume_one(settings, topic: str, group: str, timeout: float = 30.0):
    consumer = Consumer(consumer_conf(settings, group))
    consumer.subscribe([topic])
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            return msg
    finally:
        consumer.close()
    raise AssertionError(f"nothing consumed from {topic} in {timeout} s")


def test_chunk_at_the_limit_goes_end_to_end(kafka_settings, make_topic, unique_name):
    topic = make_topic(partitions=1)
    rng = np.random.default_rng(1)
    pcm = rng.integers(-32768, 32768, size=DEFAULT_MAX_CHUNK_BYTES // 2, dtype=np.int16)  # 1 MiB, incompressible
    header = ChunkHeader(device_id="big-1", machine_type="fan", seq=0, capture_ns=1, producer_id="p")
    key, value, headers = encode_chunk(header, pcm)
    assert len(value) == DEFAULT_MAX_CHUNK_BYTES
    producer = Producer(producer_conf(kafka_settings))
    errors = []
    producer.produce(topic, key=key, value=value, headers=headers, on_delivery=lambda e, m: errors.append(e))
    assert producer.flush(30) == 0 and errors == [None]
    del producer
    msg = _consume_one(kafka_settings, topic, unique_name("g"))
    chunk = decode_chunk(msg.key(), msg.value(), msg.headers())
    assert np.array_equal(chunk.pcm, pcm)

    async def via_aiokafka():
        from aiokafka import AIOKafkaConsumer

        c = AIOKafkaConsumer(topic, **aiokafka_consumer_kwargs(kafka_settings, unique_name("a")))
        await c.start()
        try:
            m = await asyncio.wait_for(c.getone(), 30)
        finally:
            await c.stop()
        return decode_chunk(m.key, m.value, m.headers)

    assert np.array_equal(asyncio.run(via_aiokafka()).pcm, pcm)


def test_oversize_chunk_is_refused_by_the_producer(kafka_settings, make_topic):
    topic = make_topic(partitions=1)
    header = ChunkHeader(device_id="big-2", machine_type="fan", seq=0, capture_ns=1, producer_id="p")
    key, _, headers = encode_chunk(header, np.zeros(16, dtype=np.int16))
    producer = Producer(producer_conf(kafka_settings))
    with pytest.raises(KafkaException) as info:
        producer.produce(topic, key=key, value=b"\0" * (KAFKA_MAX_MESSAGE_BYTES + 1), headers=headers)
    err = info.value.args[0]
    del info, producer
    assert err.code() == KafkaError.MSG_SIZE_TOO_LARGE
    assert "too large" in err.str().lower()
    # A producer configured past the aligned limit is stopped by the broker instead.
    loose = Producer(producer_conf(kafka_settings, compression="none", **{"message.max.bytes": 4 << 20}))
    reports = []
    loose.produce(topic, key=key, value=os.urandom(2 << 20), headers=headers,
                  on_delivery=lambda e, m: reports.append(e))
    loose.flush(30)
    del loose
    assert len(reports) == 1 and reports[0] is not None
    assert reports[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
