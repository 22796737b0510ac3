"""Checks shared by the gradbalance.nn tests: one balanced step against hand-computed gradients."""

from __future__ import annotations

import torch

import gradbalance as gb
from tests.helpers import FixedWeights

# Registered methods named by the issue (whichever exist on this branch) + an engine-only
# Gram method so that the exact (gradient-combining) path is always exercised.
METHODS = [m for m in ("mean", "mgda", "uw") if m in gb.available_methods()] + ["fixed-gram"]
# Methods that take their task gradients w.r.t. the shared representation (features=...).
REPRESENTATION_METHODS = [m for m in ("mgda_ub",) if m in gb.available_methods()] + ["fixed-repr"]


class FixedRepresentation(FixedWeights):
    """FixedWeights in representation mode: the engine's features path (MGDA-UB style)."""

    mode = "representation"


def make(method: str):
    if method == "fixed-gram":
        return FixedWeights([0.3, 0.7])
    if method == "fixed-repr":
        return FixedRepresentation([0.6, 0.4])
    return method


def _grads(loss, params):
    if not params:
        return []
    gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts]) if ts else torch.zeros(0)


def check_balanced_steps(model, method, losses_fn, steps=3, lr=0.05, shared_params="model"):
    """Run ``steps`` GradBalance steps (``losses_fn`` returns the losses dict, or
    ``(losses, features)``); at each, check against autograd by hand that

    - the shared parameters get ``sum_i w_i g_i`` (w = ``info.weights``);
    - each task's parameters that only its own loss reaches get ``c_t g_t`` with ``c_t >= 0``
      (collinear with the task's own gradient: no other task's gradient leaks into them);

    and that every parameter moved. Returns the list of StepInfo."""
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=lr), make(method),
                         shared_params=model if shared_params == "model" else shared_params)
    shared = model.shared_parameters()
    infos = []
    for _ in range(steps):
        before = [p.detach().clone() for p in model.parameters()]
        losses = losses_fn()
        features = None
        if isinstance(losses, tuple):  # (losses, features)
            losses, features = losses
        names = list(losses)
        g_shared = [_flat(_grads(losses[t], shared)) for t in names]
        own = {t: model.task_parameters(t) for t in names}
        g_own = {t: _flat(_grads(losses[t], own[t])) for t in names}
        others_reach = {
            t: any(_flat(_grads(losses[s], own[t])).abs().sum() > 0 for s in names if s != t)
            for t in names
        }
        opt.zero_grad()
        info = opt.backward(losses, features=features)
        infos.append(info)
        w = info.weights
        assert w is not None and torch.isfinite(w).all()
        if shared:
            got = _flat([p.grad for p in shared])
            want = sum(float(w[i]) * g_shared[i] for i in range(len(names)))
            torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-7)
        for t in names:
            if others_reach[t]:
                continue
            got = _flat([torch.zeros_like(p) if p.grad is None else p.grad for p in own[t]])
            ref = g_own[t]
            c = float(got @ ref) / float(ref @ ref)
            assert c >= 0
            torch.testing.assert_close(got, c * ref, rtol=1e-5, atol=1e-7)
        opt.step()
        moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
        assert any(moved)
    return infos
