"""StepInfo.head_weights (what the heads' gradients were really scaled by) and the cosine matrix in
``to_dict(cosines="matrix")``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradbalance as gb
from gradbalance import StepInfo
from tests.helpers import FixedWeights, MultiTaskNet, make_batch, task_losses

K = 3


class _CommonHead(nn.Module):
    """Trunk, k heads, and a bias ``c`` added to every output: a task-specific (non-shared)
    parameter that every loss reaches, so its gradient is ``sum_i head_weight_i dL_i/dc``."""

    def __init__(self):
        super().__init__()
        self.net = MultiTaskNet(K)
        self.c = nn.Parameter(torch.tensor([0.3]))

    def forward(self, x):
        z, outs = self.net(x)
        return z, [o + (1 + j) * self.c[0] for j, o in enumerate(outs)]


def _losses(model, x, y):
    z, outs = model(x)
    # every loss reads c; task j also reads its own head
    return z, [((o - y[:, j]) ** 2).mean() * (j + 1) for j, o in enumerate(outs)]


def _per_task_head_grads(model, x, y):
    heads = list(model.net.heads.parameters()) + [model.c]
    _, losses = _losses(model, x, y)
    return [torch.autograd.grad(loss, heads, retain_graph=True, allow_unused=True) for loss in losses]


def _methods():
    return [m for m, d in gb.available_methods().items() if not d.lower().startswith("alias")]


@pytest.mark.parametrize("method", _methods())
def test_head_gradients_are_the_reported_head_weights_times_the_task_gradients(method):
    """For every registered method: each head parameter's .grad is sum_i w_i dL_i/dp with w the
    weights the StepInfo says the heads got (head_weights, else weights)."""
    torch.manual_seed(0)
    model = _CommonHead()
    x, y = make_batch(K)
    per_task = _per_task_head_grads(model, x, y)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), method, shared_params=model.net.trunk)
    for _ in range(3):  # stateful methods move away from their first-step weights
        opt.zero_grad()
        z, losses = _losses(model, x, y)
        info = opt.backward(losses, features=z)
    w = info.effective_head_weights()
    assert w is not None and w.shape == (K,)
    heads = list(model.net.heads.parameters()) + [model.c]
    for j, p in enumerate(heads):
        expected = sum(float(w[i]) * per_task[i][j] for i in range(K) if per_task[i][j] is not None)
        torch.testing.assert_close(p.grad, expected, atol=1e-5, rtol=1e-4, msg=f"{method}: head param {j}")
    if info.head_weights is None:  # then the heads got exactly `weights`
        assert info.weights is not None
        assert "head_weight/task0" not in info.to_dict()
    else:
        assert info.to_dict()["head_weight/task1"] == pytest.approx(float(info.head_weights[1]))


def test_nash_mtl_heads_get_the_unclipped_weights():
    """Nash-MTL clips the shared update only: weights = clip * a, head_weights = a."""
    model = MultiTaskNet(K)
    x, y = make_batch(K)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), gb.methods.NashMTL(max_norm=1e-3),
                         shared_params=model.trunk)
    _, losses = task_losses(model, x, y)
    info = opt.backward(losses)
    clip = info.extras["clip"]
    assert clip < 1e-2  # the clip really acted
    torch.testing.assert_close(info.weights, info.head_weights * clip, atol=1e-12, rtol=1e-9)
    assert bool((info.head_weights > 10 * info.weights).all())


def test_head_weights_none_for_loss_weighting_and_for_unknown_heads():
    model = MultiTaskNet(K)
    x, y = make_batch(K)
    # a plain weighting: the heads get `weights`
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([0.2, 0.3, 0.5]),
                         shared_params=model.trunk)
    _, losses = task_losses(model, x, y)
    info = opt.backward(losses)
    assert info.head_weights is None and torch.equal(info.effective_head_weights(), info.weights)
    # a method with its own head weights, given explicitly
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([0.2, 0.3, 0.5], [1.0, 2.0, 3.0]),
                         shared_params=model.trunk)
    opt.zero_grad()
    _, losses = task_losses(model, x, y)
    info = opt.backward(losses)
    assert info.head_weights.tolist() == [1.0, 2.0, 3.0]
    # DB-MTL (loss path) without shared_params: the wrapper cannot tell heads from trunk, every
    # parameter gets `weights`, and StepInfo says so (None), even though the method has head weights
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "db_mtl")
    if opt.method.requires == "losses":
        opt.zero_grad()
        _, losses = task_losses(model, x, y)
        info = opt.backward(losses)
        assert info.head_weights is None


def _info(cos):
    k = cos.shape[0]
    return StepInfo(weights=torch.full((k,), 1.0 / k), losses=torch.ones(k), grad_norms=torch.ones(k),
                    cosine=cos, engine="loop", task_names=tuple("abcd"[:k]))


def test_to_dict_cosine_matrix_keys_are_the_upper_triangle():
    cos = torch.tensor([[1.0, -0.5, 0.25], [-0.5, 1.0, 0.75], [0.25, 0.75, 1.0]])
    flat = _info(cos).to_dict(cosines="matrix")
    pairs = {k: v for k, v in flat.items() if k.count("/") == 2 and k.startswith("cosine/")}
    assert pairs == {"cosine/a/b": -0.5, "cosine/a/c": 0.25, "cosine/b/c": 0.75}
    assert flat["cosine/min"] == -0.5 and flat["cosine/mean"] == pytest.approx(1 / 6) and flat["conflicts"] == 1
    summary = _info(cos).to_dict()
    assert not any(k.count("/") == 2 for k in summary)  # the default stays a summary
    with pytest.raises(ValueError, match="cosines"):
        _info(cos).to_dict(cosines="full")


def test_to_dict_matrix_from_a_real_step_matches_the_gradients():
    model = MultiTaskNet(K)
    x, y = make_batch(K)
    params = list(model.trunk.parameters())
    _, losses = task_losses(model, x, y)
    g = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, retain_graph=True)])
                     for loss in losses])
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([1.0, 1.0, 1.0]),
                         shared_params=model.trunk)
    _, losses = task_losses(model, x, y)
    flat = opt.backward(losses).to_dict(cosines="matrix")
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        expected = float(torch.nn.functional.cosine_similarity(g[i], g[j], dim=0))
        assert flat[f"cosine/task{i}/task{j}"] == pytest.approx(expected, abs=1e-5)
