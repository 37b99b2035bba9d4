"""The training stages of the ensemble (method.md), one function per stage.

1. ``pretrain_simsiam``: GhostNetV2 encoder, SimSiam on two signal-augmented views (crop-splice
   + mixup on a share of the batches) plus the auxiliary ArcFace task on (machine type, id).
2. ``finetune_contrastive``: anchor / positive (signal-augmented) / negative (SF or SP
   pseudo-anomaly) with the eq. 6 loss, keeping the auxiliary ArcFace task.
3. ``train_timecnn``: Table 1 1-D CNN on raw waveforms with ArcFace.
4. ``train_fusion``: Table 2 SE fusion classifier over the frozen encoders' embeddings
   (embeddings are computed once and cached: the encoders are frozen, so this is exact).

Every stage runs on the profile's device, reports progress (a tqdm bar on a terminal, else a plain
log line every 30 s: trainer/progress.py; plus one log line per epoch), honours ``run.max_steps``
and draws every random number from generators seeded by the run seed.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from stream_asd.audio.augment import PseudoAnomaly, SignalAugment, crop_points, crop_splice_mixup
from stream_asd.audio.features import LogMelFrontend
from stream_asd.model.losses import arcface_loss, contrastive_eq6_loss, simsiam_loss
from stream_asd.model.networks import (
    TABLE1_BLOCKS, ArcFaceHead, EmbeddingHead, FusionNet, SimSiamHead, SpectrogramEncoder, TimeCNN, TimeCNNConfig,
)

from .profiles import TrainProfile

log = logging.getLogger("trainer.ensemble")


@dataclass
class StageReport:
    name: str
    epochs: int = 0
    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)   # mean loss per epoch
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "epochs": self.epochs, "steps": self.steps, "seconds": round(self.seconds, 2),
                "seconds_per_epoch": round(self.seconds / self.epochs, 3) if self.epochs else None,
                "losses": [round(x, 5) for x in self.losses], **self.extra}


class Batches:
    """Shuffled index batches, deterministic by generator; drops a last batch of 1 (BatchNorm)."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator):
        self.n, self.batch_size, self.gen = n, max(2, min(batch_size, n)), gen

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = torch.randperm(self.n, generator=self.gen)
        for start in range(0, self.n, self.batch_size):
            idx = order[start:start + self.batch_size]
            if idx.numel() >= 2:
                yield idx

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest >= 2 else 0)


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from .progress import progress_bar  # tqdm on a terminal, plain log lines otherwise

    return progress_bar(total=total, desc=desc, unit="step")


def run_epochs(name: str, epochs: int, batches: Batches, step: Callable[[torch.Tensor], float],
               max_steps: int, progress: bool, on_epoch_end: Callable[[], None] | None = None) -> StageReport:
    """Drive a stage: ``step(index_batch) -> loss`` for every batch of every epoch."""
    report = StageReport(name)
    total = epochs * len(batches)
    if max_steps:
        total = min(total, max_steps)
    bar = _bar(total, name, progress)
    t0 = time.perf_counter()
    try:
        for epoch in range(epochs):
            losses = []
            for idx in batches:
                losses.append(step(idx))
                report.steps += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}")
                if max_steps and report.steps >= max_steps:
                    break
            if on_epoch_end is not None:
                on_epoch_end()
            report.epochs += 1
            mean = float(sum(losses) / max(1, len(losses)))
            if not math.isfinite(mean):
                from stream_asd.errors import AsdError

                raise AsdError(f"{name}: loss became {mean} in epoch {epoch + 1}; lower the learning rate "
                               f"(--set ...lr=) or check the data")
            report.losses.append(mean)
            log.info("%s epoch %d/%d: loss %.4f (%d steps, %.1f s)", name, epoch + 1, epochs, mean,
                     report.steps, time.perf_counter() - t0)
            if max_steps and report.steps >= max_steps:
                break
    finally:
        if bar is not None:
            bar.close()
    report.seconds = time.perf_counter() - t0
    return report


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))


def stage_steps(epochs: int, batches: Batches, max_steps: int) -> int:
    """Optimiser steps a stage will take (the cosine schedules' length): epochs x batches,
    capped by ``run.max_steps`` when set."""
    steps = epochs * len(batches)
    return min(steps, max_steps) if max_steps else steps


def optimise(loss: torch.Tensor, optimizers: list[torch.optim.Optimizer],
             schedulers: list[torch.optim.lr_scheduler.LRScheduler] = ()) -> float:
    """One training step: clear gradients, backpropagate, step every optimiser, then every
    scheduler; returns the loss as a float for the epoch log."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in optimizers:
        opt.step()
    for sched in schedulers:
        sched.step()
    return float(loss.detach())


# --------------------------------------------------------------------------------------------
# Feature helpers
# --------------------------------------------------------------------------------------------

class Features:
    """Waves -> normalised 2-channel log-mel on the training device, with the raw dB form that
    the pseudo-anomaly generator needs (SF/SP act on dB, before normalisation)."""

    def __init__(self, frontend: LogMelFrontend, device: torch.device):
        self.frontend = frontend.to(device).eval()
        self.device = device

    @torch.no_grad()
    def logmel(self, waves: torch.Tensor) -> torch.Tensor:
        return self.frontend(waves.to(self.device))

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        fe = self.frontend
        return x * fe.norm_std[None, :, :, None] + fe.norm_mean[None, :, :, None]

    def normalise(self, x_db: torch.Tensor) -> torch.Tensor:
        fe = self.frontend
        return (x_db - fe.norm_mean[None, :, :, None]) / fe.norm_std[None, :, :, None]


def augment_waves(waves: torch.Tensor, aug: SignalAugment, gen: torch.Generator,
                  device: torch.device | None = None) -> torch.Tensor:
    """Signal augmentation on the training device, one waveform at a time; every random draw
    comes from the CPU generator ``gen`` (so CPU and GPU runs draw the same numbers)."""
    if device is not None:
        waves = waves.to(device)
    return torch.stack([aug(w, gen) for w in waves])


def signal_augment_from(profile: TrainProfile) -> SignalAugment:
    return SignalAugment(pitch_steps=tuple(profile.augment.pitch_steps), snr_db=tuple(profile.augment.snr_db),
                         p_time_shift=profile.augment.p_time_shift, p_pitch_shift=profile.augment.p_pitch_shift,
                         p_fade=profile.augment.p_fade, p_noise=profile.augment.p_noise)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

@dataclass
class SpectrogramModel:
    encoder: SpectrogramEncoder
    simsiam: SimSiamHead
    emb_head: EmbeddingHead
    arcface: ArcFaceHead

    def modules(self) -> list[nn.Module]:
        return [self.encoder, self.simsiam, self.emb_head, self.arcface]

    def train(self, mode: bool = True) -> None:
        for m in self.modules():
            m.train(mode)


def timecnn_config(profile: TrainProfile) -> TimeCNNConfig:
    w = profile.timecnn.width
    blocks = tuple((t, max(8, int(round(c * w))), s) for t, c, s in TABLE1_BLOCKS)
    return TimeCNNConfig(stem_channels=max(8, int(round(16 * w))), blocks=blocks)


# --------------------------------------------------------------------------------------------
# Stage 1: SimSiam pre-training + auxiliary ArcFace
# --------------------------------------------------------------------------------------------

def pretrain_simsiam(model: SpectrogramModel, feats: Features, waves: torch.Tensor, labels: torch.Tensor,
                     profile: TrainProfile, gen: torch.Generator, progress: bool = True) -> StageReport:
    cfg = profile.simsiam
    aug = signal_augment_from(profile)
    batches = Batches(len(waves), cfg.batch_size, gen)
    steps = stage_steps(cfg.epochs, batches, profile.run.max_steps)
    backbone = list(model.encoder.parameters()) + list(model.simsiam.parameters())
    head = list(model.emb_head.parameters()) + list(model.arcface.parameters())
    opt_b = torch.optim.SGD(backbone, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    opt_h = torch.optim.AdamW(head, lr=cfg.head_lr)
    sched_b, sched_h = cosine_schedule(opt_b, steps), cosine_schedule(opt_h, steps)
    n_classes = model.arcface.num_classes
    model.train()

    def step(idx: torch.Tensor) -> float:
        w = waves[idx]
        x1 = feats.logmel(augment_waves(w, aug, gen, feats.device))
        x2 = feats.logmel(augment_waves(w, aug, gen, feats.device))
        target = F.one_hot(labels[idx], n_classes).float().to(feats.device)
        if torch.rand((), generator=gen).item() < cfg.p_mixup:
            # crop-splice + mixup (sec. 2.3) with a shuffled partner; both views get the same mix
            # (one crop point and one partner for the batch: augment.crop_splice_mixup, tested)
            perm = torch.randperm(len(idx), generator=gen).to(feats.device)
            points = crop_points(x1.shape[-2], x1.shape[-1], gen)
            lam = cfg.mixup_lambda
            x1, mixed_target = crop_splice_mixup(x1, x1[perm], target, target[perm], lam=lam, points=points)
            x2, _ = crop_splice_mixup(x2, x2[perm], target, target[perm], lam=lam, points=points)
            target = mixed_target
        h1, h2 = model.encoder(x1), model.encoder(x2)
        z1, p1 = model.simsiam(h1)
        z2, p2 = model.simsiam(h2)
        loss_ss = simsiam_loss(p1, p2, z1, z2)
        c1 = model.arcface.cosine(model.emb_head(h1))
        c2 = model.arcface.cosine(model.emb_head(h2))
        loss_aux = 0.5 * (arcface_loss(c1, target, model.arcface.s, model.arcface.m)
                          + arcface_loss(c2, target, model.arcface.s, model.arcface.m))
        loss = loss_ss + cfg.aux_weight * loss_aux
        return optimise(loss, [opt_b, opt_h], [sched_b, sched_h])

    report = run_epochs("simsiam", cfg.epochs, batches, step, profile.run.max_steps, progress)
    model.train(False)
    return report


# --------------------------------------------------------------------------------------------
# Stage 2: fine-tuning with pseudo-anomalies (eq. 6)
# --------------------------------------------------------------------------------------------

def finetune_contrastive(model: SpectrogramModel, feats: Features, waves: torch.Tensor, labels: torch.Tensor,
                         profile: TrainProfile, gen: torch.Generator, progress: bool = True) -> StageReport:
    cfg = profile.finetune
    aug = signal_augment_from(profile)
    negatives = PseudoAnomaly()
    batches = Batches(len(waves), cfg.batch_size, gen)
    params = (list(model.encoder.parameters()) + list(model.emb_head.parameters())
              + list(model.arcface.parameters()))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    model.simsiam.eval()

    def step(idx: torch.Tensor) -> float:
        w = waves[idx]
        anchor = feats.logmel(w)
        positive = feats.logmel(augment_waves(w, aug, gen, feats.device))
        with torch.no_grad():
            negative = feats.normalise(negatives(feats.denormalise(anchor), gen))
        h = model.encoder(torch.cat([anchor, positive, negative]))
        a, p, n = h.chunk(3)
        loss_c = contrastive_eq6_loss(a, p, n, m=cfg.margin, s=cfg.scale, alpha=cfg.alpha, beta=cfg.beta)
        cos = model.arcface.cosine(model.emb_head(a))
        loss = loss_c + cfg.aux_weight * arcface_loss(cos, labels[idx].to(feats.device), model.arcface.s, model.arcface.m)
        return optimise(loss, [opt])

    report = run_epochs("finetune", cfg.epochs, batches, step, profile.run.max_steps, progress)
    model.train(False)
    return report


# --------------------------------------------------------------------------------------------
# Stage 3: time-domain CNN with ArcFace
# --------------------------------------------------------------------------------------------

def train_timecnn(tcnn: TimeCNN, arcface: ArcFaceHead, waves: torch.Tensor, labels: torch.Tensor,
                  profile: TrainProfile, device: torch.device, gen: torch.Generator,
                  progress: bool = True) -> StageReport:
    cfg = profile.timecnn
    batches = Batches(len(waves), cfg.batch_size, gen)
    steps = stage_steps(cfg.epochs, batches, profile.run.max_steps)
    opt = torch.optim.AdamW(list(tcnn.parameters()) + list(arcface.parameters()), lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    sched = cosine_schedule(opt, steps)
    tcnn.train()
    arcface.train()
    max_shift = int(profile.augment.max_shift_fraction * waves.shape[-1])

    def step(idx: torch.Tensor) -> float:
        w = waves[idx]
        # circular time shift: the only augmentation here (cheap, keeps the sound's content)
        shifts = torch.randint(-max_shift, max_shift + 1, (len(idx),), generator=gen)
        w = torch.stack([torch.roll(x, int(s)) for x, s in zip(w, shifts)]).to(device)
        emb = tcnn(w)
        loss = arcface_loss(arcface.cosine(emb), labels[idx].to(device), arcface.s, arcface.m)
        return optimise(loss, [opt], [sched])

    report = run_epochs("timecnn", cfg.epochs, batches, step, profile.run.max_steps, progress)
    tcnn.eval()
    arcface.eval()
    return report


# --------------------------------------------------------------------------------------------
# Stage 4: fusion classifier over the frozen encoders
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_all(fn: Callable[[torch.Tensor], torch.Tensor], waves: torch.Tensor, batch_size: int,
               device: torch.device) -> torch.Tensor:
    out = []
    for start in range(0, len(waves), batch_size):
        out.append(fn(waves[start:start + batch_size].to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def train_fusion(fusion: FusionNet, arcface: ArcFaceHead, freq_emb: torch.Tensor, time_emb: torch.Tensor,
                 labels: torch.Tensor, profile: TrainProfile, device: torch.device, gen: torch.Generator,
                 progress: bool = True) -> StageReport:
    cfg = profile.fusion
    batches = Batches(len(labels), cfg.batch_size, gen)
    steps = stage_steps(cfg.epochs, batches, profile.run.max_steps)
    opt = torch.optim.SGD(list(fusion.parameters()) + list(arcface.parameters()), lr=cfg.lr,
                          momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = cosine_schedule(opt, steps)
    fusion.train()
    arcface.train()

    def step(idx: torch.Tensor) -> float:
        emb = fusion(freq_emb[idx].to(device), time_emb[idx].to(device))
        loss = arcface_loss(arcface.cosine(emb), labels[idx].to(device), arcface.s, arcface.m)
        return optimise(loss, [opt], [sched])

    report = run_epochs("fusion", cfg.epochs, batches, step, profile.run.max_steps, progress)
    fusion.eval()
    arcface.eval()
    return report
