"""Shared end-to-end checks for the methods of tests/test_{gradvac,graddrop,config,...}.py."""

from __future__ import annotations

import copy

import torch

import gradbalance as gb
from gradbalance.methods.base import TaskInputs
from tests.helpers import MultiTaskNet, make_batch, task_losses


def per_task_grads(model: MultiTaskNet, losses):
    """Plain autograd: the (k, P) trunk gradients and each task's own head gradients."""
    trunk = list(model.trunk.parameters())
    rows, heads = [], []
    for i, loss in enumerate(losses):
        gs = torch.autograd.grad(loss, trunk, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
        heads.append(
            torch.autograd.grad(loss, list(model.heads[i].parameters()), retain_graph=True)
        )
    return torch.stack(rows), heads


def check_one_step(method, k: int = 3, seed: int = 0):
    """One ``GradBalance.backward`` on MultiTaskNet writes exactly what the method says.

    The shared ``.grad`` must equal ``weights @ G`` (or the method's ``direction``), and head ``i``
    must get ``head_weights[i]`` times task i's own head gradient (autograd reference). Returns
    the method's aggregation and the StepInfo.
    """
    model = MultiTaskNet(k, seed=seed)
    x, y = make_batch(k, seed=seed + 1)
    opt = gb.GradBalance(
        torch.optim.SGD(model.parameters(), lr=0.1), method, shared_params=model.trunk
    )
    _, losses = task_losses(model, x, y)
    grads, heads = per_task_grads(model, losses)
    info = opt.backward(losses)
    detached = torch.stack([v.detach() for v in losses]).double()
    agg = opt._balancer.method.aggregate(
        TaskInputs(
            losses=detached,
            gram=(grads @ grads.T).double(),
            grads=grads,
            task_names=info.task_names,
        )
    )
    if agg.direction is not None:
        expected = agg.direction
    else:
        expected = agg.weights.to(grads.dtype) @ grads
    got = torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    hw = agg.head_weights if agg.head_weights is not None else agg.weights
    if hw is None:
        hw = torch.ones(k)
    for i in range(k):
        for p, g in zip(model.heads[i].parameters(), heads[i]):
            torch.testing.assert_close(p.grad, g * float(hw[i]), atol=1e-6, rtol=1e-5)
    return agg, info


def train(make_method, k: int = 3, steps: int = 4, start=None, model=None, first_batch: int = 0):
    """Train MultiTaskNet with Adam for ``steps`` steps (a new batch each step)."""
    model = MultiTaskNet(k) if model is None else model
    opt = gb.GradBalance(
        torch.optim.Adam(model.parameters(), lr=0.01), make_method(), shared_params=model.trunk
    )
    if start is not None:
        opt.load_state_dict(start)
    infos = []
    for s in range(first_batch, first_batch + steps):
        x, y = make_batch(k, seed=100 + s)
        opt.zero_grad()
        _, losses = task_losses(model, x, y)
        infos.append(opt.backward(losses))
        opt.step()
    return model, opt, infos


def check_resume_bit_identical(make_method, k: int = 3, before: int = 3, after: int = 3):
    """Save at step ``before``, load into a fresh model/optimizer/method, continue: same bits."""
    full, _, _ = train(make_method, k, before + after)
    half, opt, _ = train(make_method, k, before)
    state = copy.deepcopy(opt.state_dict())
    fresh = MultiTaskNet(k, seed=123)
    fresh.load_state_dict(half.state_dict())
    resumed, _, _ = train(make_method, k, after, start=state, model=fresh, first_batch=before)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def check_deterministic(make_method, k: int = 3, steps: int = 3):
    """Two runs from scratch with the same construction give the same parameters, bit for bit."""
    a, _, _ = train(make_method, k, steps)
    b, _, _ = train(make_method, k, steps)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
