"""Losses of the ensemble (method.md): SimSiam, ArcFace, and the fine-tuning loss of eq. 6.

Pure functions on tensors; they run on CPU or CUDA. The pseudo-anomaly generators (SF/SP) live
with the other augmentations in ``stream_asd/audio/augment.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["negative_cosine", "simsiam_loss", "arcface_logits", "arcface_loss", "contrastive_eq6_loss"]


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -mean cos(p, z) over the batch, with z detached (SimSiam's stop-gradient)."""
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """L = 0.5*D(p1, stopgrad(z2)) + 0.5*D(p2, stopgrad(z1)). Range [-1, 1]; -1 when aligned.

    No gradient reaches z1/z2 through this loss (they only get it via p1/p2, which are computed
    from them by the predictor)."""
    return 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)


def arcface_logits(cosine: torch.Tensor, labels: torch.Tensor | None = None,
                   s: float = 30.0, m: float = 0.5) -> torch.Tensor:
    """ArcFace logits from cosines (B, C).

    labels: None (no margin: inference), int class indices (B,), or soft targets (B, C) from
    mixup (DEVIATION 6, docs/model.md), in which case each class's margin is applied in proportion to its target weight
    (logit_j = s * (cos_j + t_j * (phi_j - cos_j))), which reduces to hard ArcFace for one-hot t.
    phi = cos(theta + m), with the fallback cos(theta) - m*sin(m) past theta > pi - m so that the
    target logit keeps decreasing in theta.
    """
    if labels is None:
        return s * cosine
    cos = cosine.clamp(-1.0, 1.0)
    sin = (1.0 - cos.square()).clamp_min(0.0).sqrt()
    phi = cos * math.cos(m) - sin * math.sin(m)  # cos(theta + m)
    phi = torch.where(cos > math.cos(math.pi - m), phi, cos - math.sin(math.pi - m) * m)
    if labels.dim() == 1:
        target = F.one_hot(labels.long(), cosine.shape[1]).to(cosine.dtype)
    else:
        target = labels.to(cosine.dtype)
    return s * (cos + target * (phi - cos))


def arcface_loss(cosine: torch.Tensor, labels: torch.Tensor, s: float = 30.0, m: float = 0.5) -> torch.Tensor:
    """Cross-entropy on ArcFace logits; labels are class indices (B,) or soft targets (B, C)."""
    logits = arcface_logits(cosine, labels, s=s, m=m)
    if labels.dim() == 1:
        return F.cross_entropy(logits, labels.long())
    return torch.sum(-labels.to(logits.dtype) * F.log_softmax(logits, dim=1), dim=1).mean()


def contrastive_eq6_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                         m: float = 0.05, s: float = 1.0, alpha: float = 0.01, beta: float = 0.005,
                         reduction: str = "mean") -> torch.Tensor:
    """Fine-tuning loss with pseudo-anomalies (paper eq. 6, as method.md settles it):

        L_cos = -cos(a, p) + cos(a, n)
        L_dis = max(0, ||a - p||^2 - ||a - n||^2 + m)
        L     = mean((L_dis + alpha) * exp(s * L_cos + beta))

    DEVIATION 1 (docs/model.md): the paper prints L_dis without the hinge and writes D for the
    cosine terms while D is the *negative* cosine in its SimSiam section; as printed the loss is
    unbounded below (push ||a-n|| to infinity). With the hinge, L >= alpha*exp(beta - 2s) > 0.
    Distances are on the raw (unnormalised) embeddings, as printed.
    """
    l_cos = -F.cosine_similarity(anchor, positive, dim=-1) + F.cosine_similarity(anchor, negative, dim=-1)
    d_pos = (anchor - positive).square().sum(dim=-1)
    d_neg = (anchor - negative).square().sum(dim=-1)
    l_dis = F.relu(d_pos - d_neg + m)
    per_sample = (l_dis + alpha) * torch.exp(s * l_cos + beta)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
