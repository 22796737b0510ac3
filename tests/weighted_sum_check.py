"""End-to-end check shared by the Gram-based method tests: through ``gb.GradBalance`` the shared
``.grad`` must equal ``sum_i w_i g_i`` and each head ``hw_i`` times its own gradient, with ``w``
and ``hw`` computed independently from per-task autograd gradients."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

import gradbalance as gb
from gradbalance.methods.base import TaskInputs
from tests.helpers import MultiTaskNet, assert_same_snapshot, make_batch, snapshot, task_losses


def random_gradients(k: int, p: int = 20, seed: int = 0, conflict: bool = True) -> torch.Tensor:
    """A (k, p) float64 gradient matrix with varied norms; with ``conflict`` some pairs conflict."""
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(k, p, generator=g, dtype=torch.float64)
    grads = grads * torch.empty(k, 1, dtype=torch.float64).uniform_(0.3, 3.0, generator=g)
    if not conflict:
        grads = grads.abs()
    return grads


def inputs_for(grads: torch.Tensor, step: int = 0, losses: torch.Tensor | None = None) -> TaskInputs:
    k = grads.shape[0]
    if losses is None:
        losses = torch.linspace(0.5, 2.0, k, dtype=torch.float64)
    return TaskInputs(losses=losses, gram=grads @ grads.T,
                      task_names=tuple(f"task{i}" for i in range(k)), step=step)


def check_end_to_end(method, k: int = 3, features: bool = False) -> None:
    # seeds and shifted targets chosen so that the mean gradient conflicts with a task
    model = MultiTaskNet(k, seed=4).double()
    x, y = make_batch(k, seed=5)
    x, y = x.double(), y.double()
    y[:, 0] += 3.0
    y[:, 1] -= 3.0
    shared = list(model.trunk.parameters())
    heads = [list(h.parameters()) for h in model.heads]
    z, losses = task_losses(model, x, y)
    wrt = [z] if features else shared
    rows = [torch.cat([g.flatten() for g in torch.autograd.grad(loss, wrt, retain_graph=True)])
            for loss in losses]
    grads = torch.stack(rows)
    names = tuple(f"task{i}" for i in range(k))
    ref = copy.deepcopy(method).aggregate(TaskInputs(
        losses=torch.stack(losses).detach(), gram=grads @ grads.T, task_names=names, step=0))
    w = ref.weights
    hw = ref.head_weights if ref.head_weights is not None else w
    # expected shared gradient: sum_i w_i g_i on the shared parameters (via the chain rule in
    # representation mode, where g_i lives on z)
    if features:
        expected_shared = torch.autograd.grad(sum(wi * li for wi, li in zip(w, losses)), shared,
                                              retain_graph=True)
    else:
        flat = w @ grads
        expected_shared = torch.split(flat, [p.numel() for p in shared])
    expected_heads = [[hw[i] * g for g in torch.autograd.grad(losses[i], heads[i], retain_graph=True)]
                      for i in range(k)]
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), method, shared_params=model.trunk)
    info = opt.backward(losses, features=z if features else None)
    torch.testing.assert_close(info.weights, w, rtol=1e-6, atol=1e-9)
    for p, e in zip(shared, expected_shared):
        torch.testing.assert_close(p.grad, e.reshape(p.shape), rtol=1e-6, atol=1e-9)
    for i in range(k):
        for p, e in zip(heads[i], expected_heads[i]):
            torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-9)
    # not a trivial case: the weights are not all equal
    assert float(w.max() - w.min()) > 1e-3


def run_doc_snippets(page: str) -> int:
    """Execute every ```python block of ``docs/methods/<page>.md``; returns how many ran."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "methods" / f"{page}.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    for block in blocks:
        exec(compile(block, f"docs/methods/{page}.md", "exec"), {})  # noqa: S102 - our own docs
    return len(blocks)


def check_resume(make, k: int = 3, before: int = 3, after: int = 3, features: bool = False):
    """Save at step ``before``, load into a fresh model/optimizer/method, continue ``after`` steps:
    parameters, gradients, optimizer state and method state must match bit for bit."""

    def run(model, opt, start, steps):
        for step in range(start, start + steps):
            x, y = make_batch(k, seed=100 + step)
            opt.zero_grad()
            z, losses = task_losses(model, x.double(), y.double())
            opt.backward(losses, features=z if features else None)
            opt.step()

    model = MultiTaskNet(k).double()
    opt = gb.GradBalance(torch.optim.Adam(model.parameters(), lr=1e-2), make(), shared_params=model.trunk)
    run(model, opt, 0, before)
    saved_opt, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    run(model, opt, before, after)
    fresh = MultiTaskNet(k, seed=123).double()
    fresh.load_state_dict(saved_model)
    opt2 = gb.GradBalance(torch.optim.Adam(fresh.parameters(), lr=1e-2), make(), shared_params=fresh.trunk)
    opt2.load_state_dict(saved_opt)
    run(fresh, opt2, before, after)
    assert_same_snapshot(snapshot(model, opt), snapshot(fresh, opt2))
    sa, sb = opt.method.state_dict(), opt2.method.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]) if torch.is_tensor(sa[key]) else sa[key] == sb[key], key
    return opt.method
