"""The calibration clips are held out from every stage that learns: no network, no log-mel
normaliser and no GMM sees a window of them; only standardisation and thresholds do. Before
this split every network trained on all windows, so thresholds were set on clips the model had
learnt, came out too low, and unseen normals exceeded them far more often than the quantile."""

from __future__ import annotations

import numpy as np
import pytest

import trainer  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
from trainer.profiles import get_profile

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from stream_asd.audio.synth_dataset import write_dataset

    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, ["fan"], devices_per_type=2, n_train=14, n_test_normal=1, n_test_anomaly=1,
                  seconds=2.0, seed=5, faults=("rubbing",), severity=(1.0, 1.0))
    return root


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.reshape(-1, x.shape[-1])}


def test_no_learning_stage_sees_a_calibration_window(data, tmp_path, monkeypatch):
    import trainer.ensemble as E
    from stream_asd.audio.features import LogMelFrontend
    from trainer.fit import fit, load_training_data

    profile = get_profile("tiny", ["run.max_steps=2", "scoring.gmm_max_iter=20"])
    td = load_training_data(data, "auto", profile, seed=7, machine_types=None, progress=False)
    calib = _rows(td.train.waves[td.calib_mask])
    fit_rows = _rows(td.train.waves[td.fit_mask])
    assert calib and not (calib & fit_rows)

    seen: dict[str, set[bytes]] = {}

    def spy(name, fn, pos):
        def wrapper(*args, **kwargs):
            seen.setdefault(name, set()).update(_rows(args[pos]))
            return fn(*args, **kwargs)
        return wrapper

    for name, pos in [("pretrain_simsiam", 2), ("finetune_contrastive", 2), ("train_timecnn", 2), ("encode_all", 1)]:
        monkeypatch.setattr(E, name, spy(name, getattr(E, name), pos))
    orig_norm = LogMelFrontend.fit_normalisation

    def norm_spy(self, batches):
        batches = list(batches)
        seen.setdefault("normalisation", set()).update(_rows(torch.cat(batches)))
        return orig_norm(self, iter(batches))

    monkeypatch.setattr(LogMelFrontend, "fit_normalisation", norm_spy)
    report = fit(data, tmp_path / "b", profile=profile, seed=7, progress=False)

    assert set(seen) == {"pretrain_simsiam", "finetune_contrastive", "train_timecnn", "encode_all", "normalisation"}
    for name, rows in seen.items():
        assert rows, name
        assert not (rows & calib), f"{name} saw {len(rows & calib)} calibration windows"
        assert rows <= fit_rows, name
    assert report["n_calibration_windows"] == int(td.calib_mask.sum())
    group = next(s for s in report["stages"] if s["name"] == "scoring")["groups"]["fan"]
    assert group["thresholds_from"] == "held-out normals"
