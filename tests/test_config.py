"""ConFIG: equal cosines, the projection length, agreement with the P-dimensional pinv form."""

from __future__ import annotations

import pytest
import torch

from gradbalance.methods import ConFIG, TaskInputs
from tests.modern_checks import check_one_step


def _direction(g, method=None):
    agg = (method or ConFIG()).aggregate(
        TaskInputs(losses=torch.ones(g.shape[0], dtype=torch.float64), gram=g @ g.T)
    )
    return agg.weights @ g, agg


def _grads(k, p=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, p, generator=gen, dtype=torch.float64)
    return g * torch.logspace(-2, 2, k, dtype=torch.float64)[:, None]  # very different norms


@pytest.mark.parametrize("k", [2, 3, 6])
def test_equal_positive_cosine_with_every_task(k):
    g = _grads(k, seed=k)
    g[1] = -g[0] + 0.2 * g[1]  # a strong conflict
    d, _ = _direction(g)
    cos = (g @ d) / (g.norm(dim=1) * d.norm())
    assert bool((cos > 0).all())
    torch.testing.assert_close(cos, cos.mean().expand(k), atol=1e-10, rtol=0)


@pytest.mark.parametrize("k", [2, 4])
def test_length_is_the_sum_of_projections_and_matches_pinv_form(k):
    g = _grads(k, seed=10 + k)
    d, _ = _direction(g)
    u = d / d.norm()
    torch.testing.assert_close(d.norm(), (g @ u).sum())
    units = g / g.norm(dim=1, keepdim=True)
    gv = torch.linalg.pinv(units) @ torch.ones(k, dtype=torch.float64)  # the paper's U^+ 1
    gu = gv / gv.norm()
    torch.testing.assert_close(d, (g @ gu).sum() * gu)


def test_invariant_to_task_order_and_linear_in_scale():
    g = _grads(4, seed=3)
    d, agg = _direction(g)
    perm = torch.tensor([2, 0, 3, 1])
    d_perm, agg_perm = _direction(g[perm])
    torch.testing.assert_close(d_perm, d)
    torch.testing.assert_close(agg_perm.weights, agg.weights[perm])
    torch.testing.assert_close(_direction(7.0 * g)[0], 7.0 * d)


def test_dependent_and_degenerate_gradients():
    g = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)  # g2 = 2 g1
    d, _ = _direction(g)
    cos = (g @ d) / (g.norm(dim=1) * d.norm())
    torch.testing.assert_close(cos, torch.full((3,), 2**-0.5, dtype=torch.float64))
    opposite = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)
    d, agg = _direction(opposite)
    assert agg.extras["degenerate"] and torch.equal(d, torch.zeros(2, dtype=torch.float64))
    zero_task = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    d, agg = _direction(zero_task)
    assert agg.weights[1] == 0
    torch.testing.assert_close(d, torch.tensor([1.5, 1.5], dtype=torch.float64))


def test_validation_and_repr():
    for bad in (-1.0, 1.0, "x", True):
        with pytest.raises(ValueError, match="rcond"):
            ConFIG(rcond=bad)
    assert repr(ConFIG()) == "ConFIG(rcond=1e-08)"


def test_end_to_end_step_and_heads():
    agg, info = check_one_step("config")
    assert torch.equal(agg.head_weights, torch.ones(3, dtype=torch.float64))
    assert torch.equal(info.weights, agg.weights)


@pytest.mark.parametrize("t,rcond", [(1e-6, None), (1e-3, 1e-4), (1e-3, 0.0), (1.5e-2, 1e-4)])
def test_rcond_cuts_the_cosine_spectrum_like_pinv(t, rcond):
    # g3 leaves the plane of g1, g2 by an angle t: the cosine matrix N has an eigenvalue t^2 / 2.
    # Eigenvalues of N = U U^T are the squared singular values of U, so dropping those below
    # rcond * max (relative: 1.125e-4 at t = 1.5e-2 lies between rcond and rcond * max = 2e-4)
    # is the P-dimensional pinv of U with rtol = sqrt(rcond).
    g = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.5, 0.0],
                      [3 * (1 - t * t) ** 0.5 / 2**0.5, 3 * (1 - t * t) ** 0.5 / 2**0.5, 3 * t]], dtype=torch.float64)
    method = ConFIG() if rcond is None else ConFIG(rcond=rcond)
    d, _ = _direction(g, method)
    units = g / g.norm(dim=1, keepdim=True)
    rtol = (1e-8 if rcond is None else rcond) ** 0.5
    gv = torch.linalg.pinv(units, rtol=rtol) @ torch.ones(3, dtype=torch.float64)
    gu = gv / gv.norm()
    torch.testing.assert_close(d, (g @ gu).sum() * gu, rtol=1e-6, atol=1e-9)
    cos = (g @ d) / (g.norm(dim=1) * d.norm())
    assert bool((cos.max() - cos.min() < 1e-6)) == (rcond == 0.0)  # only the exact solve equalises them


def test_repr_names_every_argument():
    # repr is built from hyperparameters(), which checkpoints record to warn on a changed method
    assert repr(ConFIG(rcond=1e-4)) == "ConFIG(rcond=0.0001)"
