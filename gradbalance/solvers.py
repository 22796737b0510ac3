"""Quadratic programs on the k x k Gram matrix of the task gradients.

Every solver here is a pure function of a small ``(k, k)`` matrix ``M = G G^T`` (``G`` the
``(k, P)`` task-gradient matrix); none of them ever sees ``G``. Results are float64.

Sections:

* **Min-norm point of the convex hull** (MGDA, Sener & Koltun 2018):
  ``min_{a in simplex} a^T M a = ||sum_i a_i g_i||^2``. :func:`min_norm_closed_form` (k = 2),
  :func:`min_norm_frank_wolfe`, :func:`min_norm_cvxpy` and the dispatcher :func:`min_norm`.
  All return a :class:`MinNormResult`; :func:`fw_gap` and :func:`best_pair` are the shared pieces.

Host synchronisation: the iterative solvers branch on values (convergence tests, active sets),
which on an accelerator would cost one device-to-host sync per iteration. They therefore copy
``M`` to the CPU once (one sync for the whole solve; ``k x k`` is tiny), iterate in NumPy
(a torch call costs ~5 us of overhead, more than the arithmetic of a k x k step), and return
the weights on ``M``'s device. :func:`min_norm_closed_form` stays on the device and never syncs.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.linalg.lapack import dtrtrs
from torch import Tensor

__all__ = [
    "MinNormResult",
    "SolverError",
    "best_pair",
    "fw_gap",
    "min_norm",
    "min_norm_closed_form",
    "min_norm_cvxpy",
    "min_norm_frank_wolfe",
]

MIN_NORM_SOLVERS = ("auto", "frank_wolfe", "cvxpy", "closed_form")
# Tighter than Clarabel's own 1e-8, so that its weights match Frank-Wolfe's to ~1e-10, not ~1e-8.
_CLARABEL_DEFAULTS = {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12, "tol_ktratio": 1e-10}
_GAP_FLOOR = 1e-13  # rounding floor of the Frank-Wolfe gap test, times k * max_i M_ii


class SolverError(ValueError):
    """A QP solver failed or returned a non-optimal status (never swallowed silently)."""


class MinNormResult(NamedTuple):
    """Solution of ``min_{a in simplex} a^T M a``.

    Attributes:
        weights: ``(k,)`` float64 weights ``a`` (non-negative, summing to 1), on ``M``'s device.
        objective: ``a^T M a = ||d||^2`` with ``d = sum_i a_i g_i`` (a 0-dim float64 tensor).
        gap: the Frank-Wolfe duality gap ``a^T M a - min_i (M a)_i`` (>= 0; 0 at the optimum);
            it bounds the sub-optimality: ``||d||^2 - ||d*||^2 <= 2 gap``.
        iterations: iterations taken (0 for the closed form).
        status: ``"optimal"`` (gap within tolerance), ``"max_iter"`` (iteration cap reached:
            the best iterate is returned) or ``"stalled"`` (rounding stopped progress above the
            tolerance: the best iterate is returned).
    """

    weights: Tensor
    objective: Tensor
    gap: Tensor
    iterations: int
    status: str


# --------------------------------------------------------------------------- shared


def _check_gram(M: Tensor, check_finite: bool = True) -> Tensor:
    """Validate a ``(k, k)`` matrix and return it detached, in float64, on its device."""
    if not isinstance(M, Tensor):
        raise TypeError(f"M must be a torch.Tensor, got {type(M).__name__}")
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] < 1:
        raise ValueError(f"M must be a square (k, k) matrix with k >= 1, got shape {tuple(M.shape)}")
    M = M.detach().to(torch.float64)
    if check_finite and not bool(torch.isfinite(M).all()):
        raise ValueError("M contains NaN or inf")
    return M


# --------------------------------------------------------------------------- min-norm point (MGDA)
# New QPs go below in their own section, with their own result type, reusing _check_gram.


def fw_gap(M: Tensor, a: Tensor) -> Tensor:
    """Frank-Wolfe duality gap of ``a`` for ``min_{a in simplex} a^T M a``.

    Args:
        M: ``(k, k)`` symmetric positive semi-definite matrix.
        a: ``(k,)`` point of the simplex.

    Returns:
        ``a^T M a - min_i (M a)_i``: with ``d = G^T a``, ``||d||^2 - min_i g_i . d``. It is >= 0
        and is 0 exactly at the optimum (the KKT conditions ``g_i . d >= ||d||^2``).
    """
    Ma = M @ a
    return a @ Ma - Ma.min()


def _pair_gamma(v11: Tensor, v12: Tensor, v22: Tensor) -> Tensor:
    """Weight on the first vector of ``min_{g in [0,1]} ||g u + (1-g) w||^2`` (elementwise).

    ``gamma = (v22 - v12) / (v11 + v22 - 2 v12)`` clipped to [0, 1]; the denominator is
    ``||u - w||^2``, and when it is 0 (``u = w``: every gamma is optimal) gamma is 1/2.
    """
    den = v11 + v22 - 2.0 * v12
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, (v22 - v12) / safe, torch.full_like(den, 0.5)).clamp(0.0, 1.0)


def _best_pair_np(M: np.ndarray) -> tuple[int, int, float]:
    d = M.diagonal()
    den = d[:, None] + d[None, :] - 2.0 * M
    with np.errstate(divide="ignore", invalid="ignore"):
        gamma = np.where(den > 0, (d[None, :] - M) / den, 0.5).clip(0.0, 1.0)
    value = gamma * gamma * d[:, None] + (1 - gamma) ** 2 * d[None, :] + 2 * gamma * (1 - gamma) * M
    i, j = divmod(int(np.argmin(value)), M.shape[0])
    return i, j, float(gamma[i, j])


def best_pair(M: Tensor) -> tuple[int, int, float]:
    """The pair of vertices (or single vertex) whose segment holds the lowest-norm point.

    The initialisation of the paper's Frank-Wolfe: the 2-task closed form on every pair
    ``(i, j)`` at once (``i = j`` covers single vertices), then the pair of lowest norm.

    Args:
        M: ``(k, k)`` symmetric PSD matrix.

    Returns:
        ``(i, j, gamma)``: the point ``gamma e_i + (1 - gamma) e_j`` of the simplex.
    """
    return _best_pair_np(_check_gram(M).cpu().numpy())


def min_norm_closed_form(M: Tensor) -> MinNormResult:
    """Exact min-norm point of two vectors (MGDA's Algorithm 1 for k = 2).

    ``a = (gamma, 1 - gamma)`` with ``gamma = (v22 - v12) / (v11 + v22 - 2 v12)`` clipped to
    [0, 1], ``v_ij = g_i . g_j``. Identical gradients (zero denominator) get ``(1/2, 1/2)``.
    Stays on ``M``'s device and never syncs with the host, so ``M`` is not checked for NaN/inf
    (they propagate to the weights). A ``(1, 1)`` matrix gives ``a = (1,)``.

    Args:
        M: ``(2, 2)`` (or ``(1, 1)``) Gram matrix.

    Returns:
        :class:`MinNormResult` with ``iterations = 0`` and ``status = "optimal"``.

    Raises:
        ValueError: ``M`` is not 2 x 2 (or 1 x 1).

    References:
        Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
        Algorithm 1.
    """
    M = _check_gram(M, check_finite=False)
    k = M.shape[0]
    if k > 2:
        raise ValueError(f"the closed form solves k <= 2 tasks, got k = {k}; use frank_wolfe or cvxpy")
    if k == 1:
        a = torch.ones(1, dtype=M.dtype, device=M.device)
    else:
        g = _pair_gamma(M[0, 0], M[0, 1], M[1, 1])
        a = torch.stack([g, 1.0 - g])
    return MinNormResult(a, a @ M @ a, fw_gap(M, a), 0, "optimal")


class _Corral:
    """Active vertices ``S`` with weights ``lam`` and the Cholesky factor of ``M_SS + c 1 1^T``.

    Minimising ``y^T M_SS y`` over ``sum(y) = 1`` equals minimising ``y^T (M_SS + c 1 1^T) y``
    there (the added term is the constant ``c``), so the affine minimiser is
    ``y = A^{-1} 1 / (1^T A^{-1} 1)`` with ``A = M_SS + c 1 1^T``, which is positive definite
    exactly when the active gradients are affinely independent (Wolfe's corral). Adding a vertex
    extends the factor in O(n^2); dropping one (rare) refactors.
    """

    def __init__(self, M: np.ndarray, S: np.ndarray, lam: np.ndarray, c: float) -> None:
        self.M, self.c, self.S, self.lam = M, c, S, lam
        self.L = np.linalg.cholesky(M[np.ix_(S, S)] + c)  # raises LinAlgError if dependent

    def add(self, t: int) -> bool:
        col = self.M[self.S, t] + self.c
        ell = dtrtrs(self.L, col, lower=1)[0]
        d2 = self.M[t, t] + self.c - ell @ ell
        if not d2 > 1e-12 * (self.M[t, t] + self.c):
            return False  # t is (numerically) in the affine hull of the corral
        n = self.S.size
        L = np.zeros((n + 1, n + 1))
        L[:n, :n] = self.L
        L[n, :n] = ell
        L[n, n] = np.sqrt(d2)
        self.L, self.S, self.lam = L, np.append(self.S, t), np.append(self.lam, 0.0)
        return True

    def affine_min(self) -> np.ndarray:
        ones = np.ones(self.S.size)
        x = dtrtrs(self.L, dtrtrs(self.L, ones, lower=1)[0], lower=1, trans=1)[0]
        return x / x.sum()

    def keep(self, mask: np.ndarray) -> None:
        self.S, self.lam = self.S[mask], self.lam[mask]
        self.L = np.linalg.cholesky(self.M[np.ix_(self.S, self.S)] + self.c)


def _corrective_step(corral: _Corral, t: int) -> bool:
    """Add vertex ``t`` and run Wolfe's minor cycle on ``corral``; False on numerical failure."""
    if (corral.S == t).any() or not corral.add(t):
        return False  # no descent left but rounding: the caller stops
    for _ in range(corral.S.size + 1):
        y = corral.affine_min()
        if not np.isfinite(y).all():
            return False
        if (y > 0).all():
            corral.lam = y
            return True
        neg = y <= 0
        lam = corral.lam
        if neg[-1] and lam[-1] == 0.0:
            return False  # the new vertex does not enter: no descent direction (rounding)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(neg, lam / (lam - y), 2.0)
        r = int(np.argmin(ratio))
        lam = lam + ratio[r] * (y - lam)
        lam[r] = 0.0
        corral.lam = lam
        try:
            corral.keep(lam > 0)
        except np.linalg.LinAlgError:
            return False
        if corral.S.size == 0:
            return False
    return False


def _frank_wolfe_np(M: np.ndarray, max_iter: int, tol: float, corrective: bool):
    """The Frank-Wolfe loop on a NumPy float64 matrix: returns ``(a, iterations, status)``."""
    k = M.shape[0]
    scale = max(float(M.diagonal().max()), 0.0)
    floor = _GAP_FLOOR * k * scale
    i, j, gamma = _best_pair_np(M)
    a = np.zeros(k)
    a[i] += gamma
    a[j] += 1.0 - gamma
    corral = None
    if corrective:
        S, c = np.flatnonzero(a > 0), scale if scale > 0 else 1.0
        try:
            corral = _Corral(M, S, a[S], c)
        except np.linalg.LinAlgError:  # the best pair is two identical gradients: keep one
            a[:] = 0.0
            a[i] = 1.0
            corral = _Corral(M, np.array([i]), np.ones(1), c)
    Ma = M @ a
    f = float(a @ Ma)
    it = 0
    while True:
        t = int(np.argmin(Ma))
        if f - Ma[t] <= tol * f + floor:
            return a, it, "optimal"
        if it >= max_iter:
            return a, it, "max_iter"
        it += 1
        if corral is None:
            den = f + M[t, t] - 2.0 * Ma[t]  # ||d - g_t||^2 > 0 here since the gap is > 0
            g = min(max((M[t, t] - Ma[t]) / den, 0.0), 1.0) if den > 0 else 0.5
            a *= g
            a[t] += 1.0 - g
            Ma = g * Ma + (1.0 - g) * M[:, t]
            f = float(a @ Ma)
            continue
        if not _corrective_step(corral, t):
            return a, it, "stalled"
        new = np.zeros(k)
        new[corral.S] = np.maximum(corral.lam, 0.0)
        new /= new.sum()
        new_Ma = M @ new
        new_f = float(new @ new_Ma)
        if new_f >= f:  # no progress: rounding; keep the better iterate
            return a, it, "stalled"
        a, Ma, f = new, new_Ma, new_f


def min_norm_frank_wolfe(
    M: Tensor, max_iter: int = 250, tol: float = 1e-5, *, corrective: bool = True
) -> MinNormResult:
    """Frank-Wolfe for ``min_{a in simplex} a^T M a`` (MGDA's Algorithm 2).

    Initialised from the best pair (:func:`best_pair`). Each iteration picks the vertex
    ``t = argmin_i (M a)_i`` (the task gradient most opposed to ``d = G^T a``), then:

    * ``corrective=False``: the paper's step, an exact line search between ``d`` and ``g_t``
      by the 2-vector closed form, ``a <- gamma a + (1 - gamma) e_t``. Converges at the
      Frank-Wolfe rate O(1/t) and zig-zags when the optimum lies inside a face.
    * ``corrective=True`` (default): the same vertex choice, followed by a fully corrective
      step (Wolfe's min-norm-point minor cycle): ``a`` is re-optimised over the affine hull of
      its active vertices, stepping back to the simplex boundary and dropping vertices while
      that minimiser leaves it. This reaches the exact optimum in finitely many iterations
      (about one per active task, so ``max_iter`` should exceed k when k > 250), and the
      weights match a QP solver's to rounding instead of to the O(1/t) accuracy of plain
      Frank-Wolfe. The affine minimiser comes from a Cholesky factor of the active block of
      ``M`` (plus a constant), extended in O(n^2) per added task and refactored when tasks
      leave.

    Stopping rule: the duality gap ``a^T M a - min_i (M a)_i`` (which bounds the error of
    ``d``: ``||d - d*||^2 <= 2 gap``) is at most ``tol * a^T M a + 1e-13 * k * max_i M_ii``
    (relative to ``||d||^2``, with a rounding floor); or ``max_iter`` iterations; or no more
    progress under rounding. The last (best) iterate is returned in every case.

    Args:
        M: ``(k, k)`` symmetric PSD Gram matrix, any device. The loop runs in NumPy on the
            CPU: one copy of ``M`` to the host per solve, no per-iteration device syncs (and
            k x k operations are far cheaper there than as accelerator kernels).
        max_iter: iteration cap, int >= 0 (default 250, as the official code).
        tol: relative duality-gap tolerance, > 0 (default 1e-5).
        corrective: add the fully corrective step (default True); False is the paper's plain
            Frank-Wolfe.

    Returns:
        :class:`MinNormResult` (weights on ``M``'s device).

    Raises:
        TypeError: ``M`` is not a tensor.
        ValueError: bad ``M`` (not square, NaN/inf), ``max_iter < 0`` or ``tol <= 0``.

    References:
        Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
        Algorithm 2; P. Wolfe, "Finding the nearest point in a polytope", Mathematical
        Programming 11, 1976 (the corrective minor cycle). Deviations from the official code
        (isl-org/MultiObjectiveOptimization, ``min_norm_solvers.py``): the gap stopping rule
        replaces the rule "L1 change of ``a`` below 1e-5"; the iteration counter is
        incremented (the official one never is, so its cap never applies); the last iterate
        is returned (the official code returns the previous one on convergence).
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a number > 0, got {tol!r}")
    M_in = _check_gram(M)
    M_np = M_in.cpu().numpy()
    M_np = (M_np + M_np.T) / 2.0
    a_np, it, status = _frank_wolfe_np(M_np, max_iter, float(tol), corrective)
    Ma = M_np @ a_np
    f = float(a_np @ Ma)
    stats = torch.tensor([f, max(f - float(Ma.min()), 0.0)], dtype=torch.float64, device=M_in.device)
    return MinNormResult(torch.from_numpy(a_np).to(M_in.device), stats[0], stats[1], it, status)


def min_norm_cvxpy(M: Tensor, solver: str = "CLARABEL", **solver_options: Any) -> MinNormResult:
    """``min_{a in simplex} a^T M a`` through cvxpy, as a second-order-cone/QP problem.

    PSD-safe and scale-free formulation: with ``s_i = ||g_i||`` divided by the smallest non-zero
    norm (``s_i = 1`` for a zero gradient) and ``b = s * a``, ``a^T M a = b^T C b`` where ``C = M / (s s^T)`` has a unit
    diagonal; ``C = L L^T`` from an eigendecomposition with the negative rounding eigenvalues
    clipped to 0; the problem solved is ``minimise ||L^T b||^2`` subject to ``b >= 0``,
    ``sum_i b_i / s_i = 1``, and ``a = b / s``. (Factoring ``M`` itself fails on gradients
    scaled 1e-6 vs 1e6: their Gram entries span 24 orders of magnitude.)

    Args:
        M: ``(k, k)`` symmetric PSD Gram matrix (any device; solved on the CPU).
        solver: the cvxpy solver, named explicitly (default ``"CLARABEL"``, installed with
            cvxpy; ``"SCS"``, ``"OSQP"`` ... also work).
        **solver_options: passed to ``problem.solve``. Without options, Clarabel runs with
            gap and feasibility tolerances of 1e-12 (its own are 1e-8); if it cannot reach
            them (status ``optimal_inaccurate``, seen on gradients scaled 1e-6 vs 1e6) it is
            re-run once at its own default tolerances, and that answer is accepted only with
            status ``optimal``.

    Returns:
        :class:`MinNormResult` with the solver's iteration count (0 if it reports none) and
        ``status = "optimal"``.

    Raises:
        SolverError: the solver is not installed, fails, or ends with any status other than
            ``optimal`` (``optimal_inaccurate`` included). Never returns a stale answer.
        TypeError, ValueError: ``M`` is not a tensor, not square or not finite.

    References:
        Sener & Koltun, NeurIPS 2018, eq. (3); Diamond & Boyd, "CVXPY", JMLR 2016; Goulart &
        Chen, "Clarabel: an interior-point solver for conic programs", 2024.
    """
    import cvxpy as cp  # imported lazily: it takes about a second

    M_in = _check_gram(M)
    M = M_in.cpu()
    k = M.shape[0]
    if solver not in cp.installed_solvers():
        raise SolverError(f"cvxpy solver {solver!r} is not installed; installed: {cp.installed_solvers()}")
    if float(M.diagonal().max()) <= 0.0:  # all gradients zero: every point is optimal
        a = M_in.new_full((k,), 1.0 / k)
        return MinNormResult(a, a @ M_in @ a, fw_gap(M_in, a).clamp_min(0.0), 0, "optimal")
    # b = s * a with s_i proportional to ||g_i||: the quadratic form becomes the cosine matrix C (unit
    # diagonal), whatever the gradient scales; the scales move into the linear constraint.
    # (s is divided by the smallest non-zero norm, which only rescales the objective: the
    # constraint's coefficients 1 / s_i lie in (0, 1]. Of the choices tried (none, geometric
    # mean, max, min) this one kept Clarabel accurate on norms spread over 1e-6..1e6.)
    norms = M.diagonal().clamp_min(0.0).sqrt()
    unit = torch.where(norms > 0, norms, torch.ones_like(norms))
    C = M / unit[:, None] / unit[None, :]
    s = torch.where(norms > 0, norms / norms[norms > 0].min(), torch.ones_like(norms))
    w, V = torch.linalg.eigh((C + C.T) / 2.0)
    pos = w > 0
    L = (V[:, pos] * w[pos].sqrt()).numpy()
    b = cp.Variable(k)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(L.T @ b)), [b >= 0, (1.0 / s).numpy() @ b == 1])
    tight = solver == "CLARABEL" and not solver_options
    options = dict(_CLARABEL_DEFAULTS) if tight else dict(solver_options)
    try:
        with warnings.catch_warnings():
            if tight:  # an inaccurate first attempt is retried below, not reported
                warnings.filterwarnings("ignore", message="Solution may be inaccurate")
            problem.solve(solver=solver, **options)
        if tight and problem.status == cp.OPTIMAL_INACCURATE:
            # badly scaled problems cannot reach 1e-12: retry at Clarabel's own tolerances
            problem.solve(solver=solver)
    except cp.error.SolverError as err:
        raise SolverError(f"cvxpy solver {solver} failed on the min-norm QP (k={k}): {err}") from err
    if problem.status != cp.OPTIMAL or b.value is None:
        raise SolverError(
            f"cvxpy solver {solver} ended with status {problem.status!r} on the min-norm QP "
            f"(k={k}); refusing to use its answer"
        )
    a = (torch.as_tensor(b.value, dtype=torch.float64) / s).clamp_min(0.0)
    a = (a / a.sum()).to(M_in.device)
    stats = problem.solver_stats
    iters = int(stats.num_iters) if stats is not None and stats.num_iters is not None else 0
    return MinNormResult(a, a @ M_in @ a, fw_gap(M_in, a).clamp_min(0.0), iters, "optimal")


def min_norm(M: Tensor, solver: str = "auto", *, max_iter: int = 250, tol: float = 1e-5) -> MinNormResult:
    """Min-norm point of the convex hull of the task gradients, from their Gram matrix.

    Args:
        M: ``(k, k)`` Gram matrix ``G G^T``.
        solver: ``"auto"`` (closed form for k <= 2, Frank-Wolfe otherwise), ``"frank_wolfe"``,
            ``"cvxpy"`` (Clarabel) or ``"closed_form"`` (k <= 2 only).
        max_iter: Frank-Wolfe's iteration cap (ignored by the other solvers).
        tol: Frank-Wolfe's relative duality-gap tolerance (ignored by the other solvers).

    Returns:
        :class:`MinNormResult`.

    Raises:
        TypeError: ``M`` is not a tensor.
        ValueError: unknown solver, ``M`` not square (or, for the iterative solvers,
            containing NaN/inf), or ``"closed_form"`` with k > 2.
        SolverError: the cvxpy solver failed.
    """
    if solver not in MIN_NORM_SOLVERS:
        raise ValueError(f"solver must be one of {MIN_NORM_SOLVERS}, got {solver!r}")
    if solver == "auto":
        solver = "closed_form" if _check_gram(M, check_finite=False).shape[0] <= 2 else "frank_wolfe"
    if solver == "closed_form":
        return min_norm_closed_form(M)
    if solver == "cvxpy":
        return min_norm_cvxpy(M)
    return min_norm_frank_wolfe(M, max_iter=max_iter, tol=tol)
