"""Helpers of the processor tests: a deterministic machine-sound generator with injectable
faults, a small training set for ``asd-train fit --profile tiny``, a stand-in detector, chunk
producers and topic readers. Not a test module (no ``test_`` prefix)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SR = 16_000
CHUNK_S = 1.0
WINDOW_S = 4.0
HOP_S = 2.0
CHUNK_SAMPLES = int(SR * CHUNK_S)


# -- machine sounds ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    device_id: str
    machine_type: str
    f0: float  # fundamental of the hum
    seed: int
    fault_at: int | None = None  # first faulty chunk (seq)

    def chunk(self, seq: int, n: int = CHUNK_SAMPLES) -> np.ndarray:
        """Samples ``[seq*n, (seq+1)*n)`` of the device's endless signal, float32 in [-1, 1)."""
        t = (np.arange(n) + seq * n) / SR
        x = np.zeros(n)
        for h, amp in ((1, 0.12), (2, 0.06), (3, 0.03), (5, 0.015)):
            x += amp * np.sin(2 * np.pi * self.f0 * h * t + 0.3 * h)
        rng = np.random.default_rng([self.seed, seq])
        x += 0.01 * rng.standard_normal(n)
        if self.fault_at is not None and seq >= self.fault_at:
            # a worn bearing: loud whine plus rattling broadband bursts
            x += 0.25 * np.sin(2 * np.pi * 3150.0 * t)
            bursts = (np.sin(2 * np.pi * 7.0 * t) > 0.6).astype(float)
            x += 0.2 * bursts * rng.standard_normal(n)
        return np.clip(x, -1.0, 0.999).astype(np.float32)

    def signal(self, first_seq: int, n_chunks: int) -> np.ndarray:
        return np.concatenate([self.chunk(s) for s in range(first_seq, first_seq + n_chunks)])


def fleet(n: int = 12, faulty: tuple[int, ...] = (3, 8), fault_at: int = 8) -> list[Machine]:
    types = ("fan", "pump")
    out = []
    for i in range(n):
        mt = types[i % 2]
        base = 110.0 if mt == "fan" else 180.0
        out.append(Machine(f"{mt}-{i:02d}", mt, base + 7.0 * i, seed=1000 + i,
                           fault_at=fault_at if i in faulty else None))
    return out


# -- training data and the tiny bundle ------------------------------------------------------------
def write_training_set(root: Path, machines: list[Machine], clips_per_device: int = 8, clip_chunks: int = 4) -> Path:
    """Normal clips in the DCASE2020 layout: ``<type>/train/normal_id_XX_NNNNNNNN.wav``."""
    import soundfile as sf

    for m in machines:
        folder = root / m.machine_type / "train"
        folder.mkdir(parents=True, exist_ok=True)
        idx = int(m.device_id.split("-")[1])
        healthy = Machine(m.device_id, m.machine_type, m.f0, m.seed)  # training audio is all normal
        for c in range(clips_per_device):
            x = healthy.signal(10_000 + c * clip_chunks, clip_chunks)
            sf.write(folder / f"normal_id_{idx:02d}_{c:08d}.wav", x, SR, subtype="PCM_16")
    return root


def build_tiny_bundle(cache_root: Path, machines: list[Machine]) -> Path:
    """``asd-train fit --profile tiny`` on the fleet's normal audio; cached by content."""
    key_src = json.dumps([m.__dict__ for m in machines], sort_keys=True) + Path(__file__).read_text()
    for f in sorted((REPO / "trainer").glob("*.py")) + sorted((REPO / "stream_asd" / "model").glob("*.py")):
        key_src += f.read_text()
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    bundle = cache_root / f"tiny-{key}"
    if (bundle / "manifest.json").exists():
        return bundle
    data = write_training_set(cache_root / f"data-{key}", [Machine(m.device_id, m.machine_type, m.f0, m.seed)
                                                          for m in machines])
    tmp = cache_root / f"tiny-{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "trainer.cli", "fit", "--data", str(data), "--out", str(tmp), "--profile", "tiny",
           "--layout", "dcase2020", "--set", f"features.window_seconds={WINDOW_S}",
           # A few clips per device cannot fill full covariances: with the default ridge the
           # statistics GMM (64-d) scores unseen normal windows at 20-50 std and the fusion GMM
           # (32-d) up to ~9 (faults: 1e3-1e4). The tests score with a ridged fusion GMM only
           # (profile overrides, no code change).
           "--set", "scoring.weight_fusion=1.0", "--set", "scoring.weight_stats=0.0",
           "--set", "scoring.gmm_reg_covar=0.5",
           "--no-progress", "--force"]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"asd-train fit failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    os.replace(tmp, bundle)
    return bundle


# -- a stand-in detector (same interface as stream_asd.model.detector) ----------------------------
class WindowScore(NamedTuple):
    score: float
    scores: dict
    threshold: float
    is_anomaly: bool


class RmsDetector:
    """Scores a window by its RMS (the faults above are loud): for tests of the plumbing."""

    def __init__(self, window_samples: int = int(WINDOW_S * SR), threshold: float = 0.2,
                 model_groups=("fan", "pump"), version: str = "rms-1"):
        self.version = version
        self.window_samples = window_samples
        self.model_groups = set(model_groups)
        self.threshold = threshold
        self.device = "cpu"

    def score_windows(self, waves, machine_types, device_ids):
        w = np.asarray(waves, dtype=np.float32)
        rms = np.sqrt(np.mean(w.astype(np.float64) ** 2, axis=1))
        return [WindowScore(float(r), {"rms": float(r)}, self.threshold, bool(r > self.threshold)) for r in rms]


# -- Kafka helpers ----------------------------------------------------------------------------------
class ChunkProducer:
    """An idempotent confluent-kafka producer for test input; ``send`` then ``flush``."""

    def __init__(self, bootstrap: str, topic: str):
        from confluent_kafka import Producer

        self.topic = topic
        self.errors: list = []
        self.p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                           "linger.ms": 2, "message.max.bytes": 2 * 1024 * 1024})

    def send(self, items: list[tuple[bytes | None, bytes | None, list]]) -> None:
        for key, value, headers in items:
            while True:
                try:
                    self.p.produce(self.topic, key=key, value=value, headers=headers,
                                   on_delivery=lambda err, msg: self.errors.append(err) if err else None)
                    break
                except BufferError:
                    self.p.poll(0.1)
        self.p.poll(0)

    def flush(self) -> None:
        assert self.p.flush(60) == 0
        assert not self.errors, self.errors


def produce_chunks(bootstrap: str, topic: str, items: list[tuple[bytes | None, bytes | None, list]]) -> None:
    """Produce (key, value, headers) in order and wait for all acks."""
    p = ChunkProducer(bootstrap, topic)
    p.send(items)
    p.flush()


def read_topic(bootstrap: str, topic: str, *, min_count: int = 0, timeout: float = 60.0, idle: float = 3.0,
               stop_at: int | None = None) -> list:
    """All messages of ``topic`` (from the beginning), waiting for ``min_count`` then ``idle`` quiet
    (or returning as soon as ``stop_at`` messages are in)."""
    import uuid

    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False,
                  "fetch.message.max.bytes": 4 * 1024 * 1024})
    c.subscribe([topic])
    out: list = []
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is None or msg.error():
                if len(out) >= min_count and time.monotonic() - last > idle:
                    break
                continue
            out.append(msg)
            last = time.monotonic()
            if stop_at is not None and len(out) >= stop_at:
                break
    finally:
        c.close()
    return out


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


def scrape(port: int) -> dict[str, float]:
    """/metrics over HTTP -> {'name{labels}': value} (samples only)."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def metric_sum(samples: dict[str, float], name: str, **labels: str) -> float:
    total = 0.0
    for key, v in samples.items():
        base = key.split("{", 1)[0]
        if base != name:
            continue
        if all(f'{k}="{val}"' in key for k, val in labels.items()):
            total += v
    return total


def stop(proc: subprocess.Popen, wait_s: float = 30.0) -> int:
    """SIGTERM (a graceful drain), SIGKILL if it does not exit within ``wait_s``; the exit code."""
    proc.terminate()
    try:
        return proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- processor workers as subprocesses --------------------------------------------------------------
class Worker:
    """A processor worker subprocess (``stream-asd process`` or the stand-in worker script)."""

    def __init__(self, bootstrap: str, sets: dict[str, Any], log_path: Path, bundle: Path | None = None,
                 faust_cli: bool = False):
        self.metrics_port = free_port()
        sets = dict(sets)
        sets["metrics.port"] = self.metrics_port
        sets["metrics.host"] = "127.0.0.1"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        args: list[str] = []
        if faust_cli and bundle is not None:
            # the plain Faust worker: `faust -A stream_asd.processor.app worker`, settings from ASD_*
            sets.update({"kafka.bootstrap": bootstrap, "model.bundle": bundle})
            env.update({"ASD_" + k.upper().replace(".", "__"): str(v) for k, v in sets.items()})
            cmd = [str(Path(sys.executable).parent / "faust"), "-A", "stream_asd.processor.app", "worker", "-l", "info"]
        else:
            for k, v in sets.items():
                args += ["--set", f"{k}={v}"]
            if bundle is not None:
                cmd = [sys.executable, "-m", "stream_asd.cli", "process", "--bootstrap", bootstrap,
                       "--bundle", str(bundle)]
            else:
                cmd = [sys.executable, str(REPO / "tests" / "processor_worker.py"), "--bootstrap", bootstrap]
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd + args, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_port)

    def wait_metrics(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                self.metrics()
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"worker metrics not up after {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def terminate(self, timeout: float = 40.0) -> int:
        import signal as _signal

        if self.proc.poll() is None:
            self.proc.send_signal(_signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def wait_group_members(bootstrap: str, group: str, members: int, timeout: float = 120.0) -> None:
    """Wait until the consumer group is Stable with ``members`` members that all hold partitions."""
    from confluent_kafka import ConsumerGroupState
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            desc = admin.describe_consumer_groups([group])[group].result(timeout=10)
            last = (desc.state, [len(m.assignment.topic_partitions) for m in desc.members])
            if (desc.state == ConsumerGroupState.STABLE and len(desc.members) == members
                    and all(m.assignment.topic_partitions for m in desc.members)):
                return
        except Exception as exc:  # group not there yet
            last = repr(exc)
        time.sleep(0.5)
    raise TimeoutError(f"group {group} not stable with {members} members: {last}")


def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    import uuid

    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"eo-{uuid.uuid4().hex}"})
    try:
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)}
    finally:
        c.close()


def wait_committed_to_end(bootstrap: str, group: str, topic: str, partitions: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    ends = end_offsets(bootstrap, topic, partitions)
    got: dict = {}
    while time.monotonic() < deadline:
        got = committed_offsets(bootstrap, group, topic, partitions)
        if all(ends[p] == 0 or got.get(p, -1) >= ends[p] for p in ends):
            return got
        time.sleep(0.5)
    raise TimeoutError(f"committed {got} never reached the end offsets {ends}")


def chunk_message(m: Machine, seq: int, capture_ns: int | None = None, producer_id: str = "test") -> tuple:
    from stream_asd.wire import ChunkHeader, encode_chunk, float_to_pcm16

    if capture_ns is None:
        capture_ns = time.time_ns() - int(CHUNK_S * 1e9)  # the chunk just finished recording
    header = ChunkHeader(m.device_id, m.machine_type, seq, capture_ns, producer_id, sample_rate=SR)
    return encode_chunk(header, float_to_pcm16(m.chunk(seq)))


def header_dict(msg) -> dict[str, bytes]:
    return {k: (v or b"") for k, v in (msg.headers() or [])}
