"""Linear scalarisation ("sum", "mean"): the update is exactly that of one ordinary backward."""

from __future__ import annotations

import pytest
import torch

import gradbalance as gb
from gradbalance.methods import Mean, Sum, TaskInputs
from tests.helpers import MultiTaskNet, make_batch, task_losses

D = torch.float64


@pytest.mark.parametrize("k", [1, 2, 5])
def test_weights(k):
    inputs = TaskInputs(losses=torch.linspace(0.5, 3.0, k, dtype=D))
    torch.testing.assert_close(Sum().aggregate(inputs).weights, torch.ones(k, dtype=D), rtol=0, atol=0)
    torch.testing.assert_close(Mean().aggregate(inputs).weights, torch.full((k,), 1.0 / k, dtype=D), rtol=0, atol=0)
    assert Sum.requires == Mean.requires == "losses"  # one ordinary backward, no per-task gradients


@pytest.mark.parametrize("name,reduce", [("sum", torch.sum), ("mean", torch.mean)])
def test_update_equals_backward_of_the_sum_or_mean_on_every_parameter(name, reduce):
    """Heads included: task i's head gets weight 1 ("sum") or 1/k ("mean"), as with
    ``torch.stack(losses).sum().backward()`` / ``.mean().backward()``."""
    k = 3
    model = MultiTaskNet(k).double()
    x, y = make_batch(k)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), name, shared_params=model.trunk)
    _, losses = task_losses(model, x.double(), y.double())
    opt.backward(losses)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _, losses = task_losses(model, x.double(), y.double())
    reduce(torch.stack(losses)).backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-14)
