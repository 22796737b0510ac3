"""The NaN/inf check on the combined gradient (``paths.grads.check_finite_grads``): it must see
every non-finite entry, whatever the others are, and never refuse a finite half-precision
gradient whose entries sum past float16's range."""

from __future__ import annotations

import pytest
import torch

import gradbalance as gb
from gradbalance.paths.grads import check_finite_grads


def _grads(dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.randn(64, 32, dtype=dtype), None, torch.randn(7, dtype=dtype)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_bad_entry_anywhere_is_found(dtype, bad):
    for where in (0, 2):
        grads = _grads(dtype)
        grads[where].view(-1)[3] = bad
        with pytest.raises(gb.NonFiniteError, match="NaN or inf"):
            check_finite_grads(grads, ["a", "b"])


def test_opposite_infinities_do_not_cancel():
    grads = _grads()
    grads[0].view(-1)[0] = float("inf")
    grads[2][0] = float("-inf")
    with pytest.raises(gb.NonFiniteError):
        check_finite_grads(grads, ["a", "b"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_finite_half_precision_gradient_passes(dtype):
    # 300,000 entries of 1.0 sum to 3e5, past float16's largest finite value (65504)
    check_finite_grads([torch.ones(300_000, dtype=dtype)], ["a"])


def test_finite_gradients_pass_and_no_gradient_is_refused():
    check_finite_grads(_grads(), ["a", "b"])
    with pytest.raises(ValueError, match="reach none"):
        check_finite_grads([None, None], ["a", "b"])


def test_loss_path_refuses_a_nan_gradient_of_a_finite_loss_and_writes_nothing():
    """sqrt at 0 has a finite value and an infinite derivative: the loss-weighting path (one
    backward of the weighted sum) must refuse it before touching .grad."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(3, 4)
    heads = torch.nn.ModuleList(torch.nn.Linear(4, 1) for _ in range(2))
    opt = gb.GradBalance(torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1), "mean",
                         shared_params=trunk)
    z = trunk(torch.randn(5, 3))
    losses = [heads[0](z).pow(2).mean(), (heads[1](z) * 0).sum().sqrt()]
    with pytest.raises(gb.NonFiniteError):
        opt.backward(losses)
    assert all(p.grad is None for p in [*trunk.parameters(), *heads.parameters()])
