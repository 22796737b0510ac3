"""FairGrad: the fixed-point equation, the Nash-MTL case alpha = 1, scale and order."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from gradbalance.methods import FairGrad, TaskInputs
from tests.modern_checks import check_one_step


def _weights(g, alpha=1.0):
    agg = FairGrad(alpha).aggregate(
        TaskInputs(losses=torch.ones(g.shape[0], dtype=torch.float64), gram=g @ g.T)
    )
    return agg.extras["solution"], agg


def _grads(k, seed, p=20):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, p, generator=gen, dtype=torch.float64)
    return g * torch.logspace(-1, 1, k, dtype=torch.float64)[:, None]


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("k", [2, 4])
def test_fixed_point_equation_holds(alpha, k):
    g = _grads(k, seed=k)
    w, agg = _weights(g, alpha)
    assert bool((w > 0).all())
    m = g @ g.T
    torch.testing.assert_close(m @ w, w ** (-1 / alpha), rtol=1e-8, atol=0)
    assert agg.extras["residual"] < 1e-8


def test_alpha_one_is_the_nash_mtl_condition():
    g = _grads(3, seed=7)
    w, _ = _weights(g, 1.0)
    torch.testing.assert_close(
        w * (g @ g.T @ w), torch.ones(3, dtype=torch.float64), rtol=1e-8, atol=0
    )
    # two tasks: the direction is proportional to g1/||g1|| + g2/||g2|| (as for Nash-MTL)
    g2 = _grads(2, seed=8)
    d = _weights(g2)[0] @ g2
    bisector = g2[0] / g2[0].norm() + g2[1] / g2[1].norm()
    torch.testing.assert_close(d / d.norm(), bisector / bisector.norm(), rtol=0, atol=1e-8)


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_gradient_scale_changes_weights_by_the_closed_form_factor(alpha):
    g = _grads(3, seed=1)
    w, _ = _weights(g, alpha)
    w_scaled, _ = _weights(10.0 * g, alpha)  # M -> 100 M
    torch.testing.assert_close(w_scaled, w * 100.0 ** (-alpha / (1 + alpha)), rtol=1e-7, atol=0)


def test_invariant_to_task_order():
    g = _grads(4, seed=5)
    perm = torch.tensor([3, 1, 0, 2])
    w, _ = _weights(g)
    w_perm, _ = _weights(g[perm])
    torch.testing.assert_close(w_perm, w[perm], rtol=1e-8, atol=0)


def test_orthogonal_closed_form_and_zero_gradient_task():
    g = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.5, 0.0]], dtype=torch.float64)
    w, _ = _weights(g, 2.0)  # orthogonal: ||g_i||^2 w_i = w_i^(-1/2)  =>  w_i = ||g_i||^(-4/3)
    expected = torch.tensor([2.0 ** (-4 / 3), 0.0, 0.5 ** (-4 / 3)], dtype=torch.float64)
    torch.testing.assert_close(w, expected, rtol=1e-8, atol=0)


def test_validation_and_repr():
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
            FairGrad(bad)
    for bad in ("1", True):
        with pytest.raises(TypeError, match="alpha must be a number"):
            FairGrad(bad)
    with pytest.raises(ValueError, match="wiring must be one of"):
        FairGrad(wiring="paper")
    with pytest.raises(ValueError, match="max_norm"):
        FairGrad(max_norm=-1.0)
    assert repr(FairGrad(2)) == "FairGrad(alpha=2.0, max_norm=1.0, wiring='official')"


def test_end_to_end_step_heads_get_their_plain_gradients():
    agg, info = check_one_step("fairgrad")
    torch.testing.assert_close(agg.head_weights, torch.ones_like(agg.weights))
    torch.testing.assert_close(info.weights, agg.weights)
    agg, info = check_one_step(FairGrad(wiring="libmtl", max_norm=None))
    torch.testing.assert_close(agg.head_weights, agg.extras["solution"])


# ------------------------------------------------------- the official wiring, against a port
def _official_fairgrad_step(model, heads, losses_fn, alpha, max_norm):
    """A port of OptMN-Lab/fairgrad methods/weight_methods.py, class FairGrad: each loss
    backpropagated on its own, the shared gradients collected and cleared (lines 797-805), the
    weights by least_squares from 1/k with bounds (0, inf) (lines 814-821), the shared gradient
    overwritten with k * sum_i w_i g_i (overwrite_grad, lines 845-855), then
    clip_grad_norm_(shared, max_norm) (backward, lines 870-871)."""
    from scipy.optimize import least_squares

    shared = list(model.parameters())
    losses = losses_fn()
    k = len(losses)
    rows = []
    for i in range(k):
        losses[i].backward(retain_graph=i < k - 1)
        rows.append(torch.cat([p.grad.reshape(-1) for p in shared]))
        for p in shared:
            p.grad = None
    grads = torch.stack(rows, 1)  # (P, k), as grad2vec fills it
    a = (grads.t() @ grads).numpy()
    res = least_squares(lambda x: a @ x - np.power(1 / x, 1 / alpha), np.ones(k) / k, bounds=(0, np.inf),
                        ftol=1e-15, xtol=1e-15, gtol=1e-15)
    g = (grads * torch.from_numpy(res.x).view(1, -1)).sum(1) * k
    offset = 0
    for p in shared:
        p.grad = g[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(shared, max_norm)
    return res.x


@pytest.mark.parametrize("max_norm", [1.0, 1e-3, None])
@pytest.mark.parametrize("k", [2, 3])
def test_gradients_match_a_port_of_the_official_code(k, max_norm):
    import gradbalance as gb

    torch.manual_seed(k)
    trunk = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh()).double()
    heads = torch.nn.ModuleList(torch.nn.Linear(6, 1) for _ in range(k)).double()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(12, k, generator=gen, dtype=torch.float64)

    def losses_fn():
        z = trunk(x)
        return [((h(z).squeeze(-1) - y[:, i]) ** 2).mean() * (i + 1) for i, h in enumerate(heads)]

    _official_fairgrad_step(trunk, heads, losses_fn, 2.0, max_norm or 0.0)
    want = [p.grad.clone() for p in list(trunk.parameters()) + list(heads.parameters())]
    for p in list(trunk.parameters()) + list(heads.parameters()):
        p.grad = None
    opt = gb.GradBalance(torch.optim.SGD(list(trunk.parameters()) + list(heads.parameters()), lr=0.1),
                         FairGrad(alpha=2.0, max_norm=max_norm), shared_params=trunk)
    info = opt.backward(losses_fn())
    got = [p.grad for p in list(trunk.parameters()) + list(heads.parameters())]
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-12)
    if max_norm == 1e-3:
        assert info.extras["clip"] < 1.0  # the clip acted


def test_libmtl_wiring_is_the_gradient_of_the_weighted_sum():
    g = _grads(3, seed=3)
    m = g @ g.T
    agg = FairGrad(wiring="libmtl", max_norm=None).aggregate(
        TaskInputs(losses=torch.ones(3, dtype=torch.float64), gram=m))
    official = FairGrad(max_norm=None).aggregate(TaskInputs(losses=torch.ones(3, dtype=torch.float64), gram=m))
    torch.testing.assert_close(agg.weights, agg.extras["solution"], rtol=0, atol=0)
    assert agg.head_weights is not None
    torch.testing.assert_close(agg.head_weights, agg.extras["solution"], rtol=0, atol=0)
    torch.testing.assert_close(official.weights, 3 * agg.weights, rtol=1e-15, atol=0)
    clipped = FairGrad(wiring="libmtl", max_norm=1e-3).aggregate(
        TaskInputs(losses=torch.ones(3, dtype=torch.float64), gram=m))
    w = clipped.weights
    assert float(w @ m @ w) ** 0.5 == pytest.approx(1e-3, rel=1e-5)
    torch.testing.assert_close(clipped.head_weights, agg.extras["solution"], rtol=0, atol=0)  # heads unclipped


# ---------------------------------------------------------------- two tasks: the scalar solve
def _opposed(gap, n1=3.0, n2=0.5):
    """Two gradients with cos = -1 + gap and norms n1, n2 (a point next to the Pareto front)."""
    theta = math.acos(-1.0 + gap)
    return torch.tensor([[n1, 0.0], [n2 * math.cos(theta), n2 * math.sin(theta)]], dtype=torch.float64)


def _exact(m, alpha, w0):
    """The solution for the given (float64) M in 60-digit arithmetic, by Newton from w0."""
    mp = pytest.importorskip("mpmath")
    with mp.workdps(60):
        mm = [[mp.mpf(float(v)) for v in row] for row in m.tolist()]
        p = 1 / mp.mpf(alpha)
        f = lambda a, b: [mm[0][0] * a + mm[0][1] * b - a**-p, mm[1][0] * a + mm[1][1] * b - b**-p]  # noqa: E731
        sol = mp.findroot(f, [mp.mpf(float(v)) for v in w0])
        return mp, [sol[0], sol[1]], mm, p


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("gap", [1.0, 1e-2, 1e-8, 1e-12])
def test_two_tasks_exact_near_opposed(alpha, gap):
    g = _opposed(gap)
    m = g @ g.T
    w, agg = _weights(g, alpha)
    assert bool((w > 0).all()) and agg.extras["solver_failures"] == 0
    mp, exact, mm, p = _exact(m, alpha, w)
    with mp.workdps(60):
        wm = [mp.mpf(float(v)) for v in w]
        # forward error against the exact solution of M w = w^(-1/alpha) for this M
        assert max(abs(wm[i] / exact[i] - 1) for i in range(2)) < 1e-13
        # the equations hold to machine precision relative to the size of their terms
        for i in range(2):
            terms = abs(mm[i][0] * wm[0]) + abs(mm[i][1] * wm[1]) + wm[i] ** -p
            assert abs(mm[i][0] * wm[0] + mm[i][1] * wm[1] - wm[i] ** -p) / terms < 1e-14
    if gap >= 1e-2:  # well conditioned: the float64 relative residual is itself ~1e-12
        torch.testing.assert_close(m @ w, w ** (-1 / alpha), rtol=1e-12, atol=0)


@pytest.mark.parametrize("alpha", [0.5, 2.0, 5.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_task_solve_agrees_with_least_squares(alpha, seed):
    g = _grads(2, seed=seed)
    m = (g @ g.T).numpy()
    closed = FairGrad.solve_two(m, alpha)
    generic = FairGrad(alpha).solve(m)
    torch.testing.assert_close(torch.from_numpy(closed), torch.from_numpy(generic), rtol=1e-10, atol=0)


def test_two_tasks_alpha_one_is_the_nash_closed_form():
    g = _opposed(1e-8)
    w, _ = _weights(g, 1.0)
    expected = 1.0 / (g.norm(dim=1) * math.sqrt(1e-8))
    torch.testing.assert_close(w, expected, rtol=1e-7, atol=0)  # 1e-8: the gap of the rounded g


@pytest.mark.parametrize("alpha", [0.5, 1.0, 5.0])
def test_two_tasks_scale_law_and_order(alpha):
    g = _opposed(1e-6)
    w, _ = _weights(g, alpha)
    m = g @ g.T
    for s, rtol in ((2.0**-20, 1e-13), (8.0, 1e-13), (2.0**30, 1e-13), (7.3, 1e-9)):
        # M -> s M; a power of 2 is exact, 7.3 rounds M (1 + cos moves by ~eps / 1e-6)
        agg = FairGrad(alpha).aggregate(TaskInputs(losses=torch.ones(2, dtype=torch.float64), gram=s * m))
        torch.testing.assert_close(agg.extras["solution"], w * s ** (-alpha / (1 + alpha)), rtol=rtol, atol=0)
    w_swapped, _ = _weights(g.flip(0), alpha)
    torch.testing.assert_close(w_swapped, w.flip(0), rtol=0, atol=0)


def test_two_opposed_gradients_raise_first_then_reuse_the_previous_weights():
    method = FairGrad(2.0)
    opposed = torch.tensor([[2.0, 4.0], [-1.0, -2.0]], dtype=torch.float64)
    inputs = TaskInputs(losses=torch.ones(2, dtype=torch.float64), gram=opposed @ opposed.T)
    with pytest.raises(RuntimeError, match="opposed"):
        method.aggregate(inputs)
    good = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)
    first = method.aggregate(TaskInputs(losses=torch.ones(2, dtype=torch.float64), gram=good @ good.T))
    method.commit(first.pending)
    with pytest.warns(RuntimeWarning, match="Pareto-stationary"):
        agg = method.aggregate(inputs)
    # rescaled by the scale law: s = max diag of M (5 before, 20 now)
    torch.testing.assert_close(agg.extras["solution"], first.extras["solution"] * 4.0 ** (-2.0 / 3.0),
                               rtol=1e-14, atol=0)
    assert agg.extras["solver_failures"] == 1
    method.commit(agg.pending)
    assert method.failures == 1 and method.state_dict()["failures"] == 1
    fresh = FairGrad(2.0)
    fresh.load_state_dict(method.state_dict())
    torch.testing.assert_close(fresh.w_n, method.w_n)


def test_defaults_are_the_official_class_defaults():
    import gradbalance as gb

    expected = "FairGrad(alpha=1.0, max_norm=1.0, wiring='official')"
    assert repr(FairGrad()) == expected and repr(gb.methods.make_method("fairgrad")) == expected


def _near_opposed_inputs(delta, dtype):
    # g1 = (1, 0), g2 = (-1, delta): 1 + cos = delta^2 / 2 to first order
    g = torch.tensor([[1.0, 0.0], [-1.0, delta]], dtype=dtype)
    return TaskInputs(losses=torch.ones(2, dtype=torch.float64), gram=g @ g.T)


def test_opposed_up_to_the_gram_precision_is_100_eps_of_its_dtype():
    # float64: 1 + cos ~ 6.6e-15 = 30 eps is below the 100 eps threshold: no solution
    with pytest.raises(RuntimeError, match=r"1 \+ cos = 6\.6\de-15"):
        FairGrad().aggregate(_near_opposed_inputs(1.15e-7, torch.float64))
    # 1 + cos ~ 1e-6: solvable from a float64 Gram (the Nash closed form for alpha = 1) ...
    inputs = _near_opposed_inputs(2**0.5 * 1e-3, torch.float64)
    w = FairGrad().aggregate(inputs).extras["solution"]
    m = inputs.gram
    gap = float(torch.linalg.det(m)) / float(m[0, 0] * m[1, 1] - m[0, 1] * m.diagonal().prod().sqrt())
    torch.testing.assert_close(w, 1 / (m.diagonal().sqrt() * gap**0.5), rtol=1e-6, atol=0)
    # ... but not from a float32 one, where it is below 100 eps32 = 1.2e-5: rounding noise
    with pytest.raises(RuntimeError, match="opposed"):
        FairGrad().aggregate(_near_opposed_inputs(2**0.5 * 1e-3, torch.float32))


def test_fallback_failures_accumulate_and_survive_a_state_round_trip():
    method = FairGrad(2.0)
    good = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)
    opposed = torch.tensor([[2.0, 4.0], [-1.0, -2.0]], dtype=torch.float64)
    ones = torch.ones(2, dtype=torch.float64)
    method.commit(method.aggregate(TaskInputs(losses=ones, gram=good @ good.T)).pending)
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match="Pareto-stationary"):
            method.commit(method.aggregate(TaskInputs(losses=ones, gram=opposed @ opposed.T)).pending)
    assert method.failures == 2
    fresh = FairGrad(2.0)
    fresh.load_state_dict(method.state_dict())
    assert fresh.failures == 2 and fresh.state_dict()["failures"] == 2


def test_a_single_live_task_gets_the_one_dimensional_solution():
    # k = 2, task 0 has a zero gradient: ||g||^2 w = w^(-1/alpha), w = ||g||^(-2 alpha / (1 + alpha))
    g = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    w, _ = _weights(g, 2.0)
    torch.testing.assert_close(w, torch.tensor([0.0, 5.0 ** (-4 / 3)], dtype=torch.float64), rtol=1e-14, atol=0)


def test_weights_use_the_symmetric_part_of_the_gram():
    g = _grads(3, seed=11)
    skew = 0.05 * torch.triu(torch.ones(3, 3, dtype=torch.float64), 1)
    bent = g @ g.T + skew - skew.T
    ref, _ = _weights(g)
    ones = torch.ones(3, dtype=torch.float64)
    for m in (bent, bent.T):
        got = FairGrad().aggregate(TaskInputs(losses=ones, gram=m)).extras["solution"]
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=0)


class _InexactFairGrad(FairGrad):
    """FairGrad whose k >= 3 solver stops at a relative error ``err`` of the exact solution."""

    def __init__(self, err):
        super().__init__()
        self.err = err

    def solve(self, gram):
        return super().solve(gram) * (1 + self.err)


def test_a_k3_solve_with_relative_residual_above_1e_6_warns():
    g = _grads(3, seed=2)
    inputs = TaskInputs(losses=torch.ones(3, dtype=torch.float64), gram=g @ g.T)
    with pytest.warns(RuntimeWarning, match="relative residual"):
        agg = _InexactFairGrad(1e-5).aggregate(inputs)
    assert 1e-6 < agg.extras["residual"] < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        agg = _InexactFairGrad(1e-8).aggregate(inputs)
    assert agg.extras["residual"] < 1e-6


def test_bad_state_is_refused_and_changes_nothing():
    method = FairGrad()
    g = _grads(2, seed=1)
    method.commit(method.aggregate(TaskInputs(losses=torch.ones(2, dtype=torch.float64), gram=g @ g.T)).pending)
    before = method.state_dict()
    with pytest.raises(ValueError, match="missing"):
        method.load_state_dict({"failures": 5})
    after = method.state_dict()
    assert after["failures"] == before["failures"] == 0 and torch.equal(after["w_n"], before["w_n"])


@pytest.mark.parametrize("max_norm", [None, 1e-3])
def test_reported_update_norm_is_the_norm_of_the_applied_shared_update(max_norm):
    g = _grads(3, seed=4)
    agg = FairGrad(max_norm=max_norm).aggregate(TaskInputs(losses=torch.ones(3, dtype=torch.float64), gram=g @ g.T))
    applied = float((agg.weights @ g).norm())
    assert agg.extras["update_norm"] == pytest.approx(applied, rel=1e-10)
    if max_norm is not None:
        assert agg.extras["clip"] < 1.0 and applied == pytest.approx(max_norm, rel=1e-3)
