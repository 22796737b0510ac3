"""Shared checks for the stateful classic methods (PCGrad, GradNorm, UW, DWA, RLW)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

import gradbalance as gb
from tests.helpers import MultiTaskNet, make_batch, task_losses


def train(opt, model, k: int, steps: range, hook: Callable | None = None) -> list:
    """Steps on batches that depend on the step index only; returns the StepInfos."""
    infos = []
    for s in steps:
        x, y = make_batch(k, n=16, seed=100 + s)
        opt.zero_grad()
        _, losses = task_losses(model, x, y)
        infos.append(opt.backward(losses))
        opt.step()
        if hook is not None:
            hook(opt, s)
    return infos


def assert_resume_bit_identical(make_method: Callable[[], gb.methods.Method], k: int = 3,
                                before: int = 4, after: int = 4, hook: Callable | None = None):
    """Save at step ``before``, load into a fresh model/optimizer/method, continue ``after``
    steps: parameters, optimizer state and method state must match bit for bit."""
    model = MultiTaskNet(k)
    opt = gb.GradBalance(torch.optim.Adam(model.parameters(), lr=0.01), make_method(),
                         shared_params=model.trunk)
    train(opt, model, k, range(before), hook)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    infos = train(opt, model, k, range(before, before + after), hook)

    twin = MultiTaskNet(k, seed=123)
    twin.load_state_dict(saved_model)
    opt2 = gb.GradBalance(torch.optim.Adam(twin.parameters(), lr=0.01), make_method(),
                          shared_params=twin.trunk)
    opt2.load_state_dict(saved_opt)
    infos2 = train(opt2, twin, k, range(before, before + after), hook)

    for a, b in zip(infos, infos2):
        assert torch.equal(a.weights, b.weights)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name
    sa, sb = opt.method.state_dict(), opt2.method.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        va, vb = sa[key], sb[key]
        assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb, key

    # the method's state matters: without it (a fresh method) the continuation differs
    third = MultiTaskNet(k, seed=123)
    third.load_state_dict(saved_model)
    opt3 = gb.GradBalance(torch.optim.Adam(third.parameters(), lr=0.01), make_method(),
                          shared_params=third.trunk)
    opt3.load_state_dict({key: v for key, v in saved_opt.items() if key != "gradbalance"})
    infos3 = train(opt3, third, k, range(before, before + after), hook)
    assert any(not torch.equal(a.weights, c.weights) for a, c in zip(infos, infos3))
    return infos
