"""MMoE: gates are distributions, the mixture rule, one expert = hard sharing, GradBalance."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradbalance as gb
from gradbalance.nn import HardSharing, MMoE
from tests.nn_checks import METHODS, REPRESENTATION_METHODS, check_balanced_steps


def _model(n_experts=3, seed=0):
    torch.manual_seed(seed)
    experts = [nn.Sequential(nn.Linear(5, 6), nn.ReLU()) for _ in range(n_experts)]
    towers = {"a": nn.Linear(6, 1), "b": nn.Linear(6, 2)}
    return MMoE(experts, towers, in_features=5)


def test_gates_are_distributions():
    model = _model(4)
    with torch.no_grad():  # large logits: the softmax must still give distributions
        for g in model.gates.values():
            g.weight.mul_(50)
    w = model.gate_weights(torch.randn(9, 5) * 10)
    for t in ("a", "b"):
        assert w[t].shape == (9, 4)
        assert (w[t] >= 0).all()
        torch.testing.assert_close(w[t].sum(-1), torch.ones(9))


def test_mixture_rule_by_hand():
    model = _model(3)
    x = torch.randn(7, 5)
    out, z = model(x, return_features=True)
    e = [expert(x) for expert in model.experts]
    assert torch.equal(z, torch.stack(e, dim=1))
    for t in ("a", "b"):
        g = torch.softmax(model.gates[t](x), dim=-1)
        mixed = sum(g[:, i : i + 1] * e[i] for i in range(3))
        torch.testing.assert_close(out[t], model.towers[t](mixed), rtol=1e-6, atol=1e-7)


def test_parameters_partition():
    model = _model(3)
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == {id(p) for p in model.experts.parameters()}
    tasks = [{id(p) for p in model.task_parameters(t)} for t in ("a", "b")]
    assert tasks[0] == {id(p) for m in (model.gates["a"], model.towers["a"]) for p in m.parameters()}
    assert not shared & tasks[0] and not shared & tasks[1] and not tasks[0] & tasks[1]
    assert shared | tasks[0] | tasks[1] == {id(p) for p in model.parameters()}


def test_one_expert_reduces_to_hard_sharing():
    mmoe = _model(1)
    hard = HardSharing(copy.deepcopy(mmoe.experts[0]), copy.deepcopy(dict(mmoe.towers.items())))
    x, y = torch.randn(8, 5), torch.randn(8)
    out_m, out_h = mmoe(x), hard(x)
    for t in ("a", "b"):
        assert torch.equal(out_m[t], out_h[t])
    # and the same gradients on the shared expert / trunk; the single gate learns nothing
    for out in (out_m, out_h):
        sum((o.sum(-1) - y).pow(2).mean() for o in out.values()).backward()
    for p, q in zip(mmoe.experts[0].parameters(), hard.trunk.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    for g in mmoe.gates.values():
        assert torch.equal(g.weight.grad, torch.zeros_like(g.weight))


@pytest.mark.parametrize("method", METHODS)
def test_end_to_end(method):
    model = _model(3)
    x, y = torch.randn(10, 5), torch.randn(10, 2)
    check_balanced_steps(
        model, method,
        lambda: {"a": (model(x)["a"].squeeze(-1) - y[:, 0]).pow(2).mean(),
                 "b": nn.functional.cross_entropy(model(x)["b"], (y[:, 1] > 0).long())},
    )


@pytest.mark.parametrize("method", REPRESENTATION_METHODS)
def test_end_to_end_representation_mode(method):
    model = _model(3)
    x, y = torch.randn(10, 5), torch.randn(10, 3)

    def losses():
        out, z = model(x, return_features=True)
        return {t: (o - y[:, : o.shape[1]]).pow(2).mean() for t, o in out.items()}, z

    check_balanced_steps(model, method, losses)


def test_features_reach_every_task():
    model = _model(2)
    out, z = model(torch.randn(4, 5), return_features=True)
    for o in out.values():  # every task reads the stacked expert outputs
        g = torch.autograd.grad(o.pow(2).mean(), z, retain_graph=True)[0]
        assert g.abs().sum() > 0
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "mean", shared_params=model)
    info = opt.backward({t: o.pow(2).mean() for t, o in out.items()}, features=z)
    assert info.weights.tolist() == [0.5, 0.5]


def test_custom_gates_and_bad_arguments():
    experts = [nn.Linear(5, 6) for _ in range(2)]
    towers = [nn.Linear(6, 1), nn.Linear(6, 1)]
    model = MMoE(experts, towers, gates=[nn.Linear(5, 2), nn.Linear(5, 2)])
    assert model.task_names == ["task0", "task1"]
    with pytest.raises(ValueError, match="in_features"):
        MMoE(experts, towers)
    with pytest.raises(ValueError, match="experts"):
        MMoE([], towers, in_features=5)
    with pytest.raises(ValueError, match="gates"):
        MMoE(experts, towers, gates=[nn.Linear(5, 2)])
    with pytest.raises(ValueError, match="same tasks"):
        MMoE(experts, {"a": towers[0], "b": towers[1]}, gates={"a": nn.Linear(5, 2), "c": nn.Linear(5, 2)})
    with pytest.raises(ValueError, match="tied"):
        MMoE(experts, {"a": experts[0], "b": towers[1]}, in_features=5)
    with pytest.raises(ValueError, match="gate"):
        MMoE(experts, towers, gates=[nn.Linear(5, 3), nn.Linear(5, 3)])(torch.randn(2, 5))


def test_default_gates_read_images_flattened():
    """Conv experts on (N, C, H, W): the default linear gates read x.flatten(1)."""
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
               for _ in range(2)]
    model = MMoE(experts, {"a": nn.Linear(4, 1), "b": nn.Linear(4, 3)}, in_features=3 * 6 * 6)
    x = torch.randn(5, 3, 6, 6)
    out = model(x)
    e = [expert(x) for expert in model.experts]
    for t in ("a", "b"):
        g = torch.softmax(x.flatten(1) @ model.gates[t].weight.T + model.gates[t].bias, dim=-1)
        torch.testing.assert_close(model.gate_weights(x)[t], g)
        torch.testing.assert_close(out[t], model.towers[t](g[:, :1] * e[0] + g[:, 1:] * e[1]))
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", shared_params=model)
    info = opt.backward({"a": out["a"].pow(2).mean(), "b": out["b"].pow(2).mean()})
    assert info.weights.shape == (2,)
    # the wrong in_features: a ValueError naming the input's shape, not a raw matmul error
    wrong = MMoE([copy.deepcopy(experts[0])], {"a": nn.Linear(4, 1)}, in_features=6)
    with pytest.raises(ValueError, match=r"\(5, 3, 6, 6\).*108 features"):
        wrong(x)
    with pytest.raises(ValueError, match="no batch dimension"):
        wrong.gate_weights(torch.randn(6))
