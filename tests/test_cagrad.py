"""CAGrad: c = 0 is the mean, dual optimality, the ball constraint, primal optimality, invariances."""

from __future__ import annotations

import math

import cvxpy as cp
import pytest
import torch

import gradbalance as gb
from gradbalance.methods import CAGrad
from tests.weighted_sum_check import (
    check_end_to_end,
    inputs_for,
    random_gradients,
    run_doc_snippets,
)


def dual_objective(grads, w, c):
    g0 = grads.mean(0)
    gw = w @ grads
    return float(gw @ g0 + c * g0.norm() * gw.norm())


@pytest.mark.parametrize("rescale", [0, 1, 2])
@pytest.mark.parametrize("k", [2, 3, 6])
def test_c_zero_is_the_mean(rescale, k):
    grads = random_gradients(k, seed=k)
    w = CAGrad(c=0.0, rescale=rescale).aggregate(inputs_for(grads)).weights
    torch.testing.assert_close(w, torch.full((k,), 1.0 / k, dtype=torch.float64), rtol=0, atol=1e-15)


def test_hand_computed_orthogonal_pair():
    # g1 = e1, g2 = e2: by symmetry w* = (1/2, 1/2), g_w = g0, lam = c, weights = (1 + c) / 2
    grads = torch.eye(2, dtype=torch.float64)
    w = CAGrad(c=0.4, rescale=0).aggregate(inputs_for(grads)).weights
    torch.testing.assert_close(w, torch.tensor([0.7, 0.7], dtype=torch.float64), atol=1e-7, rtol=0)


@pytest.mark.parametrize("c", [0.2, 0.4, 0.9])
@pytest.mark.parametrize("k,p,seed", [(2, 20, 0), (3, 20, 1), (5, 20, 2), (8, 20, 3), (6, 3, 4)])
def test_dual_solution_beats_random_points_and_vertices(c, k, p, seed):
    grads = random_gradients(k, p, seed=seed)  # (6, 3): rank-deficient Gram matrix
    w_star, _, _ = CAGrad(c=c).solve(grads @ grads.T)
    w_star = torch.from_numpy(w_star)
    assert abs(float(w_star.sum()) - 1.0) < 1e-12 and (w_star >= 0).all()
    best = dual_objective(grads, w_star, c)
    g = torch.Generator().manual_seed(seed)
    candidates = list(torch.eye(k, dtype=torch.float64))
    candidates += list(torch.distributions.Dirichlet(torch.ones(k, dtype=torch.float64)).sample((200,)))
    candidates += [torch.rand(k, generator=g, dtype=torch.float64) ** 4 for _ in range(50)]
    for cand in candidates:
        assert best <= dual_objective(grads, cand / cand.sum(), c) + 1e-9


@pytest.mark.parametrize("c", [0.1, 0.4, 0.8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ball_constraint_and_primal_optimality(c, seed):
    k = 4
    grads = random_gradients(k, seed=seed)
    g0 = grads.mean(0)
    d = CAGrad(c=c, rescale=0).aggregate(inputs_for(grads)).weights @ grads
    radius = c * float(g0.norm())
    assert float((d - g0).norm()) <= radius * (1 + 1e-9)
    # primal: max_d min_i g_i . d  s.t.  ||d - g0|| <= c ||g0||, by an independent conic solver
    x, t = cp.Variable(grads.shape[1]), cp.Variable()
    prob = cp.Problem(cp.Maximize(t), [grads.numpy() @ x >= t, cp.norm(x - g0.numpy()) <= radius])
    prob.solve(solver="CLARABEL")
    assert float((grads @ d).min()) == pytest.approx(prob.value, rel=1e-5, abs=1e-6)


def test_rescale_modes():
    grads = random_gradients(3, seed=4)
    c = 0.5
    w0 = CAGrad(c=c, rescale=0).aggregate(inputs_for(grads)).weights
    torch.testing.assert_close(CAGrad(c=c, rescale=1).aggregate(inputs_for(grads)).weights, w0 / (1 + c**2))
    torch.testing.assert_close(CAGrad(c=c, rescale=2).aggregate(inputs_for(grads)).weights, w0 / (1 + c))


def test_permutation_and_scale_invariance():
    grads = random_gradients(5, seed=5)
    w = CAGrad().aggregate(inputs_for(grads)).weights
    perm = torch.tensor([2, 4, 1, 0, 3])
    torch.testing.assert_close(CAGrad().aggregate(inputs_for(grads[perm])).weights, w[perm], atol=1e-6, rtol=0)
    torch.testing.assert_close(CAGrad().aggregate(inputs_for(1e4 * grads)).weights, w, atol=1e-6, rtol=0)


def test_zero_mean_gradient_gives_the_mean():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    agg = CAGrad().aggregate(inputs_for(grads))
    torch.testing.assert_close(agg.weights, torch.full((2,), 0.5 / 1.16, dtype=torch.float64))
    assert agg.extras["lambda"] == 0.0


def test_heads_get_their_plain_gradient():
    agg = CAGrad().aggregate(inputs_for(random_gradients(3)))
    torch.testing.assert_close(agg.head_weights, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("kwargs", [{"c": -0.1}, {"c": math.inf}, {"c": "0.4"}, {"rescale": 3}, {"rescale": True}])
def test_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        CAGrad(**kwargs)


def test_registry_defaults():
    method = gb.methods.base.make_method("cagrad")
    assert repr(method) == "CAGrad(c=0.4, rescale=1)"


def test_end_to_end():
    check_end_to_end(CAGrad(), k=3)


def test_doc_snippets_run():
    assert run_doc_snippets("cagrad") >= 1


def test_zero_combined_gradient_drops_the_extra_term():
    # g1 = e1, g2 = -e1, g3 = e2: w* = (1/2, 1/2, 0) gives g_w* = 0 (objective 0, the minimum), so
    # lam = c ||g0|| / ||g_w*|| is undefined; the extra term is dropped and d = g0, which is primal
    # optimal: max_d min_i g_i . d = 0 over the ball (any d with d_1 = 0), and g0 = (0, 1/3) attains it
    grads = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    agg = CAGrad(c=0.4, rescale=0).aggregate(inputs_for(grads))
    assert agg.extras["lambda"] == 0.0
    torch.testing.assert_close(agg.weights, torch.full((3,), 1.0 / 3, dtype=torch.float64), rtol=0, atol=1e-15)
    assert float((grads @ (agg.weights @ grads)).min()) == pytest.approx(0.0, abs=1e-15)


def test_c_zero_is_the_mean_without_running_the_solver():
    agg = CAGrad(c=0.0).aggregate(inputs_for(random_gradients(4, seed=9)))
    assert agg.extras == {"lambda": 0.0, "solver_iterations": 0}


def test_weights_use_the_symmetric_part_of_the_gram():
    # M, M^T and (M + M^T) / 2 give the same weights (a Gram assembled from blocks can be asymmetric
    # by rounding; g0 . g_w = 1^T M w / k must use the symmetric part)
    grads = random_gradients(4, seed=10)
    skew = 0.05 * torch.triu(torch.ones(4, 4, dtype=torch.float64), 1)
    bent = grads @ grads.T + skew - skew.T
    ones = torch.ones(4, dtype=torch.float64)
    ref = CAGrad().aggregate(inputs_for(grads)).weights
    for m in (bent, bent.T):
        torch.testing.assert_close(CAGrad().aggregate(gb.methods.TaskInputs(losses=ones, gram=m)).weights, ref,
                                   atol=1e-7, rtol=0)


def test_repr_names_every_argument():
    # repr is built from hyperparameters(), which checkpoints record to warn on a changed method
    assert repr(CAGrad(c=0.5, rescale=2)) == "CAGrad(c=0.5, rescale=2)"


@pytest.mark.parametrize("seed", [0, 3])
def test_reported_lambda_is_c_norm_g0_over_norm_gw(seed):
    grads = random_gradients(4, seed=seed)
    method = CAGrad(c=0.6, rescale=0)
    w_star, _, _ = method.solve(grads @ grads.T)
    gw = torch.from_numpy(w_star) @ grads
    lam = 0.6 * float(grads.mean(0).norm()) / float(gw.norm())
    agg = method.aggregate(inputs_for(grads))
    assert agg.extras["lambda"] == pytest.approx(lam, rel=1e-9)
    torch.testing.assert_close(agg.weights, 0.25 + lam * torch.from_numpy(w_star))
