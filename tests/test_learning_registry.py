"""Model registry: atomic pointer, history, rollback, checksums; the watcher keeps the old model
when a new one is corrupt or made for another feature spec. Real files; object storage through
a local S3-compatible server (moto) when it is installed."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from stream_asd.errors import BundleError
from stream_asd.registry import (ModelAnnouncement, Registry, RegistryError, RegistryWatcher, bundle_sha256,
                                 default_compatibility)


def make_fake_bundle(path: Path, *, n_mels: int = 224, weights: bytes = b"w" * 100) -> Path:
    """A stand-in folder with a manifest and a weights file (the registry only moves bytes)."""
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"feature_spec": {"sample_rate": 16000, "n_mels": n_mels}}))
    (path / "weights.safetensors").write_bytes(weights)
    (path / "sub").mkdir()
    (path / "sub" / "gmm.json").write_text("{}")
    return path


class FakeDetector:
    def __init__(self, path: Path):
        manifest = json.loads((path / "manifest.json").read_text())
        if (path / "weights.safetensors").read_bytes()[:1] != b"w":
            raise BundleError("weights are corrupt")
        self.feature_spec = manifest["feature_spec"]
        self.path = path


def test_put_set_current_history_rollback(tmp_path):
    reg = Registry(tmp_path / "reg")
    b1 = make_fake_bundle(tmp_path / "b1", weights=b"w1" * 10)
    b2 = make_fake_bundle(tmp_path / "b2", weights=b"w2" * 10)
    b3 = make_fake_bundle(tmp_path / "b3", weights=b"w3" * 10)
    v1 = reg.put(b1, "fan")
    assert reg.current("fan") is None  # put never moves the pointer
    assert reg.put(b1, "fan") == v1  # same bytes, same version
    v2, v3 = reg.put(b2, "fan"), reg.put(b3, "fan")
    assert len({v1, v2, v3}) == 3
    assert [v.version for v in reg.versions("fan")] == [v1, v2, v3]
    # the copy is byte-identical and checksummed
    assert bundle_sha256(reg.fetch("fan", v2)) == bundle_sha256(b2) == reg.info("fan", v2).sha256
    for v in (v1, v2, v3):
        reg.set_current("fan", v, action="publish")
    assert reg.current("fan").version == v3 and reg.current("fan").previous == v2
    # two rollbacks in a row go two versions back (stack semantics), then forward again by name
    assert reg.rollback("fan").version == v2
    assert reg.rollback("fan").version == v1
    with pytest.raises(RegistryError):
        reg.rollback("fan")  # nothing before v1
    assert reg.rollback("fan", to=v3).version == v3
    actions = [(e["action"], e["version"]) for e in reg.history("fan")]
    assert actions == [("publish", v1), ("publish", v2), ("publish", v3), ("rollback", v2), ("rollback", v1),
                       ("rollback", v3)]
    with pytest.raises(RegistryError):
        reg.set_current("fan", "no-such-version")
    assert reg.current("fan").version == v3
    # no temporary files left behind anywhere
    leftovers = [p for p in (tmp_path / "reg").rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_pointer_readers_never_see_a_partial_pointer(tmp_path):
    """Readers poll the pointer while a writer flips it 300 times: every read parses and names
    one of the two versions."""
    reg = Registry(tmp_path / "reg")
    va = reg.put(make_fake_bundle(tmp_path / "a", weights=b"wa"), "pump")
    vb = reg.put(make_fake_bundle(tmp_path / "b", weights=b"wb"), "pump")
    reg.set_current("pump", va)
    seen: list[str] = []
    bad: list[Exception] = []
    stop = threading.Event()

    def reader():
        r = Registry(tmp_path / "reg")
        while not stop.is_set():
            try:
                seen.append(r.current("pump").version)
            except Exception as exc:  # noqa: BLE001
                bad.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(300):
        reg.set_current("pump", vb if i % 2 == 0 else va)
    stop.set()
    for t in threads:
        t.join()
    assert bad == []
    assert set(seen) <= {va, vb} and len(seen) > 100
    assert len(reg.history("pump")) == 301


def test_tampered_copy_is_refused(tmp_path):
    reg = Registry(tmp_path / "reg")
    v = reg.put(make_fake_bundle(tmp_path / "b"), "fan")
    path = reg.fetch("fan", v)
    (path / "weights.safetensors").write_bytes(b"x" * 100)
    with pytest.raises(BundleError, match="checksums"):
        reg.fetch("fan", v)


def _watcher(reg, group, swaps, **kw):
    return RegistryWatcher(reg, group, swaps.append, loader=FakeDetector, compatible=default_compatibility,
                           poll_seconds=0.2, **kw)


def _wait(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_watcher_polls_swaps_and_keeps_old_model_on_bad_bundles(tmp_path):
    from prometheus_client import CollectorRegistry

    from stream_asd.metrics import ProcessorMetrics

    metrics = ProcessorMetrics(CollectorRegistry())
    reg = Registry(tmp_path / "reg")
    v1 = reg.put(make_fake_bundle(tmp_path / "b1", weights=b"w1"), "fan")
    reg.set_current("fan", v1)
    swaps: list = []
    w = _watcher(reg, "fan", swaps, metrics=metrics)
    assert w.load_current().version == v1
    w.start()
    try:
        # corrupt bundle (loader refuses it)
        vbad = reg.put(make_fake_bundle(tmp_path / "bad", weights=b"xx-corrupt"), "fan")
        reg.set_current("fan", vbad)
        assert _wait(lambda: vbad in w.failed)
        # other feature spec
        vspec = reg.put(make_fake_bundle(tmp_path / "spec", n_mels=128, weights=b"w-spec"), "fan")
        reg.set_current("fan", vspec)
        assert _wait(lambda: vspec in w.failed)
        assert "feature spec" in w.failed[vspec]
        time.sleep(0.6)  # a few more polls: failures are counted once, not every poll
        assert w.running_version == v1 and [s.version for s in swaps] == [v1]
        assert metrics.model_reloads.labels(result="failure")._value.get() == 2
        # a good one is picked up by polling
        v2 = reg.put(make_fake_bundle(tmp_path / "b2", weights=b"w2"), "fan")
        reg.set_current("fan", v2)
        assert _wait(lambda: w.running_version == v2)
        assert [s.version for s in swaps] == [v1, v2]
        assert metrics.model_reloads.labels(result="ok")._value.get() == 2
        # a copy damaged after publishing is refused by checksum
        v3 = reg.put(make_fake_bundle(tmp_path / "b3", weights=b"w3"), "fan")
        (tmp_path / "reg" / "fan" / "versions" / v3 / "sub" / "gmm.json").write_text('{"evil": 1}')
        reg.set_current("fan", v3)
        assert _wait(lambda: v3 in w.failed)
        assert "checksums" in w.failed[v3] and w.running_version == v2
    finally:
        w.stop()


def test_late_announcement_of_a_failed_move_is_not_a_second_failure(tmp_path):
    """The poll often sees a new pointer just before its asd.models announcement arrives: one bad
    bundle must count as one failure; announcing a later move of the pointer retries it."""
    from prometheus_client import CollectorRegistry

    from stream_asd.metrics import ProcessorMetrics

    metrics = ProcessorMetrics(CollectorRegistry())
    failures = metrics.model_reloads.labels(result="failure")
    reg = Registry(tmp_path / "reg")
    v1 = reg.put(make_fake_bundle(tmp_path / "b1", weights=b"w1"), "fan")
    reg.set_current("fan", v1)
    w = _watcher(reg, "fan", [], metrics=metrics)
    w.load_current()
    vbad = reg.put(make_fake_bundle(tmp_path / "bad", weights=b"xx-corrupt"), "fan")
    reg.set_current("fan", vbad)
    w._check("poll")                                              # the poll sees the move first
    assert vbad in w.failed and failures._value.get() == 1
    w._on_announcement(reg.announcement("fan").to_json())         # then its announcement arrives
    w._check("poll")
    assert failures._value.get() == 1 and w.running_version == v1
    reg.set_current("fan", v1)
    reg.set_current("fan", vbad)                                  # an operator moves it again
    w._on_announcement(reg.announcement("fan").to_json())
    assert failures._value.get() == 2 and w.running_version == v1
    assert [e["trigger"] for e in w.events if e["event"] == "failure"] == ["poll", "announcement"]


def test_announcement_roundtrip_and_rejects_other_schema():
    a = ModelAnnouncement("fan", "v1", "/r/fan/versions/v1", "ab" * 32)
    assert ModelAnnouncement.from_json(a.to_json()) == a
    with pytest.raises(RegistryError):
        ModelAnnouncement.from_json(b'{"schema":"asd.model/2","model_group":"fan"}')
    with pytest.raises(RegistryError):
        ModelAnnouncement.from_json(b"\xff garbage")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_url(monkeypatch):
    """A bucket on a local S3-compatible server (moto) on loopback."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(k, v)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"})
    import uuid

    bucket = f"asd-{uuid.uuid4().hex[:10]}"  # moto keeps buckets across servers in one process
    fs.mkdir(bucket)
    try:
        yield f"s3://{bucket}/registry"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_registry_on_object_storage(tmp_path, s3_url):
    reg = Registry(s3_url, cache_dir=tmp_path / "cache")
    v1 = reg.put(make_fake_bundle(tmp_path / "b1", weights=b"w1"), "valve")
    v2 = reg.put(make_fake_bundle(tmp_path / "b2", weights=b"w2"), "valve")
    reg.set_current("valve", v1, action="publish")
    reg.set_current("valve", v2, action="publish")
    other = Registry(s3_url, cache_dir=tmp_path / "cache2")  # a second reader (another pod)
    assert other.current("valve").version == v2
    local = other.fetch("valve", v2)
    assert bundle_sha256(local) == bundle_sha256(tmp_path / "b2")
    assert other.rollback("valve").version == v1
    assert reg.current("valve").version == v1
    assert [e["action"] for e in reg.history("valve")] == ["publish", "publish", "rollback"]
    assert reg.announcement("valve").uri.startswith(f"{s3_url}/valve/versions/")


def test_archive_on_object_storage(tmp_path, s3_url):
    """Archive segments written to and read back from object storage (same local S3 server)."""
    import numpy as np

    from stream_asd.archive.reader import iter_archive_clips
    from stream_asd.archive.store import ArchiveStore
    from stream_asd.archive.writer import ArchiverOptions, SegmentWriter, _Pending
    from stream_asd.audio.io import read_audio
    from stream_asd.wire import ChunkHeader, decode_chunk, encode_chunk

    url = s3_url.replace("/registry", "/archive")
    written = []
    writer = SegmentWriter(ArchiveStore(url), ArchiverOptions(segment_seconds=3), written.extend)
    rng = np.random.default_rng(0)
    pcm = {}
    for seq in range(6):
        pcm[seq] = (rng.standard_normal(16000) * 1000).astype(np.int16)
        key, value, headers = encode_chunk(ChunkHeader("valve-1", "valve", seq, time.time_ns(), "t"), pcm[seq])
        writer.add(_Pending(0, seq, decode_chunk(key, value, headers), 0.0), 0.0)
    writer.flush_all()
    assert len(written) == 6
    store = ArchiveStore(url)
    [(mt, dev, date)] = list(store.partitions())
    entries = store.read_manifest(f"{mt}/{dev}/{date}")
    assert [(e["first_seq"], e["last_seq"]) for e in entries] == [(0, 2), (3, 5)]
    clips = list(iter_archive_clips(url, cache_dir=tmp_path / "cache"))
    assert len(clips) == 2 and all(str(c.path).startswith(str(tmp_path / "cache")) for c in clips)
    got = np.concatenate([read_audio(c.path, 16000) for c in clips])
    want = np.concatenate([pcm[s] for s in range(6)]).astype(np.float32) / 32768.0
    assert np.allclose(got, want, atol=1e-6)
