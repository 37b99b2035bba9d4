"""The neural part of the ensemble must learn and detect (issue 12 item 4).

One tiny training run (``asd-train fit --profile tiny`` with a few more epochs) on an easy
synthetic set: 2 machine types x 2 devices, 24 normal 2 s clips a device, test anomalies with
a strong fault (``rubbing`` at full severity). On it:

- the fusion embedding alone (the bundle's per-part score ``fusion``, the 0.9 of the paper's
  ensemble) separates anomalous from normal test windows: window AUC >= 0.8, per device, mean
  over devices; a fusion network that outputs a constant fails that same check;
- every training stage's loss falls (the training report's per-epoch losses);
- the encoder's embeddings of normal windows do not collapse: their spread per dimension stays
  above a floor; an encoder that outputs a constant fails that same check.

Settings beyond the tiny profile's: 3/2/6/6 epochs, and positive views without pitch shift or
added noise (``augment.p_pitch_shift=0``, ``augment.p_noise=0``: the views differ by time
shift and fade). Fusion window AUC measured on this set (2 CPU threads) for training seeds
0/1/2/3: 1.00 / 1.00 / 1.00 / 0.90 (seeds 1 and 2 with 3 TimeCNN epochs); the same run cut to
one optimiser step per stage: 0.59. With the cpu profile's milder transforms (pitch +-1
semitone, SNR 5..20 dB) and 3/2/3/6 epochs, seeds 0/1/2: 0.61 / 1.00 / 0.99; with the paper's
(the tiny profile's own), seeds 0/1: 0.81 / 0.57, and eq. 6's loss starts in the thousands:
SimSiam learns invariance to what the fault changes (issue 12 item 2). One bundle serves
every test here (module fixture); the fit takes ~40 s on 2 shared cores.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import trainer  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow

FUSION_MIN_AUC = 0.8
# mean per-dimension std of L2-normalised encoder outputs, times sqrt(dim): about 1 for
# isotropic embeddings, 0 for a collapsed encoder. Measured here: 0.13-0.29 after training;
# 0.001 for an encoder whose SimSiam and fine-tuning stages did not run.
SPREAD_FLOOR = 0.02
LIVE_DIMS_FLOOR = 0.1   # share of dimensions that vary at all (the rest are ReLU-dead)

OVERRIDES = [
    "simsiam.epochs=3", "finetune.epochs=2", "timecnn.epochs=6", "fusion.epochs=6",
    "augment.p_pitch_shift=0", "augment.p_noise=0",
]
TRAINED_STAGES = ("simsiam", "finetune", "timecnn", "fusion")


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    from stream_asd.audio.synth_dataset import write_dataset
    from trainer.cli import main
    from trainer.data import list_clips, load_wave, window_wave

    root = tmp_path_factory.mktemp("learns")
    data = write_dataset(root / "data", ["fan", "pump"], devices_per_type=2, n_train=24, n_test_normal=8,
                         n_test_anomaly=8, seconds=2.0, seed=11, faults=("rubbing",), severity=(1.0, 1.0))
    out, report_path = root / "bundle", root / "report.json"
    torch.set_num_threads(2)
    args = ["fit", "--data", str(data), "--out", str(out), "--profile", "tiny", "--seed", "0", "--no-progress",
            "--report", str(report_path)]
    for o in OVERRIDES:
        args += ["--set", o]
    assert main(args) == 0

    from stream_asd.model.detector import load_detector

    det = load_detector(out, device="cpu")
    # test windows exactly as evaluate / stream-asd score cut them (hop = one window)
    windows: dict[str, list[tuple[int, np.ndarray]]] = {}
    for clip in list_clips(data, split="test"):
        w = window_wave(load_wave(clip.path, det.feature_spec.sample_rate), det.window_samples).numpy()
        windows.setdefault(f"{clip.machine_type}-{clip.machine_id}", []).append((int(clip.label == "anomaly"), w))
    return {"data": data, "bundle": out, "report": json.loads(report_path.read_text()), "det": det,
            "windows": windows}


# --------------------------------------------------------------------------------------------
# checks (each one is also shown to fail on a broken model)
# --------------------------------------------------------------------------------------------

def fusion_window_aucs(det, windows) -> dict[str, float]:
    """Window AUC of the ``fusion`` part score alone, per device (its own or its type's GMM)."""
    from sklearn.metrics import roc_auc_score

    aucs = {}
    for device, clips in sorted(windows.items()):
        labels, scores = [], []
        for label, w in clips:
            mtype = device.split("-")[0]
            for r in det.score_windows(w, [mtype] * len(w), [device] * len(w)):
                labels.append(label)
                scores.append(r.scores["fusion"])
        aucs[device] = float(roc_auc_score(labels, scores))
    return aucs


def assert_fusion_detects(det, windows) -> float:
    aucs = fusion_window_aucs(det, windows)
    mean = float(np.mean(list(aucs.values())))
    assert mean >= FUSION_MIN_AUC, f"fusion window AUC {mean:.3f} < {FUSION_MIN_AUC} (per device {aucs})"
    return mean


def assert_loss_falls(stage: dict) -> None:
    losses = stage["losses"]
    assert len(losses) >= 2 and all(math.isfinite(x) for x in losses), stage
    assert losses[-1] < 0.99 * losses[0], f"{stage['name']}: loss did not fall over its epochs: {losses}"


def assert_not_collapsed(emb: torch.Tensor) -> tuple[float, float]:
    """``emb`` (N, D): per-dimension std of the L2-normalised rows, mean times sqrt(D), above
    SPREAD_FLOOR, and at least LIVE_DIMS_FLOOR of the dimensions varying."""
    h = torch.nn.functional.normalize(emb.double(), dim=1)
    sd = h.std(dim=0) * math.sqrt(h.shape[1])
    spread, live = float(sd.mean()), float((sd > 0.01).double().mean())
    assert spread >= SPREAD_FLOOR, f"encoder embeddings collapsed: spread {spread:.4f} < {SPREAD_FLOOR}"
    assert live >= LIVE_DIMS_FLOOR, f"encoder embeddings collapsed: only {live:.1%} of dimensions vary"
    return spread, live


def _normal_windows(learned) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([w for clips in learned["windows"].values() for label, w in clips
                                            if label == 0]))


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------

def test_fusion_embedding_alone_detects_strong_faults(learned):
    auc = assert_fusion_detects(learned["det"], learned["windows"])
    assert auc <= 1.0


def test_a_fusion_network_that_outputs_a_constant_fails_the_check(learned):
    from torch import nn

    from stream_asd.model.detector import load_detector

    broken = load_detector(learned["bundle"], device="cpu")
    last_bn = [m for m in broken.model.fusion.layers if isinstance(m, nn.BatchNorm2d)][-1]
    with torch.no_grad():
        last_bn.weight.zero_()   # eval-mode BN: output = its bias, whatever the input
        emb = broken.model.embed(_normal_windows(learned)[:8]).fusion
    assert float(emb.std(dim=0).max()) == 0.0
    with pytest.raises(AssertionError, match="fusion window AUC"):
        assert_fusion_detects(broken, learned["windows"])


def test_every_training_stage_loss_falls(learned):
    stages = {s["name"]: s for s in learned["report"]["stages"]}
    for name in TRAINED_STAGES:
        assert_loss_falls(stages[name])
    with pytest.raises(AssertionError, match="did not fall"):
        assert_loss_falls({"name": "flat", "losses": [2.0, 2.0, 1.999]})


def test_encoder_embeddings_of_normal_windows_do_not_collapse(learned):
    det = learned["det"]
    with torch.no_grad():
        emb = det.model.embed(_normal_windows(learned)).freq
    assert emb.shape[1] == det.model.encoder.out_features
    assert_not_collapsed(emb)
    # the same check on an encoder whose output layer is zeroed (a constant embedding) fails
    from stream_asd.model.detector import load_detector

    broken = load_detector(learned["bundle"], device="cpu")
    with torch.no_grad():
        for p in broken.model.encoder.backbone.conv_head.parameters():
            p.zero_()
        flat = broken.model.embed(_normal_windows(learned)[:16]).freq
    with pytest.raises(AssertionError, match="collapsed"):
        assert_not_collapsed(flat)
