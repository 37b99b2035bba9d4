"""Publishing: the quality gate refuses a worse candidate, corrupt and other-feature-spec
bundles are refused by publish and by the processor-side watcher (the old model keeps
scoring); rollback; `asd-train job` end to end on an archive (no broker). Tiny profile."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from _learning_data import SR, corrupt_bundle_copy, machine_sound, write_archive, write_dataset

torch = pytest.importorskip("torch")


def _fit(data: Path, out: Path, *overrides: str, seed: int = 0) -> Path:
    from trainer.fit import fit
    from trainer.profiles import get_profile

    torch.set_num_threads(1)
    fit(data, out, layout="dcase2020", profile=get_profile("tiny", list(overrides)), seed=seed, progress=False)
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning-bundles")
    good_data = write_dataset(root / "good-data")
    bad_data = write_dataset(root / "bad-data", train_anomalous=True, seed=5)
    t = time.perf_counter()
    good = _fit(good_data, root / "good")
    fit_s = time.perf_counter() - t
    bad = _fit(bad_data, root / "bad")
    other_spec = _fit(good_data, root / "other-spec", "features.hop_length=200")
    corrupt = corrupt_bundle_copy(good, root / "corrupt")
    archive = write_archive(root / "archive")
    print(f"tiny fit: {fit_s:.1f} s")
    return {"good": good, "bad": bad, "other_spec": other_spec, "corrupt": corrupt, "good_data": good_data,
            "archive": archive}


def test_gate_refuses_worse_corrupt_and_incompatible(bundles, tmp_path):
    from stream_asd.registry import Registry
    from trainer.publish import publish_bundle

    reg = Registry(tmp_path / "reg")
    common = dict(archive=bundles["archive"], eval_data=bundles["good_data"], eval_layout="dcase2020")
    first = publish_bundle(bundles["good"], reg, "fan", **common)
    assert first.status == "published", first.reasons
    good_version = first.version
    cand = first.gate["candidate"]
    assert cand["labelled"]["fan"]["auc"] > 0.9 and cand["archive"]["fan"]["auc"] > 0.6
    print("good model:", {k: {m: round(v["fan"][m], 3) for m in ("auc", "far")} for k, v in cand.items()})

    bad = publish_bundle(bundles["bad"], reg, "fan", **common)
    assert bad.status == "refused_gate" and bad.exit_code == 4
    assert any("labelled/fan" in r for r in bad.reasons)
    print("model trained on anomalous audio:", {k: {m: round(v["fan"][m], 3) for m in ("auc", "far")} for k, v in bad.gate["candidate"].items()},
          bad.reasons)
    corrupt = publish_bundle(bundles["corrupt"], reg, "fan", **common)
    assert corrupt.status == "refused_invalid" and "sha256" in corrupt.reasons[0]
    other = publish_bundle(bundles["other_spec"], reg, "fan", **common)
    assert other.status == "refused_invalid" and "feature spec" in other.reasons[0]
    assert reg.current("fan").version == good_version
    assert [v.version for v in reg.versions("fan")] == [good_version]  # refused bundles never enter the registry
    # archive data alone (held-out normals + pseudo-anomalies) may or may not catch it with a tiny
    # model: measured, not asserted (the labelled set above is what refuses it reliably)
    bad2 = publish_bundle(bundles["bad"], reg, "fan", archive=bundles["archive"])
    print("bad model, archive data only:", bad2.status, bad2.reasons)


def test_publish_cli_refusal_exit_codes(bundles, tmp_path, capsys):
    from trainer.cli import main as asd_train

    reg = str(tmp_path / "reg")
    assert asd_train(["publish", "--bundle", str(bundles["good"]), "--registry", reg, "--model-group", "fan",
                      "--no-gate"]) == 0
    assert asd_train(["publish", "--bundle", str(bundles["corrupt"]), "--registry", reg, "--model-group", "fan",
                      "--no-gate"]) == 3
    assert "REFUSED (refused_invalid)" in capsys.readouterr().err
    assert asd_train(["publish", "--bundle", str(bundles["bad"]), "--registry", reg, "--model-group", "fan",
                      "--eval-data", str(bundles["good_data"]), "--eval-layout", "dcase2020"]) == 4
    err = capsys.readouterr().err
    assert "REFUSED (refused_gate)" in err and "labelled/fan" in err


def test_watcher_keeps_the_old_model_scoring(bundles, tmp_path):
    from stream_asd.model.detector import load_detector
    from stream_asd.registry import Registry, RegistryWatcher

    reg = Registry(tmp_path / "reg")
    v_good = reg.put(bundles["good"], "fan")
    reg.set_current("fan", v_good)
    swaps = []
    w = RegistryWatcher(reg, "fan", swaps.append, loader=lambda p: load_detector(p, device="cpu"), poll_seconds=0.2)
    w.load_current()
    rng = np.random.default_rng(3)
    waves = np.stack([machine_sound(120.0, 1.0, rng) for _ in range(4)])
    before = [s.score for s in w.running_detector.score_windows(waves, ["fan"] * 4, ["fan-id_00"] * 4)]
    w.start()
    try:
        # bypass publish: put bad bundles straight into the registry, as a broken pipeline might
        v_corrupt = reg.put(bundles["corrupt"], "fan")
        reg.set_current("fan", v_corrupt)
        deadline = time.monotonic() + 30
        while v_corrupt not in w.failed and time.monotonic() < deadline:
            time.sleep(0.1)
        v_spec = reg.put(bundles["other_spec"], "fan")
        reg.set_current("fan", v_spec)
        while v_spec not in w.failed and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        w.stop()
    assert "sha256" in w.failed[v_corrupt] and "feature spec" in w.failed[v_spec]
    assert w.running_version == v_good and [s.version for s in swaps] == [v_good]
    after = [s.score for s in w.running_detector.score_windows(waves, ["fan"] * 4, ["fan-id_00"] * 4)]
    assert np.allclose(before, after)


def test_job_on_archive_publishes_and_rollback(bundles, tmp_path):
    from trainer.cli import main as asd_train

    reg = tmp_path / "reg"
    first = asd_train(["publish", "--bundle", str(bundles["good"]), "--registry", str(reg), "--model-group", "fan",
                       "--no-gate"])
    assert first == 0
    result = tmp_path / "job.json"
    code = asd_train(["job", "--archive", str(bundles["archive"]), "--registry", str(reg), "--model-group", "fan",
                      "--profile", "tiny", "--set", "run.threads=1", "--eval-data", str(bundles["good_data"]),
                      "--eval-layout", "dcase2020", "--result", str(result)])
    doc = json.loads(result.read_text())
    assert code == 0 and doc["status"] == "published", doc
    assert doc["data"]["devices"] == 2 and doc["data"]["segments"] == 16
    from stream_asd.registry import Registry

    r = Registry(reg)
    assert r.current("fan").version == doc["version"] != doc["previous"]
    print("job:", json.dumps({k: doc[k] for k in ("status", "timings_s", "data")}))
    assert asd_train(["rollback", "--registry", str(reg), "--model-group", "fan"]) == 0
    assert r.current("fan").version == doc["previous"]
    assert [e["action"] for e in r.history("fan")] == ["publish", "publish", "rollback"]
    # nothing selected: skipped, exit 0, says why
    code = asd_train(["job", "--archive", str(bundles["archive"]), "--registry", str(reg), "--model-group", "fan",
                      "--profile", "tiny", "--since", "2099-01-01", "--result", str(result)])
    assert code == 0 and json.loads(result.read_text())["status"] == "skipped"
