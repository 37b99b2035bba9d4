"""Dataset readers on the real clips (manifest.csv is ground truth) and on small generated trees."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile

from stream_asd.audio.datasets import Clip, detect_layout, iter_clips, read_manifest
from stream_asd.errors import DatasetLayoutError

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
if not REALDATA.is_dir():
    REALDATA = Path("/work/shared/realdata")
needs_realdata = pytest.mark.skipif(not (REALDATA / "manifest.csv").is_file(), reason="shared/realdata not present")


def _manifest_rows() -> list[dict]:
    with (REALDATA / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@needs_realdata
def test_realdata_manifest_reader_matches_manifest_exactly():
    rows = _manifest_rows()
    clips = iter_clips(REALDATA)  # auto -> manifest.csv
    assert detect_layout(REALDATA) == "manifest"
    assert len(clips) == len(rows) > 0
    by_path = {str(c.path.relative_to(REALDATA)): c for c in clips}
    for row in rows:
        clip = by_path[row["path"]]
        assert (clip.machine_type, clip.machine_id, clip.label) == (row["machine_type"], row["machine_id"], row["label"])
        assert clip.domain == (row["domain"] or None)
        if row["split"]:
            assert (clip.split, clip.split_inferred) == (row["split"], False)
        else:
            assert clip.split_inferred and clip.split == ("train" if row["label"] == "normal" else "test")
    assert Counter(c.label for c in clips) == Counter(r["label"] for r in rows)


@needs_realdata
def test_realdata_folder_readers_agree_with_manifest():
    """Reading the clips by file names alone (no manifest) gives the manifest's labels and ids."""
    rows = {r["path"]: r for r in _manifest_rows()}
    clips = iter_clips(REALDATA / "clips")  # mixed tree: DCASE2020 plain folders + DCASE2023 names
    assert len(clips) == len(rows)
    for clip in clips:
        row = rows["clips/" + str(clip.path.relative_to(REALDATA / "clips"))]
        assert clip.label == row["label"] and clip.machine_id == row["machine_id"]
        if row["machine_type"] != "unknown":
            assert clip.machine_type == row["machine_type"]
        if row["split"]:
            assert clip.split == row["split"]
        assert clip.domain == (row["domain"] or None)
    # DCASE2023 names (with _source_/_target_) read as the dcase2021 layout; every other folder is plain DCASE2020
    expected_layouts = Counter("dcase2021" if r["domain"] else "dcase2020" for r in rows.values())
    assert Counter(c.layout for c in clips) == expected_layouts
    # the plain-folder cases named in the brief
    toycar = iter_clips(REALDATA / "clips" / "dcase2020" / "ToyCar")
    assert [(c.machine_type, c.machine_id, c.label, c.split) for c in toycar] == [
        ("ToyCar", "id_01", "anomaly", "test"), ("ToyCar", "id_01", "normal", "train"),
        ("ToyCar", "id_01", "normal", "train")]
    fan = iter_clips(REALDATA / "clips" / "dcase2023" / "fan")
    assert detect_layout(REALDATA / "clips" / "dcase2023" / "fan") == "dcase2021"
    assert Counter((c.split, c.domain, c.label) for c in fan) == {
        ("train", "source", "normal"): 2, ("test", "source", "anomaly"): 1, ("test", "target", "normal"): 1}
    assert {c.device_id for c in fan} == {"fan-section_00"}


def _touch_wav(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.zeros(16, dtype=np.float32), 16000, subtype="PCM_16")


def test_mimii_layout_and_its_split_convention(tmp_path):
    for snr in ("-6_dB", "6_dB"):
        for mid in ("id_00", "id_02"):
            for i in range(5):
                _touch_wav(tmp_path / snr / "fan" / mid / "normal" / f"{i:08d}.wav")
            for i in range(2):
                _touch_wav(tmp_path / snr / "fan" / mid / "abnormal" / f"{i:08d}.wav")
    _touch_wav(tmp_path / "6_dB" / "valve" / "id_04" / "normal" / "00000000.wav")
    assert detect_layout(tmp_path) == "mimii"
    clips = iter_clips(tmp_path)
    assert len(clips) == 29
    fan = [c for c in clips if c.machine_type == "fan" and c.snr == "-6_dB" and c.machine_id == "id_00"]
    # per (snr, type, id): all abnormal + the same number of normals (last by name) are test
    assert Counter((c.split, c.label) for c in fan) == {("train", "normal"): 3, ("test", "normal"): 2,
                                                        ("test", "anomaly"): 2}
    assert sorted(c.path.name for c in fan if c.split == "test" and c.label == "normal") == [
        "00000003.wav", "00000004.wav"]
    assert all(c.split_inferred and c.layout == "mimii" for c in clips)
    assert {c.snr for c in clips} == {"-6_dB", "6_dB"}
    # a single type folder as root
    only = iter_clips(tmp_path / "6_dB" / "valve")
    assert [(c.machine_type, c.machine_id, c.snr, c.split) for c in only] == [("valve", "id_04", None, "train")]
    assert [c.machine_type for c in iter_clips(tmp_path, machine_types=["valve"])] == ["valve"]


def test_dcase2020_layout(tmp_path):
    for t in ("fan", "pump"):
        for mid in ("00", "02"):
            for i in range(3):
                _touch_wav(tmp_path / t / "train" / f"normal_id_{mid}_{i:08d}.wav")
            _touch_wav(tmp_path / t / "test" / f"normal_id_{mid}_00000000.wav")
            _touch_wav(tmp_path / t / "test" / f"anomaly_id_{mid}_00000000.wav")
    _touch_wav(tmp_path / "fan" / "test" / "id_05_00000000.wav")  # unlabelled eval clip: skipped
    assert detect_layout(tmp_path) == "dcase2020"
    clips = iter_clips(tmp_path)
    assert len(clips) == 20
    assert clips == sorted(clips, key=lambda c: str(c.path)) and clips == iter_clips(tmp_path)
    assert Counter((c.machine_type, c.split, c.label) for c in clips)[("pump", "train", "normal")] == 6
    assert {c.device_id for c in clips} == {"fan-id_00", "fan-id_02", "pump-id_00", "pump-id_02"}
    assert not any(c.split_inferred for c in clips) and all(c.domain is None for c in clips)
    assert {c.machine_type for c in iter_clips(tmp_path, "dcase2020", ["pump"])} == {"pump"}
    with pytest.raises(DatasetLayoutError, match="valve"):
        iter_clips(tmp_path, machine_types=["valve"])
    with pytest.raises(DatasetLayoutError, match="mimii"):
        iter_clips(tmp_path, layout="mimii")


def test_dcase2021_layout_with_all_split_folders(tmp_path):
    names = {
        "train": ["section_00_source_train_normal_0000_a.wav", "section_00_target_train_normal_0000_a.wav",
                  "section_01_source_train_normal_0000.wav"],
        "source_test": ["section_00_source_test_normal_0000.wav", "section_00_source_test_anomaly_0000.wav"],
        "target_test": ["section_01_target_test_anomaly_0001_b.wav"],
        "test": ["gearbox_test_section_02_source_test_normal_0003_volt_1.5.wav", "section_02_0000.wav"],
    }
    for folder, files in names.items():
        for name in files:
            _touch_wav(tmp_path / "gearbox" / folder / name)
    assert detect_layout(tmp_path) == "dcase2021"
    clips = iter_clips(tmp_path)
    assert len(clips) == 7  # the unlabelled eval clip is skipped
    got = {(c.machine_id, c.domain, c.split, c.label) for c in clips}
    assert ("section_00", "target", "train", "normal") in got
    assert ("section_01", "target", "test", "anomaly") in got
    assert ("section_02", "source", "test", "normal") in got
    assert {c.machine_type for c in clips} == {"gearbox"}


def test_plain_folder_of_dcase_names(tmp_path):
    for name in ("normal_id_01_00000000.wav", "normal_id_01_00000001.flac", "anomaly_id_01_00000000.wav"):
        _touch_wav(tmp_path / "ToyCar" / name)
    clips = iter_clips(tmp_path / "ToyCar")
    assert [(c.machine_type, c.machine_id, c.split, c.label, c.split_inferred) for c in clips] == [
        ("ToyCar", "id_01", "test", "anomaly", True), ("ToyCar", "id_01", "train", "normal", True),
        ("ToyCar", "id_01", "train", "normal", True)]
    assert iter_clips(tmp_path) == clips  # the type folder one level down reads the same


def test_manifest_reader(tmp_path):
    _touch_wav(tmp_path / "a" / "x.wav")
    _touch_wav(tmp_path / "b" / "normal_id_03_00000000.wav")
    (tmp_path / "manifest.csv").write_text(
        "path,machine_type,machine_id,split,label\n"
        "a/x.wav,pump,id_07,test,abnormal\n"
        "b/normal_id_03_00000000.wav,,,,normal\n")
    clips = iter_clips(tmp_path)
    assert [(c.machine_type, c.machine_id, c.split, c.label, c.split_inferred) for c in clips] == [
        ("pump", "id_07", "test", "anomaly", False), ("b", "id_03", "train", "normal", True)]
    assert read_manifest(tmp_path / "manifest.csv") == clips == iter_clips(tmp_path / "manifest.csv")
    (tmp_path / "manifest.csv").write_text("path,machine_id,label\na/x.wav,id_00,normal\ngone.wav,id_00,normal\n")
    with pytest.raises(DatasetLayoutError, match="gone.wav"):
        iter_clips(tmp_path)
    (tmp_path / "manifest.csv").write_text("file,label\na/x.wav,normal\n")
    with pytest.raises(DatasetLayoutError, match="columns"):
        iter_clips(tmp_path)
    (tmp_path / "manifest.csv").write_text("path,machine_id,label\na/x.wav,id_00,broken\n")
    with pytest.raises(DatasetLayoutError, match="line 2"):
        iter_clips(tmp_path)


def test_clear_errors_when_nothing_matches(tmp_path):
    with pytest.raises(DatasetLayoutError, match="no such folder"):
        iter_clips(tmp_path / "missing")
    with pytest.raises(DatasetLayoutError, match="no .wav or .flac"):
        iter_clips(tmp_path)
    _touch_wav(tmp_path / "fan" / "recording_1.wav")
    for call in (iter_clips, detect_layout):
        with pytest.raises(DatasetLayoutError, match="tried: mimii, dcase2021, dcase2020") as info:
            call(tmp_path)
        assert "recording_1.wav" in str(info.value)
    with pytest.raises(DatasetLayoutError, match="unknown layout"):
        iter_clips(tmp_path, layout="dcase2099")


def test_clip_fields():
    c = Clip(Path("x.wav"), "fan", "id_00", "test", "anomaly")
    assert c.device_id == "fan-id_00" and c.is_anomaly and c.domain is None


@needs_realdata
def test_realdata_files_decode_with_manifest_durations():
    from stream_asd.audio.io import audio_info, read_audio

    for row in _manifest_rows():
        path = REALDATA / row["path"]
        info = audio_info(path)
        assert (info.sample_rate, info.channels) == (int(row["sample_rate"]), int(row["channels"]))
        assert info.duration_s == pytest.approx(float(row["duration_s"]), abs=0.01)
    x = read_audio(REALDATA / _manifest_rows()[0]["path"])
    assert x.dtype == np.float32 and x.size == 11 * 16000 and 0 < np.abs(x).max() <= 1.0
