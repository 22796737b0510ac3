"""DualProj: the projection of the mean onto the dual cone (non-conflicting, KKT, invariances)."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

import gradbalance as gb
from gradbalance.methods import DualProj
from tests.weighted_sum_check import (
    check_end_to_end,
    inputs_for,
    random_gradients,
    run_doc_snippets,
)


@pytest.mark.parametrize("k,p", [(2, 20), (3, 20), (5, 20), (8, 20), (6, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_non_conflicting_and_kkt(k, p, seed):
    grads = random_gradients(k, p, seed=seed)
    gram = grads @ grads.T
    w = DualProj().aggregate(inputs_for(grads)).weights
    u = torch.full((k,), 1.0 / k, dtype=torch.float64)
    mw = gram @ w
    scale = float(gram.diagonal().max())
    assert (mw >= -1e-9 * scale).all()  # g_i . d >= 0
    assert (w >= u - 1e-12).all()
    assert ((w - u) * mw).abs().max() <= 1e-9 * scale


def test_matches_a_primal_projection_of_the_mean():
    grads = random_gradients(4, seed=1)
    mean = grads.mean(0)
    assert (grads @ mean < 0).any()
    w = DualProj().aggregate(inputs_for(grads)).weights
    d = cp.Variable(grads.shape[1])
    cp.Problem(cp.Minimize(cp.sum_squares(d - mean.numpy())), [grads.numpy() @ d >= 0]).solve(solver="CLARABEL")
    np.testing.assert_allclose((w @ grads).numpy(), d.value, atol=1e-6)


@pytest.mark.parametrize("k", [2, 5])
def test_equals_mean_when_the_mean_conflicts_with_no_task(k):
    grads = random_gradients(k, conflict=False, seed=k)
    torch.testing.assert_close(DualProj().aggregate(inputs_for(grads)).weights,
                               torch.full((k,), 1.0 / k, dtype=torch.float64))


def test_permutation_invariance():
    grads = random_gradients(5, seed=7)
    perm = torch.tensor([4, 2, 0, 1, 3])
    w = DualProj().aggregate(inputs_for(grads)).weights
    wp = DualProj().aggregate(inputs_for(grads[perm])).weights
    torch.testing.assert_close(wp, w[perm], atol=1e-10, rtol=0)


def test_pref_is_the_point_projected():
    grads = random_gradients(3, seed=2)
    pref = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    w = DualProj(pref=pref.tolist()).aggregate(inputs_for(grads)).weights
    d = cp.Variable(grads.shape[1])
    target = (pref @ grads).numpy()
    cp.Problem(cp.Minimize(cp.sum_squares(d - target)), [grads.numpy() @ d >= 0]).solve(solver="CLARABEL")
    np.testing.assert_allclose((w @ grads).numpy(), d.value, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"pref": [-0.1, 1.0]}, {"reg": float("nan")}])
def test_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        DualProj(**kwargs)


def test_reg_must_be_a_number():
    with pytest.raises(TypeError, match="reg must be a number"):
        DualProj(reg=True)


def test_registry_and_different_from_upgrad():
    grads = random_gradients(4, seed=0)
    w = DualProj().aggregate(inputs_for(grads)).weights
    w_up = gb.methods.UPGrad().aggregate(inputs_for(grads)).weights
    assert (w - w_up).abs().max() > 1e-3
    assert "dualproj" in gb.available_methods()


def test_end_to_end():
    check_end_to_end(DualProj(), k=3)


def test_doc_snippets_run():
    assert run_doc_snippets("dualproj") >= 1


def test_heads_get_their_plain_gradient():
    agg = DualProj().aggregate(inputs_for(random_gradients(3, seed=3)))
    torch.testing.assert_close(agg.head_weights, torch.ones(3, dtype=torch.float64))


def test_reg_solves_the_regularised_problem():
    # reg * I is added to the trace-normalised Gram: w = argmin_{v >= p} v^T (M / tr M + reg I) v,
    # checked by an independent QP solver; reg = 0.1 moves the answer well away from reg = 0
    grads = random_gradients(4, seed=1)
    gram = (grads @ grads.T).numpy()
    reg, p = 0.1, np.full(4, 0.25)
    w = DualProj(reg=reg).aggregate(inputs_for(grads)).weights
    v = cp.Variable(4)
    a = gram / np.trace(gram) + reg * np.eye(4)
    cp.Problem(cp.Minimize(cp.quad_form(v, cp.psd_wrap(a))), [v >= p]).solve(solver="CLARABEL")
    np.testing.assert_allclose(w.numpy(), v.value, atol=1e-6)
    assert (w - DualProj().aggregate(inputs_for(grads)).weights).abs().max() > 1e-2


def test_repr_names_every_argument():
    # repr is built from hyperparameters(), which checkpoints record to warn on a changed method
    assert repr(DualProj(pref=[0.7, 0.3], reg=0.1)) == "DualProj(pref=[0.7, 0.3], reg=0.1)"
    assert repr(DualProj()) == "DualProj(pref=None, reg=0.0)"
