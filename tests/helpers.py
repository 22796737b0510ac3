"""Shared test fixtures: small multi-task models and engine-only methods."""

from __future__ import annotations

import torch
from torch import nn

from gradbalance.methods.base import Aggregation, Method, TaskInputs


class FixedWeights(Method):
    """A Gram-based test method that applies fixed weights (exercises the exact engine)."""

    requires = "gram"

    def __init__(self, weights, head_weights=None):
        self.w = torch.as_tensor(weights, dtype=torch.float64)
        self.hw = None if head_weights is None else torch.as_tensor(head_weights, dtype=torch.float64)

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        return Aggregation(weights=self.w.to(inputs.losses.device), head_weights=self.hw)


class MultiTaskNet(nn.Module):
    """A shared trunk and k linear heads (regression losses)."""

    def __init__(self, k: int, d_in: int = 6, width: int = 16, act: type[nn.Module] = nn.ReLU,
                 norm: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        layers = [nn.Linear(d_in, width), act()]
        if norm:
            layers.append(nn.LayerNorm(width))
        layers += [nn.Linear(width, width), act()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(k))

    def forward(self, x):
        z = self.trunk(x)
        return z, [h(z).squeeze(-1) for h in self.heads]


def make_batch(k: int, n: int = 32, d_in: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randn(n, k, generator=g)
    return x, y


def task_losses(model: MultiTaskNet, x, y):
    z, outs = model(x)
    return z, [((o - y[:, i]) ** 2).mean() * (i + 1) for i, o in enumerate(outs)]


def snapshot(model: nn.Module, opt: torch.optim.Optimizer | None = None):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    state = None
    if opt is not None:
        state = {
            i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for i, s in enumerate(opt.state.values())
        }
    return params, grads, state


def assert_same_snapshot(a, b):
    pa, ga, sa = a
    pb, gb_, sb = b
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n
        assert (ga[n] is None) == (gb_[n] is None), n
        if ga[n] is not None:
            assert torch.equal(ga[n], gb_[n]), n
    assert (sa is None) == (sb is None)
    if sa is not None:
        assert sa.keys() == sb.keys()
        for i in sa:
            for key in sa[i]:
                va, vb = sa[i][key], sb[i][key]
                assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb
