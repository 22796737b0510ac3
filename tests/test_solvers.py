"""Min-norm QP solvers: optimality (KKT), agreement between solvers, degenerate inputs."""

from __future__ import annotations

import itertools

import pytest
import torch

from gradbalance.solvers import (
    SolverError,
    best_pair,
    fw_gap,
    min_norm,
    min_norm_closed_form,
    min_norm_cvxpy,
    min_norm_frank_wolfe,
)

D = torch.float64


def rand_g(k, p, seed, scales=None):
    g = torch.randn(k, p, dtype=D, generator=torch.Generator().manual_seed(seed))
    return g if scales is None else g * torch.as_tensor(scales, dtype=D)[:, None]


def assert_kkt(G, a, tol=1e-7):
    """a on the simplex; with d = G^T a: g_i . d >= ||d||^2 - tol, equality where a_i > 0."""
    scale = float((G * G).sum(1).max())
    assert float(a.min()) >= 0.0
    assert abs(float(a.sum()) - 1.0) <= 1e-12
    d = a @ G
    dd = float(d @ d)
    proj = G @ d
    assert float((dd - proj).max()) <= tol * scale, "some g_i . d < ||d||^2"
    active = a > 1e-6
    assert float((proj[active] - dd).abs().max()) <= tol * scale, "complementarity"


def all_solvers(M):
    out = {"fw": min_norm_frank_wolfe(M), "cvxpy": min_norm_cvxpy(M)}
    if M.shape[0] <= 2:
        out["closed"] = min_norm_closed_form(M)
    return out


@pytest.mark.parametrize("k", [2, 3, 5, 10, 32, 64])
@pytest.mark.parametrize("p_of_k", ["half", "k", "4k", "500"])
def test_random_problems_solvers_agree_and_satisfy_kkt(k, p_of_k):
    p = {"half": max(1, k // 2), "k": k, "4k": 4 * k, "500": 500}[p_of_k]
    G = rand_g(k, p, seed=1000 * k + p)
    M = G @ G.T
    scale = float(M.diagonal().max())
    res = all_solvers(M)
    ref = res["cvxpy"]
    for name, r in res.items():
        assert r.status == "optimal", name
        assert_kkt(G, r.weights)
        assert abs(float(r.objective - ref.objective)) <= 1e-9 * scale, name
        # ||d||^2 really is the squared norm of sum_i a_i g_i
        d = r.weights @ G
        assert abs(float(d @ d) - float(r.objective)) <= 1e-10 * scale
        if p >= k:  # rows independent: M is positive definite, the optimum is unique
            torch.testing.assert_close(r.weights, ref.weights, atol=1e-5, rtol=0)


def test_frank_wolfe_is_fast_in_iterations():
    """The corrective step adds about one vertex per iteration (k = 64: a few dozen)."""
    G = rand_g(64, 500, seed=3)
    r = min_norm_frank_wolfe(G @ G.T)
    assert r.status == "optimal" and r.iterations <= 2 * 64


def _cases():
    g = rand_g(3, 7, seed=5)
    u = g[0]
    yield "identical", torch.stack([u, u, u]), u[None]
    yield "collinear", torch.stack([u, 2 * u, 0.5 * u]), (0.5 * u)[None]
    yield "opposite", torch.stack([u, -u]), torch.zeros(1, 7, dtype=D)
    yield "opposite_plus_one", torch.stack([u, -u, g[1]]), torch.zeros(1, 7, dtype=D)
    yield "one_zero", torch.stack([g[0], torch.zeros(7, dtype=D), g[1]]), torch.zeros(1, 7, dtype=D)
    yield "all_zero", torch.zeros(4, 7, dtype=D), torch.zeros(1, 7, dtype=D)
    yield "tiny", 1e-100 * rand_g(5, 9, seed=6), None
    yield "rank_deficient", rand_g(20, 3, seed=7), None
    yield "badly_scaled", rand_g(4, 6, seed=8, scales=[1e-6, 1e6, 1.0, 1e3]), None
    yield "one_dimensional", rand_g(6, 1, seed=9), None


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_degenerate_problems(case):
    _name, G, d_star = case
    M = G @ G.T
    scale = float(M.diagonal().max())
    res = all_solvers(M)
    objectives = [float(r.objective) for r in res.values()]
    for solver, r in res.items():
        assert bool(torch.isfinite(r.weights).all()), solver
        assert_kkt(G, r.weights)
        assert abs(objectives[0] - float(r.objective)) <= 1e-9 * max(scale, 1e-300), solver
        if d_star is not None:  # the min-norm point is known in closed form
            torch.testing.assert_close(r.weights @ G, d_star[0], atol=1e-6 * scale**0.5, rtol=0)


def test_unique_degenerate_weights():
    """Where a degenerate optimum is unique, every solver finds the same weights."""
    u = rand_g(1, 5, seed=11)[0]
    v = rand_g(1, 5, seed=12)[0]
    cases = {
        "opposite": (torch.stack([u, -u]), [0.5, 0.5]),
        "collinear": (torch.stack([u, 2 * u, 0.5 * u]), [0.0, 0.0, 1.0]),
        "one_zero": (torch.stack([u, torch.zeros(5, dtype=D), v]), [0.0, 1.0, 0.0]),
        "badly_scaled": (torch.stack([1e-6 * u, 1e6 * v]), None),
    }
    for name, (G, expected) in cases.items():
        M = G @ G.T
        for solver, r in all_solvers(M).items():
            if expected is not None:
                torch.testing.assert_close(r.weights, torch.tensor(expected, dtype=D), atol=1e-5, rtol=0)
            else:  # the tiny gradient is (almost) the min-norm point: a ~ (1, 0)
                assert float(r.weights[0]) > 1 - 1e-9, (name, solver)


def test_solutions_are_scale_invariant():
    """Tiny (1e-100) and huge (1e100) copies of a problem have the same weights."""
    G = rand_g(6, 20, seed=13)
    base = min_norm_frank_wolfe(G @ G.T).weights
    for c in (1e-100, 1e-8, 1e8, 1e100):
        Gc = c * G
        torch.testing.assert_close(min_norm_frank_wolfe(Gc @ Gc.T).weights, base, atol=1e-10, rtol=0)
    G2 = G[:2]
    base2 = min_norm_closed_form(G2 @ G2.T).weights
    for c in (1e-100, 1e100):
        Gc = c * G2
        torch.testing.assert_close(min_norm_closed_form(Gc @ Gc.T).weights, base2, atol=1e-12, rtol=0)


@pytest.mark.parametrize("seed", range(6))
def test_closed_form_against_brute_force_grid(seed):
    G = rand_g(2, 3, seed=seed)
    if seed == 4:  # nearly opposite
        G[1] = -0.7 * G[0] + 0.01 * G[1]
    if seed == 5:  # one dominates: clipped to a vertex
        G[1] = 3.0 * G[0] + 0.1 * G[1]
    M = G @ G.T
    r = min_norm_closed_form(M)
    grid = torch.linspace(0, 1, 200_001, dtype=D)
    pts = grid[:, None] * G[0] + (1 - grid[:, None]) * G[1]
    vals = (pts * pts).sum(1)
    best = int(vals.argmin())
    assert float(r.objective) <= float(vals[best]) + 1e-12
    assert abs(float(r.weights[0]) - float(grid[best])) <= 1e-5
    torch.testing.assert_close(r.weights[1], 1 - r.weights[0])


def test_closed_form_identical_gradients_split_evenly_without_nan():
    g = rand_g(1, 4, seed=1)[0]
    for G in (torch.stack([g, g]), torch.zeros(2, 4, dtype=D)):
        r = min_norm_closed_form(G @ G.T)
        torch.testing.assert_close(r.weights, torch.tensor([0.5, 0.5], dtype=D))


@pytest.mark.parametrize("solver", ["frank_wolfe", "cvxpy"])
def test_permutation_invariance(solver):
    G = rand_g(7, 30, seed=21)
    M = G @ G.T
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    a = min_norm(M, solver).weights
    b = min_norm(M[perm][:, perm], solver).weights
    torch.testing.assert_close(b, a[perm], atol=1e-6, rtol=0)


def test_best_pair_is_the_best_segment():
    G = rand_g(5, 4, seed=31)
    M = G @ G.T
    i, j, gamma = best_pair(M)
    value = float(((gamma * G[i] + (1 - gamma) * G[j]) ** 2).sum())
    for p in range(5):
        for q in range(5):
            sub = min_norm_closed_form(M[[p, q]][:, [p, q]])
            assert value <= float(sub.objective) + 1e-12


def test_paper_frank_wolfe_counts_iterations_and_returns_last_iterate():
    G = rand_g(10, 40, seed=41)
    M = G @ G.T
    opt = min_norm_cvxpy(M)
    objs = []
    for n in (1, 2, 5, 20, 250):
        r = min_norm_frank_wolfe(M, max_iter=n, corrective=False)
        assert r.iterations == n and r.status == "max_iter"  # counter incremented, cap applies
        # the reported numbers describe the returned weights (no stale iterate)
        torch.testing.assert_close(r.objective, r.weights @ M @ r.weights)
        torch.testing.assert_close(r.gap, fw_gap(M, r.weights))
        objs.append(float(r.objective))
    assert all(b < a for a, b in itertools.pairwise(objs))  # every extra iteration was used
    # plain Frank-Wolfe converges, slowly: the gap bounds the sub-optimality
    assert objs[-1] - float(opt.objective) <= 2 * float(r.gap) + 1e-12
    assert objs[-1] - float(opt.objective) <= 1e-3 * float(M.diagonal().max())


def test_paper_frank_wolfe_stops_on_gap():
    G = rand_g(4, 3, seed=42)
    r = min_norm_frank_wolfe(G @ G.T, tol=1e-3, corrective=False)
    assert r.status == "optimal"
    assert float(r.gap) <= 1e-3 * float(r.objective) + 1e-9


def test_cvxpy_non_optimal_status_raises(monkeypatch):
    import cvxpy as cp

    monkeypatch.setattr(cp.Problem, "status", property(lambda self: cp.OPTIMAL_INACCURATE))
    G = rand_g(4, 6, seed=51)
    with pytest.raises(SolverError, match="optimal_inaccurate"):
        min_norm_cvxpy(G @ G.T)


def test_cvxpy_solver_exception_is_wrapped(monkeypatch):
    import cvxpy as cp

    def boom(self, *args, **kwargs):
        raise cp.error.SolverError("numerical trouble")

    monkeypatch.setattr(cp.Problem, "solve", boom)
    G = rand_g(4, 6, seed=52)
    with pytest.raises(SolverError, match="numerical trouble"):
        min_norm(G @ G.T, "cvxpy")
    assert issubclass(SolverError, ValueError)


def test_cvxpy_other_solver_and_unknown_solver():
    G = rand_g(5, 8, seed=53)
    M = G @ G.T
    ref = min_norm_frank_wolfe(M)
    scs = min_norm_cvxpy(M, solver="SCS", eps=1e-9)
    assert abs(float(scs.objective - ref.objective)) <= 1e-6 * float(M.diagonal().max())
    with pytest.raises(SolverError, match="not installed"):
        min_norm_cvxpy(M, solver="NOT_A_SOLVER")


def test_bad_inputs():
    with pytest.raises(ValueError, match="square"):
        min_norm(torch.zeros(2, 3, dtype=D))
    with pytest.raises(ValueError, match="NaN"):
        min_norm_frank_wolfe(torch.tensor([[1.0, float("nan")], [0.0, 1.0]], dtype=D))
    with pytest.raises(ValueError, match="k <= 2"):
        min_norm(torch.eye(3, dtype=D), "closed_form")
    with pytest.raises(ValueError, match="solver must be"):
        min_norm(torch.eye(3, dtype=D), "quadprog")
    with pytest.raises(ValueError, match="max_iter"):
        min_norm_frank_wolfe(torch.eye(3, dtype=D), max_iter=-1)
    with pytest.raises(ValueError, match="tol"):
        min_norm_frank_wolfe(torch.eye(3, dtype=D), tol=0.0)
    with pytest.raises(TypeError):
        min_norm_frank_wolfe([[1.0]])


def test_dispatcher_auto_and_float32_input():
    G = rand_g(2, 5, seed=61)
    M = (G @ G.T).float()
    auto = min_norm(M)
    assert auto.weights.dtype == D and auto.iterations == 0
    torch.testing.assert_close(auto.weights, min_norm_closed_form(M).weights)
    one = min_norm(torch.ones(1, 1, dtype=D))
    torch.testing.assert_close(one.weights, torch.ones(1, dtype=D))


def test_frank_wolfe_kkt_on_many_small_random_and_degenerate_problems():
    """Fuzz: scaled, duplicated, opposite and integer (tied) gradients; KKT always holds."""
    gen = torch.Generator().manual_seed(0)
    statuses = []
    for n in range(300):
        k = int(torch.randint(2, 25, (1,), generator=gen))
        p = int(torch.randint(1, 30, (1,), generator=gen))
        G = torch.randn(k, p, dtype=D, generator=gen)
        kind = n % 5
        if kind == 1:
            G = G * torch.exp(3 * torch.randn(k, 1, dtype=D, generator=gen))
        elif kind == 2:
            G[torch.randint(0, k, (k // 2,), generator=gen)] = G[0].clone()
        elif kind == 3:
            G = torch.cat([G[: k // 2], -G[: k - k // 2]])
        elif kind == 4:
            G = torch.round(G)
        r = min_norm_frank_wolfe(G @ G.T)
        statuses.append(r.status)
        assert bool(torch.isfinite(r.weights).all())
        assert_kkt(G, r.weights)
    assert statuses.count("optimal") >= 0.99 * len(statuses)


def test_plain_frank_wolfe_stops_at_the_first_iterate_within_the_default_tolerance():
    """Default tol = 1e-5 relative gap: the returned iterate is within it, the one before is not."""
    G = rand_g(8, 20, seed=3)
    M = G @ G.T
    r = min_norm_frank_wolfe(M, corrective=False)
    floor = 1e-13 * 8 * float(M.diagonal().max())
    assert r.status == "optimal" and r.iterations > 1
    assert float(r.gap) <= 1e-5 * float(r.objective) + floor
    before = min_norm_frank_wolfe(M, max_iter=r.iterations - 1, corrective=False)
    assert before.status == "max_iter"
    assert float(before.gap) > 1e-5 * float(before.objective) + floor


def test_dispatcher_passes_max_iter_and_tol_to_frank_wolfe():
    G = rand_g(8, 20, seed=4)
    M = G @ G.T
    exact = min_norm(M, "frank_wolfe")
    loose = min_norm(M, "frank_wolfe", tol=0.5)
    direct = min_norm_frank_wolfe(M, tol=0.5)
    assert loose.iterations == direct.iterations < exact.iterations
    assert torch.equal(loose.weights, direct.weights)
    assert float(loose.gap) <= 0.5 * float(loose.objective)
    capped = min_norm(M, "frank_wolfe", max_iter=0)  # the best pair, no iteration
    assert capped.status == "max_iter" and capped.iterations == 0
    i, j, gamma = best_pair(M)
    start = torch.zeros(8, dtype=D)
    start[i] += gamma
    start[j] += 1 - gamma
    torch.testing.assert_close(capped.weights, start, atol=1e-15, rtol=0)


def test_auto_solves_two_tasks_in_closed_form():
    """Identical gradients: the closed form splits evenly (Frank-Wolfe would return a vertex)."""
    g = rand_g(1, 4, seed=2)[0]
    G = torch.stack([g, g])
    r = min_norm(G @ G.T)
    torch.testing.assert_close(r.weights, torch.tensor([0.5, 0.5], dtype=D), atol=0, rtol=0)


def test_frank_wolfe_uses_only_the_symmetric_part_of_M():
    """a^T M a depends on (M + M^T) / 2 only; an asymmetric M (rounding in a float32 Gram matrix,
    here exaggerated) gives the weights of its symmetric part, not a different optimum."""
    G = rand_g(6, 10, seed=14)
    M = G @ G.T
    E = 1e-2 * rand_g(6, 6, seed=15)
    E = E - E.T
    ref = min_norm_frank_wolfe(M)
    r = min_norm_frank_wolfe(M + E)
    torch.testing.assert_close(r.weights, ref.weights, atol=1e-10, rtol=0)
    torch.testing.assert_close(r.objective, ref.objective, atol=1e-10, rtol=0)


def test_cvxpy_retries_an_inaccurate_tight_solve_at_the_solver_defaults(monkeypatch):
    """A Clarabel solve that cannot reach the 1e-12 tolerances (status optimal_inaccurate) is
    re-run once at Clarabel's own tolerances, and that answer is used."""
    import cvxpy as cp

    calls = []
    original_solve, original_status = cp.Problem.solve, cp.Problem.status

    def solve(self, *args, **kwargs):
        calls.append(kwargs)
        return original_solve(self, *args, **kwargs)

    def status(self):  # the first (tight) attempt reports inaccurate
        return cp.OPTIMAL_INACCURATE if len(calls) == 1 else original_status.fget(self)

    monkeypatch.setattr(cp.Problem, "solve", solve)
    monkeypatch.setattr(cp.Problem, "status", property(status))
    G = rand_g(5, 8, seed=16)
    M = G @ G.T
    r = min_norm_cvxpy(M)
    assert len(calls) == 2
    assert calls[0].get("tol_gap_abs") == 1e-12 and "tol_gap_abs" not in calls[1]
    assert_kkt(G, r.weights, tol=1e-6)


def test_cvxpy_answer_is_put_back_on_the_simplex(monkeypatch):
    """A solver answer off the constraint by its tolerance (a slightly wrong sum, a tiny negative
    entry) is clipped at 0 and renormalised: the weights returned lie on the simplex."""
    import cvxpy as cp

    original_solve = cp.Problem.solve

    def solve(self, *args, **kwargs):
        out = original_solve(self, *args, **kwargs)
        (b,) = self.variables()
        value = 1.001 * b.value
        value[value.argmin()] = -1e-9
        b.value = value
        return out

    monkeypatch.setattr(cp.Problem, "solve", solve)
    G = rand_g(6, 3, seed=19)  # four of the six weights are 0 at the optimum
    r = min_norm_cvxpy(G @ G.T)
    assert float(r.weights.min()) >= 0.0
    assert abs(float(r.weights.sum()) - 1.0) <= 1e-15
    assert_kkt(G, r.weights, tol=1e-6)
