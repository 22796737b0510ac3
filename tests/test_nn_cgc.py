"""CGC: the gated mixture over own + shared experts, reduction to MMoE, partition, GradBalance."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradbalance.nn import CGC, MMoE
from tests.nn_checks import METHODS, check_balanced_steps


def _expert():
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU())


def _model(own=(1, 2), shared=2, seed=0):
    torch.manual_seed(seed)
    return CGC([_expert() for _ in range(shared)],
               {"a": [_expert() for _ in range(own[0])], "b": [_expert() for _ in range(own[1])]},
               {"a": nn.Linear(6, 1), "b": nn.Linear(6, 2)}, in_features=5)


def test_mixture_over_own_then_shared_experts_by_hand():
    model = _model()
    x = torch.randn(7, 5)
    out, z = model(x, return_features=True)
    shared = [e(x) for e in model.shared_experts]
    assert torch.equal(z, torch.stack(shared, dim=1))
    for t in ("a", "b"):
        experts = [e(x) for e in model.task_experts[t]] + shared
        g = torch.softmax(model.gates[t](x), dim=-1)
        assert torch.allclose(g.sum(-1), torch.ones(7)) and (g >= 0).all()
        mixed = sum(g[:, i : i + 1] * e for i, e in enumerate(experts))
        torch.testing.assert_close(out[t], model.towers[t](mixed), rtol=1e-6, atol=1e-7)


def test_no_task_experts_is_mmoe():
    cgc = _model(own=(0, 0), shared=3)
    mmoe = MMoE(copy.deepcopy(list(cgc.shared_experts)), copy.deepcopy(dict(cgc.towers.items())),
                gates=copy.deepcopy(dict(cgc.gates.items())))
    x = torch.randn(6, 5)
    a, b = cgc(x), mmoe(x)
    for t in ("a", "b"):
        assert torch.equal(a[t], b[t])


def test_parameters_partition_and_own_experts_get_only_their_task():
    model = _model()
    shared = {id(p) for p in model.shared_parameters()}
    tasks = [{id(p) for p in model.task_parameters(t)} for t in ("a", "b")]
    assert shared == {id(p) for p in model.shared_experts.parameters()}
    assert {id(p) for p in model.task_experts["a"].parameters()} <= tasks[0]
    assert not shared & tasks[0] and not shared & tasks[1] and not tasks[0] & tasks[1]
    assert shared | tasks[0] | tasks[1] == {id(p) for p in model.parameters()}
    model(torch.randn(4, 5))["a"].sum().backward()
    assert all(p.grad is None for p in model.task_experts["b"].parameters())


@pytest.mark.parametrize("method", METHODS)
def test_end_to_end(method):
    model = _model()
    x, y = torch.randn(10, 5), torch.randn(10, 3)
    check_balanced_steps(model, method, lambda: {t: (o - y[:, : o.shape[1]]).pow(2).mean()
                                                 for t, o in model(x).items()})


def test_bad_arguments():
    with pytest.raises(ValueError, match="shared_experts"):
        CGC([], {"a": []}, {"a": nn.Linear(6, 1)}, in_features=5)
    with pytest.raises(ValueError, match="task_experts"):
        CGC([_expert()], {"a": [], "c": []}, {"a": nn.Linear(6, 1), "b": nn.Linear(6, 1)}, in_features=5)
    with pytest.raises(ValueError, match="in_features"):
        CGC([_expert()], [[], []], [nn.Linear(6, 1), nn.Linear(6, 1)])
    e = _expert()
    with pytest.raises(ValueError, match="tied"):
        CGC([e], {"a": [e]}, {"a": nn.Linear(6, 1)}, in_features=5)


def test_default_gates_read_images_flattened():
    """Conv experts on (N, C, H, W): CGC's default linear gates read x.flatten(1), like MMoE's."""
    torch.manual_seed(0)

    def conv():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    model = CGC([conv()], {"a": [conv()], "b": []}, {"a": nn.Linear(4, 1), "b": nn.Linear(4, 2)},
                in_features=3 * 6 * 6)
    x = torch.randn(5, 3, 6, 6)
    out = model(x)
    own, shared = model.task_experts["a"][0](x), model.shared_experts[0](x)
    g = torch.softmax(x.flatten(1) @ model.gates["a"].weight.T + model.gates["a"].bias, dim=-1)
    torch.testing.assert_close(model.gate_weights(x)["a"], g)
    torch.testing.assert_close(out["a"], model.towers["a"](g[:, :1] * own + g[:, 1:] * shared))
    wrong = CGC([conv()], {"a": [], "b": []}, {"a": nn.Linear(4, 1), "b": nn.Linear(4, 2)}, in_features=6)
    with pytest.raises(ValueError, match=r"CGC's default gates.*\(5, 3, 6, 6\).*108 features"):
        wrong(x)
