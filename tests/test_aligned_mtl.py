"""Aligned-MTL: the aligned Gram is sigma times a projector (condition number 1), scale modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradbalance as gb
from gradbalance.methods import AlignedMTL
from gradbalance.methods.aligned_mtl import aligned_weights
from tests.weighted_sum_check import (
    check_end_to_end,
    inputs_for,
    random_gradients,
    run_doc_snippets,
)


def sigma_of(grads, scale):
    lam = np.sort(np.linalg.eigvalsh((grads @ grads.T).numpy()))  # ascending
    lam = lam[lam > lam[-1] * len(lam) * np.finfo(np.float32).eps]
    # "median" is the lower median (torch.median, as in the official code)
    return {"min": lam[0], "median": lam[(len(lam) - 1) // 2], "rmse": lam.mean()}[scale]


@pytest.mark.parametrize("scale", ["min", "median", "rmse"])
@pytest.mark.parametrize("k,seed", [(2, 0), (3, 1), (4, 2), (7, 3)])
def test_aligned_gram_is_sigma_times_identity(scale, k, seed):
    grads = random_gradients(k, seed=seed)
    w_mat, _ = aligned_weights(grads @ grads.T, scale)
    aligned = w_mat @ grads  # rows: the aligned task gradients
    gram = aligned @ aligned.T
    sigma = sigma_of(grads, scale)
    torch.testing.assert_close(gram, sigma * torch.eye(k, dtype=torch.float64), rtol=1e-8, atol=1e-8 * sigma)
    alpha = AlignedMTL(scale=scale).aggregate(inputs_for(grads)).weights
    torch.testing.assert_close(alpha @ grads, aligned.sum(0))  # d = sum of the aligned gradients


def test_rank_deficient_gram_gives_a_scaled_projector():
    base = random_gradients(2, seed=4)
    grads = torch.stack([base[0], base[1], base[0] + base[1], 2 * base[0]])  # rank 2
    agg = AlignedMTL().aggregate(inputs_for(grads))
    assert agg.extras["rank"] == 2 and torch.isfinite(agg.weights).all()
    w_mat, lam = aligned_weights(grads @ grads.T)
    gram = (w_mat @ grads) @ (w_mat @ grads).T
    sigma = float(lam[-1])
    eig = torch.linalg.eigvalsh(gram)
    torch.testing.assert_close(eig[-2:], torch.full((2,), sigma, dtype=torch.float64), rtol=1e-8, atol=0)
    assert eig[:2].abs().max() < 1e-8 * sigma
    torch.testing.assert_close(gram @ gram, sigma * gram, rtol=1e-7, atol=1e-7 * sigma**2)


def test_hand_computed_cases():
    orth = torch.diag(torch.tensor([3.0, 3.0, 3.0], dtype=torch.float64))  # already aligned
    torch.testing.assert_close(AlignedMTL().aggregate(inputs_for(orth)).weights, torch.ones(3, dtype=torch.float64))
    grads = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # lambda = 4, 1
    torch.testing.assert_close(AlignedMTL().aggregate(inputs_for(grads)).weights,
                               torch.tensor([0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(AlignedMTL(scale="rmse").aggregate(inputs_for(grads)).weights,
                               torch.tensor([2.5**0.5 / 2, 2.5**0.5], dtype=torch.float64))


def test_permutation_and_scale():
    grads = random_gradients(5, seed=6)
    perm = torch.tensor([1, 4, 0, 3, 2])
    w = AlignedMTL().aggregate(inputs_for(grads)).weights
    torch.testing.assert_close(AlignedMTL().aggregate(inputs_for(grads[perm])).weights, w[perm])
    # W is homogeneous of degree 0 in the gradients: the update scales like the gradients
    torch.testing.assert_close(AlignedMTL().aggregate(inputs_for(10 * grads)).weights, w)


def test_zero_gradients():
    agg = AlignedMTL().aggregate(inputs_for(torch.zeros(3, 4, dtype=torch.float64)))
    assert agg.extras["rank"] == 0 and (agg.weights == 0).all()


def test_head_scaling_option():
    grads = random_gradients(3, seed=7)
    plain = AlignedMTL().aggregate(inputs_for(grads))
    torch.testing.assert_close(plain.head_weights, torch.ones(3, dtype=torch.float64))
    scaled = AlignedMTL(scale_heads=True).aggregate(inputs_for(grads))
    torch.testing.assert_close(scaled.head_weights, scaled.weights)


@pytest.mark.parametrize("kwargs,err", [({"scale": "max"}, ValueError), ({"mode": "ub"}, ValueError),
                                        ({"scale_heads": 1}, TypeError)])
def test_bad_hyperparameters(kwargs, err):
    with pytest.raises(err):
        AlignedMTL(**kwargs)


def test_registry_names():
    expected = "AlignedMTL(scale='min', mode='exact', scale_heads=False)"
    assert repr(gb.methods.base.make_method("aligned_mtl")) == expected
    assert gb.methods.base.make_method("aligned_mtl_ub").mode == "representation"


def test_end_to_end():
    check_end_to_end(AlignedMTL(), k=3)


def test_end_to_end_representation():
    check_end_to_end(gb.methods.base.make_method("aligned_mtl_ub"), k=3, features=True)


def test_doc_snippets_run():
    assert run_doc_snippets("aligned_mtl") >= 1
    assert run_doc_snippets("aligned_mtl_ub") >= 1


def test_eigenvalue_tolerance_is_k_times_float32_eps_relative_to_the_largest():
    # the official tolerance drops eigenvalues <= lambda_max * k * eps32: with k = 4 an eigenvalue
    # of 2 eps32 is dropped (W is then the projector on the other three), one of 5 eps32 is kept
    eps = float(torch.finfo(torch.float32).eps)
    dropped = torch.diag(torch.tensor([1.0, 1.0, 1.0, 2 * eps], dtype=torch.float64))
    agg = AlignedMTL().aggregate(inputs_for(dropped.sqrt()))
    assert agg.extras["rank"] == 3
    torch.testing.assert_close(agg.weights, torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    kept = torch.diag(torch.tensor([1.0, 1.0, 1.0, 5 * eps], dtype=torch.float64))
    agg = AlignedMTL().aggregate(inputs_for(kept.sqrt()))
    assert agg.extras["rank"] == 4  # sigma = 5 eps: alpha_i = sqrt(sigma / lambda_i)
    torch.testing.assert_close(agg.weights, torch.tensor([(5 * eps) ** 0.5] * 3 + [1.0], dtype=torch.float64))


def test_weights_use_the_symmetric_part_of_the_gram():
    # a Gram assembled from blocks can be asymmetric by rounding; the weights must not depend on
    # which triangle the eigensolver reads: M, M^T and (M + M^T) / 2 give the same weights
    grads = random_gradients(4, seed=8)
    gram = grads @ grads.T
    skew = 1e-3 * torch.triu(torch.ones(4, 4, dtype=torch.float64), 1)
    bent = gram + skew - skew.T
    ones = torch.ones(4, dtype=torch.float64)
    ref = AlignedMTL().aggregate(inputs_for(grads)).weights
    for m in (bent, bent.T):
        torch.testing.assert_close(AlignedMTL().aggregate(gb.methods.TaskInputs(losses=ones, gram=m)).weights, ref)


def test_repr_names_every_argument():
    # repr is built from hyperparameters(), which checkpoints record to warn on a changed method
    expected = "AlignedMTL(scale='rmse', mode='representation', scale_heads=True)"
    assert repr(AlignedMTL(scale="rmse", mode="representation", scale_heads=True)) == expected
