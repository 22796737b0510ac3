"""SoftSharing and its penalties: closed forms, independence at weight 0, no shared parameters."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

import gradbalance as gb
from gradbalance.nn import SoftSharing, group_sparsity_penalty, soft_sharing_penalty
from tests.helpers import FixedWeights
from tests.nn_checks import METHODS, check_balanced_steps


def _towers(k=3, seed=0):
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)) for _ in range(k)]


def _set(module, *values):
    with torch.no_grad():
        for p, v in zip(module.parameters(), values):
            p.copy_(torch.as_tensor(v, dtype=p.dtype).reshape(p.shape))
    return module


# ---------------------------------------------------------------- l2: pairwise squared distances


@pytest.mark.parametrize("k", [2, 3, 4])
def test_l2_penalty_and_gradient_closed_form(k):
    towers = _towers(k)
    weight = 0.37
    pen = soft_sharing_penalty(towers, "l2", weight=weight)
    params = [list(t.parameters()) for t in towers]
    want = sum(
        (a - b).pow(2).sum()
        for i, j in itertools.combinations(range(k), 2)
        for a, b in zip(params[i], params[j])
    ) * weight
    torch.testing.assert_close(pen, want, rtol=1e-6, atol=0)
    pen.backward()
    for i in range(k):
        for n in range(len(params[i])):
            # d/d theta_i sum_{pairs} ||theta_a - theta_b||^2 = 2 sum_{j != i} (theta_i - theta_j)
            g = 2 * weight * sum(params[i][n] - params[j][n] for j in range(k) if j != i)
            torch.testing.assert_close(params[i][n].grad, g.detach(), rtol=1e-5, atol=1e-6)


def test_l2_two_towers_hand_value():
    a = _set(nn.Linear(2, 1), [[1.0, 2.0]], [0.5])
    b = _set(nn.Linear(2, 1), [[1.0, 0.0]], [-0.5])
    # ||(0, 2)||^2 + ||1||^2 = 5
    assert soft_sharing_penalty({"a": a, "b": b}).item() == pytest.approx(5.0, abs=1e-6)


# ---------------------------------------------------------------- trace norm


def test_trace_penalty_orthogonal_rows():
    # stacked rows (3,0,0,0) and (0,0,4,0) are orthogonal: singular values 3 and 4, and the
    # gradient U V^T is each row divided by its norm
    a = _set(nn.Linear(4, 1, bias=False), [[3.0, 0.0, 0.0, 0.0]])
    b = _set(nn.Linear(4, 1, bias=False), [[0.0, 0.0, 4.0, 0.0]])
    pen = soft_sharing_penalty([a, b], "trace", weight=2.0)
    assert pen.item() == pytest.approx(14.0, abs=1e-5)
    pen.backward()
    torch.testing.assert_close(a.weight.grad, torch.tensor([[2.0, 0, 0, 0]]))
    torch.testing.assert_close(b.weight.grad, torch.tensor([[0, 0, 2.0, 0]]))


@pytest.mark.parametrize("values", [((1.0, 2.0), (3.0, -1.0)), ((0.5, 0.1), (0.2, 0.7)), ((2.0, -1.0), (-1.5, 0.3))])
def test_trace_penalty_2x2_closed_form(values):
    # for M = [[a, b], [c, d]]: ||M||_* = sqrt(||M||_F^2 + 2 |det M|), and its gradient is
    # (M + sign(det M) adj(M)^T) / ||M||_*, with adj(M)^T = [[d, -c], [-b, a]]
    (a_, b_), (c_, d_) = values
    ta = _set(nn.Linear(2, 1, bias=False), [[a_, b_]])
    tb = _set(nn.Linear(2, 1, bias=False), [[c_, d_]])
    det = a_ * d_ - b_ * c_
    nuc = math.sqrt(a_**2 + b_**2 + c_**2 + d_**2 + 2 * abs(det))
    pen = soft_sharing_penalty([ta, tb], "trace")
    assert pen.item() == pytest.approx(nuc, rel=1e-5)
    pen.backward()
    s = math.copysign(1.0, det)
    want_a = torch.tensor([[a_ + s * d_, b_ - s * c_]]) / nuc
    want_b = torch.tensor([[c_ - s * b_, d_ + s * a_]]) / nuc
    torch.testing.assert_close(ta.weight.grad, want_a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tb.weight.grad, want_b, rtol=1e-4, atol=1e-5)


def test_trace_gradient_finite_for_identical_towers():
    towers = _towers(3)
    for t in towers[1:]:
        t.load_state_dict(towers[0].state_dict())
    pen = soft_sharing_penalty(towers, "trace")
    pen.backward()
    assert all(torch.isfinite(p.grad).all() for t in towers for p in t.parameters())


# ---------------------------------------------------------------- group sparsity (l1/lq)


def test_group_sparsity_elementwise_closed_form():
    a = _set(nn.Linear(3, 1, bias=False), [[3.0, 0.0, -1.0]])
    b = _set(nn.Linear(3, 1, bias=False), [[4.0, 0.0, 1.0]])
    pen = group_sparsity_penalty([a, b], q=2, weight=0.5)
    assert pen.item() == pytest.approx(0.5 * (5.0 + 0.0 + math.sqrt(2)), rel=1e-6)
    pen.backward()
    r2 = 1 / math.sqrt(2)
    torch.testing.assert_close(a.weight.grad, 0.5 * torch.tensor([[0.6, 0.0, -r2]]))
    torch.testing.assert_close(b.weight.grad, 0.5 * torch.tensor([[0.8, 0.0, r2]]))  # 0 at the zero group


def test_group_sparsity_q_inf_and_q1():
    towers = _towers(3)
    flat = [torch.cat([p.detach().reshape(-1) for p in t.parameters()]) for t in towers]
    stacked = torch.stack(flat)
    inf = group_sparsity_penalty(towers, q=math.inf).item()
    assert inf == pytest.approx(stacked.abs().max(0).values.sum().item(), rel=1e-6)
    one = group_sparsity_penalty(towers, q=1).item()
    assert one == pytest.approx(stacked.abs().sum().item(), rel=1e-6)


def test_group_sparsity_groups_input_columns():
    towers = _towers(2)
    pen = group_sparsity_penalty(towers, q=2, dim=1, include=lambda n: n.endswith("weight"))
    want = 0.0
    for idx in ("0.weight", "2.weight"):
        ws = [dict(t.named_parameters())[idx].detach() for t in towers]
        for col in range(ws[0].shape[1]):
            want += math.sqrt(sum(float(w[:, col].pow(2).sum()) for w in ws))
    assert pen.item() == pytest.approx(want, rel=1e-6)


def test_penalty_arguments():
    towers = _towers(2)
    with pytest.raises(ValueError, match="kind"):
        soft_sharing_penalty(towers, "l1")
    with pytest.raises(ValueError, match="weight"):
        soft_sharing_penalty(towers, weight=-1.0)
    with pytest.raises(ValueError, match="at least 2"):
        soft_sharing_penalty(towers[:1])
    with pytest.raises(ValueError, match="q must be"):
        group_sparsity_penalty(towers, q=0.5)
    with pytest.raises(ValueError, match="nothing|no parameter"):
        soft_sharing_penalty(towers, include=lambda n: False)
    with pytest.raises(ValueError, match="same architecture|shapes"):
        soft_sharing_penalty([nn.Linear(3, 4), nn.Linear(3, 5)])
    shared = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="same tensor"):
        soft_sharing_penalty([shared, shared])


# ---------------------------------------------------------------- the model with GradBalance


def _batch(n=12):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)


def test_weight_zero_trains_exactly_as_independent_networks():
    x, y = _batch()
    towers = _towers(3)
    alone = copy.deepcopy(towers)
    model = SoftSharing(towers)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "sum",
                         shared_params=model)
    opts = [torch.optim.SGD(t.parameters(), lr=0.1, momentum=0.9) for t in alone]
    for _ in range(4):
        opt.zero_grad()
        out = model(x)
        opt.backward({t: (o - y).pow(2).mean() for t, o in out.items()})
        model.penalty("l2", weight=0.0).backward()
        opt.step()
        for t, o in zip(alone, opts):
            o.zero_grad()
            (t(x) - y).pow(2).mean().backward()
            o.step()
    for t, ref in zip(towers, alone):
        for p, q in zip(t.parameters(), ref.parameters()):
            assert torch.equal(p, q)


def test_positive_weight_pulls_towers_together():
    x, y = _batch()
    spread = []
    for weight in (0.0, 1.0):
        model = SoftSharing(_towers(3))
        opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.05), "mean", shared_params=model)
        for _ in range(20):
            opt.zero_grad()
            opt.backward({t: (o - y).pow(2).mean() for t, o in model(x).items()})
            model.penalty("l2", weight=weight).backward()
            opt.step()
        spread.append(model.penalty("l2").item())
    assert spread[1] < 0.5 * spread[0]


def test_dict_inputs_run_one_tower_each():
    model = SoftSharing({"a": nn.Linear(3, 1), "b": nn.Linear(2, 1)})
    xa, xb = torch.randn(4, 3), torch.randn(5, 2)
    out = model({"a": xa, "b": xb})
    assert torch.equal(out["a"], model.towers["a"](xa)) and torch.equal(out["b"], model.towers["b"](xb))
    with pytest.raises(KeyError, match="unknown task"):
        model({"c": xa})


@pytest.mark.parametrize("method", [m for m in METHODS if m in ("mean", "uw")])
@pytest.mark.parametrize("shared", ["model", None])
def test_loss_weighting_methods_work_without_shared_parameters(method, shared):
    x, y = _batch()
    model = SoftSharing(_towers(2))
    assert model.shared_parameters() == []
    check_balanced_steps(model, method, lambda: {t: (o - y).pow(2).mean() for t, o in model(x).items()},
                         shared_params=model if shared == "model" else None)


@pytest.mark.parametrize("method", ["fixed-gram"] + [m for m in ("mgda", "pcgrad") if m in gb.available_methods()])
def test_gradient_methods_refuse_a_model_with_nothing_shared(method):
    model = SoftSharing(_towers(2))
    m = FixedWeights([0.5, 0.5]) if method == "fixed-gram" else method
    with pytest.raises(ValueError, match="shared_params is empty.*loss-weighting method"):
        gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), m, shared_params=model)


def test_gradient_method_with_inferred_shared_params_says_why():
    x, y = _batch()
    model = SoftSharing(_towers(2))
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([0.5, 0.5]))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="no parameter is reached by more than one loss.*loss-weighting"):
        opt.backward({t: (o - y).pow(2).mean() for t, o in model(x).items()})
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---------------------------------------------------------------- include: leave differently shaped layers out


def _mixed_towers():
    """Same hidden layer, output layers of different sizes (1 regression output vs 5 classes),
    and an extra layer only the second tower has."""
    torch.manual_seed(3)
    a = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    b = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5), nn.Linear(5, 5))
    return {"age": a, "race": b}


def test_include_selects_before_the_towers_are_compared():
    towers = _mixed_towers()
    hidden = lambda n: n.startswith("0.")  # noqa: E731 - the documented use
    wa, ba = towers["age"][0].weight, towers["age"][0].bias
    wb, bb = towers["race"][0].weight, towers["race"][0].bias
    # by hand: only the first layer is tied
    l2 = ((wa - wb) ** 2).sum() + ((ba - bb) ** 2).sum()
    torch.testing.assert_close(soft_sharing_penalty(towers, include=hidden), l2)
    torch.testing.assert_close(SoftSharing(towers).penalty(include=hidden, weight=0.5), 0.5 * l2)
    trace = sum(torch.linalg.svdvals(torch.stack([p.reshape(-1), q.reshape(-1)])).sum()
                for p, q in ((wa, wb), (ba, bb)))
    torch.testing.assert_close(soft_sharing_penalty(towers, "trace", include=hidden), trace)
    group = torch.sqrt(wa**2 + wb**2).sum() + torch.sqrt(ba**2 + bb**2).sum()
    torch.testing.assert_close(group_sparsity_penalty(towers, include=hidden), group)
    # the gradient reaches the tied layer only
    SoftSharing(towers).penalty(include=hidden).backward()
    assert towers["age"][0].weight.grad is not None and towers["age"][2].weight.grad is None
    # without include the towers do not match, and the error says so
    with pytest.raises(ValueError, match="same architecture"):
        soft_sharing_penalty(towers)
    same_names = {"a": nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)),
                  "b": nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5))}
    with pytest.raises(ValueError, match="different shapes"):
        group_sparsity_penalty(same_names)
    assert float(group_sparsity_penalty(same_names, include=lambda n: n.startswith("0.")).detach()) > 0
    # an included name that does not match is still refused
    with pytest.raises(ValueError, match="shapes"):
        soft_sharing_penalty(same_names, include=lambda n: n.endswith("weight"))
