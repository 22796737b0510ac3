"""IMTL-G: equal projections on the unit gradients, weights summing to 1, invariances."""

from __future__ import annotations

import pytest
import torch

import gradbalance as gb
from gradbalance.methods import IMTLG
from gradbalance.methods.imtl import imtl_g_weights
from tests.weighted_sum_check import (
    check_end_to_end,
    inputs_for,
    random_gradients,
    run_doc_snippets,
)


def coordinate_imtl_g(grads):
    """The paper's formula on the gradient vectors themselves (independent of the Gram form)."""
    u = grads / grads.norm(dim=1, keepdim=True)
    d_mat, u_mat = grads[0] - grads[1:], u[0] - u[1:]
    tail = grads[0] @ u_mat.T @ torch.linalg.inv(d_mat @ u_mat.T)
    return torch.cat([(1 - tail.sum()).reshape(1), tail])


@pytest.mark.parametrize("k", [2, 3, 5, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_equal_projections_and_sum_one(k, seed):
    grads = random_gradients(k, seed=seed)
    alpha = IMTLG().aggregate(inputs_for(grads)).weights
    d = alpha @ grads
    proj = grads @ d / grads.norm(dim=1)
    torch.testing.assert_close(proj, proj.mean().expand(k), rtol=1e-9, atol=1e-10)
    assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(alpha, coordinate_imtl_g(grads), rtol=1e-8, atol=1e-10)


def test_hand_computed_orthogonal_pair():
    # g1 = 2 e1, g2 = e2: d = (2a, 1 - a) with 2a = 1 - a
    grads = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(IMTLG().aggregate(inputs_for(grads)).weights,
                               torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))


def test_permutation_invariance():
    grads = random_gradients(6, seed=3)
    perm = torch.tensor([5, 3, 1, 0, 2, 4])
    w = IMTLG().aggregate(inputs_for(grads)).weights
    torch.testing.assert_close(IMTLG().aggregate(inputs_for(grads[perm])).weights, w[perm], rtol=1e-8, atol=1e-10)


def test_zero_gradient_gets_weight_zero():
    grads = random_gradients(3, seed=2)
    grads = torch.cat([grads, torch.zeros(1, grads.shape[1], dtype=torch.float64)])
    alpha = imtl_g_weights(grads @ grads.T)
    assert alpha[3] == 0.0
    torch.testing.assert_close(alpha[:3], coordinate_imtl_g(grads[:3]))


def test_only_one_nonzero_gradient_gets_all_the_weight():
    """With every other gradient zero, the rule runs on the one left: d = g_i, alpha_i = 1."""
    g = random_gradients(1, seed=4)
    grads = torch.cat([torch.zeros(2, 20, dtype=torch.float64), g])
    torch.testing.assert_close(imtl_g_weights(grads @ grads.T), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64),
                               rtol=0, atol=0)


def test_gradient_below_1e_12_of_the_largest_counts_as_zero():
    """A gradient 1e-14 times the largest has no reliable direction: weight 0, as a zero one."""
    grads = random_gradients(3, seed=5)
    tiny = torch.cat([grads, 1e-14 * random_gradients(1, seed=6)])
    alpha = imtl_g_weights(tiny @ tiny.T)
    assert alpha[3] == 0.0
    torch.testing.assert_close(alpha[:3], coordinate_imtl_g(grads), rtol=1e-8, atol=1e-10)


def test_only_the_symmetric_part_of_the_gram_matrix_is_used():
    """An asymmetric Gram matrix (rounding, exaggerated here) gives its symmetric part's weights."""
    grads = random_gradients(4, seed=7)
    gram = grads @ grads.T
    e = 0.05 * torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(imtl_g_weights(gram + e - e.T), imtl_g_weights(gram), rtol=1e-10, atol=1e-12)


def test_heads_and_mode():
    agg = IMTLG().aggregate(inputs_for(random_gradients(3)))
    torch.testing.assert_close(agg.head_weights, torch.ones(3, dtype=torch.float64))
    assert IMTLG(mode="representation").mode == "representation"
    with pytest.raises(ValueError, match="mode"):
        IMTLG(mode="fast")


def test_registry():
    assert repr(gb.methods.base.make_method("imtl_g")) == "IMTLG(mode='exact')"


def test_end_to_end():
    check_end_to_end(IMTLG(), k=3)


def test_end_to_end_representation():
    check_end_to_end(IMTLG(mode="representation"), k=3, features=True)


def test_doc_snippets_run():
    assert run_doc_snippets("imtl_g") >= 1
