"""GLS: the weights are the gradient of the geometric mean; the update equals its backward."""

from __future__ import annotations

import copy

import pytest
import torch

import gradbalance as gb
from gradbalance.methods import GLS, TaskInputs
from tests.helpers import MultiTaskNet, make_batch, task_losses
from tests.modern_checks import check_one_step


@pytest.mark.parametrize("losses", [[1.0, 4.0], [0.3, 2.0, 7.5], [1e-30, 1e30, 1.0, 5.0]])
def test_weights_are_the_autograd_gradient_of_the_geometric_mean(losses):
    values = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(values.log().mean().exp(), values)
    got = GLS().aggregate(TaskInputs(losses=values.detach())).weights
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert bool(torch.isfinite(got).all())


def test_update_equals_backward_of_the_geometric_mean_on_a_model():
    k = 3
    model = MultiTaskNet(k)
    twin = copy.deepcopy(model)
    x, y = make_batch(k)
    opt = gb.GradBalance(
        torch.optim.SGD(model.parameters(), lr=0.1), "gls", shared_params=model.trunk
    )
    info = opt.backward(task_losses(model, x, y)[1])
    assert info.engine == "losses"
    torch.stack(task_losses(twin, x, y)[1]).prod().pow(1 / k).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_invariant_to_task_order():
    losses = torch.tensor([0.5, 3.0, 1.2], dtype=torch.float64)
    perm = torch.tensor([1, 2, 0])
    w = GLS().aggregate(TaskInputs(losses=losses)).weights
    torch.testing.assert_close(GLS().aggregate(TaskInputs(losses=losses[perm])).weights, w[perm])


def test_non_positive_loss_raises():
    with pytest.raises(ValueError, match=r"\['b'\]"):
        GLS().aggregate(
            TaskInputs(losses=torch.tensor([1.0, 0.0], dtype=torch.float64), task_names=("a", "b"))
        )
    assert repr(GLS()) == "GLS()"


def test_end_to_end_step_and_heads():
    agg, info = check_one_step("gls")
    torch.testing.assert_close(info.weights, agg.weights)
