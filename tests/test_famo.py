"""FAMO: weights sum to 1, the logit update (softmax Jacobian + Adam), the delayed update, state."""

from __future__ import annotations

import pytest
import torch

import gradbalance as gb
from gradbalance.methods import FAMO, TaskInputs
from tests.helpers import MultiTaskNet, make_batch, task_losses
from tests.modern_checks import check_deterministic, check_one_step, check_resume_bit_identical


def _step(method, losses):
    agg = method.aggregate(TaskInputs(losses=torch.as_tensor(losses, dtype=torch.float64)))
    method.commit(agg.pending)
    return agg


def test_weights_formula_and_sum_to_one():
    method = FAMO(min_losses=[0.1, 0.0, 0.5])
    for losses in ([1.0, 2.0, 3.0], [0.8, 1.5, 2.0], [0.5, 1.4, 0.9]):
        agg = _step(method, losses)
        xi = agg.extras["logits"]
        z = torch.softmax(xi, 0)
        gap = torch.tensor(losses, dtype=torch.float64) - torch.tensor(
            [0.1, 0.0, 0.5], dtype=torch.float64
        )
        c = (z / gap).sum()
        torch.testing.assert_close(agg.weights, z / (c * gap))
        torch.testing.assert_close(agg.weights.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_logits_follow_torch_adam_on_the_softmax_jacobian():
    lr, wd = 0.1, 0.01
    seq = [[1.0, 2.0, 4.0], [0.9, 1.5, 3.9], [0.85, 1.0, 3.0], [0.7, 0.9, 2.9], [0.69, 0.5, 2.0]]
    method = FAMO(lr=lr, weight_decay=wd)
    xi = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([xi], lr=lr, weight_decay=wd)
    prev = None
    for losses in seq:
        cur = torch.tensor(losses, dtype=torch.float64)
        if prev is not None:
            delta = prev.log() - cur.log()
            (grad,) = torch.autograd.grad(torch.softmax(xi, 0), xi, grad_outputs=delta)
            xi.grad = grad
            adam.step()
        agg = _step(method, losses)
        torch.testing.assert_close(agg.extras["logits"], xi.detach(), rtol=1e-12, atol=1e-14)
        prev = cur
    assert method.state_dict()["adam_steps"] == len(seq) - 1


def test_task_whose_loss_fell_least_gains_weight():
    method = FAMO()
    losses = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    rates = torch.tensor([0.9, 0.97, 0.8], dtype=torch.float64)  # task 1 falls least, task 2 most
    for _ in range(20):
        agg = _step(method, losses)
        losses = losses * rates
    z = torch.softmax(agg.extras["logits"], 0)
    assert z[1] > z[0] > z[2]
    assert z[1] > 1 / 3 > z[2]


def test_first_step_uses_uniform_logits_and_aggregate_is_pure():
    method = FAMO()
    a = method.aggregate(TaskInputs(losses=torch.tensor([2.0, 4.0], dtype=torch.float64)))
    torch.testing.assert_close(a.weights, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    assert method.state_dict()["logits"].numel() == 0  # nothing committed by aggregate
    method.commit(a.pending)
    b = method.aggregate(TaskInputs(losses=torch.tensor([1.0, 4.0], dtype=torch.float64)))
    c = method.aggregate(TaskInputs(losses=torch.tensor([1.0, 4.0], dtype=torch.float64)))
    assert torch.equal(b.weights, c.weights)
    assert torch.equal(method.state_dict()["logits"], torch.zeros(2, dtype=torch.float64))


def test_uses_no_per_task_gradients_and_skipped_steps_do_not_update():
    k = 3
    model = MultiTaskNet(k)
    opt = gb.GradBalance(
        torch.optim.SGD(model.parameters(), lr=0.05), "famo", shared_params=model.trunk
    )
    x, y = make_batch(k)
    info = opt.backward(task_losses(model, x, y)[1])
    assert info.engine == "losses" and info.grad_norms is None
    opt.zero_grad()  # the step was abandoned: nothing committed
    assert opt._balancer.method.state_dict()["prev_losses"].numel() == 0
    for _ in range(3):
        opt.zero_grad()
        opt.backward(task_losses(model, x, y)[1])
        opt.step()
    state = opt._balancer.method.state_dict()
    assert state["adam_steps"] == 2 and state["prev_losses"].shape == (3,)


def test_validation():
    with pytest.raises(ValueError, match="lr"):
        FAMO(lr=0)
    with pytest.raises(ValueError, match="weight_decay"):
        FAMO(weight_decay=-1)
    with pytest.raises(ValueError, match="min_losses"):
        FAMO(min_losses=[])
    with pytest.raises(ValueError, match=r"task\(s\) \[1\]"):
        FAMO(min_losses=0.5).aggregate(
            TaskInputs(losses=torch.tensor([1.0, 0.5], dtype=torch.float64))
        )
    with pytest.raises(ValueError, match="2 entries but got 3"):
        FAMO(min_losses=[0.0, 0.0]).aggregate(TaskInputs(losses=torch.ones(3, dtype=torch.float64)))
    method = FAMO()
    _step(method, [1.0, 2.0])
    with pytest.raises(ValueError, match="2 tasks but got 3"):
        _step(method, [1.0, 2.0, 3.0])
    assert repr(FAMO()) == "FAMO(lr=0.025, weight_decay=0.001, min_losses=0.0)"


def test_end_to_end_step_and_heads():
    _, info = check_one_step("famo")
    torch.testing.assert_close(info.weights.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_determinism_and_resume():
    check_deterministic(FAMO)
    check_resume_bit_identical(FAMO)


def test_invariant_to_task_order():
    seq = [[1.0, 2.0, 4.0], [0.9, 1.9, 3.0], [0.8, 1.0, 2.9]]
    perm = [2, 0, 1]
    a, b = FAMO(), FAMO()
    for losses in seq:
        wa = _step(a, losses).weights
        wb = _step(b, [losses[p] for p in perm]).weights
        torch.testing.assert_close(wb, wa[perm], rtol=1e-12, atol=0)
