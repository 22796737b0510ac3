"""Engine: ``head_weights`` on the paths that finish with one weighted backward (losses-only
methods and representation mode) need the graph twice; the heads get their own weights."""

from __future__ import annotations

import pytest
import torch

import gradbalance as gb
from gradbalance.methods.base import Aggregation, Method, TaskInputs
from tests.helpers import MultiTaskNet, make_batch, task_losses


class _Fixed(Method):
    def __init__(self, requires, weights, head_weights, mode="exact"):
        self.requires = requires
        self.mode = mode
        self.w = torch.tensor(weights, dtype=torch.float64)
        self.hw = torch.tensor(head_weights, dtype=torch.float64)

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        return Aggregation(weights=self.w, head_weights=self.hw)


@pytest.mark.parametrize("requires,mode", [("losses", "exact"), ("gram", "representation")])
def test_head_weights_on_single_backward_paths(requires, mode):
    k, w, hw = 2, [0.3, 0.7], [2.0, -1.0]
    model = MultiTaskNet(k)
    x, y = make_batch(k)
    _, losses = task_losses(model, x, y)
    (losses[0] * w[0] + losses[1] * w[1]).backward()
    shared = {n: p.grad.clone() for n, p in model.trunk.named_parameters()}
    model.zero_grad(set_to_none=True)
    _, losses = task_losses(model, x, y)
    (losses[0] * hw[0] + losses[1] * hw[1]).backward()
    heads = {n: p.grad.clone() for n, p in model.heads.named_parameters()}
    model.zero_grad(set_to_none=True)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), _Fixed(requires, w, hw, mode),
                         shared_params=model.trunk)
    z, losses = task_losses(model, x, y)
    opt.backward(losses, features=z if mode == "representation" else None)
    for n, p in model.trunk.named_parameters():
        torch.testing.assert_close(p.grad, shared[n], atol=1e-6, rtol=0)
    for n, p in model.heads.named_parameters():
        torch.testing.assert_close(p.grad, heads[n], atol=1e-6, rtol=0)
