"""Train the ensemble end to end and write its bundle (called by ``trainer.fit``)."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stream_asd.audio.features import FeatureSpec
from stream_asd.errors import ConfigError
from stream_asd.model.bundle import ModelBundle
from stream_asd.model.ensemble import EnsembleConfig, EnsembleModel, level_normalised
from stream_asd.model.networks import (ArcFaceHead, EmbeddingHead, EncoderConfig, FusionConfig, SimSiamConfig,
                                       SimSiamHead)

from . import ensemble as E
from .data import load_windows
from .profiles import TrainProfile, check_scorers, threshold_calibration

log = logging.getLogger("trainer.fit")


def feature_spec(profile: TrainProfile) -> FeatureSpec:
    f = profile.features
    return FeatureSpec(sample_rate=f.sample_rate, window_seconds=f.window_seconds, n_fft=f.n_fft,
                       hop_length=f.hop_length, n_mels=f.n_mels)


def device_ids(ws, index: torch.Tensor | None = None) -> list[str]:
    """Device id of each window: ``<machine_type>-<machine_id>`` (Clip.device_id, producer convention)."""
    labels = ws.labels if index is None else ws.labels[index]
    return [f"{ws.classes[i][0]}-{ws.classes[i][1]}" for i in labels.tolist()]


def build_model(profile: TrainProfile, spec: FeatureSpec) -> EnsembleModel:
    e = profile.encoder
    config = EnsembleConfig(encoder=EncoderConfig(width=e.width), time_cnn=E.timecnn_config(profile),
                            fusion=FusionConfig(map_side=profile.fusion.map_side),
                            normalise_level=profile.features.normalise_level)
    return EnsembleModel(spec, config)


def train_ensemble(td, profile: TrainProfile, device: torch.device, gen: torch.Generator, seed: int,
                   progress: bool) -> tuple[ModelBundle, dict[str, Any]]:
    # Every network stage and the normaliser learn from the fit clips only: the held-out
    # calibration clips must stay unseen until the thresholds are set on them, or thresholds
    # come out too low and unseen normals alarm more often than the quantile promises.
    check_scorers(profile)  # a bad scoring setting fails before the networks train, not after
    ws = td.train.subset(td.fit_mask)
    n_classes = len(ws.classes)
    spec = feature_spec(profile)
    model = build_model(profile, spec).to(device)
    if model.config.normalise_level:  # the networks learn on what EnsembleModel.embed will feed them
        ws = dataclasses.replace(ws, waves=level_normalised(ws.waves))
    stages: list[dict] = []
    t = time.perf_counter()
    bs = max(16, profile.fusion.batch_size)
    model.frontend.fit_normalisation(ws.waves[i:i + bs].to(device) for i in range(0, len(ws), bs))
    feats = E.Features(model.frontend, device)
    stages.append({"name": "normalisation", "seconds": round(time.perf_counter() - t, 2)})

    # (1) + (2): spectrogram model; the SimSiam and auxiliary heads are training-only
    e = profile.encoder
    enc = model.encoder
    simsiam = SimSiamHead(SimSiamConfig(in_features=enc.out_features, proj_dim=e.proj_dim, pred_hidden=e.pred_hidden))
    emb_head = EmbeddingHead(enc.out_features, e.embedding_dim, hidden=max(e.embedding_dim, 256))
    arcface = ArcFaceHead(e.embedding_dim, n_classes, s=e.arcface_s, m=e.arcface_m)
    spec_model = E.SpectrogramModel(enc, simsiam.to(device), emb_head.to(device), arcface.to(device))
    stages.append(E.pretrain_simsiam(spec_model, feats, ws.waves, ws.labels, profile, gen, progress).to_dict())
    stages.append(E.finetune_contrastive(spec_model, feats, ws.waves, ws.labels, profile, gen, progress).to_dict())

    # (3): time-domain CNN
    tcnn = model.time_cnn
    t_arc = ArcFaceHead(tcnn.out_features, n_classes, s=e.arcface_s, m=e.arcface_m).to(device)
    stages.append(E.train_timecnn(tcnn, t_arc, ws.waves, ws.labels, profile, device, gen, progress).to_dict())

    # (4): fusion over the frozen encoders (their embeddings are cached once)
    t = time.perf_counter()
    model.eval()
    freq_emb = E.encode_all(lambda w: enc(feats.logmel(w)), ws.waves, bs, device)
    time_emb = E.encode_all(tcnn, ws.waves, bs, device)
    encode_s = time.perf_counter() - t
    f_arc = ArcFaceHead(model.fusion.out_features, n_classes, s=e.arcface_s, m=e.arcface_m).to(device)
    rep = E.train_fusion(model.fusion, f_arc, freq_emb, time_emb, ws.labels, profile, device, gen, progress)
    rep.extra["encode_seconds"] = round(encode_s, 2)
    stages.append(rep.to_dict())

    # (5) + (6): statistics, GMMs, standardisation, thresholds per machine type. Embeddings
    # come from EnsembleModel.embed, exactly what the runtime detector computes.
    t = time.perf_counter()
    model.eval()
    sw, fit_mask, calib_mask = scoring_windows(td, profile)
    with torch.no_grad():
        fus, bms = [], []
        for i in range(0, len(sw), bs):
            out = model.embed(sw.waves[i:i + bs].to(device))
            fus.append(out.fusion.double().cpu())
            bms.append(out.band_means.double().cpu())
    fusion_emb, band_means = torch.cat(fus).numpy(), torch.cat(bms).numpy()
    groups = fit_groups(sw, fit_mask, calib_mask, fusion_emb, band_means, profile)
    stages.append({"name": "scoring", "seconds": round(time.perf_counter() - t, 2),
                   "groups": {k: g.info for k, g in groups.items()}})

    report = {"model": "ensemble", "profile": profile.to_dict(), "seed": seed, "classes": [list(c) for c in ws.classes],
              "stages": stages, "n_windows": len(ws), "n_calibration_windows": int(td.calib_mask.sum())}
    bundle = model.to("cpu").to_bundle(groups)
    return bundle, report


def scoring_windows(td, profile: TrainProfile):
    """The windows the GMMs, standardisation and thresholds are fitted on: the training clips cut
    again with ``scoring.fit_hop_fraction`` (overlapping windows, like the processor's hop) when
    that is finer than the training hop. A full-covariance GMM over a 128-d embedding needs many
    more windows than dimensions; the networks do not need the overlap (it would only repeat
    their epochs). Returns (windows, fit mask, calibration mask); a clip stays on its side."""
    ws = td.train
    f = profile.features
    if not 0 < profile.scoring.fit_hop_fraction <= 1:
        raise ConfigError(f"scoring.fit_hop_fraction={profile.scoring.fit_hop_fraction}: use a value in (0, 1], "
                          "e.g. --set scoring.fit_hop_fraction=0.25")
    window = ws.waves.shape[-1]
    hop = max(1, int(round(window * profile.scoring.fit_hop_fraction)))
    if hop >= max(1, int(round(window * f.train_hop_fraction))):
        return ws, td.fit_mask, td.calib_mask
    calib_clips = set(ws.clip_index[td.calib_mask].tolist())
    sw = load_windows(ws.clips, f.sample_rate, window, hop, classes=ws.classes)
    calib = torch.tensor([i in calib_clips for i in sw.clip_index.tolist()], dtype=torch.bool)
    log.info("scoring windows: %d (hop %.2f s) from %d clips", len(sw), hop / f.sample_rate, len(ws.clips))
    return sw, ~calib, calib


#: below this many normal windows behind a group's threshold, ``fit`` warns that the threshold
#: (a high quantile) is a guess
MIN_THRESHOLD_WINDOWS = 50


def fit_groups(ws, fit_mask: torch.Tensor, calib_mask: torch.Tensor, fusion_emb: np.ndarray,
               band_means: np.ndarray, profile: TrainProfile) -> dict:
    """One EnsembleGroup per machine type (plus a GMM pair per device with enough windows):
    GMMs on the fit windows; NLL standardisation and thresholds on the held-out windows when a
    type has at least 10 of them (else on the fit windows)."""
    from stream_asd.model.scoring import EnsembleGroup

    sc = profile.scoring
    target = threshold_calibration(profile)
    types = np.array(ws.machine_types)
    devs = np.array(device_ids(ws))
    fit_np, cal_np = fit_mask.numpy(), calib_mask.numpy()
    groups = {}
    for mtype in sorted(set(types.tolist())):
        sel_fit = (types == mtype) & fit_np
        sel_cal = (types == mtype) & cal_np
        held_out = sel_cal.sum() >= 10
        # a device "has enough windows" for its own threshold by its total count; the held-out
        # part is a fixed share of it, so scale the minimum to that share
        share = sel_cal.sum() / max(1, (types == mtype).sum()) if held_out else sel_fit.sum() / max(1, (types == mtype).sum())
        min_dev = max(10, int(round(sc.min_device_windows * share)))
        g = EnsembleGroup.fit(
            mtype, fusion_emb[sel_fit], band_means[sel_fit], None, devs[sel_fit].tolist(),
            weights=(sc.weight_fusion, sc.weight_stats), quantile=target["quantile"],
            min_device_windows=min_dev, reg_covar=sc.gmm_reg_covar, max_iter=sc.gmm_max_iter,
            calib_fusion=fusion_emb[sel_cal] if held_out else None,
            calib_band_means=band_means[sel_cal] if held_out else None,
            calib_device_ids=devs[sel_cal].tolist() if held_out else None,
            stats_log=sc.stats_log, per_device_min_windows=sc.device_gmm_min_windows or None,
            tail=sc.threshold_tail, fusion_scorer=sc.fusion_scorer, stats_scorer=sc.stats_scorer,
            knn_k=sc.knn_k, knn_bank=sc.knn_bank)
        if not held_out:
            log.warning("group %s: only %d held-out windows; thresholds from training normals come out too low "
                        "(more clips per device fix this)", mtype, sel_cal.sum())
        n_thr = int(g.thresholds.calibration.get("n_windows", 0))
        if n_thr < MIN_THRESHOLD_WINDOWS:
            n_clips = len(set(ws.clip_index[torch.from_numpy(types == mtype)].tolist()))
            log.warning("group %s: its threshold comes from only %d normal windows (%d clips); it says little "
                        "about the false-alert rate it promises: train on at least %d windows per machine type "
                        "(more or longer normal clips)", mtype, n_thr, n_clips, MIN_THRESHOLD_WINDOWS)
        g.thresholds.calibration.update(target)
        g.info.update({"thresholds_from": "held-out normals" if held_out else "training normals",
                       "n_fit_windows": int(sel_fit.sum()), "n_calibration_windows": int(sel_cal.sum()),
                       "devices": sorted(set(devs[types == mtype].tolist()))})
        groups[mtype] = g
        log.info("group %s: %d fit windows, %d calibration windows, %d device GMM pairs, threshold %.3f, "
                 "%d device thresholds", mtype, sel_fit.sum(), sel_cal.sum(), len(g.device_scorers),
                 g.thresholds.group, len(g.thresholds.per_device))
    return groups
