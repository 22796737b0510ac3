"""FairGrad: the fixed-point equation, the Nash-MTL case alpha = 1, scale and order."""

from __future__ import annotations

import pytest
import torch

from gradbalance.methods import FairGrad, TaskInputs
from tests.modern_checks import check_one_step


def _weights(g, alpha=1.0):
    agg = FairGrad(alpha).aggregate(
        TaskInputs(losses=torch.ones(g.shape[0], dtype=torch.float64), gram=g @ g.T)
    )
    return agg.weights, agg


def _grads(k, seed, p=20):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, p, generator=gen, dtype=torch.float64)
    return g * torch.logspace(-1, 1, k, dtype=torch.float64)[:, None]


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("k", [2, 4])
def test_fixed_point_equation_holds(alpha, k):
    g = _grads(k, seed=k)
    w, agg = _weights(g, alpha)
    assert bool((w > 0).all())
    m = g @ g.T
    torch.testing.assert_close(m @ w, w ** (-1 / alpha), rtol=1e-8, atol=0)
    assert agg.extras["residual"] < 1e-8


def test_alpha_one_is_the_nash_mtl_condition():
    g = _grads(3, seed=7)
    w, _ = _weights(g, 1.0)
    torch.testing.assert_close(
        w * (g @ g.T @ w), torch.ones(3, dtype=torch.float64), rtol=1e-8, atol=0
    )
    # two tasks: the direction is proportional to g1/||g1|| + g2/||g2|| (as for Nash-MTL)
    g2 = _grads(2, seed=8)
    d = _weights(g2)[0] @ g2
    bisector = g2[0] / g2[0].norm() + g2[1] / g2[1].norm()
    torch.testing.assert_close(d / d.norm(), bisector / bisector.norm(), rtol=0, atol=1e-8)


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_gradient_scale_changes_weights_by_the_closed_form_factor(alpha):
    g = _grads(3, seed=1)
    w, _ = _weights(g, alpha)
    w_scaled, _ = _weights(10.0 * g, alpha)  # M -> 100 M
    torch.testing.assert_close(w_scaled, w * 100.0 ** (-alpha / (1 + alpha)), rtol=1e-7, atol=0)


def test_invariant_to_task_order():
    g = _grads(4, seed=5)
    perm = torch.tensor([3, 1, 0, 2])
    w, _ = _weights(g)
    w_perm, _ = _weights(g[perm])
    torch.testing.assert_close(w_perm, w[perm], rtol=1e-8, atol=0)


def test_orthogonal_closed_form_and_zero_gradient_task():
    g = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.5, 0.0]], dtype=torch.float64)
    w, _ = _weights(g, 2.0)  # orthogonal: ||g_i||^2 w_i = w_i^(-1/2)  =>  w_i = ||g_i||^(-4/3)
    expected = torch.tensor([2.0 ** (-4 / 3), 0.0, 0.5 ** (-4 / 3)], dtype=torch.float64)
    torch.testing.assert_close(w, expected, rtol=1e-8, atol=0)


def test_validation_and_repr():
    for bad in (0.0, -1.0, float("inf"), "1", True):
        with pytest.raises(ValueError, match="alpha"):
            FairGrad(bad)
    assert repr(FairGrad(2)) == "FairGrad(alpha=2.0)"


def test_end_to_end_step_heads_get_the_weights():
    agg, info = check_one_step("fairgrad")
    assert agg.head_weights is None  # heads get w_i, as sum_i w_i L_i backpropagated
    torch.testing.assert_close(info.weights, agg.weights)
