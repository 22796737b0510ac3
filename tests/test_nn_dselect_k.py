"""DSelect-k: the smooth-step, the binary-encoding selectors, the entropy regulariser, k-sparse
selection at convergence, the multi-task block under GradBalance."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradbalance.nn import DSelectK, DSelectKGate, smooth_step
from tests.nn_checks import METHODS, REPRESENTATION_METHODS, check_balanced_steps


@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0])
def test_smooth_step_definition(gamma):
    t = torch.linspace(-2 * gamma, 2 * gamma, 2001, dtype=torch.float64)
    s = smooth_step(t, gamma)
    assert torch.equal(s[t <= -gamma / 2], torch.zeros_like(s[t <= -gamma / 2]))
    assert torch.equal(s[t >= gamma / 2], torch.ones_like(s[t >= gamma / 2]))
    mid = (t > -gamma / 2) & (t < gamma / 2)
    tm = t[mid]
    torch.testing.assert_close(s[mid], -2 / gamma**3 * tm**3 + 3 / (2 * gamma) * tm + 0.5)
    assert smooth_step(torch.tensor(0.0), gamma) == 0.5
    assert (s.diff() >= 0).all()  # non-decreasing
    # C1: continuous, and the derivative (autograd) is continuous, 0 at both junctions
    tt = torch.tensor([-gamma / 2, gamma / 2], dtype=torch.float64)
    eps = 1e-7
    for side in (-eps, 0.0, eps):
        x = (tt + side).requires_grad_(True)
        (g,) = torch.autograd.grad(smooth_step(x, gamma).sum(), x)
        assert g.abs().max() <= 6.01 / gamma**2 * eps  # S'' = -6/gamma^2 t-ish near the junction: slope -> 0
        torch.testing.assert_close(smooth_step(x, gamma).detach(), torch.tensor([0.0, 1.0], dtype=torch.float64),
                                   atol=1e-6, rtol=0)
    x = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    (g0,) = torch.autograd.grad(smooth_step(x, gamma), x)
    assert math.isclose(float(g0), 3 / (2 * gamma))  # the slope at 0
    with pytest.raises(ValueError, match="gamma"):
        smooth_step(t, 0.0)


def test_selector_is_the_product_over_binary_code_bits():
    torch.manual_seed(0)
    gate = DSelectKGate(num_experts=8, k=3, gamma=2.0)
    with torch.no_grad():
        gate.z.uniform_(-1.5, 1.5)
    r = gate.selectors()[0]
    s = smooth_step(gate.z.detach(), 2.0)
    for i in range(3):
        for e in range(8):
            bits = [(e >> j) & 1 for j in range(3)]
            want = math.prod(float(s[i, j]) if b else 1 - float(s[i, j]) for j, b in enumerate(bits))
            assert math.isclose(float(r[i, e].detach()), want, rel_tol=1e-5, abs_tol=1e-7)
    q = gate().detach()
    torch.testing.assert_close(q, (torch.softmax(gate.alpha.detach(), 0).unsqueeze(-1) * r.detach()).sum(0))


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_gate_weights_sum_to_one(n):
    torch.manual_seed(n)
    static = DSelectKGate(n, k=3, gamma=1.0)
    per_example = DSelectKGate(n, k=3, gamma=1.0, in_features=5)
    with torch.no_grad():  # spread z across the smooth and the saturated regions
        static.z.uniform_(-2, 2)
        per_example.z_layer.weight.normal_(0, 2)
    q = static()
    assert q.shape == (n,) and (q >= 0).all()
    torch.testing.assert_close(q.sum(), torch.tensor(1.0))
    w = per_example(torch.randn(11, 5))
    assert w.shape == (11, n) and (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(11))


def test_not_a_power_of_two_weights_at_most_one_and_reachability_term():
    torch.manual_seed(0)
    gate = DSelectKGate(5, k=2, gamma=1.0)  # 3 bits: codes 5..7 are no expert
    with torch.no_grad():
        gate.z.uniform_(-0.4, 0.4)
    r = gate.selectors()[0]
    assert float(gate().detach().sum()) < 1
    want = (1 / r.sum(-1)).sum()
    torch.testing.assert_close(gate.regularization(entropy_weight=0.0), want)
    torch.testing.assert_close(gate.regularization(entropy_weight=0.5), want + 0.5 * gate.entropy())


def test_entropy_is_the_selectors_entropy_and_zero_when_binary():
    torch.manual_seed(0)
    gate = DSelectKGate(4, k=2, gamma=1.0, in_features=3)
    x = torch.randn(6, 3)
    r = gate.selectors(x)
    want = -(r * torch.log(r + 1e-6)).sum(-1).sum(-1).mean()
    torch.testing.assert_close(gate.entropy(x), want)
    uniform = DSelectKGate(4, k=2)
    with torch.no_grad():
        uniform.z.zero_()  # S = 1/2: every selector uniform over 4 experts: entropy log 4 each
    torch.testing.assert_close(uniform.entropy(), torch.tensor(2 * math.log(4)), atol=1e-5, rtol=0)
    with torch.no_grad():
        uniform.z.copy_(torch.tensor([[1.0, -1.0], [-1.0, -1.0]]))  # saturated: one-hot selectors
    assert float(uniform.entropy().detach()) < 1e-5
    assert torch.equal(uniform(), torch.softmax(uniform.alpha, 0) @ torch.eye(4)[[1, 0]])


def _train_toy(seed, entropy_weight, steps=300):
    """Regression onto 8 orthogonal experts where the target uses experts 2 and 5 (weights .6/.4):
    the unique optimum is 2-sparse."""
    torch.manual_seed(seed)
    n, d = 8, 16
    v = torch.linalg.qr(torch.randn(d, n))[0].T  # orthonormal expert directions
    x = torch.randn(512, d)
    experts = x @ v.T  # (N, n): expert e's output is v_e . x
    y = 0.6 * experts[:, 2] + 0.4 * experts[:, 5]
    gate = DSelectKGate(n, k=2, gamma=1.0)
    opt = torch.optim.Adam(gate.parameters(), lr=0.05)
    for _ in range(steps):
        loss = (experts @ gate() - y).pow(2).mean() + gate.regularization(entropy_weight=entropy_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return gate


@pytest.mark.parametrize("seed", [0, 1])
def test_k_sparse_selection_at_convergence(seed):
    gate = _train_toy(seed, entropy_weight=0.01)
    q = gate().detach()
    assert int((q > 0).sum()) <= gate.k  # exact zeros everywhere else
    assert set(torch.nonzero(q).flatten().tolist()) == {2, 5}
    torch.testing.assert_close(q[[2, 5]], torch.tensor([0.6, 0.4]), atol=1e-3, rtol=0)
    # every selector is binary (one-hot): all its z beyond +-gamma/2
    assert (gate.z.detach().abs() >= gate.gamma / 2).all()
    assert abs(float(gate.entropy().detach())) < 1e-4


def test_dselect_k_block_mixture_rule_and_partition():
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Linear(5, 6), nn.ReLU()) for _ in range(4)]
    model = DSelectK(experts, {"a": nn.Linear(6, 1), "b": nn.Linear(6, 2)}, k=2, in_features=5)
    x = torch.randn(7, 5)
    out, z = model(x, return_features=True)
    e = [m(x) for m in model.experts]
    assert torch.equal(z, torch.stack(e, 1))
    for t in ("a", "b"):
        q = model.gates[t](x)
        torch.testing.assert_close(q.sum(-1), torch.ones(7))
        torch.testing.assert_close(out[t], model.towers[t](sum(q[:, i : i + 1] * e[i] for i in range(4))))
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == {id(p) for p in model.experts.parameters()}
    tasks = [{id(p) for p in model.task_parameters(t)} for t in ("a", "b")]
    assert not shared & tasks[0] and not tasks[0] & tasks[1]
    assert shared | tasks[0] | tasks[1] == {id(p) for p in model.parameters()}
    # the regulariser reaches only the gates
    model.regularization(x, entropy_weight=1.0).backward()
    assert all(p.grad is None for p in model.shared_parameters())
    assert all(p.grad is not None and p.grad.any() for g in model.gates.values() for p in g.z_layer.parameters())
    # static gates: one distribution repeated over the batch
    static = DSelectK(experts, [nn.Linear(6, 1), nn.Linear(6, 1)], k=1)
    w = static.gate_weights(x)["task0"]
    assert w.shape == (7, 4) and torch.equal(w[0], w[-1])


@pytest.mark.parametrize("method", METHODS)
def test_end_to_end(method):
    torch.manual_seed(0)
    model = DSelectK([nn.Sequential(nn.Linear(5, 6), nn.ReLU()) for _ in range(4)],
                     {"a": nn.Linear(6, 1), "b": nn.Linear(6, 2)}, k=2, in_features=5)
    x, y = torch.randn(10, 5), torch.randn(10, 2)
    check_balanced_steps(model, method, lambda: {t: (o - y[:, : o.shape[1]]).pow(2).mean()
                                                 for t, o in model(x).items()})


@pytest.mark.parametrize("method", REPRESENTATION_METHODS)
def test_end_to_end_representation_mode(method):
    torch.manual_seed(0)
    model = DSelectK([nn.Sequential(nn.Linear(5, 6), nn.ReLU()) for _ in range(4)],
                     {"a": nn.Linear(6, 1), "b": nn.Linear(6, 2)}, k=2, in_features=5)
    x, y = torch.randn(10, 5), torch.randn(10, 2)

    def losses():
        out, z = model(x, return_features=True)
        return {t: (o - y[:, : o.shape[1]]).pow(2).mean() for t, o in out.items()}, z

    check_balanced_steps(model, method, losses)


def test_bad_arguments():
    with pytest.raises(ValueError, match="k must"):
        DSelectKGate(4, k=0)
    with pytest.raises(ValueError, match="num_experts"):
        DSelectKGate(0, k=1)
    with pytest.raises(ValueError, match="gamma"):
        DSelectKGate(4, k=1, gamma=-1.0)
    with pytest.raises(ValueError, match="in_features"):
        DSelectKGate(4, k=1, in_features=0)
    with pytest.raises(ValueError, match="needs the input"):
        DSelectKGate(4, k=1, in_features=3)()
    with pytest.raises(ValueError, match="expects 3 input features"):
        DSelectKGate(4, k=1, in_features=3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="entropy_weight"):
        DSelectKGate(4, k=1).regularization(entropy_weight=-1.0)
    with pytest.raises(ValueError, match="experts"):
        DSelectK([], [nn.Linear(6, 1)])
    e = nn.Linear(5, 6)
    with pytest.raises(ValueError, match="tied"):
        DSelectK([e], {"a": e})
