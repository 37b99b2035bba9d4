"""Archive names (issue 11): distinct device ids / machine types never share a folder or a FLAC
file, so no device's audio is taken as already archived or overwritten by another's, and the
reader gives back the exact ids (from the manifest, never parsed from a name)."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import numpy as np
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_asd.archive.reader import iter_archive_clips, list_segments
from stream_asd.archive.store import ArchiveStore, archive_name, partition_rel, segment_name
from stream_asd.archive.writer import MODE_NORMAL, Archiver, ArchiverOptions
from stream_asd.wire import ChunkHeader, encode_chunk

SR = 16_000
T0 = int(datetime(2026, 11, 20, 12, tzinfo=timezone.utc).timestamp() * 1e9)
# Each group collided under the old safe_name(): fan/01, fan 01, fan_01 -> fan_01;
# 日本-01, 中文-01 -> _-01; and Fan-01 / fan-01 are one folder on a case-insensitive file system.
COLLIDING = ["fan/01", "fan 01", "fan_01", "日本-01", "中文-01", "Fan-01", "fan-01"]


def pcm_of(device: str, seq: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(f"{device}:{seq}".encode()).digest()[:4], "little")
    return (np.random.default_rng(seed).standard_normal(SR) * 2000).astype(np.int16)


def archive_fleet(root, devices, machine_type="fan", n_chunks=4, segment_seconds=2.0):
    """Every device sends seqs 0..n-1 at the same capture times, through the archiver's own
    intake (handle_audio -> decide, which skips chunks it takes as already archived)."""
    store = ArchiveStore(root)
    arch = Archiver({}, store, ArchiverOptions(mode=MODE_NORMAL, healthy=frozenset(devices),
                                               segment_seconds=segment_seconds))
    offset = 0
    for seq in range(n_chunks):
        for dev in devices:
            key, value, headers = encode_chunk(ChunkHeader(dev, machine_type, seq, T0 + seq * 10**9, "p"),
                                               pcm_of(dev, seq))
            arch.handle_audio(0, offset, key, value, headers, now=0.0)
            offset += 1
        arch.decide(0.0)
    arch.writer.flush_all()
    return store, arch


def read_back(store: ArchiveStore):
    """(device_id, machine_type, seq) -> pcm, from the manifests and the files they name."""
    got = {}
    files = set()
    for mt, dev, date in store.partitions():
        rel = f"{mt}/{dev}/{date}"
        for e in store.read_manifest(rel):
            path = store.path / rel / e["file"]
            assert path not in files
            files.add(path)
            data = path.read_bytes()
            assert hashlib.sha256(data).hexdigest() == e["sha256"], f"{path} was overwritten after indexing"
            pcm, sr = sf.read(path, dtype="int16")
            assert sr == SR and len(pcm) == e["samples"]
            for i, seq in enumerate(range(e["first_seq"], e["last_seq"] + 1)):
                k = (e["device_id"], e["machine_type"], seq)
                assert k not in got, f"{k} archived twice"
                got[k] = pcm[i * SR:(i + 1) * SR]
    return got, files


def test_colliding_ids_archive_to_distinct_files_with_their_own_audio(tmp_path):
    store, arch = archive_fleet(tmp_path / "arch", COLLIDING)
    assert arch.counts.get("duplicate", 0) == 0, arch.counts  # none taken as another's
    assert arch.counts["kept"] == 4 * len(COLLIDING)
    got, files = read_back(store)
    assert len(files) == 2 * len(COLLIDING)  # 2 segments of 2 s per device
    # case-insensitive file systems too: no two paths differ only in case
    assert len({str(p).casefold() for p in files}) == len(files)
    assert set(got) == {(d, "fan", s) for d in COLLIDING for s in range(4)}
    for (dev, _, seq), pcm in got.items():
        np.testing.assert_array_equal(pcm, pcm_of(dev, seq))
    assert arch.offsets.outstanding() == 0  # every offset done: nothing pinned, nothing lost


def test_reader_gives_back_the_exact_ids_and_selects_by_them(tmp_path):
    archive_fleet(tmp_path / "arch", COLLIDING)
    clips = list(iter_archive_clips(tmp_path / "arch"))
    assert sorted({c.machine_id for c in clips}) == sorted(COLLIDING)
    for dev in ("fan/01", "日本-01", "fan_01"):
        one = list(iter_archive_clips(tmp_path / "arch", devices=[dev]))
        assert len(one) == 2 and {c.machine_id for c in one} == {dev}
        for c in one:  # the clip's audio is that device's
            pcm, _ = sf.read(c.path, dtype="int16")
            seqs = [s for s in range(4) if np.array_equal(pcm[:SR], pcm_of(dev, s))]
            assert len(seqs) == 1


def test_machine_types_that_collided_stay_apart(tmp_path):
    store = ArchiveStore(tmp_path / "arch")
    for mt in ("fan/x", "fan_x"):
        archive_fleet(tmp_path / "arch", ["dev-1"], machine_type=mt)
    got, files = read_back(store)
    assert len(files) == 4
    assert {(d, mt) for d, mt, _ in got} == {("dev-1", "fan/x"), ("dev-1", "fan_x")}
    assert {s.machine_type for s in list_segments(tmp_path / "arch", machine_types=["fan/x"])} == {"fan/x"}


def test_legacy_folder_shared_by_two_devices_is_read_by_exact_id(tmp_path):
    """An archive written by the old naming holds fan/01 and fan_01 in one folder `fan_01`:
    selecting one of them gives only its own segments."""
    store = ArchiveStore(tmp_path / "arch")
    rel = "fan/fan_01/2026-11-20"
    entries = []
    for i, dev in enumerate(("fan/01", "fan_01")):
        name = f"fan_01_{i:010d}-{i:010d}.flac"
        store.write(f"{rel}/{name}", b"x")
        entries.append({"schema": "asd.archive.segment/1", "file": name, "device_id": dev, "machine_type": "fan",
                        "first_seq": i, "last_seq": i, "samples": SR, "sample_rate": SR,
                        "capture_start_ns": T0 + i, "capture_end_ns": T0 + i + 10**9})
    store.write_manifest(rel, entries)
    assert [s.device_id for s in list_segments(tmp_path / "arch", devices=["fan/01"])] == ["fan/01"]
    assert [s.device_id for s in list_segments(tmp_path / "arch", devices=["fan_01"])] == ["fan_01"]


def test_plain_ids_keep_their_names():
    # The common case keeps the layout archives already have on disk.
    for name in ("fan", "fan-01", "pump_id_00", "valve.3", "slider-id_04"):
        assert archive_name(name) == name
    assert partition_rel("fan", "fan-01", "2026-11-20") == "fan/fan-01/2026-11-20"
    assert segment_name("fan-01", 3, 7) == "fan-01_0000000003-0000000007.flac"
    for name in ("fan/01", "Fan-01", "日本-01", ".hidden", "..", ".", "", "-x", "nul", "x.", "a" * 65):
        enc = archive_name(name)
        assert enc != name and "~" in enc, (name, enc)


ids = st.text(st.characters(codec="utf-8"), max_size=300) | st.text(alphabet="aA_-./ 日~.", max_size=12)


def _safe(name: str) -> bool:
    return (0 < len(name) <= 64 and name not in (".", "..") and not name.startswith((".", "-"))
            and all(c.isascii() and (c.isalnum() or c in "._-~") for c in name))


@settings(max_examples=2000, deadline=None)
@given(ids, ids)
def test_distinct_ids_give_distinct_safe_names(a, b):
    na, nb = archive_name(a), archive_name(b)
    assert _safe(na) and _safe(nb), (a, na, b, nb)
    assert "/" not in na and "\x00" not in na
    if a != b:
        assert na != nb and na.casefold() != nb.casefold(), (a, b, na)
    else:
        assert na == nb  # deterministic: a restarted archiver finds its own segments
    seg = segment_name(a, 0, 2**63 - 1)
    assert len(seg.encode()) <= 255 and "/" not in seg
