"""RLW: seeded determinism, the distribution of the weights, accumulation, resume."""

from __future__ import annotations

import pytest
import torch

import gradbalance as gb
from gradbalance.methods import RLW, TaskInputs
from tests.classics_helpers import assert_resume_bit_identical
from tests.helpers import MultiTaskNet, make_batch, task_losses

D = torch.float64


def draws(m: RLW, k: int, n: int) -> torch.Tensor:
    out = []
    x = TaskInputs(losses=torch.ones(k, dtype=D))
    for _ in range(n):
        agg = m.aggregate(x)
        m.commit(agg.pending)
        out.append(agg.weights)
    return torch.stack(out)


def test_same_seed_same_weights_different_seed_different():
    a, b, c = draws(RLW(seed=7), 3, 5), draws(RLW(seed=7), 3, 5), draws(RLW(seed=8), 3, 5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # a new draw at every committed step


@pytest.mark.parametrize("distribution,var_z", [("normal", 1.0), ("uniform", 1 / 12)])
def test_weights_are_a_softmax_of_iid_draws(distribution, var_z):
    k, n = 4, 5000
    w = draws(RLW(seed=0, distribution=distribution), k, n)
    torch.testing.assert_close(w.sum(1), torch.ones(n, dtype=D), atol=1e-12, rtol=0)
    assert (w > 0).all()
    # by symmetry every task's mean weight is 1/k (standard error ~0.003 here)
    assert (w.mean(0) - 1 / k).abs().max() < 0.015
    # log w - mean(log w) = z - mean(z): mean 0, variance var_z (1 - 1/k) per component
    centred = w.log() - w.log().mean(1, keepdim=True)
    assert centred.mean().abs() < 0.02 * var_z**0.5
    assert float(centred.var()) == pytest.approx(var_z * (1 - 1 / k), rel=0.06)


def test_sum_to_k_scale():
    a = draws(RLW(seed=2), 5, 3)
    b = draws(RLW(seed=2, scale="sum_to_k"), 5, 3)
    torch.testing.assert_close(b, 5 * a, atol=1e-15, rtol=0)


def test_weights_are_the_softmax_of_the_seeded_draws():
    """lambda = softmax(z) with z the seeded generator's next N(0, I) (or U(0, 1)) draws, in order."""
    for distribution, draw in (("normal", torch.randn), ("uniform", torch.rand)):
        gen = torch.Generator().manual_seed(11)
        z = torch.stack([draw(4, generator=gen, dtype=D) for _ in range(3)])
        torch.testing.assert_close(draws(RLW(seed=11, distribution=distribution), 4, 3), torch.softmax(z, dim=1),
                                   rtol=0, atol=1e-15)


def test_update_is_the_gradient_of_the_weighted_sum_heads_included():
    """RLW's update on every parameter (heads included) is that of sum_i lambda_i L_i."""
    k = 3
    model = MultiTaskNet(k).double()
    x, y = make_batch(k)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), RLW(seed=5), shared_params=model.trunk)
    _, losses = task_losses(model, x.double(), y.double())
    lam = opt.backward(losses).weights
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _, losses = task_losses(model, x.double(), y.double())
    sum(w * loss for w, loss in zip(lam, losses)).backward()
    assert float(lam.max() - lam.min()) > 1e-2
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)


def test_uncommitted_draws_are_repeated():
    m = RLW()
    x = TaskInputs(losses=torch.ones(3, dtype=D))
    a, b = m.aggregate(x), m.aggregate(x)
    assert torch.equal(a.weights, b.weights)


def test_accumulation_window_uses_one_draw():
    k = 3
    model = MultiTaskNet(k)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.01), "rlw", shared_params=model.trunk)
    x, y = make_batch(k)
    seen = []
    for _ in range(2):
        opt.zero_grad()
        for part in range(2):
            _, losses = task_losses(model, x[16 * part:16 * part + 16], y[16 * part:16 * part + 16])
            seen.append(opt.backward(losses).weights)
        opt.step()
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[2], seen[3])
    assert not torch.equal(seen[1], seen[2])
    # the first step's weights are the seed-0 draw
    torch.testing.assert_close(seen[0], draws(RLW(seed=0), k, 1)[0])


def test_errors():
    with pytest.raises(ValueError, match="seed"):
        RLW(seed=1.5)
    with pytest.raises(ValueError, match="distribution"):
        RLW(distribution="dirichlet")
    with pytest.raises(ValueError, match="scale"):
        RLW(scale="one")
    with pytest.raises(ValueError, match="generator"):
        RLW().load_state_dict({})
    assert repr(RLW()) == "RLW(seed=0, distribution='normal', scale='sum_to_one')"


def test_resume_is_bit_identical():
    assert_resume_bit_identical(lambda: RLW(seed=3), k=3)
