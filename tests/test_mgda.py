"""MGDA / MGDA-UB: the weights solve the (normalised) min-norm QP, are applied to the raw
gradients on the shared parameters, and heads get their own task gradient."""

from __future__ import annotations

import pytest
import torch

import gradbalance as gb
from gradbalance.methods import MGDA, TaskInputs
from gradbalance.solvers import SolverError, min_norm_cvxpy
from tests.helpers import MultiTaskNet, assert_same_snapshot, make_batch, snapshot, task_losses

D = torch.float64


def inputs_from(G, losses=None):
    losses = torch.ones(G.shape[0], dtype=D) if losses is None else torch.as_tensor(losses, dtype=D)
    return TaskInputs(losses=losses, gram=G @ G.T)


def rand_g(k, p, seed):
    return torch.randn(k, p, dtype=D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("solver", ["auto", "frank_wolfe", "cvxpy"])
@pytest.mark.parametrize("k", [2, 3, 6])
def test_weights_solve_the_min_norm_problem(solver, k):
    G = rand_g(k, 20, seed=k)
    agg = MGDA(solver=solver).aggregate(inputs_from(G))
    a = agg.weights
    assert float(a.min()) >= 0 and abs(float(a.sum()) - 1) < 1e-12
    d = a @ G
    # KKT: every task gradient has at least ||d||^2 along d, equality on the active tasks
    proj = G @ d
    assert float((d @ d - proj).max()) <= 1e-8
    assert float((proj[a > 1e-6] - d @ d).abs().max()) <= 1e-6
    torch.testing.assert_close(agg.head_weights, torch.ones(k, dtype=D))
    assert agg.extras["status"] == "optimal"
    torch.testing.assert_close(agg.extras["update_norm"], d.norm())


def test_normalisation_is_applied_inside_the_solver_only():
    """'loss' weights = min-norm weights of g_i / L_i, applied unscaled (on the simplex)."""
    G = rand_g(4, 10, seed=1)
    losses = torch.tensor([0.5, 2.0, 1.0, 4.0], dtype=D)
    a = MGDA(normalization="loss").aggregate(inputs_from(G, losses)).weights
    Gn = G / losses[:, None]
    expected = min_norm_cvxpy(Gn @ Gn.T).weights
    torch.testing.assert_close(a, expected, atol=1e-6, rtol=0)
    assert abs(float(a.sum()) - 1) < 1e-12


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_normalisation_invariances(normalization):
    G = rand_g(3, 8, seed=2)
    losses = torch.tensor([1.0, 2.0, 3.0], dtype=D)
    m = MGDA(normalization=normalization)
    base = m.aggregate(inputs_from(G, losses)).weights
    c = torch.tensor([1.0, 100.0, 0.01], dtype=D)[:, None]
    grad_scaled = m.aggregate(inputs_from(G * c, losses)).weights  # gradient rescaled, loss not
    task_scaled = m.aggregate(inputs_from(G * c, losses * c[:, 0])).weights  # task x c: both
    close = lambda x, y: bool(torch.allclose(x, y, atol=1e-7, rtol=0))
    assert close(grad_scaled, base) == (normalization in ("l2", "loss+"))
    assert close(task_scaled, base) == (normalization in ("l2", "loss"))


def test_closed_form_two_task_value():
    """g1 = (1, 0), g2 = (0, 2): gamma = (4 - 0) / (1 + 4) = 0.8; with l2 both unit: 1/2."""
    G = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=D)
    torch.testing.assert_close(MGDA().aggregate(inputs_from(G)).weights, torch.tensor([0.8, 0.2], dtype=D))
    torch.testing.assert_close(MGDA(normalization="l2").aggregate(inputs_from(G)).weights,
                               torch.tensor([0.5, 0.5], dtype=D))


def test_permutation_invariance():
    G = rand_g(5, 12, seed=3)
    losses = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=D)
    perm = torch.tensor([3, 0, 4, 1, 2])
    for norm in ("none", "loss+"):
        m = MGDA(normalization=norm)
        a = m.aggregate(inputs_from(G, losses)).weights
        b = m.aggregate(inputs_from(G[perm], losses[perm])).weights
        torch.testing.assert_close(b, a[perm], atol=1e-9, rtol=0)


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
@pytest.mark.parametrize("case", ["zero", "all_zero", "tiny", "identical"])
def test_degenerate_gradients_give_finite_weights(normalization, case):
    g = rand_g(3, 5, seed=4)
    G = {"zero": torch.stack([g[0], torch.zeros(5, dtype=D), g[2]]),
         "all_zero": torch.zeros(3, 5, dtype=D),
         "tiny": 1e-100 * g,
         "identical": torch.stack([g[0], g[0], g[0]])}[case]
    agg = MGDA(normalization=normalization).aggregate(inputs_from(G))
    a = agg.weights
    assert bool(torch.isfinite(a).all()) and abs(float(a.sum()) - 1) < 1e-12 and float(a.min()) >= 0
    assert bool(torch.isfinite(agg.extras["update_norm"]))
    if case in ("zero", "all_zero"):  # 0 is in the hull: the update vanishes
        assert float((a @ G).norm()) == 0.0
    if case == "identical":
        torch.testing.assert_close(a @ G, g[0])


def test_loss_normalisation_rejects_bad_losses():
    G = rand_g(2, 4, seed=5)
    for norm in ("loss", "loss+"):
        with pytest.raises(ValueError, match="must be > 0"):
            MGDA(normalization=norm).aggregate(inputs_from(G, [1.0, -0.5]))
        with pytest.raises(ValueError, match="must be > 0"):
            MGDA(normalization=norm).aggregate(inputs_from(G, [0.0, 1.0]))
    # a zero loss with a zero gradient is fine (the normalised gradient is 0)
    G0 = torch.stack([torch.zeros(4, dtype=D), G[1]])
    a = MGDA(normalization="loss").aggregate(inputs_from(G0, [0.0, 1.0])).weights
    torch.testing.assert_close(a, torch.tensor([1.0, 0.0], dtype=D))


def _per_task_grads(model, x, y):
    _, losses = task_losses(model, x, y)
    shared = list(model.trunk.parameters())
    out = []
    for i, loss in enumerate(losses):
        gs = torch.autograd.grad(loss, shared + list(model.heads[i].parameters()), retain_graph=True)
        out.append(([g.double() for g in gs[: len(shared)]], [g.double() for g in gs[len(shared):]]))
    return losses, out


@pytest.mark.parametrize("normalization", ["none", "loss+"])
def test_end_to_end_exact_update_matches_hand_computation(normalization):
    k = 3
    model = MultiTaskNet(k, seed=0).double()
    x, y = make_batch(k)
    x, y = x.double(), y.double()
    losses, grads = _per_task_grads(model, x, y)
    G = torch.stack([torch.cat([g.flatten() for g in sh]) for sh, _ in grads])
    L = torch.stack([v.detach() for v in losses])
    s = torch.ones(k, dtype=D) if normalization == "none" else L * G.norm(dim=1)
    Gn = G / s[:, None]
    alpha = min_norm_cvxpy(Gn @ Gn.T).weights  # independent solver
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1),
                         method=MGDA(normalization=normalization), shared_params=model.trunk)
    opt.zero_grad()
    _, losses2 = task_losses(model, x, y)
    info = opt.backward(losses2)
    torch.testing.assert_close(info.weights, alpha, atol=1e-6, rtol=0)
    d = info.weights @ G  # sum_i alpha_i g_i on the RAW gradients
    got = torch.cat([p.grad.flatten() for p in model.trunk.parameters()])
    torch.testing.assert_close(got, d, atol=1e-10, rtol=1e-10)
    for i in range(k):  # heads: their own task's unweighted gradient
        for p, g in zip(model.heads[i].parameters(), grads[i][1]):
            torch.testing.assert_close(p.grad, g, atol=1e-12, rtol=1e-12)
    assert info.extras["solver"] == "frank_wolfe" and info.extras["status"] == "optimal"
    assert "extras/update_norm" in info.to_dict()
    torch.testing.assert_close(info.extras["update_norm"], d.norm())
    opt.step()


def test_representation_mode_mgda_ub():
    k = 3
    model = MultiTaskNet(k, seed=1).double()
    x, y = make_batch(k, seed=2)
    x, y = x.double(), y.double()
    z, losses = task_losses(model, x, y)
    Z = torch.stack([torch.autograd.grad(v, z, retain_graph=True)[0].flatten() for v in losses])
    alpha = min_norm_cvxpy(Z @ Z.T).weights
    total = sum(a * v for a, v in zip(alpha, losses))
    shared = list(model.trunk.parameters())
    want_shared = torch.autograd.grad(total, shared, retain_graph=True)
    want_heads = [torch.autograd.grad(losses[i], list(model.heads[i].parameters()), retain_graph=True)
                  for i in range(k)]
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), method="mgda_ub",
                         shared_params=model.trunk)
    assert opt.method.mode == "representation"
    opt.zero_grad()
    z, losses = task_losses(model, x, y)
    info = opt.backward(losses, features=z)
    assert info.engine == "representation"
    torch.testing.assert_close(info.weights, alpha, atol=1e-6, rtol=0)
    for p, g in zip(shared, want_shared):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-6)
    for i in range(k):
        for p, g in zip(model.heads[i].parameters(), want_heads[i]):
            torch.testing.assert_close(p.grad, g, atol=1e-12, rtol=1e-12)


def test_representation_mode_without_features_raises_and_changes_nothing():
    model = MultiTaskNet(2, seed=2)
    x, y = make_batch(2)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), method="mgda_ub",
                         shared_params=model.trunk)
    before = snapshot(model, opt)
    _, losses = task_losses(model, x, y)
    with pytest.raises(ValueError, match="features=z"):
        opt.backward(losses)
    assert_same_snapshot(before, snapshot(model, opt))


def test_cvxpy_failure_raises_and_leaves_the_model_unchanged(monkeypatch):
    import cvxpy as cp

    model = MultiTaskNet(3, seed=3)
    x, y = make_batch(3)
    opt = gb.GradBalance(torch.optim.Adam(model.parameters(), lr=0.1),
                         method=MGDA(solver="cvxpy"), shared_params=model.trunk)
    before = snapshot(model, opt)
    monkeypatch.setattr(cp.Problem, "status", property(lambda self: cp.INFEASIBLE))
    _, losses = task_losses(model, x, y)
    with pytest.raises(SolverError, match="infeasible"):
        opt.backward(losses)
    assert_same_snapshot(before, snapshot(model, opt))


def test_registry_and_hyperparameters():
    names = gb.available_methods()
    assert "mgda" in names and "mgda_ub" in names
    m = gb.methods.make_method("mgda")
    assert isinstance(m, MGDA) and m.mode == "exact" and m.normalization == "none"
    assert repr(MGDA(solver="cvxpy", normalization="loss+")) == (
        "MGDA(solver='cvxpy', normalization='loss+', mode='exact', max_iter=250, tol=1e-05)")
    assert m.state_dict() == {}
    for kwargs, match in [({"solver": "ecos"}, "solver"), ({"normalization": "L2"}, "normalization"),
                          ({"mode": "ub"}, "mode"), ({"max_iter": -1}, "max_iter"),
                          ({"max_iter": 2.5}, "max_iter"), ({"tol": 0}, "tol")]:
        with pytest.raises(ValueError, match=match):
            MGDA(**kwargs)
    with pytest.raises(ValueError, match="k <= 2"):
        MGDA(solver="closed_form").aggregate(inputs_from(rand_g(3, 4, seed=0)))


# ---------------------------------------- the official two-vector rule (documented, not followed)
def _official_from2(v11, v12, v22):
    """isl-org/MultiObjectiveOptimization multi_task/min_norm_solvers.py, lines 17-30."""
    if v12 >= v11:
        return 0.999
    if v12 >= v22:
        return 0.001
    return -1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12))


@pytest.mark.parametrize("g2", [(2.0, 0.0), (0.5, 0.0), (3.0, 1.0)])
def test_exact_two_vector_rule_where_the_official_code_clips_to_0_999(g2):
    """Where one gradient's projection on the other exceeds its own norm the min-norm point is
    a vertex: gradbalance returns it exactly, the official rule 0.999/0.001 of it, with a
    larger objective."""
    g = torch.tensor([[1.0, 0.0], list(g2)], dtype=torch.float64)
    m = g @ g.T
    w = MGDA().aggregate(TaskInputs(losses=torch.ones(2, dtype=torch.float64), gram=m)).weights
    gamma = _official_from2(float(m[0, 0]), float(m[0, 1]), float(m[1, 1]))
    official = torch.tensor([gamma, 1 - gamma], dtype=torch.float64)
    assert gamma in (0.999, 0.001)
    assert sorted(w.tolist()) == [0.0, 1.0]
    assert float(w @ m @ w) < float(official @ m @ official)
    torch.testing.assert_close(w, official, atol=1.001e-3, rtol=0)  # the same vertex, up to the 0.001


def test_exact_qp_is_never_above_the_official_projected_gradient_solution():
    from benchmarks.mgda_official import official_min_norm

    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        g = torch.randn(5, 12, generator=gen, dtype=torch.float64) * torch.randn(5, 1, generator=gen).exp()
        m = g @ g.T
        w = MGDA().aggregate(TaskInputs(losses=torch.ones(5, dtype=torch.float64), gram=m)).weights
        a, _, _ = official_min_norm(m.numpy())
        assert float(w @ m @ w) <= float(a @ m.numpy() @ a) * (1 + 1e-9)


def test_frank_wolfe_arguments_reach_the_solver_and_extras_name_it():
    """max_iter and tol are the solver's (not its defaults); extras name the solver actually run
    (auto: the closed form for two tasks, Frank-Wolfe beyond)."""
    from gradbalance.solvers import best_pair, min_norm_frank_wolfe

    G = rand_g(8, 20, seed=4)
    M = G @ G.T
    capped = MGDA(solver="frank_wolfe", max_iter=0).aggregate(inputs_from(G))
    assert capped.extras["status"] == "max_iter" and capped.extras["iterations"] == 0
    i, j, gamma = best_pair(M)
    start = torch.zeros(8, dtype=D)
    start[i] += gamma
    start[j] += 1 - gamma
    torch.testing.assert_close(capped.weights, start, atol=1e-15, rtol=0)
    loose = MGDA(solver="frank_wolfe", tol=0.5).aggregate(inputs_from(G))
    ref = min_norm_frank_wolfe(M, tol=0.5)
    assert torch.equal(loose.weights, ref.weights)
    assert loose.extras["iterations"] == ref.iterations < min_norm_frank_wolfe(M).iterations
    assert MGDA().aggregate(inputs_from(G)).extras["solver"] == "frank_wolfe"
    two = MGDA().aggregate(inputs_from(G[:2]))
    assert two.extras["solver"] == "closed_form" and two.extras["iterations"] == 0
