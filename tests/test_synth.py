"""Synthetic machine sounds: determinism, the streaming contract (chunked == long, bit-exact),
device variety, fault effects growing with severity, amplitude bounds, data set writing."""

from __future__ import annotations

import csv
import hashlib
import json
import time

import numpy as np
import pytest

from stream_asd.audio import synth as S
from stream_asd.audio.synth_dataset import write_dataset
from stream_asd.audio.datasets import iter_clips
from stream_asd.audio.io import read_audio

SR = 16000


def band_db(x: np.ndarray, n_bands: int = 48) -> np.ndarray:
    """Energy in log-spaced bands 50 Hz .. 7.5 kHz, dB."""
    power = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(x.size))) ** 2
    freqs = np.fft.rfftfreq(x.size, 1 / SR)
    edges = np.geomspace(50, 7500, n_bands + 1)
    idx = np.digitize(freqs, edges) - 1
    ok = (idx >= 0) & (idx < n_bands)
    return 10 * np.log10(np.bincount(idx[ok], weights=power[ok], minlength=n_bands) + 1e-12)


def test_fleet_ids_and_validation():
    fleet = S.make_fleet(7, ["fan", "pump", "valve"], seed=3)
    assert [d.device_id for d in fleet] == ["fan-id_00", "pump-id_00", "valve-id_00", "fan-id_01", "pump-id_01",
                                            "valve-id_01", "fan-id_02"]
    assert fleet[3].machine_id == "id_01" and all(d.seed == 3 for d in fleet)
    assert [d.machine_type for d in S.make_fleet(5)] == list(S.MACHINE_TYPES)
    assert len(S.FAULT_TYPES) >= 5 and set(S.FAULTS_BY_TYPE) == set(S.MACHINE_TYPES)
    with pytest.raises(S.SynthError, match="unknown machine type"):
        S.make_fleet(2, ["fan", "blender"])
    with pytest.raises(S.SynthError, match="unknown fault"):
        S.Fault("meltdown")
    with pytest.raises(S.SynthError, match="severity"):
        S.Fault("bearing", 1.5)
    with pytest.raises(S.SynthError, match="does not apply"):
        S.render(fleet[0], 0.0, 0.1, SR, S.Fault("click_loss"))
    with pytest.raises(S.SynthError, match="start_s"):
        S.render(fleet[0], -1.0, 0.1)
    assert S.Fault("bearing").severity == pytest.approx(0.6)  # usable without a severity


def test_one_device_id_per_synthetic_device(tmp_path):
    """The generator, the producer's sources and the data set readers (on a DCASE-layout copy
    of the device) spell a device's id the same way; --fault takes that id or a fleet index."""
    from stream_asd.producer.sources import FaultSpec, SourceError, synthetic_fleet

    fleet = synthetic_fleet(6, SR, ["fan", "valve"], seed=4, faults=[FaultSpec("valve-id_01", "click_loss", 2.0),
                                                                      FaultSpec("4", "bearing", 1.0)])
    ids = ["fan-id_00", "valve-id_00", "fan-id_01", "valve-id_01", "fan-id_02", "valve-id_02"]
    assert [s.device_id for s in fleet] == [s.profile.device_id for s in fleet] == ids
    assert [s.fault.type if s.fault else None for s in fleet] == [None, None, None, "click_loss", "bearing", None]
    with pytest.raises(SourceError, match=r"no such device.*'fan-id_00'"):
        synthetic_fleet(6, SR, ["fan", "valve"], faults=[FaultSpec("fan-01", "bearing", 2.0)])
    out = write_dataset(tmp_path / "d", ["valve"], devices_per_type=2, n_train=1, n_test_normal=0, n_test_anomaly=0,
                        seconds=0.25, seed=4)
    assert {c.device_id for c in iter_clips(out)} == {"valve-id_00", "valve-id_01"}
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert {r["device_id"] for r in rows} == {"valve-id_00", "valve-id_01"}
    assert {d["device_id"] for d in json.loads((out / "synth.json").read_text())["devices"]} == \
        {"valve-id_00", "valve-id_01"}


def test_deterministic_by_seed():
    a = S.render(S.DeviceProfile("pump", 1, 5), 30.0, 2.0)
    b = S.render(S.DeviceProfile("pump", 1, 5), 30.0, 2.0)
    c = S.render(S.DeviceProfile("pump", 1, 6), 30.0, 2.0)
    assert a.dtype == np.float32 and a.shape == (2 * SR,)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)
    assert S.DeviceProfile("pump", 1, 5).describe() == S.DeviceProfile("pump", 1, 5).describe()


@pytest.mark.parametrize("machine_type", S.MACHINE_TYPES)
def test_chunked_render_equals_long_render_bit_exact(machine_type):
    device = S.DeviceProfile(machine_type, 2, 11)
    rng = np.random.default_rng(0)
    start, n = 123_457, 5 * SR
    faults = [None, S.Fault(S.FAULTS_BY_TYPE[machine_type][-1], 0.8, start_s=start / SR + 2.3, ramp_s=0.5),
              S.Fault("drift", 0.9, start_s=start / SR + 1.1, ramp_s=1.7)]
    for fault in faults:
        whole = S.render_samples(device, start, n, SR, fault)
        cuts = np.sort(rng.choice(np.arange(1, n), 9, replace=False)).tolist() + [S.BLOCK - start % S.BLOCK]
        bounds = sorted(set([0, n] + cuts))
        parts = [S.render_samples(device, start + a, b - a, SR, fault) for a, b in zip(bounds, bounds[1:])]
        assert np.array_equal(np.concatenate(parts), whole), f"{machine_type} {fault}"
    # the producer's way: 1 s chunks addressed in seconds
    chunks = [S.render(device, k * 1.0, 1.0) for k in range(3)]
    assert np.array_equal(np.concatenate(chunks), S.render(device, 0.0, 3.0))


@pytest.mark.parametrize("fault_type", S.FAULT_TYPES)
def test_fault_leaves_everything_before_its_start_untouched(fault_type):
    device = S.DeviceProfile("valve" if fault_type == "click_loss" else "gearbox", 0, 1)
    fault = S.Fault(fault_type, 0.9, start_s=12.5, ramp_s=0.5)
    normal = S.render(device, 10.0, 5.0)
    faulty = S.render(device, 10.0, 5.0, SR, fault)
    k = int(2.5 * SR)
    assert np.array_equal(normal[:k], faulty[:k])
    assert not np.array_equal(normal[k:], faulty[k:])
    later = S.render(device, 10.0, 5.0, SR, S.Fault(fault_type, 0.9, start_s=13.0, ramp_s=0.5))
    assert np.array_equal(normal[:3 * SR], later[:3 * SR])  # same fault, later start: honoured
    if fault_type != "drift":  # (drift shifts the phase by how long it has run)
        assert np.array_equal(faulty[int(4.2 * SR):], later[int(4.2 * SR):])  # both at full strength


@pytest.mark.parametrize("machine_type", S.MACHINE_TYPES)
def test_devices_differ_more_than_clips_of_one_device(machine_type):
    d0, d1 = S.DeviceProfile(machine_type, 0, 0), S.DeviceProfile(machine_type, 1, 0)
    same = np.mean(np.abs(band_db(S.render(d0, 100.0, 4.0)) - band_db(S.render(d0, 200.0, 4.0))))
    other = np.mean(np.abs(band_db(S.render(d0, 100.0, 4.0)) - band_db(S.render(d1, 100.0, 4.0))))
    assert other > 2 * same and other > 1.5  # dB
    assert d0.describe() != d1.describe()


def tonal_ratio(ref: np.ndarray, x: np.ndarray, lo: float = 60.0, hi: float = 3000.0) -> float:
    """Frequency ratio that best maps the tonal peaks of ``ref`` onto those of ``x``
    (cross-correlation of peak spectra on a log-frequency axis)."""
    grid = np.linspace(np.log(lo), np.log(hi), 2 ** 15)

    def peaks(y):
        mag = np.abs(np.fft.rfft(y.astype(np.float64) * np.hanning(y.size)))
        smooth = np.convolve(mag, np.ones(200) / 200, mode="same")  # ~50 Hz: keep the peaks
        freqs = np.fft.rfftfreq(y.size, 1 / SR)
        p = np.interp(grid, np.log(freqs[1:]), np.maximum(mag - smooth, 0)[1:])
        return p - p.mean()

    a, b = peaks(ref), peaks(x)
    corr = np.fft.irfft(np.fft.rfft(b, 2 * grid.size) * np.conj(np.fft.rfft(a, 2 * grid.size)))
    step = grid[1] - grid[0]
    maxlag = int(np.log(1.12) / step)
    lags = np.r_[0:maxlag + 1, -maxlag:0]
    return float(np.exp(lags[np.argmax(np.r_[corr[:maxlag + 1], corr[-maxlag:]])] * step))


@pytest.mark.parametrize("machine_type", S.MACHINE_TYPES)
def test_each_fault_changes_the_spectrum_more_with_severity(machine_type):
    """Same device, same stretch of stream (same noise): the band spectrum moves away from the
    normal one, more at higher severity; drift moves the tones up by 5% x severity."""
    device = S.DeviceProfile(machine_type, 1, 2)
    reference = S.render(device, 300.0, 4.0)
    normal = band_db(reference)
    for fault_type in S.FAULTS_BY_TYPE[machine_type]:
        renders = {s: S.render(device, 300.0, 4.0, SR, S.Fault(fault_type, s, 0.0, 0.0)) for s in (0.15, 0.5, 1.0)}
        if fault_type == "drift":  # a pure tonal change: measure the frequency ratio itself
            ratios = [tonal_ratio(reference, renders[s]) for s in (0.15, 0.5, 1.0)]
            assert ratios == pytest.approx([1.0075, 1.025, 1.05], abs=0.0015), ratios
            continue
        change = [float(np.max(np.abs(band_db(renders[s]) - normal))) for s in (0.15, 0.5, 1.0)]
        assert change[0] > 0.01, (fault_type, change)  # measurable
        assert change[0] < change[1] < change[2], (fault_type, change)  # grows with severity
        assert change[2] > 0.8, (fault_type, change)  # clearly there at full severity (dB)


def test_amplitudes_stay_in_range_with_headroom():
    for device in S.make_fleet(10, seed=4):
        for fault in [None] + [S.Fault(f, 1.0, 0.0, 0.0) for f in S.FAULTS_BY_TYPE[device.machine_type]]:
            x = S.render(device, 50.0, 2.0, SR, fault)
            assert np.isfinite(x).all()
            assert np.max(np.abs(x)) < 0.99
            assert 0.01 < np.sqrt(np.mean(x ** 2)) < 0.3


def test_other_sample_rates_and_empty_render():
    device = S.DeviceProfile("fan", 0, 0)
    x = S.render(device, 0.0, 1.0, 22050, S.Fault("rubbing", 0.5))
    assert x.shape == (22050,) and np.max(np.abs(x)) < 0.99
    peak_hz = np.argmax(np.abs(np.fft.rfft(S.render(device, 0.0, 1.0, 8000)))) * 1.0
    assert 0 < peak_hz < 4000
    assert S.render(device, 5.0, 0.0).shape == (0,)


def test_render_speed():
    device = S.DeviceProfile("valve", 0, 0)
    S.render(device, 0.0, 10.0)
    best = min(_cpu_timed(lambda: S.render(device, 100.0, 10.0)) for _ in range(3))
    # a 10 s clip takes ~10-20 ms of CPU; the bound is loose because CI shares 2 cores
    assert best < 0.1, best


def _cpu_timed(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def test_write_dataset_layout_manifest_and_determinism(tmp_path):
    kwargs = dict(machine_types=["fan", "valve"], devices_per_type=2, n_train=2, n_test_normal=1, n_test_anomaly=3,
                  seconds=0.5, seed=9, severity=(0.4, 0.8))
    out = write_dataset(tmp_path / "a", **kwargs)
    clips = iter_clips(out)  # manifest.csv
    by_files = iter_clips(out, layout="dcase2020")
    assert [(c.path, c.machine_type, c.machine_id, c.split, c.label) for c in clips] == \
        [(c.path, c.machine_type, c.machine_id, c.split, c.label) for c in by_files]
    assert len(clips) == 2 * 2 * (2 + 1 + 3)
    assert (out / "fan" / "train" / "normal_id_01_00000001.wav").is_file()
    assert (out / "valve" / "test" / "anomaly_id_00_00000002.wav").is_file()
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    anomalies = [r for r in rows if r["label"] == "anomaly"]
    assert len(anomalies) == 12 and all(0.4 <= float(r["severity"]) <= 0.8 for r in anomalies)
    assert {r["fault"] for r in anomalies if r["machine_type"] == "valve"} == {"bearing", "imbalance", "rubbing"}
    assert all(r["fault"] == "" for r in rows if r["label"] == "normal")
    x = read_audio(out / rows[0]["path"])
    assert x.shape == (SR // 2,) and np.max(np.abs(x)) < 0.99
    # a normal test clip is the device's stream at its start time
    row = next(r for r in rows if r["split"] == "test" and r["label"] == "normal")
    ref = S.render(S.DeviceProfile(row["machine_type"], int(row["machine_id"][3:]), 9), float(row["start_s"]), 0.5)
    assert np.max(np.abs(read_audio(out / row["path"]) - ref)) <= 1 / 32768 + 1e-6
    again = write_dataset(tmp_path / "b", **kwargs)

    def digest(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    assert digest(out) == digest(again)


def test_write_dataset_level_randomisation_changes_only_the_gain(tmp_path):
    kwargs = dict(machine_types=["fan"], devices_per_type=1, n_train=6, n_test_normal=2, n_test_anomaly=2,
                  seconds=0.5, seed=3)
    plain = write_dataset(tmp_path / "plain", **kwargs)
    varied = write_dataset(tmp_path / "varied", level_db=6.0, **kwargs)
    rows = list(csv.DictReader((varied / "manifest.csv").open()))
    gains = np.array([float(r["gain_db"]) for r in rows])
    assert np.all(np.abs(gains) <= 6.0 + 1e-9) and np.ptp(gains) > 3.0  # spread, within range
    for r, g in zip(rows, gains):
        a, b = read_audio(plain / r["path"]), read_audio(varied / r["path"])
        ratio_db = 20 * np.log10(np.sqrt(np.mean(b ** 2)) / np.sqrt(np.mean(a ** 2)))
        assert abs(ratio_db - g) < 0.05 and np.max(np.abs(b)) <= 0.99 + 1 / 32768
    assert all(float(r["gain_db"]) == 0.0 for r in csv.DictReader((plain / "manifest.csv").open()))
    with pytest.raises(S.SynthError, match="level_db"):
        write_dataset(tmp_path / "bad", level_db=-1.0, **kwargs)


def test_synth_cli(tmp_path):
    from trainer.cli import main

    rc = main(["synth", "--out", str(tmp_path / "d"), "--machine-types", "gearbox", "--devices-per-type", "1",
               "--train", "1", "--test-normal", "1", "--test-anomaly", "2", "--seconds", "0.25", "--seed", "2"])
    assert rc == 0
    clips = iter_clips(tmp_path / "d")
    assert sorted((c.split, c.label) for c in clips) == [("test", "anomaly"), ("test", "anomaly"),
                                                          ("test", "normal"), ("train", "normal")]


def test_recipe_tables_cover_every_machine_and_fault_type():
    assert tuple(S._RECIPES) == S.MACHINE_TYPES
    assert tuple(S._FAULT_RECIPES) == S.FAULT_TYPES
    assert all(set(S.FAULTS_BY_TYPE[t]) <= set(S.FAULT_TYPES) for t in S.MACHINE_TYPES)


def test_voice_cache_serves_a_fleet_without_rebuilding_and_stays_bounded():
    """Voices are built once per (profile, rate) and kept in a bounded LRU cache: a producer's
    fleet renders chunk after chunk without rebuilding; throw-away profiles stay within the bound."""
    S._voice.cache_clear()
    fleet = S.make_fleet(40, ["gearbox", "valve"], seed=123)
    for device in fleet:
        S.render_samples(device, 0, 64)
    built = S._voice.cache_info().misses
    for device in fleet:
        S.render_samples(device, 64, 64)
    assert S._voice.cache_info().misses == built
    # equal profiles are one key (DeviceProfile is a frozen, hashable value)
    again = S.DeviceProfile("valve", 3, 123)
    assert again == fleet[7] and hash(again) == hash(fleet[7])
    S.render_samples(again, 0, 64)
    assert S._voice.cache_info().misses == built
    # a fault's voice is shared by every start time of the same fault
    S.render_samples(fleet[1], 0, 64, SR, S.Fault("click_loss", 0.5, start_s=0.0))
    fault_built = S._fault_voice_of.cache_info().misses
    S.render_samples(fleet[1], 0, 64, SR, S.Fault("click_loss", 0.5, start_s=3.0, ramp_s=0.0))
    assert S._fault_voice_of.cache_info().misses == fault_built
    for device in S.make_fleet(S._VOICE_CACHE_SIZE + 40, ["gearbox"], seed=124):
        S.render_samples(device, 0, 64)
    assert S._voice.cache_info().currsize <= S._VOICE_CACHE_SIZE


def test_cached_voices_are_read_only():
    v = S._voice(S.DeviceProfile("valve", 0, 5), SR)
    with pytest.raises(ValueError):
        v.noise_shape[0] = 1.0
    with pytest.raises(ValueError):
        v.rhythm.events[0].kernels[0][0] = 1.0
    with pytest.raises(ValueError):
        v.background.knock_kernels[0][0] = 1.0
    with pytest.raises(TypeError):
        v.rot_amps[1] = 2.0
    fv = S._fault_voice(S.DeviceProfile("valve", 0, 5), S.Fault("clogging", 0.7), SR)
    with pytest.raises(ValueError):
        fv.noise_delta[0] = 1.0


def test_concurrent_first_renders_of_a_device_agree():
    """Threads building one device's voice at the same time get the same samples."""
    from concurrent.futures import ThreadPoolExecutor

    device = S.DeviceProfile("slider", 7, 77)
    S._voice.cache_clear()
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda k: S.render(device, 10.0, 0.5), range(4)))
    assert all(np.array_equal(outs[0], x) for x in outs[1:])
    assert np.array_equal(outs[0], S.render(device, 10.0, 0.5))
