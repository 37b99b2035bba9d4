"""``normalise_level`` (DEVIATION 13): a microphone's gain is not taken for a fault."""

from __future__ import annotations

import numpy as np
import torch

from stream_asd.model.detector import load_detector
from stream_asd.model.ensemble import EnsembleConfig, EnsembleModel, level_normalised
from stream_asd.model.scoring import EnsembleGroup

from _model_tiny import TINY_SPEC, tiny_waves


def _bundle(tmp_path, normalise_level: bool):
    torch.manual_seed(0)
    cfg = EnsembleConfig.tiny()
    model = EnsembleModel(TINY_SPEC, EnsembleConfig(cfg.encoder, cfg.time_cnn, cfg.fusion, normalise_level)).eval()
    w = tiny_waves(40, seed=0)
    with torch.no_grad():
        e = model.embed(torch.from_numpy(w))
    g = EnsembleGroup.fit("fan", e.fusion, e.band_means, stats_log=True, reg_covar=1e-2)
    path = tmp_path / f"b{int(normalise_level)}"
    model.to_bundle({"fan": g}, version="lvl").save(path)
    return load_detector(path, "cpu")


def test_scores_do_not_change_with_the_microphone_gain(tmp_path):
    test = tiny_waves(4, seed=7)
    det = _bundle(tmp_path, True)
    assert det.model.config.normalise_level
    quiet = [s.score for s in det.score_windows(test * 0.25, ["fan"] * 4, ["d"] * 4)]
    loud = [s.score for s in det.score_windows(test * 2.0, ["fan"] * 4, ["d"] * 4)]
    assert np.allclose(quiet, loud, rtol=1e-3, atol=1e-3)
    # without the option the same gain change moves the scores (the property is the option's)
    plain = _bundle(tmp_path, False)
    q = [s.score for s in plain.score_windows(test * 0.25, ["fan"] * 4, ["d"] * 4)]
    lo = [s.score for s in plain.score_windows(test * 2.0, ["fan"] * 4, ["d"] * 4)]
    assert not np.allclose(q, lo, rtol=1e-2, atol=1e-2)


def test_level_normalised_scales_each_window_and_leaves_silence_quiet():
    w = torch.from_numpy(tiny_waves(3, seed=1)) * torch.tensor([[0.1], [1.0], [3.0]])
    out = level_normalised(w)
    rms = out.square().mean(dim=1).sqrt()
    assert torch.allclose(rms, torch.full((3,), 0.05), rtol=1e-4)
    assert torch.allclose(out[0] / out[0].abs().max(), w[0] / w[0].abs().max(), atol=1e-6)  # shape unchanged
    silent = torch.full((1, 1000), 1e-7)
    assert level_normalised(silent).abs().max() < 1e-4


def test_configs_written_before_the_option_load_without_it():
    d = EnsembleConfig.tiny().to_dict()
    del d["normalise_level"]
    assert EnsembleConfig.from_dict(d).normalise_level is False
