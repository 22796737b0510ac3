"""Nash-MTL: the bargaining solution a_i (M a)_i = 1, two-task closed form, scale, clipping, state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradbalance as gb
from gradbalance.methods import NashMTL
from tests.weighted_sum_check import (
    check_end_to_end,
    check_resume,
    inputs_for,
    random_gradients,
    run_doc_snippets,
)


def well_conditioned(k, seed):
    grads = random_gradients(k, p=40, seed=seed)
    assert torch.linalg.cond(grads @ grads.T) < 1e3
    return grads


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_tasks_follow_the_sum_of_unit_gradients(seed):
    grads = random_gradients(2, seed=seed)
    d = NashMTL().aggregate(inputs_for(grads)).weights @ grads
    target = grads[0] / grads[0].norm() + grads[1] / grads[1].norm()
    cos = float(d @ target / (d.norm() * target.norm()))
    assert cos == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("k", range(2, 9))
def test_bargaining_solution(k):
    grads = well_conditioned(k, seed=k)
    gram = grads @ grads.T
    agg = NashMTL(max_norm=0.0).aggregate(inputs_for(grads))
    a = agg.weights
    assert (a > 0).all()
    torch.testing.assert_close(a * (gram @ a), torch.ones(k, dtype=torch.float64), atol=1e-5, rtol=0)
    assert agg.extras["residual"] < 1e-5 and agg.extras["solver_failures"] == 0


def test_scaling_the_gradients_by_s_scales_a_by_one_over_s():
    grads = well_conditioned(4, seed=3)
    a = NashMTL(max_norm=0.0).aggregate(inputs_for(grads)).weights
    for s in (1e-3, 7.0, 1e4):
        torch.testing.assert_close(NashMTL(max_norm=0.0).aggregate(inputs_for(s * grads)).weights, a / s,
                                   rtol=1e-6, atol=0)


def test_agrees_across_solvers_and_permutations():
    grads = well_conditioned(4, seed=5)
    a = NashMTL(max_norm=0.0).aggregate(inputs_for(grads)).weights
    a_scs = NashMTL(max_norm=0.0, cvxpy_solver="SCS").aggregate(inputs_for(grads)).weights
    torch.testing.assert_close(a_scs, a, rtol=1e-3, atol=0)
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(NashMTL(max_norm=0.0).aggregate(inputs_for(grads[perm])).weights, a[perm],
                               rtol=1e-6, atol=0)


def test_max_norm_clips_the_shared_update_only():
    grads = 10 * well_conditioned(3, seed=6)
    gram = grads @ grads.T
    raw = NashMTL(max_norm=0.0).aggregate(inputs_for(grads)).weights
    assert float(raw @ gram @ raw) ** 0.5 > 1.0
    agg = NashMTL(max_norm=1.0).aggregate(inputs_for(grads))
    assert float(agg.weights @ gram @ agg.weights) ** 0.5 == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(agg.weights / agg.weights.sum(), raw / raw.sum())
    torch.testing.assert_close(agg.head_weights, raw)  # heads: unclipped a_i
    big = NashMTL(max_norm=1e6).aggregate(inputs_for(grads))
    torch.testing.assert_close(big.weights, raw)


def test_update_every_reuses_the_last_weights_and_warm_starts():
    method = NashMTL(update_every=3, max_norm=0.0)
    grads = well_conditioned(3, seed=7)
    first = method.aggregate(inputs_for(grads, step=0))
    method.commit(first.pending)
    other = well_conditioned(3, seed=8)
    for step in (1, 2):
        agg = method.aggregate(inputs_for(other, step=step))
        assert agg.extras["reused"] is True
        torch.testing.assert_close(agg.weights, first.weights, rtol=0, atol=0)
        method.commit(agg.pending)
    fresh = method.aggregate(inputs_for(other, step=3))
    assert fresh.extras["reused"] is False
    torch.testing.assert_close(fresh.weights, NashMTL(max_norm=0.0).aggregate(inputs_for(other)).weights,
                               rtol=1e-6, atol=0)
    # warm start: the same problem again is solved at the first iteration
    method.commit(fresh.pending)
    assert method.aggregate(inputs_for(other, step=3)).extras["solver_iterations"] == 1


@pytest.mark.parametrize("grads", [
    torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64),  # exactly opposed
    torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64),  # a zero gradient
])
def test_solver_failure_raises_and_changes_nothing(grads):
    method = NashMTL()
    before = method.state_dict()
    with pytest.raises(RuntimeError, match="Nash-MTL"):
        method.aggregate(inputs_for(grads))
    assert method.state_dict()["num_tasks"] == before["num_tasks"] == 0


def test_task_count_is_checked():
    method = NashMTL()
    method.commit(method.aggregate(inputs_for(random_gradients(3))).pending)
    with pytest.raises(ValueError, match="3 tasks but this step has 2"):
        method.aggregate(inputs_for(random_gradients(2)))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"update_every": 0}, ValueError, "update_every must be >= 1, got 0"),
    ({"optim_niter": 1.5}, TypeError, "optim_niter must be an int"),
    ({"max_norm": float("nan")}, ValueError, "max_norm"),
    ({"cvxpy_solver": "NOT_A_SOLVER"}, ValueError, "cvxpy_solver 'NOT_A_SOLVER' is not installed"),
    ({"update_every": True}, TypeError, "update_every must be an int"),
])
def test_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        NashMTL(**kwargs)


def test_solver_argument_is_deprecated_but_works():
    with pytest.warns(FutureWarning, match="cvxpy_solver"):
        method = NashMTL(solver="scs")
    assert method.cvxpy_solver == "SCS" and method.solver == "SCS"
    assert NashMTL(max_norm=None).max_norm == 0.0


# ------------------------------------ the iterative solver's failure paths (k >= 3), injected
class _Value:
    value = None


class _FakeProblem:
    """Stands in for the cached cvxpy problem: each solve() plays the next scripted outcome."""

    def __init__(self, script, a):
        self.script, self.a, self.status, self.calls = list(script), a, None, 0

    def solve(self, **_):
        import cvxpy as cp

        self.calls += 1
        outcome = self.script.pop(0)
        if outcome == "raise":
            raise cp.error.SolverError("injected")
        self.status, self.a.value = outcome


def _with_script(monkeypatch, method, script):
    a = _Value()
    prob = _FakeProblem(script, a)
    monkeypatch.setattr(method, "_problem", lambda k: (prob, a, _Value(), _Value()))
    return prob


def _normalised(grads):
    gram = grads @ grads.T
    fro = float(torch.linalg.matrix_norm(gram))
    m_n = (gram / fro).numpy()
    exact, _, _ = NashMTL().solve(m_n, 1.0 / np.sqrt(np.diag(m_n)))
    return exact, fro


@pytest.mark.parametrize("first", [
    "raise",                      # the solver errors out
    "infeasible_with_solution",   # a non-optimal status, even with the right numbers: the status check
    "optimal_but_violating",      # "optimal" with a point violating a_i (M a)_i >= 1: the constraint check
])
def test_iterative_solver_first_iteration_failure_raises_and_changes_nothing(monkeypatch, first):
    grads = random_gradients(3, seed=4)
    exact, _ = _normalised(grads)
    outcome = {"raise": "raise", "infeasible_with_solution": ("infeasible", exact),
               "optimal_but_violating": ("optimal", 0.5 * exact)}[first]
    method = NashMTL(max_norm=None)
    prob = _with_script(monkeypatch, method, [outcome])
    with pytest.raises(RuntimeError, match="failed on the first iteration"):
        method.aggregate(inputs_for(grads))
    assert prob.calls == 1 and method.state_dict()["num_tasks"] == 0 and method.failures == 0


@pytest.mark.parametrize("second", ["raise", "infeasible_with_solution", "optimal_but_violating"])
def test_iterative_solver_later_failure_keeps_this_steps_last_iterate_and_says_so(monkeypatch, second):
    """A failure at iteration 2 returns iteration 1's point (never the warm start), warns and
    counts the failure."""
    grads = random_gradients(3, seed=4)
    exact, fro = _normalised(grads)
    first = 2.0 * exact  # feasible (a_i (M a)_i = 4) but not converged: the loop goes on
    outcome = {"raise": "raise", "infeasible_with_solution": ("infeasible", exact),
               "optimal_but_violating": ("optimal", 0.5 * exact)}[second]
    method = NashMTL(max_norm=None)
    prob = _with_script(monkeypatch, method, [("optimal", first), outcome])
    with pytest.warns(RuntimeWarning) as record:
        agg = method.aggregate(inputs_for(grads))
    messages = [str(w.message) for w in record]
    assert any("failed at iteration 2" in m for m in messages)
    assert any("max |a_i (M a)_i - 1| = 3.00e+00" in m for m in messages)  # the residual is reported too
    assert prob.calls == 2 and agg.extras["solver_failures"] == 1
    torch.testing.assert_close(agg.weights, torch.from_numpy(first) / math.sqrt(fro), rtol=1e-15, atol=0)
    method.commit(agg.pending)
    assert method.failures == 1


def test_registry_defaults():
    method = gb.methods.base.make_method("nash_mtl")
    assert repr(method) == "NashMTL(update_every=1, optim_niter=20, max_norm=1.0, cvxpy_solver='CLARABEL')"


def test_end_to_end():
    check_end_to_end(NashMTL(max_norm=0.0), k=3)
    check_end_to_end(NashMTL(), k=3)


def test_save_load_continue_is_bit_identical():
    method = check_resume(lambda: NashMTL(update_every=2), k=3, before=3, after=3)
    assert method.num_tasks == 3 and method.alpha.shape == (3,)


def test_doc_snippets_run():
    assert run_doc_snippets("nash_mtl") >= 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_task_closed_form_matches_the_iterations(seed):
    grads = random_gradients(2, p=30, seed=seed)
    gram = (grads @ grads.T).numpy()
    m_n = gram / float(torch.linalg.matrix_norm(torch.from_numpy(gram)))
    closed = NashMTL.solve_two(m_n, torch.finfo(torch.float64).eps)
    iterated, _, failures = NashMTL().solve(m_n, 1.0 / torch.from_numpy(m_n).diag().sqrt().numpy())
    assert failures == 0
    torch.testing.assert_close(torch.from_numpy(closed), torch.from_numpy(iterated), rtol=1e-5, atol=0)


@pytest.mark.parametrize("gap", [1e-3, 1e-6, 1e-9, 1e-12])
def test_two_nearly_opposed_gradients_get_the_exact_solution(gap):
    # cos(g1, g2) = -1 + gap (a point next to the Pareto front): the solution exists, with
    # weights ~ 1 / sqrt(gap); the cvxpy iterations used to fail here ("failed on the first
    # iteration") or stop with a huge residual
    theta = torch.tensor(math.acos(-1.0 + gap), dtype=torch.float64)
    g1 = torch.tensor([3.0, 0.0], dtype=torch.float64)
    g2 = 0.5 * torch.stack([torch.cos(theta), torch.sin(theta)])
    grads = torch.stack([g1, g2])
    gram = grads @ grads.T
    agg = NashMTL(max_norm=0.0).aggregate(inputs_for(grads))
    a = agg.weights
    assert (a > 0).all() and torch.isfinite(a).all()
    # the residual itself is computed with cancellation of order eps / gap
    torch.testing.assert_close(a * (gram @ a), torch.ones(2, dtype=torch.float64), rtol=0,
                               atol=1e-9 + 1e-14 / gap)
    d = a @ grads  # the bisector of the unit gradients, norm sqrt(2)
    assert float(d.norm()) == pytest.approx(math.sqrt(2.0), rel=1e-6 + 1e-14 / gap)
    assert float(d @ g1) > 0 and float(d @ g2) > 0
    clipped = NashMTL().aggregate(inputs_for(grads))
    assert float((clipped.weights @ grads).norm()) == pytest.approx(1.0, rel=2e-6 + 1e-14 / gap)


def test_two_opposed_gradients_in_float32_raise():
    grads = torch.tensor([[1.0, 2.0], [-1.0, -2.0 + 1e-7]], dtype=torch.float32)  # 1 + cos ~ 1e-15
    with pytest.raises(RuntimeError, match="opposed"):
        NashMTL().aggregate(inputs_for(grads))


def test_two_opposed_gradients_after_a_step_reuse_the_previous_weights_with_a_warning():
    method = NashMTL()
    good = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)
    method.commit(method.aggregate(inputs_for(good)).pending)
    previous_n = method.alpha_n.clone()
    opposed = torch.tensor([[2.0, 4.0], [-1.0, -2.0]], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="Pareto-stationary"):
        agg = method.aggregate(inputs_for(opposed, step=1))
    gram = opposed @ opposed.T
    raw = previous_n / float(torch.linalg.matrix_norm(gram)) ** 0.5
    torch.testing.assert_close(agg.head_weights, raw)
    assert agg.extras["solver_failures"] == 1
    assert float((agg.weights @ opposed).norm()) <= 1.0 + 1e-9  # still clipped
    method.commit(agg.pending)
    assert method.failures == 1
    torch.testing.assert_close(method.alpha_n, previous_n)


# ------------------------------------ the convex-concave iterations, start points and failure count
def _scaled_problem(k, seed):
    """Conflicting gradients with norms spread over e^{+-3}: the normalised Gram matrix M~."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, 10, generator=gen, dtype=torch.float64)
    g = g * torch.exp(1.5 * torch.randn(k, 1, generator=gen, dtype=torch.float64))
    return g, (g @ g.T / torch.linalg.matrix_norm(g @ g.T)).numpy()


def test_one_iteration_solves_the_official_linearised_subproblem():
    """optim_niter=1 runs exactly one convex-concave step from the start a^t: the official
    subproblem min sum(M a) + phi'(a^t) . a, phi'(a^t) = 1/a^t + M (1 / (M a^t)), subject to
    -log a_i - log (M a)_i <= 0 (AvivNavon/nash-mtl, weight_methods.py), solved here directly."""
    import cvxpy as cp

    _, m_n = _scaled_problem(3, seed=7)
    start = 1.0 / np.sqrt(np.diag(m_n))
    assert (start > 0).all() and (m_n @ start > 0).all()  # the linearisation applies
    one, it, failures = NashMTL(optim_niter=1).solve(m_n, start)
    assert it == 1 and failures == 0
    a = cp.Variable(3, nonneg=True)
    phi = 1.0 / start + m_n @ (1.0 / (m_n @ start))
    cp.Problem(cp.Minimize(cp.sum(m_n @ a) + phi @ a),
               [-cp.log(a[i]) - cp.log((m_n @ a)[i]) <= 0 for i in range(3)]).solve(solver="CLARABEL")
    np.testing.assert_allclose(one, a.value, rtol=1e-6)
    assert np.abs(one * (m_n @ one) - 1).max() > 1.0  # one step is not yet the solution here
    full, it_full, _ = NashMTL().solve(m_n, start)
    assert it_full > 1 and np.abs(full * (m_n @ full) - 1).max() < 1e-6


def test_first_solve_starts_from_inverse_norms_and_later_ones_warm_start():
    """Step 0 starts at a_i = 1 / ||g_i|| (on M~), not the official ones; a later step starts at
    the previous solution, so re-solving the same problem takes one iteration."""
    g, m_n = _scaled_problem(5, seed=14)
    agg = NashMTL().aggregate(inputs_for(g))
    from_norms = NashMTL().solve(m_n, 1.0 / np.sqrt(np.diag(m_n)))[1]
    from_ones = NashMTL().solve(m_n, np.ones(5))[1]
    assert agg.extras["solver_iterations"] == from_norms < from_ones
    g, m_n = _scaled_problem(5, seed=23)
    method = NashMTL()
    cold = method.aggregate(inputs_for(g))
    assert cold.extras["solver_iterations"] > 1
    method.commit(cold.pending)
    warm = method.aggregate(inputs_for(g, step=1))
    assert warm.extras["solver_iterations"] == 1
    torch.testing.assert_close(warm.weights, cold.weights, rtol=1e-6, atol=0)


def test_solver_failures_add_up_across_steps_and_in_the_state():
    method = NashMTL()
    method.commit(method.aggregate(inputs_for(torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64))).pending)
    opposed = torch.tensor([[2.0, 4.0], [-1.0, -2.0]], dtype=torch.float64)
    for step in (1, 2):
        with pytest.warns(RuntimeWarning, match="Pareto-stationary"):
            agg = method.aggregate(inputs_for(opposed, step=step))
        assert agg.extras["solver_failures"] == 1
        method.commit(agg.pending)
    assert method.failures == 2 and method.state_dict()["failures"] == 2


def test_reused_weights_are_re_clipped_with_the_current_gram_matrix():
    """update_every=2: the step in between reuses a, clipped to max_norm with this step's M."""
    method = NashMTL(update_every=2, max_norm=1.0)
    grads = 10 * well_conditioned(3, seed=7)
    first = method.aggregate(inputs_for(grads, step=0))
    method.commit(first.pending)
    other = 20 * well_conditioned(3, seed=8)
    gram = other @ other.T
    agg = method.aggregate(inputs_for(other, step=1))
    assert agg.extras["reused"] is True
    torch.testing.assert_close(agg.head_weights, first.head_weights, rtol=0, atol=0)  # the same a, unclipped
    raw_norm = float(first.head_weights @ gram @ first.head_weights) ** 0.5
    assert raw_norm > 1.5
    assert float(agg.weights @ gram @ agg.weights) ** 0.5 == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(agg.weights, first.head_weights / (raw_norm + 1e-6), rtol=1e-12, atol=0)
