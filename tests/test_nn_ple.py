"""PLE: one level is CGC, the progressive routing by hand, the partition and the cut, GradBalance."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradbalance as gb
from gradbalance import jacobian
from gradbalance.nn import CGC, PLE
from tests.helpers import FixedWeights
from tests.nn_checks import METHODS, REPRESENTATION_METHODS, check_balanced_steps


def _expert(d_in=5, d=6):
    return nn.Sequential(nn.Linear(d_in, d), nn.ReLU())


def _towers():
    return {"a": nn.Linear(6, 1), "b": nn.Linear(6, 2)}


def _two_levels(seed=0):
    torch.manual_seed(seed)
    return PLE([[_expert(), _expert()], [_expert(6), _expert(6)]],
               [{"a": [_expert()], "b": [_expert(), _expert()]}, {"a": [_expert(6)], "b": []}],
               _towers(), in_features=5)


def _losses(model, x, y):
    return {t: (o - y[:, : o.shape[1]]).pow(2).mean() for t, o in model(x).items()}


def test_one_level_is_cgc_with_the_same_weights():
    torch.manual_seed(0)
    cgc = CGC([_expert() for _ in range(3)], {"a": [_expert()], "b": [_expert(), _expert()]}, _towers(),
              in_features=5)
    ple = PLE([copy.deepcopy(list(cgc.shared_experts))],
              [copy.deepcopy({t: list(m) for t, m in cgc.task_experts.items()})],
              copy.deepcopy(dict(cgc.towers.items())), gates=[copy.deepcopy(dict(cgc.gates.items()))])
    assert ple.levels == 1 and len(ple.shared_gates) == 0
    x = torch.randn(9, 5)
    (out_c, z_c), (out_p, z_p) = cgc(x, return_features=True), ple(x, return_features=True)
    assert torch.equal(z_c, z_p)
    for t in ("a", "b"):
        assert torch.equal(out_c[t], out_p[t])
        torch.testing.assert_close(ple.gate_weights(x)[t][0], cgc.gate_weights(x)[t], rtol=0, atol=0)
    # the same gradients too
    y = torch.randn(9, 2)
    for m in (cgc, ple):
        sum(_losses(m, x, y).values()).backward()
    assert sum(p.numel() for p in cgc.parameters()) == sum(p.numel() for p in ple.parameters())
    for t in ("a", "b"):
        for p, q in zip(cgc.task_experts[t].parameters(), ple.task_experts[0][t].parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    for p, q in zip(cgc.shared_experts.parameters(), ple.shared_experts[0].parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


def test_two_levels_progressive_routing_by_hand():
    model = _two_levels()
    x = torch.randn(7, 5)
    out = model(x)
    w = model.gate_weights(x)
    # level 1: task gates over [own, shared]; the shared gate over [a's, b's, shared] (all experts)
    own1 = {t: [e(x) for e in model.task_experts[0][t]] for t in ("a", "b")}
    sh1 = [e(x) for e in model.shared_experts[0]]
    x1 = {}
    for t in ("a", "b"):
        g = torch.softmax(model.gates[0][t](x), -1)
        torch.testing.assert_close(w[t][0], g)
        x1[t] = sum(g[:, i : i + 1] * e for i, e in enumerate(own1[t] + sh1))
    gs = torch.softmax(model.shared_gates[0](x), -1)
    assert gs.shape == (7, 1 + 2 + 2)
    torch.testing.assert_close(w["shared"][0], gs)
    x1s = sum(gs[:, i : i + 1] * e for i, e in enumerate(own1["a"] + own1["b"] + sh1))
    # level 2 (last): task experts read their task's mixture, shared experts the shared mixture;
    # no shared gate
    assert len(model.shared_gates) == 1 and len(w["shared"]) == 1
    sh2 = [e(x1s) for e in model.shared_experts[1]]
    for t in ("a", "b"):
        g = torch.softmax(model.gates[1][t](x1[t]), -1)
        experts = [e(x1[t]) for e in model.task_experts[1][t]] + sh2
        assert g.shape == (7, len(experts))
        want = model.towers[t](sum(g[:, i : i + 1] * e for i, e in enumerate(experts)))
        torch.testing.assert_close(out[t], want, rtol=1e-6, atol=1e-7)


def test_gates_are_distributions():
    model = _two_levels()
    for ws in model.gate_weights(torch.randn(6, 5) * 5).values():
        for w in ws:
            assert (w >= 0).all()
            torch.testing.assert_close(w.sum(-1), torch.ones(6))


def test_parameters_partition_and_who_reaches_what():
    model = _two_levels()
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == {id(p) for m in (model.shared_experts, model.shared_gates) for p in m.parameters()}
    tasks = {t: {id(p) for p in model.task_parameters(t)} for t in ("a", "b")}
    assert not shared & tasks["a"] and not shared & tasks["b"] and not tasks["a"] & tasks["b"]
    assert shared | tasks["a"] | tasks["b"] == {id(p) for p in model.parameters()}
    reached = {id(p) for p in model.shared_parameters("reached")}
    assert reached == shared | {id(p) for p in model.task_experts[0].parameters()}
    # task a's loss reaches b's level-1 experts (through the shared gate), not b's gates or
    # tower (their gradient is zero: the last level reads slices of one concatenated tensor)
    model(torch.randn(4, 5))["a"].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.task_experts[0]["b"].parameters())
    for m in (model.gates[0]["b"], model.gates[1]["b"], model.towers["b"]):
        assert all(p.grad is None or not p.grad.any() for p in m.parameters())
    with pytest.raises(ValueError, match="scope"):
        model.shared_parameters("all")


@pytest.mark.parametrize("levels", [1, 2])
def test_features_are_a_cut_batched_engine_equals_loop(levels):
    model = _two_levels() if levels == 2 else PLE([[_expert(), _expert()]], [{"a": [_expert()], "b": []}],
                                                  _towers(), in_features=5)
    x, y = torch.randn(8, 5), torch.randn(8, 2)
    for scope in ("shared", "reached"):
        shared = model.shared_parameters(scope)
        out, z = model(x, return_features=True)
        losses = [(o - y[:, : o.shape[1]]).pow(2).mean() for o in out.values()]
        loop = jacobian.task_gradients(losses, shared, engine="loop", retain_graph=True)
        batched = jacobian.task_gradients(losses, shared, engine="batched", features=z)
        torch.testing.assert_close(batched.shared, loop.shared, rtol=1e-5, atol=1e-7)
    if levels == 2:
        assert z.shape == (8, 6 + 6 + 2 * 6)  # x^1_a, x^1_b, two level-2 shared experts


@pytest.mark.parametrize("method", METHODS)
def test_end_to_end(method):
    model = _two_levels()
    x, y = torch.randn(10, 5), torch.randn(10, 2)
    check_balanced_steps(model, method, lambda: _losses(model, x, y))


def test_reached_scope_balances_the_lower_task_experts():
    model = _two_levels()
    x, y = torch.randn(10, 5), torch.randn(10, 2)
    reached = model.shared_parameters("reached")
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([0.3, 0.7]), shared_params=reached)
    losses = _losses(model, x, y)
    g = {t: torch.autograd.grad(losses[t], reached, retain_graph=True) for t in ("a", "b")}
    opt.backward(losses)
    for i, p in enumerate(reached):  # b's level-1 experts get 0.3 g_a + 0.7 g_b, like the shared experts
        torch.testing.assert_close(p.grad, 0.3 * g["a"][i] + 0.7 * g["b"][i], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", REPRESENTATION_METHODS)
def test_end_to_end_representation_mode(method):
    model = _two_levels()
    x, y = torch.randn(10, 5), torch.randn(10, 2)

    def losses():
        out, z = model(x, return_features=True)
        return {t: (o - y[:, : o.shape[1]]).pow(2).mean() for t, o in out.items()}, z

    check_balanced_steps(model, method, losses)


def test_bad_arguments():
    t = _towers
    with pytest.raises(ValueError, match="shared_experts is empty"):
        PLE([], [], t(), in_features=5)
    with pytest.raises(ValueError, match="levels"):
        PLE([[_expert()], [_expert(6)]], [{"a": [], "b": []}], t(), in_features=5)
    with pytest.raises(ValueError, match="non-empty"):
        PLE([[_expert()], []], [{"a": [], "b": []}] * 2, t(), in_features=5)
    with pytest.raises(ValueError, match="must name the tasks"):
        PLE([[_expert()]], [{"a": [], "c": []}], t(), in_features=5)
    with pytest.raises(ValueError, match="in_features"):
        PLE([[_expert()]], [{"a": [], "b": []}], t())
    with pytest.raises(ValueError, match="output size"):  # cannot read the level-1 expert size
        PLE([[nn.ReLU()], [_expert()]], [{"a": [], "b": []}] * 2, t(), in_features=5)
    with pytest.raises(ValueError, match="shared_gates"):
        PLE([[_expert()], [_expert(6)]], [{"a": [], "b": []}] * 2, t(), in_features=5, shared_gates=[])
    with pytest.raises(ValueError, match="reserved"):
        PLE([[_expert()]], [[[]]], {"shared": nn.Linear(6, 1)}, in_features=5)
    e = _expert()
    with pytest.raises(ValueError, match="tied"):
        PLE([[e]], [{"a": [e], "b": []}], t(), in_features=5)
    model = PLE([[_expert()]], [{"a": [], "b": []}], t(), gates=[{"a": nn.Linear(5, 3), "b": nn.Linear(5, 1)}])
    with pytest.raises(ValueError, match="gate 'a'"):
        model(torch.randn(2, 5))
