"""Loss values on hand-made inputs; stop-gradient in SimSiam; eq. 6 hinge bound."""

import math

import torch
import torch.nn.functional as F

from stream_asd.model.losses import (arcface_logits, arcface_loss, contrastive_eq6_loss,
                                     simsiam_loss)


def test_simsiam_values_on_hand_made_vectors():
    e1 = torch.tensor([[1.0, 0.0]])
    e2 = torch.tensor([[0.0, 1.0]])
    assert math.isclose(float(simsiam_loss(e1, e1, e1, e1)), -1.0, abs_tol=1e-6)
    assert math.isclose(float(simsiam_loss(e1, e1, e2, e2)), 0.0, abs_tol=1e-6)
    assert math.isclose(float(simsiam_loss(e1, e1, -e1, -e1)), 1.0, abs_tol=1e-6)
    # 0.5*D(p1,z2) + 0.5*D(p2,z1): p1 aligned with z2, p2 orthogonal to z1 -> -0.5
    assert math.isclose(float(simsiam_loss(e1, e1, e2, e1)), -0.5, abs_tol=1e-6)


def test_simsiam_gradient_does_not_flow_through_stop_gradient_branch():
    torch.manual_seed(0)
    z1 = torch.randn(4, 8, requires_grad=True)
    z2 = torch.randn(4, 8, requires_grad=True)
    p1 = torch.randn(4, 8, requires_grad=True)
    p2 = torch.randn(4, 8, requires_grad=True)
    simsiam_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0
    # through a shared encoder, z gets gradient only via the predictor path
    w = torch.randn(8, 8, requires_grad=True)
    x1, x2 = torch.randn(4, 8), torch.randn(4, 8)
    z1, z2 = x1 @ w, x2 @ w
    pred = torch.nn.Linear(8, 8)
    loss = simsiam_loss(pred(z1), pred(z2), z1, z2)
    loss.backward()
    g_full = w.grad.clone()
    w.grad = None
    z1d, z2d = (x1 @ w), (x2 @ w)
    ref = 0.5 * -F.cosine_similarity(pred(z1d), z2d.detach()).mean() + 0.5 * -F.cosine_similarity(pred(z2d), z1d.detach()).mean()
    ref.backward()
    assert torch.allclose(g_full, w.grad)


def test_arcface_margin_on_target_only():
    cos = torch.tensor([[0.5, 0.2, -0.1]])
    s, m = 30.0, 0.5
    logits = arcface_logits(cos, torch.tensor([0]), s=s, m=m)
    expected_target = s * math.cos(math.acos(0.5) + m)
    assert math.isclose(float(logits[0, 0]), expected_target, rel_tol=1e-5)
    assert torch.allclose(logits[0, 1:], s * cos[0, 1:])
    assert torch.allclose(arcface_logits(cos, None, s=s, m=m), s * cos)
    # fallback beyond pi - m stays monotonic: a smaller cosine never gets a larger logit
    c = torch.linspace(-1, 1, 201).unsqueeze(1).repeat(1, 2)
    lg = arcface_logits(c, torch.zeros(201, dtype=torch.long), s=s, m=m)[:, 0]
    assert torch.all(lg[1:] >= lg[:-1] - 1e-5)
    # cross-entropy value by hand
    loss = arcface_loss(cos, torch.tensor([0]), s=s, m=m)
    lse = math.log(math.exp(expected_target) + math.exp(s * 0.2) + math.exp(s * -0.1))
    assert math.isclose(float(loss), lse - expected_target, rel_tol=1e-5)
    # soft one-hot targets equal hard labels
    soft = arcface_loss(cos, torch.tensor([[1.0, 0.0, 0.0]]), s=s, m=m)
    assert math.isclose(float(soft), float(loss), rel_tol=1e-5)


def test_eq6_loss_hand_values():
    a = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[1.0, 0.0]])
    n = torch.tensor([[-1.0, 0.0]])
    m, s, alpha, beta = 0.05, 1.0, 0.01, 0.005
    # perfect: cos(a,p)=1, cos(a,n)=-1 -> L_cos=-2; dist 0 vs 4 -> hinge 0
    got = float(contrastive_eq6_loss(a, p, n, m, s, alpha, beta))
    assert math.isclose(got, alpha * math.exp(-2 * s + beta), rel_tol=1e-6)
    # swapped: L_cos=+2, L_dis = 4 - 0 + m
    got = float(contrastive_eq6_loss(a, n, p, m, s, alpha, beta))
    assert math.isclose(got, (4 + m + alpha) * math.exp(2 * s + beta), rel_tol=1e-6)
    # all equal: L_cos=0, L_dis=m
    got = float(contrastive_eq6_loss(a, a, a, m, s, alpha, beta))
    assert math.isclose(got, (m + alpha) * math.exp(beta), rel_tol=1e-6)


def test_eq6_loss_is_bounded_below_by_its_hinge():
    torch.manual_seed(1)
    floor = 0.01 * math.exp(0.005 - 2.0)
    a = torch.randn(64, 16)
    p = torch.randn(64, 16)
    n = torch.randn(64, 16)
    for scale in (1.0, 10.0, 1e3, 1e6):  # pushing negatives far away cannot go below the floor
        per = contrastive_eq6_loss(a, p, n * scale, reduction="none")
        assert torch.all(per >= floor * (1 - 1e-6))
    far = contrastive_eq6_loss(a, a, -a * 1e6)
    assert math.isclose(float(far), floor, rel_tol=1e-4)
