"""The AE baseline (``asd-train fit --model ae``): DCASE2020 Task 2 style dense autoencoder on
log-mel frame vectors, one per machine type, same bundle format (kind "ae").

Score of a window = mean squared reconstruction error over its frame vectors, standardised by
the training normals' errors; thresholds per type (and per device) on held-out normals, like
the ensemble.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from stream_asd.audio.features import FeatureSpec
from stream_asd.model.bundle import ModelBundle
from stream_asd.model.ensemble import AeModel
from stream_asd.model.networks import AutoencoderConfig
from stream_asd.model.scoring import AeGroup

from .ensemble import Batches, optimise, run_epochs
from .profiles import TrainProfile, threshold_calibration
from .train_ensemble import device_ids

log = logging.getLogger("trainer.fit")


def train_ae(td, profile: TrainProfile, device: torch.device, gen: torch.Generator, seed: int,
             progress: bool) -> tuple[ModelBundle, dict[str, Any]]:
    ws = td.train
    a, f = profile.ae, profile.features
    spec = FeatureSpec(sample_rate=f.sample_rate, window_seconds=f.window_seconds, n_fft=a.n_fft,
                       hop_length=a.hop_length, n_mels=a.n_mels)
    types = np.array(ws.machine_types)
    names = sorted(set(types.tolist()))
    cfg = AutoencoderConfig(arch="dense", n_mels=a.n_mels, context=a.n_frames, hidden=(a.hidden,) * 4,
                            bottleneck=a.bottleneck)
    model = AeModel(spec, cfg, names).to(device).eval()
    stages = []
    t = time.perf_counter()
    with torch.no_grad():
        vectors = torch.cat([model.frame_vectors(ws.waves[i:i + 64].to(device)).cpu() for i in range(0, len(ws), 64)])
    stages.append({"name": "features", "seconds": round(time.perf_counter() - t, 2)})
    fit_np = td.fit_mask.numpy()
    for gi, name in enumerate(names):
        ae = model.autoencoder(name)
        sel = torch.from_numpy(np.nonzero((types == name) & fit_np)[0])
        x = vectors[sel].reshape(-1, vectors.shape[-1])
        opt = torch.optim.Adam(ae.parameters(), lr=a.lr)
        ae.train()

        def step(idx: torch.Tensor, x=x, ae=ae, opt=opt) -> float:
            batch = x[idx].to(device)
            return optimise((ae(batch) - batch).square().mean(), [opt])

        rep = run_epochs(f"ae[{name}]", a.epochs, Batches(len(x), a.batch_size, gen), step,
                         profile.run.max_steps, progress)
        ae.eval()
        stages.append(rep.to_dict())

    # standardisation on the fit windows, thresholds on held-out windows (as the ensemble)
    t = time.perf_counter()
    with torch.no_grad():
        idx_all = np.array([model.group_index(n) for n in types])
        errors = torch.cat([model.reconstruction_errors(ws.waves[i:i + 64].to(device), idx_all[i:i + 64]).cpu()
                            for i in range(0, len(ws), 64)]).double().numpy()
    devs = np.array(device_ids(ws))
    sc = profile.scoring
    target = threshold_calibration(profile)
    groups = {}
    for name in names:
        g = AeGroup(name, model.group_index(name))
        sel_fit = (types == name) & fit_np
        sel_cal = (types == name) & ~fit_np
        g.fit_standardisation(errors[sel_fit])
        use = sel_cal if sel_cal.sum() >= 10 else sel_fit
        g.calibrate(errors[use], devs[use].tolist(), target["quantile"],
                    max(1, int(sc.min_device_windows * use.sum() / max(1, (types == name).sum()))), sc.threshold_tail)
        g.thresholds.calibration.update(target)
        g.info.update({"n_fit_windows": int(sel_fit.sum()), "n_calibration_windows": int(sel_cal.sum()),
                       "thresholds_from": "held-out normals" if use is sel_cal else "training normals"})
        groups[name] = g
    stages.append({"name": "scoring", "seconds": round(time.perf_counter() - t, 2)})
    report = {"model": "ae", "profile": profile.to_dict(), "seed": seed, "stages": stages, "n_windows": len(ws),
              "classes": [list(c) for c in ws.classes]}
    return model.to("cpu").to_bundle(groups), report
