"""UPGrad: non-conflicting, the mean without conflict, exact cone projections, invariances."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

import gradbalance as gb
from gradbalance.cone import project_weights
from gradbalance.methods import UPGrad
from tests.weighted_sum_check import (
    check_end_to_end,
    inputs_for,
    random_gradients,
    run_doc_snippets,
)


@pytest.mark.parametrize("k,p", [(2, 20), (3, 20), (5, 20), (8, 20), (6, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_non_conflicting_on_conflicting_problems(k, p, seed):
    grads = random_gradients(k, p, seed=seed)
    w = UPGrad().aggregate(inputs_for(grads)).weights
    d = w @ grads
    scale = grads.norm(dim=1).max() ** 2
    assert (grads @ d >= -1e-9 * scale).all()


def test_problems_do_conflict_and_upgrad_changes_the_mean():
    grads = random_gradients(5, seed=0)
    mean = grads.mean(0)
    assert (grads @ mean < 0).any()  # the mean itself conflicts with some task
    w = UPGrad().aggregate(inputs_for(grads)).weights
    assert (w - 0.2).abs().max() > 1e-3


@pytest.mark.parametrize("k", [2, 4, 7])
def test_equals_mean_without_conflict(k):
    grads = random_gradients(k, conflict=False, seed=k)
    assert (grads @ grads.T >= 0).all()
    agg = UPGrad().aggregate(inputs_for(grads))
    torch.testing.assert_close(agg.weights, torch.full((k,), 1.0 / k, dtype=torch.float64))
    assert agg.extras["projected"] == 0


@pytest.mark.parametrize("seed", [0, 3])
def test_each_projection_satisfies_kkt_and_matches_a_primal_solver(seed):
    k = 4
    grads = random_gradients(k, seed=seed)
    gram = grads @ grads.T
    for i in range(k):
        u = torch.zeros(k, dtype=torch.float64)
        u[i] = 1.0
        v = project_weights(gram, u)
        mv = gram @ v
        scale = float(gram.diagonal().max())
        assert (v >= u - 1e-12).all()  # dual feasibility
        assert (mv >= -1e-9 * scale).all()  # primal feasibility: G d >= 0
        assert ((v - u) * mv).abs().max() <= 1e-9 * scale  # complementary slackness
        # an independent solver on the primal: min ||d - g_i||^2 s.t. G d >= 0
        d = cp.Variable(grads.shape[1])
        cp.Problem(cp.Minimize(cp.sum_squares(d - grads[i].numpy())), [grads.numpy() @ d >= 0]).solve(
            solver="CLARABEL")
        np.testing.assert_allclose((v @ grads).numpy(), d.value, atol=1e-6)


def test_permutation_invariance():
    grads = random_gradients(5, seed=4)
    w = UPGrad().aggregate(inputs_for(grads)).weights
    perm = torch.tensor([3, 0, 4, 2, 1])
    wp = UPGrad().aggregate(inputs_for(grads[perm])).weights
    torch.testing.assert_close(wp, w[perm], atol=1e-10, rtol=0)


def test_scale_invariance_of_weights_and_rank_deficient_input():
    grads = random_gradients(3, seed=5)
    grads = torch.cat([grads, grads[:1] - 2 * grads[1:2]])  # 4 tasks, rank 3
    w = UPGrad().aggregate(inputs_for(grads)).weights
    w_big = UPGrad().aggregate(inputs_for(1e6 * grads)).weights
    torch.testing.assert_close(w_big, w, atol=1e-9, rtol=1e-7)
    assert (grads @ (w @ grads) >= -1e-9 * grads.norm(dim=1).max() ** 2).all()


def test_pref_weights_the_projections():
    grads = random_gradients(3, seed=6)
    pref = [0.2, 0.3, 0.5]
    w = UPGrad(pref=pref).aggregate(inputs_for(grads)).weights
    gram = grads @ grads.T
    expected = sum(project_weights(gram, torch.eye(3, dtype=torch.float64)[i] * pref[i]) for i in range(3))
    torch.testing.assert_close(w, expected)


def test_reg_allows_only_small_conflicts():
    grads = random_gradients(5, seed=0)
    w = UPGrad(reg=1e-4).aggregate(inputs_for(grads)).weights
    w0 = UPGrad().aggregate(inputs_for(grads)).weights
    assert (w - w0).abs().max() < 1e-2


def test_reg_is_passed_to_the_projection():
    """reg = 1e-4 (torchjd's) solves the regularised projection, which differs from the exact one."""
    grads = random_gradients(5, seed=0)
    gram = grads @ grads.T
    w = UPGrad(reg=1e-4).aggregate(inputs_for(grads)).weights
    expected = project_weights(gram, torch.eye(5, dtype=torch.float64) / 5, reg=1e-4).sum(dim=1)
    torch.testing.assert_close(w, expected, rtol=1e-10, atol=1e-12)
    assert float((w - UPGrad().aggregate(inputs_for(grads)).weights).abs().max()) > 1e-6


def test_hand_computed_cone_and_projection_count():
    """2-D gradients g0 = (1, 0), g1 = (-1, 1), g2 = (-1, 0.1): the dual cone is d_x >= 0,
    d_y >= 10 d_x. Projections: g0 -> (1, 10) / 101 (onto the ray of g2's constraint), g1 -> (0, 1),
    g2 -> (0, 0.1) (onto d_x = 0). Every projection moved (3), although only g0 and g2 carry the
    active constraints; heads get their plain gradients."""
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [-1.0, 0.1]], dtype=torch.float64)
    agg = UPGrad().aggregate(inputs_for(grads))
    projections = torch.tensor([[1 / 101, 10 / 101], [0.0, 1.0], [0.0, 0.1]], dtype=torch.float64)
    expected = projections.mean(0)
    torch.testing.assert_close(agg.weights @ grads, expected, rtol=1e-9, atol=1e-12)
    assert agg.extras["projected"] == 3
    torch.testing.assert_close(agg.head_weights, torch.ones(3, dtype=torch.float64))


def test_all_zero_gradients():
    agg = UPGrad().aggregate(inputs_for(torch.zeros(3, 5, dtype=torch.float64)))
    torch.testing.assert_close(agg.weights, torch.full((3,), 1 / 3, dtype=torch.float64))


@pytest.mark.parametrize("kwargs", [{"pref": [1.0, -1.0]}, {"pref": [2.0, -1.0]}, {"pref": [0.0, 0.0]}, {"reg": -1.0}])
def test_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        UPGrad(**kwargs)


def test_reg_must_be_a_number():
    with pytest.raises(TypeError, match="reg must be a number"):
        UPGrad(reg=True)
    with pytest.raises(ValueError, match="reg must be >= 0.0, got -1.0"):
        UPGrad(reg=-1.0)


def test_pref_length_mismatch():
    with pytest.raises(ValueError, match="pref has 2 entries"):
        UPGrad(pref=[1.0, 1.0]).aggregate(inputs_for(random_gradients(3)))


def test_registry_and_repr():
    assert "upgrad" in gb.available_methods()
    assert repr(UPGrad()) == "UPGrad(pref=None, reg=0.0)"


def test_end_to_end():
    check_end_to_end(UPGrad(), k=3)


def test_doc_snippets_run():
    assert run_doc_snippets("upgrad") >= 1
