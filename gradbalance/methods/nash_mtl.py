"""Nash-MTL (Navon et al. 2022), following the official code (AvivNavon/nash-mtl)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from gradbalance.methods.base import (
    Aggregation,
    Method,
    TaskInputs,
    check_num_tasks,
    check_number,
    register,
    require_gram,
)

__all__ = ["NashMTL"]

# compiled cvxpy problems, one per number of tasks, shared by all instances (a cache, not state:
# each solve sets every parameter, and solver-level warm starts are off)
_PROBLEMS: dict[int, tuple] = {}


@register("nash_mtl", "Nash-MTL: the Nash bargaining solution a_i (M a)_i = 1, shared norm clipped to 1")
class NashMTL(Method):
    """Multi-Task Learning as a Bargaining Game (Nash-MTL).

    Takes the Nash bargaining solution among the tasks: the update ``d = sum_i a_i g_i`` with
    ``a > 0`` solving ``M a = 1 / a`` (``M = G G^T``), i.e. ``a_i (M a)_i = 1`` for every task.
    As in the paper and the official code, ``a`` is found by up to ``optim_niter``
    convex-concave iterations, each a cvxpy problem linearising the concave part around the
    previous iterate ``a^t``::

        min_a  sum_i (M~ a)_i + phi'(a^t) . a    s.t.  log a_i + log (M~ a)_i >= 0,  a >= 0
        phi'(a^t) = 1 / a^t + M~ (1 / (M~ a^t))

    on the normalised ``M~ = M / ||M||_F`` (for conditioning; the official code normalises the
    same way), stopping when the iterate moves less than ``1e-6`` or ``max_i |a_i (M~ a)_i - 1|
    < 1e-6``. The first iteration is warm-started from the previous step's solution (on the
    first step from ``1 / ||g_i||``, the solution's scaling, where the official code starts
    from ones). The solution of the raw system is ``a = a~ / sqrt(||M||_F)``, so ``a``
    scales like ``1 / ||g||``: the update does not grow with the loss scale.

    ``max_norm`` clipping is part of the method (official code: ``clip_grad_norm_`` of the
    shared parameters after ``backward``). Here it scales the shared weights: with
    ``n = sqrt(a^T M a)`` the shared update is ``min(1, max_norm / (n + 1e-6)) sum_i a_i g_i``,
    still a weighted sum.

    Args:
        update_every: solve every this many steps (default 1); the steps in between reuse the
            last solution (re-clipped with the current ``M``). Only the solver cost is saved:
            the engine still computes ``M`` every step.
        optim_niter: maximum convex-concave iterations per solve (default 20).
        max_norm: clip the norm of the shared update to this value (default 1.0); ``None`` or
            ``<= 0`` disables clipping.
        cvxpy_solver: the cvxpy backend, named explicitly (default ``"CLARABEL"``; ``"SCS"``
            also ships with cvxpy). The official ``ECOS`` is no longer installed by cvxpy >= 1.6.
            (Called ``solver`` before; ``solver=`` still works with a ``FutureWarning``. MGDA's
            ``solver`` names an algorithm, hence the rename.)

    ``update_every`` here vs the wrapper's: ``NashMTL(update_every=n)`` is the official
    ``update_weights_every``: the engine still computes the Gram matrix every step and only
    the cvxpy solve is skipped, the reused weights being re-clipped with the current ``M``.
    ``GradBalance(..., update_every=n)`` (the wrapper's) skips the per-task gradients as well
    and reuses the last weights as they were (one ordinary backward). Use one or the other;
    both count the optimizer's committed steps. ``extras["reused"]`` is ``True`` on a step
    that reused weights, in both.

    Task-specific parameters get ``a_i`` times their own gradient, unclipped (the official
    code back-propagates ``sum_i a_i L_i`` and clips the shared parameters only).

    With two tasks the solution has a closed form, used instead of the iterations:
    ``a_i = 1 / (||g_i|| sqrt(1 + cos(g1, g2)))`` (then ``d = (u1 + u2) / sqrt(1 + cos)`` with
    ``u_i = g_i / ||g_i||``, always of norm ``sqrt(2)``). It is exact where the solver is
    ill-conditioned: for nearly opposed gradients (a point near the Pareto front) the weights
    grow like ``1 / sqrt(1 + cos)`` and the cvxpy iterations fail or stop far from the
    solution, although the problem is well posed until ``cos = -1``. With two tasks a zero
    gradient, or ``1 + cos <= 100 eps`` (``eps`` of the Gram matrix's dtype: opposed up to the
    precision ``M`` was computed in: a Pareto-stationary point) has no solution: on the first
    step this raises a ``RuntimeError`` and changes nothing; later the previous step's
    normalised solution is reused (rescaled to the current ``||M||_F``, then clipped), with a
    ``RuntimeWarning``, counted in ``extras["solver_failures"]`` and the state (the official
    code also keeps the previous weights when its solver fails). A run that reaches the
    front therefore keeps going instead of stopping with an error.

    Failures are never silent: if the first iteration of a solve fails (solver error,
    infeasible, e.g. a zero or exactly opposed gradient) a ``RuntimeError`` is raised and
    nothing changes; if a later one fails, the last successful iterate *of this step* is used,
    a warning is issued and ``extras["solver_failures"]`` counts it (also summed in the state).

    State: the last normalised solution ``a~`` (warm start), the last ``a`` (reused between
    updates), the number of tasks and the total number of solver failures.

    Example:
        >>> import torch
        >>> from gradbalance.methods import NashMTL, TaskInputs
        >>> M = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> agg = NashMTL(max_norm=0.0).aggregate(TaskInputs(losses=torch.ones(2, dtype=torch.float64), gram=M))
        >>> agg.weights.round(decimals=4)
        tensor([0.5000, 1.0000], dtype=torch.float64)

    References:
        A. Navon, A. Shamsian, I. Achituve, H. Maron, K. Kawaguchi, G. Chechik, E. Fetaya.
        "Multi-Task Learning as a Bargaining Game." ICML 2022. Official code:
        github.com/AvivNavon/nash-mtl.
    """

    requires = "gram"

    def __init__(self, update_every: int = 1, optim_niter: int = 20, max_norm: float | None = 1.0,
                 cvxpy_solver: str = "CLARABEL", *, solver: str | None = None) -> None:
        update_every = check_number("update_every", update_every, minimum=1, integer=True)
        optim_niter = check_number("optim_niter", optim_niter, minimum=1, integer=True)
        if max_norm is not None:
            if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
                raise TypeError(f"max_norm must be a number or None, got {type(max_norm).__name__}")
            if math.isnan(max_norm):
                raise ValueError(f"max_norm must be a number (None or <= 0 disables clipping), got {max_norm!r}")
        if solver is not None:
            warnings.warn("NashMTL(solver=...) is deprecated: the cvxpy backend is now called cvxpy_solver "
                          "(MGDA's solver= names an algorithm)", FutureWarning, stacklevel=2)
            cvxpy_solver = solver
        import cvxpy as cp  # imported lazily: cvxpy takes about a second to import

        if not isinstance(cvxpy_solver, str) or cvxpy_solver.upper() not in cp.installed_solvers():
            raise ValueError(f"cvxpy_solver {cvxpy_solver!r} is not installed; available: "
                             f"{cp.installed_solvers()}")
        self.update_every, self.optim_niter = update_every, optim_niter
        self.max_norm = 0.0 if max_norm is None else float(max_norm)
        self.cvxpy_solver = cvxpy_solver.upper()
        self.reset()

    @property
    def solver(self) -> str:
        """Deprecated name of :attr:`cvxpy_solver`."""
        return self.cvxpy_solver

    def reset(self) -> None:
        """Forget the warm start and the last weights."""
        self.num_tasks, self.failures = 0, 0
        self.alpha_n = self.alpha = torch.zeros(0, dtype=torch.float64)

    def _problem(self, k: int) -> tuple:
        import cvxpy as cp

        if k not in _PROBLEMS:
            a, m, c = cp.Variable(k, nonneg=True), cp.Parameter((k, k)), cp.Parameter(k)
            ma = m @ a
            cons = [cp.log(a[i]) + cp.log(ma[i]) >= 0 for i in range(k)]
            _PROBLEMS[k] = (cp.Problem(cp.Minimize(cp.sum(ma) + c @ a), cons), a, m, c)
        return _PROBLEMS[k]

    def solve(self, m_n: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, int, int]:
        """Convex-concave iterations on the normalised Gram matrix: ``(a~, iterations, failures)``."""
        import cvxpy as cp

        prob, a, m, c = self._problem(m_n.shape[0])
        m.value, current, failures, it = m_n, start, 0, 0
        for it in range(1, self.optim_niter + 1):
            m_a = m_n @ current
            # phi's linearisation needs a point with a > 0 and M a > 0; elsewhere (the start of
            # ones with conflicting gradients) drop the linear term: still a bounded convex
            # problem whose solution is such a point (the official code gets an unbounded one)
            valid = bool(np.all(current > 0) and np.all(m_a > 0))
            c.value = 1.0 / current + m_n @ (1.0 / m_a) if valid else np.zeros_like(current)
            new: np.ndarray | None = None  # this iteration's solution, None when the solver failed
            try:
                # no solver-level warm start: the result must depend on (M, a^t) only, so that
                # a checkpoint reloaded into a fresh process continues bit for bit
                prob.solve(solver=self.cvxpy_solver, warm_start=False)
                if prob.status in ("optimal", "optimal_inaccurate") and a.value is not None:
                    solved = np.asarray(a.value, dtype=np.float64)
                    # solvers can report "optimal" on infeasible data (huge a): check the constraints
                    if bool(np.all(np.isfinite(solved)) and np.all(solved > 0)
                            and np.all(solved * (m_n @ solved) >= 1.0 - 1e-4)):
                        new = solved
            except (cp.error.SolverError, ArithmeticError, ValueError):
                new = None
            if new is None:
                if it == 1:
                    raise RuntimeError(
                        f"Nash-MTL: the {self.cvxpy_solver} solver failed on the first iteration (status "
                        f"{prob.status!r}); the task gradients may be zero or exactly opposed. "
                        "Try cvxpy_solver='SCS' or check the losses."
                    )
                failures += 1
                warnings.warn(f"Nash-MTL: {self.cvxpy_solver} failed at iteration {it}; using "
                              "the previous iterate of this step", RuntimeWarning, stacklevel=3)
                break
            moved = float(np.linalg.norm(new - current))
            current = new
            if moved < 1e-6 or float(np.abs(current * (m_n @ current) - 1.0).max()) < 1e-6:
                break
        return current, it, failures

    @staticmethod
    def solve_two(m_n: np.ndarray, eps: float) -> np.ndarray:
        """The exact two-task solution ``a_i = 1 / (||g_i|| sqrt(1 + cos))`` (on ``M~``).

        Raises ``RuntimeError`` when a gradient is zero or ``1 + cos <= 100 eps`` (``eps`` of the
        Gram matrix's dtype): opposed gradients, up to the precision ``M`` was computed in,
        for which the bargaining problem has no solution.
        """
        n1, n2 = math.sqrt(max(float(m_n[0, 0]), 0.0)), math.sqrt(max(float(m_n[1, 1]), 0.0))
        if not (n1 > 0.0 and n2 > 0.0):
            raise RuntimeError("Nash-MTL: a task gradient is zero; the bargaining problem has no "
                               "solution. Check the losses.")
        gap = 1.0 + float(m_n[0, 1]) / (n1 * n2)  # 1 + cos(g1, g2)
        if not gap > 100.0 * eps:
            raise RuntimeError(f"Nash-MTL: the two task gradients are opposed (1 + cos = {gap:.2e}, "
                               f"at the precision of the Gram matrix); the bargaining problem has no "
                               "solution. Check the losses.")
        t = 1.0 / math.sqrt(gap)
        return np.array([t / n1, t / n2], dtype=np.float64)

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        k = inputs.num_tasks
        check_num_tasks(self.num_tasks or None, k, "NashMTL")
        given = require_gram(inputs, "NashMTL")
        gram = given.detach().double().cpu()
        gram = 0.5 * (gram + gram.T)
        extras: dict[str, Any] = {}
        if self.num_tasks and inputs.step % self.update_every != 0:
            alpha, pending = self.alpha.clone(), None
            extras["reused"] = True
        else:
            fro = float(torch.linalg.matrix_norm(gram))
            if not fro > 0.0:
                raise RuntimeError("Nash-MTL: every task gradient is zero")
            m_n = (gram / fro).numpy()
            # first step: a_i = 1 / ||g_i|| (in M~'s scale), the solution's scaling, instead of
            # the official ones; a zero gradient keeps 1 and fails in the solver with a message
            diag = np.sqrt(np.diag(m_n))
            first = np.where(diag > 0, 1.0 / np.where(diag > 0, diag, 1.0), 1.0)
            start = self.alpha_n.numpy() if self.num_tasks else first
            if k == 2:
                try:
                    a_n, nit, failures = self.solve_two(m_n, torch.finfo(given.dtype).eps), 0, 0
                except RuntimeError:
                    if not self.num_tasks:
                        raise
                    # a Pareto-stationary point (opposed or zero gradients): no solution; keep
                    # the previous step's normalised weights, as the official code does
                    warnings.warn("Nash-MTL: the two task gradients are opposed or zero (a "
                                  "Pareto-stationary point), no bargaining solution; reusing the "
                                  "previous step's weights", RuntimeWarning, stacklevel=2)
                    a_n, nit, failures = self.alpha_n.numpy().copy(), 0, 1
            else:
                a_n, nit, failures = self.solve(m_n, start)
            alpha_n = torch.from_numpy(a_n)
            alpha = alpha_n / math.sqrt(fro)
            pending = (k, alpha_n, alpha.clone(), failures)
            residual = float((alpha * (gram @ alpha) - 1.0).abs().max())
            # (two tasks: the closed form is exact; its residual is rounding in M a near cos = -1)
            if residual > 1e-3 and k != 2:
                warnings.warn(f"Nash-MTL: max |a_i (M a)_i - 1| = {residual:.2e} after {nit} "
                              "iterations (raise optim_niter?)", RuntimeWarning, stacklevel=2)
            extras.update(reused=False, solver_iterations=nit, solver_failures=failures,
                          residual=residual)
        norm = float(alpha @ gram @ alpha) ** 0.5
        clip = min(1.0, self.max_norm / (norm + 1e-6)) if self.max_norm > 0 else 1.0
        extras.update(update_norm=norm * clip, clip=clip)
        device = inputs.losses.device
        return Aggregation(weights=(alpha * clip).to(device), head_weights=alpha.to(device),
                           extras=extras, pending=pending)

    def commit(self, pending: Any) -> None:
        if pending is None:
            return
        self.num_tasks, self.alpha_n, self.alpha, failures = pending
        self.failures += failures

    def state_dict(self) -> dict[str, Any]:
        return {"num_tasks": self.num_tasks, "failures": self.failures,
                "alpha_n": self.alpha_n.clone(), "alpha": self.alpha.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"num_tasks", "failures", "alpha_n", "alpha"} - set(state)
        if missing:
            raise ValueError(f"NashMTL state is missing {sorted(missing)}")
        self.num_tasks, self.failures = int(state["num_tasks"]), int(state["failures"])
        self.alpha_n = state["alpha_n"].detach().double().cpu().clone()
        self.alpha = state["alpha"].detach().double().cpu().clone()

    def hyperparameters(self) -> dict[str, Any]:
        return {"update_every": self.update_every, "optim_niter": self.optim_niter,
                "max_norm": self.max_norm, "cvxpy_solver": self.cvxpy_solver}
