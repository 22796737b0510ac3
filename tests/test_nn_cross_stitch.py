"""CrossStitch: identity mixing = independent towers, the mixing rule, gradients, learning rates."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradbalance as gb
from gradbalance.nn import CrossStitch, CrossStitchUnit
from tests.helpers import FixedWeights
from tests.nn_checks import METHODS, check_balanced_steps


def _tower():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))


def _towers(k=2, seed=0):
    torch.manual_seed(seed)
    return [_tower() for _ in range(k)]


@pytest.mark.parametrize("k", [2, 3, 5])
def test_paper_initialisation(k):
    a = CrossStitchUnit(k).alpha.detach()
    assert torch.allclose(a.diagonal(), torch.full((k,), 0.9))
    off = a[~torch.eye(k, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, 0.1 / (k - 1)))
    assert torch.allclose(a.sum(1), torch.ones(k))
    ac = CrossStitchUnit(k, channels=3).alpha.detach()
    assert ac.shape == (3, k, k) and torch.equal(ac, a.expand(3, k, k))


@pytest.mark.parametrize("mode", ["layer", "channel"])
def test_identity_mixing_equals_independent_towers(mode):
    towers = _towers(3)
    ref = copy.deepcopy(towers)
    model = CrossStitch(towers, after=[1, 3], mode=mode)
    with torch.no_grad():
        for unit in model.stitches.values():
            unit.alpha.copy_(torch.eye(3).expand_as(unit.alpha))
    x = torch.randn(8, 4)
    out = model(x)
    for i, t in enumerate(ref):
        assert torch.equal(out[f"task{i}"], t(x))


def test_layer_mixing_rule_by_hand():
    towers = _towers(2)
    model = CrossStitch({"a": towers[0], "b": towers[1]}, after=[0])
    alpha = torch.tensor([[0.7, 0.3], [-0.2, 1.1]])
    with torch.no_grad():
        model.stitches["0"].alpha.copy_(alpha)
    x = torch.randn(5, 4)
    h = [t[0](x) for t in towers]
    mixed = [alpha[i, 0] * h[0] + alpha[i, 1] * h[1] for i in range(2)]
    out = model(x)
    for i, name in enumerate("ab"):
        torch.testing.assert_close(out[name], towers[i][1:](mixed[i]), rtol=1e-6, atol=1e-7)


def test_channel_mixing_rule_by_hand():
    towers = _towers(2)
    model = CrossStitch(towers, after=[1], mode="channel")
    unit = model.stitches["1"]
    assert unit.channels == 6  # read from the Linear(4, 6) before the ReLU
    torch.manual_seed(1)
    with torch.no_grad():
        unit.alpha.copy_(torch.randn(6, 2, 2))
    a = unit.alpha.detach()
    x = torch.randn(5, 4)
    h = [t[:2](x) for t in towers]
    for i in range(2):
        mixed = torch.stack([a[c, i, 0] * h[0][:, c] + a[c, i, 1] * h[1][:, c] for c in range(6)], dim=1)
        torch.testing.assert_close(model(x)[f"task{i}"], towers[i][2:](mixed), rtol=1e-5, atol=1e-6)


def test_channel_mixing_on_conv_maps():
    torch.manual_seed(0)
    towers = [nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3)) for _ in range(2)]
    ref = copy.deepcopy(towers)
    model = CrossStitch(towers, after=[1], mode="channel")
    with torch.no_grad():
        model.stitches["1"].alpha.copy_(torch.eye(2).expand(3, 2, 2))
    x = torch.randn(2, 1, 7, 7)
    for i, t in enumerate(ref):
        assert torch.equal(model(x)[f"task{i}"], t(x))


def test_gradient_reaches_mixing_parameters_in_closed_form():
    towers = _towers(2)
    model = CrossStitch(towers, after=[4])  # mix the outputs: y_i = sum_j alpha_ij h_j
    x = torch.randn(6, 4)
    out = model(x)
    out["task0"].sum().backward()
    h = [t(x).detach() for t in towers]
    grad = model.stitches["4"].alpha.grad
    # d/d alpha_0j of sum(y_0) = sum(h_j); task 0's loss does not depend on row 1
    torch.testing.assert_close(grad[0], torch.stack([h[0].sum(), h[1].sum()]), rtol=1e-5, atol=1e-6)
    assert torch.equal(grad[1], torch.zeros(2))


def test_param_groups_carry_the_larger_rate():
    model = CrossStitch(_towers(2), after=[1, 3])
    groups = model.param_groups(lr=0.01)
    assert [g["lr"] for g in groups] == [0.01, pytest.approx(10.0)]
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert ids[1] == {id(p) for p in model.stitch_parameters()}
    assert not ids[0] & ids[1] and ids[0] | ids[1] == {id(p) for p in model.parameters()}
    # one SGD step moves alpha by lr * mult * grad, a tower weight by lr * grad
    opt = torch.optim.SGD(model.param_groups(lr=0.01, stitch_lr_mult=50.0))
    out = model(torch.randn(4, 4))
    sum(o.pow(2).mean() for o in out.values()).backward()
    a, w = model.stitches["1"].alpha, model.towers["task0"][0].weight
    a0, ga, w0, gw = a.detach().clone(), a.grad.clone(), w.detach().clone(), w.grad.clone()
    opt.step()
    torch.testing.assert_close(a.detach(), a0 - 0.5 * ga)
    torch.testing.assert_close(w.detach(), w0 - 0.01 * gw)


def test_reached_scope_is_what_the_engine_infers():
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    model = CrossStitch(_towers(2), after=[1])
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([0.5, 0.5]))
    opt.backward({t: (o - y).pow(2).mean() for t, o in model(x).items()})
    assert {id(p) for p in opt.shared_params} == {id(p) for p in model.shared_parameters("reached")}
    assert {id(p) for p in model.shared_parameters()} == {id(p) for p in model.stitch_parameters()}


@pytest.mark.parametrize("scope", ["stitch", "reached"])
@pytest.mark.parametrize("method", METHODS)
def test_end_to_end(method, scope):
    x, y = torch.randn(10, 4), torch.randn(10, 2)
    model = CrossStitch(_towers(2), after=[1, 3])
    shared = model.shared_parameters(scope)
    model.shared_parameters = lambda: shared  # what check_balanced_steps treats as shared
    check_balanced_steps(model, method, lambda: {t: (o - y).pow(2).mean() for t, o in model(x).items()})


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        CrossStitch(_towers(2), after=[1], mode="pixel")
    with pytest.raises(ValueError, match="at least 2"):
        CrossStitch(_towers(1), after=[1])
    with pytest.raises(TypeError, match="Sequential"):
        CrossStitch([nn.Linear(2, 2), nn.Linear(2, 2)], after=[0])
    with pytest.raises(ValueError, match="same layers"):
        CrossStitch([_tower(), nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(),
                                             nn.Linear(5, 2))], after=[1])
    with pytest.raises(ValueError, match="shapes"):
        CrossStitch([nn.Sequential(nn.Linear(4, 6)), nn.Sequential(nn.Linear(4, 7))], after=[0])
    for after in ([], [5], [1, 1], [-1]):
        with pytest.raises(ValueError, match="after"):
            CrossStitch(_towers(2), after=after)
    with pytest.raises(ValueError, match="lr"):
        CrossStitch(_towers(2), after=[1]).param_groups(lr=0.0)
    with pytest.raises(ValueError, match="scope"):
        CrossStitch(_towers(2), after=[1]).shared_parameters("all")
    with pytest.raises(ValueError, match="channel"):
        CrossStitch(_towers(2), after=[1], mode="channel", channels=[3])(torch.randn(2, 4))
