"""The one Adam helper: each method keeps its own eps placement, bit for bit.

FAMO follows ``torch.optim.Adam`` (its official code steps the logits with it); GradNorm, UW
and IMTL-L follow the Adam paper's Algorithm 1 written literally. Each test ports the method's
update in a few lines and compares the method's state with ``torch.equal`` (no tolerance), so a
method switched to the other placement, or a dropped bias correction, fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from gradbalance.methods import FAMO, IMTL, UW, GradNorm, TaskInputs
from gradbalance.methods.adam import adam_update

D = torch.float64
B1, B2, EPS = 0.9, 0.999, 1e-8


def _kingma(p, g, m, v, t, lr):
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    m_hat, v_hat = m / (1 - B1**t), v / (1 - B2**t)
    return p - lr * m_hat / (v_hat.sqrt() + EPS), m, v


def _torch_order(p, g, m, v, t, lr, wd):
    g = g + wd * p
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    denom = v.sqrt() / math.sqrt(1 - B2**t) + EPS
    return p - (lr / (1 - B1**t)) * m / denom, m, v


def _sequence(n=8, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        grads = torch.randn(k, 4, generator=g, dtype=D)
        yield torch.rand(k, generator=g, dtype=D) + 0.5, grads @ grads.T


def test_torch_placement_is_torch_optim_adam():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(5, generator=gen, dtype=D)
    ref = p.clone().requires_grad_(True)
    adam = torch.optim.Adam([ref], lr=0.05, weight_decay=0.01)
    m = v = torch.zeros(5, dtype=D)
    for t in range(1, 30):
        g = torch.randn(5, generator=gen, dtype=D) * 10.0 ** (t % 5 - 6)  # down to 1e-6: near eps
        ref.grad = g.clone()
        adam.step()
        p, m, v = adam_update(p, g, m, v, t, lr=0.05, weight_decay=0.01, eps_placement="torch")
        torch.testing.assert_close(p, ref.detach(), rtol=1e-14, atol=1e-16)


def test_the_two_placements_are_the_same_update_up_to_rounding():
    gen = torch.Generator().manual_seed(1)
    p, m, v = torch.randn(50, generator=gen, dtype=D), torch.zeros(50, dtype=D), torch.zeros(50, dtype=D)
    pk, mk, vk = p.clone(), m.clone(), v.clone()
    for t in range(1, 20):
        g = torch.randn(50, generator=gen, dtype=D) * 1e-7
        p, m, v = adam_update(p, g, m, v, t, lr=0.1, eps_placement="torch")
        pk, mk, vk = adam_update(pk, g, mk, vk, t, lr=0.1, eps_placement="kingma")
    torch.testing.assert_close(p, pk, rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="eps_placement"):
        adam_update(p, g, m, v, 1, lr=0.1, eps_placement="keras")


def test_famo_keeps_the_torch_placement_bit_for_bit():
    method = FAMO(lr=0.1, gamma=0.01)
    xi = m = v = torch.zeros(3, dtype=D)
    prev = None
    for t, (losses, _) in enumerate(_sequence()):
        if prev is not None:
            z = torch.softmax(xi, 0)
            delta = prev.log() - losses.log()
            xi, m, v = _torch_order(xi, z * (delta - z @ delta), m, v, t, 0.1, 0.01)
        agg = method.aggregate(TaskInputs(losses=losses))
        method.commit(agg.pending)
        prev = losses
        assert torch.equal(method.state_dict()["logits"], xi)
        assert torch.equal(method.state_dict()["exp_avg_sq"], v)


def test_gradnorm_keeps_the_kingma_placement_bit_for_bit():
    method = GradNorm(lr=0.05, alpha=0.5)
    w = m = v = torch.ones(3, dtype=D)
    m = v = torch.zeros(3, dtype=D)
    l0 = None
    for t, (losses, gram) in enumerate(_sequence(40, seed=3), start=1):
        l0 = losses if l0 is None else l0
        n = gram.diagonal().sqrt()
        r = (losses / l0) / (losses / l0).mean()
        g = w * n
        grad = torch.sign(g - g.mean() * r**0.5) * n
        w, m, v = _kingma(w, grad, m, v, torch.tensor([float(t)] * 3, dtype=D), 0.05)
        w = w.clamp_min(0.0)
        w = w * (3 / w.sum())
        agg = method.aggregate(TaskInputs(losses=losses, gram=gram))
        method.commit(agg.pending)
        assert torch.equal(method.weights, w)


def test_uw_keeps_the_kingma_placement_bit_for_bit():
    method = UW(lr=0.05)
    s = m = v = torch.zeros(3, dtype=D)
    for t, (losses, _) in enumerate(_sequence(), start=1):
        grad = 0.5 - 0.5 * torch.exp(-s) * losses
        s, m, v = _kingma(s, grad, m, v, torch.tensor([float(t)] * 3, dtype=D), 0.05)
        agg = method.aggregate(TaskInputs(losses=losses))
        method.commit(agg.pending)
        assert torch.equal(method.log_variances, s)


def test_imtl_keeps_the_kingma_placement_bit_for_bit():
    method = IMTL(lr=0.05)
    s = m = v = torch.zeros(3, dtype=D)
    for t, (losses, gram) in enumerate(_sequence(), start=1):
        grad = s.exp() * losses - 1.0
        s, m, v = _kingma(s, grad, m, v, t, 0.05)
        agg = method.aggregate(TaskInputs(losses=losses, gram=gram))
        method.commit(agg.pending)
        assert torch.equal(method.s, s)


@pytest.mark.parametrize("placement", ["torch", "kingma"])
def test_a_tensor_of_per_entry_steps_is_the_int_step_entry_by_entry(placement):
    """step given per entry (tasks that joined at different steps): each entry gets the update of
    its own step count, bias corrections included."""
    gen = torch.Generator().manual_seed(2)
    p, g = torch.randn(3, generator=gen, dtype=D), torch.randn(3, generator=gen, dtype=D)
    m, v = 0.1 * torch.randn(3, generator=gen, dtype=D), torch.rand(3, generator=gen, dtype=D)
    steps = torch.tensor([1.0, 2.0, 7.0], dtype=D)
    new, new_m, new_v = adam_update(p, g, m, v, steps, lr=0.1, eps_placement=placement, weight_decay=0.01)
    for i, t in enumerate((1, 2, 7)):
        ref = adam_update(p[i:i + 1], g[i:i + 1], m[i:i + 1], v[i:i + 1], t, lr=0.1, eps_placement=placement,
                          weight_decay=0.01)
        torch.testing.assert_close(new[i:i + 1], ref[0], rtol=1e-15, atol=0)
        torch.testing.assert_close(new_v[i:i + 1], ref[2], rtol=0, atol=0)
