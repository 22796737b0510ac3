"""FairGrad, from the paper and the official code (scipy least squares on the k x k system)."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from scipy.optimize import brentq, least_squares

from gradbalance.methods.base import Aggregation, Method, TaskInputs, check_max_norm, clip_factor, register

__all__ = ["FairGrad"]

_EPS = float(np.finfo(np.float64).eps)
WIRINGS = ("official", "libmtl")


@register("fairgrad", "FairGrad (Ban & Ji 2024): alpha-fair allocation, solves M w = w^(-1/alpha)")
class FairGrad(Method):
    """FairGrad: alpha-fair resource allocation between tasks.

    FairGrad picks the update ``d = sum_i w_i g_i`` whose per-task "utilities" ``g_i . d``
    maximise the alpha-fair sum ``sum_i (g_i . d)^(1 - alpha) / (1 - alpha)``; its optimality
    condition is the ``k x k`` non-linear system

    ``M w = w^(-1/alpha)`` (element-wise power), ``w > 0``,

    with ``M = G G^T``. ``alpha = 1`` is proportional fairness: ``w_i (M w)_i = 1``, the
    Nash-MTL condition; ``alpha -> 0`` tends to the sum of the gradients (utilitarian) and
    ``alpha -> inf`` to max-min fairness.

    Two tasks (the common case, and the one where a generic solver fails: near the Pareto front
    the gradients are nearly opposed and the weights diverge like ``(1 + cos)^(-alpha/(1+alpha))``)
    reduce to one scalar equation. With ``n_i = ||g_i||``, ``rho = cos(g1, g2)``, ``p = 1/alpha``,
    ``x_i = n_i w_i`` and ``r = x2 / x1`` the rows read ``x1 + rho x2 = n1^(p-1) x1^(-p)`` and
    ``x2 + rho x1 = n2^(p-1) x2^(-p)``; dividing them eliminates ``x1``::

        F(log r) = p log r + log(r + rho) - log(1 + rho r) - (p - 1) log(n2 / n1) = 0

    on the interval where ``r + rho > 0`` and ``1 + rho r > 0`` (empty iff ``rho = -1``), then
    ``x1^(1+p) (1 + rho r) = n1^(p-1)``. ``F`` is strictly increasing (its derivative is
    ``p + r (1 - rho^2) / ((r + rho)(1 + rho r)) > 0``) and goes from ``-inf`` to ``+inf``, so
    the root is unique and ``scipy.optimize.brentq`` brackets it (``|log r*| <= |L| / p``, and
    ``<= |L| / (p+1)`` for ``rho < 0``). For ``rho < 0`` it is solved in ``v = logit s``, with
    ``r = q + s (1 - q^2) / q``, ``q = -rho``: then ``r + rho`` and ``1 + rho r`` are
    ``s (1 - q^2) / q`` and ``(1 - s)(1 - q^2)``, free of cancellation as ``rho -> -1``, and
    ``1 + rho = det M / (n1 n2 (n1 n2 - M_12))`` with ``det M`` in exact arithmetic. The weights
    are then within a few ``eps`` (relative) of the exact solution for the given ``M`` (checked
    against 60-digit arithmetic down to ``1 + cos = 1e-13``). ``alpha = 1`` (or equal norms)
    gives ``r = 1``: ``w_i = 1 / (n_i sqrt(1 + cos))``, the Nash-MTL closed form. The tasks
    are put in a canonical order first, so the result does not depend on their order. (The
    residual ``M w - w^(-1/alpha)`` evaluated in floating point is then rounding of order
    ``eps / (1 + cos)``; it is reported in ``extras["residual"]`` but not warned about.)

    Two tasks whose gradients are opposed up to the precision of ``M`` (``1 + cos <= 100 eps``,
    ``eps`` of the Gram matrix's dtype: a Pareto-stationary point) have no positive solution.
    As in Nash-MTL: on the first step this raises a ``RuntimeError``; later the previous step's
    weights are reused, rescaled to the current ``M`` by the scale law below, with a
    ``RuntimeWarning``, counted in ``extras["solver_failures"]`` and in the state.

    Three or more tasks are solved as in the official code by ``scipy.optimize.least_squares``
    on the residual ``M w - w^(-1/alpha)``, here in ``u = log w`` (``w > 0`` without bounds)
    with the exact Jacobian ``M diag(w) + diag(w^(-1/alpha)) / alpha``, from the orthogonal
    solution ``w_i = M_ii^(-alpha/(1+alpha))``, tolerances ``1e-12`` (measured against the
    official bounded solve in ``w`` from ``1/k``: 3-6x faster, worst relative residual ``3e-13``
    instead of ``3e-10`` on random problems, and ``3e-2`` instead of ``1`` next to a
    Pareto-stationary point). To make the solve independent of the gradients' scale it runs on
    ``M / s`` (``s`` the largest diagonal entry of ``M``) and rescales: if ``M -> s M`` the
    solution is ``w -> s^(-alpha / (1 + alpha)) w``. A solve whose relative residual exceeds
    ``1e-6`` warns (the weights are still used) and the residual is reported in
    ``extras["residual"]``.

    A task whose shared gradient is zero has no finite solution (its row reads
    ``0 = w_i^(-1/alpha)``); it gets weight 0 and the others are solved without it (one task
    left: ``w = ||g||^(-2 alpha/(1+alpha))``).

    Args:
        alpha: fairness exponent ``alpha > 0``. Default ``1.0`` (the default of the official
            class and of its ``--alpha`` flag, and LibMTL's example value); the official run
            scripts use ``alpha = 2.0`` for NYU-v2, Cityscapes, CelebA and QM9.
        max_norm: clip the norm of the shared update to this value (default ``1.0``, the
            official code's); ``None`` turns it off (LibMTL does not clip).
        wiring: how the weights reach the parameters:

            - ``"official"`` (default), as OptMN-Lab/fairgrad ``methods/weight_methods.py``
              (class ``FairGrad``): each loss is back-propagated on its own (lines 797-805),
              so every head gets its task's plain gradient (head weight 1); the shared
              gradient is overwritten with ``k * sum_i w_i g_i`` (``overwrite_grad``, line
              845: "to match the sum loss"), then clipped with
              ``clip_grad_norm_(shared, max_norm)`` (``backward``, lines 870-871).
            - ``"libmtl"``, as LibMTL ``weighting/FairGrad.py``: one backward of
              ``sum_i w_i L_i``: shared ``sum_i w_i g_i`` (no factor ``k``), head ``i`` gets
              ``w_i`` times its gradient. ``FairGrad(wiring="libmtl", max_norm=None)`` is
              LibMTL's method exactly.

    The clip is folded into the weights: with ``n = ||d||`` (``d`` the shared update,
    ``n^2 = c^2 w^T M w``, ``c`` = ``k`` or 1) the shared weights are multiplied by
    ``min(1, max_norm / (n + 1e-6))``, the factor of ``torch.nn.utils.clip_grad_norm_``;
    heads are never clipped (as in the official code, which clips the shared parameters only).
    ``StepInfo.weights`` are the shared weights (``k w`` times the clip factor by default);
    ``extras["solution"]`` is ``w`` itself, ``extras["clip"]`` the factor. With the wrapper's
    ``update_every > 1`` the reused steps keep the clip factor of the step that solved.

    Scale: the weights carry ``1 / ||g||``-like units, so the update's size does not grow with
    the loss scale for ``alpha = 1`` (like Nash-MTL).

    State: the last weights normalised to ``M / s`` (the fallback at Pareto-stationary points)
    and the total number of such fallbacks. Cost: ``k`` gradient passes for ``M``, then a small
    CPU solve (one host copy of ``M``).

    Example:
        >>> import torch
        >>> from gradbalance.methods import FairGrad, TaskInputs
        >>> g = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
        >>> agg = FairGrad().aggregate(TaskInputs(losses=torch.ones(2, dtype=torch.float64), gram=g @ g.T))
        >>> agg.extras["solution"]  # orthogonal gradients: w_i = 1 / ||g_i|| when alpha = 1
        tensor([0.5000, 2.0000], dtype=torch.float64)
        >>> agg.weights  # official wiring: k w, then clipped: ||k (w_1 g_1 + w_2 g_2)|| = 2 sqrt(2) -> 1
        tensor([0.3536, 1.4142], dtype=torch.float64)
        >>> agg.head_weights  # heads: their plain gradients
        tensor([1., 1.], dtype=torch.float64)

    References:
        H. Ban, K. Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024.
    """

    requires = "gram"

    def __init__(self, alpha: float = 1.0, max_norm: float | None = 1.0, wiring: str = "official") -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
        if not 0.0 < alpha < float("inf"):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        if wiring not in WIRINGS:
            raise ValueError(f"wiring must be one of {WIRINGS}, got {wiring!r}")
        self.alpha = float(alpha)
        self.max_norm = check_max_norm(max_norm)
        self.wiring = wiring
        self.reset()

    def hyperparameters(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "max_norm": self.max_norm, "wiring": self.wiring}

    def reset(self) -> None:
        """Forget the last weights (the fallback at Pareto-stationary points) and the failures."""
        self.failures = 0
        self.w_n = torch.zeros(0, dtype=torch.float64)

    def solve(self, gram: np.ndarray) -> np.ndarray:
        """Solve ``gram @ w = w ** (-1 / alpha)`` for ``w > 0`` with ``least_squares`` (any ``k``)."""
        a = self.alpha
        scale = float(np.max(np.diag(gram)))
        m = gram / scale

        p = 1.0 / a
        # in u = log w: w > 0 without bounds; start from the orthogonal solution M_ii^(-a/(1+a))
        def residual(u):
            return m @ np.exp(u) - np.exp(-p * u)

        def jacobian(u):
            return m * np.exp(u)[None, :] + np.diag(p * np.exp(-p * u))

        res = least_squares(
            residual,
            -np.log(np.diag(m)) * a / (1.0 + a),
            jac=jacobian,
            ftol=1e-12,
            xtol=1e-12,
            gtol=1e-12,
        )
        return np.exp(res.x) * scale ** (-a / (1.0 + a))

    @staticmethod
    def solve_two(gram: np.ndarray, alpha: float, eps: float = _EPS) -> np.ndarray:
        """The exact two-task solution of ``gram @ w = w ** (-1 / alpha)``, ``w > 0``.

        One monotone scalar equation solved by ``brentq`` to machine precision (closed form for
        ``alpha = 1`` or equal norms); see the class docstring for the derivation. Raises
        ``RuntimeError`` when a gradient is zero or ``1 + cos <= 100 eps`` (opposed gradients up
        to the precision of the Gram matrix: no positive solution).
        """
        p = 1.0 / alpha
        m11, m22, m12 = float(gram[0, 0]), float(gram[1, 1]), 0.5 * float(gram[0, 1] + gram[1, 0])
        if not (m11 > 0.0 and m22 > 0.0):
            raise RuntimeError("FairGrad: a task gradient is zero; the system has no positive solution")
        if m11 < m22:  # canonical order (larger norm first): exact invariance to the task order
            return FairGrad.solve_two(gram[::-1, ::-1], alpha, eps)[::-1].copy()
        ln1, ln2 = 0.5 * math.log(m11), 0.5 * math.log(m22)  # log ||g_i||
        n12 = math.sqrt(m11) * math.sqrt(m22)
        if m12 < 0.0:
            # 1 + cos = det(M) / (n1 n2 (n1 n2 - m12)) with det(M) in exact arithmetic: 1 + cos
            # to a few eps relative (1 + m12 / (n1 n2) would carry an absolute error of eps)
            det = Fraction(m11) * Fraction(m22) - Fraction(m12) ** 2
            gap = max(0.0, float(det) / n12 / (n12 - m12))
            rho = gap - 1.0
        else:
            rho = min(1.0, m12 / n12)
            gap = 1.0 + rho
        if not gap > 100.0 * eps:
            raise RuntimeError(
                f"FairGrad: the two task gradients are opposed (1 + cos = {gap:.2e}, at the "
                "precision of the Gram matrix); the system has no positive solution"
            )
        big = (p - 1.0) * (ln2 - ln1)  # L = log(c2 / c1), c_i = ||g_i||^(p - 1)
        if big == 0.0:  # alpha = 1 or equal norms: r = 1
            log_r, log_den = 0.0, math.log(gap)
        elif rho < 0.0:
            # r = q + s (1 - q^2) / q with q = -rho and s = expit(v): r - q and 1 - q r are then
            # s (1 - q^2) / q and (1 - s)(1 - q^2), free of cancellation as cos -> -1
            q = -rho
            log_q, one_m_q2 = math.log1p(-gap), gap * (2.0 - gap)  # log q, 1 - q^2

            def parts(v):  # (log r, log s, log (1 - s))
                e = math.exp(-abs(v))
                s, t = (1.0 / (1.0 + e), e / (1.0 + e)) if v >= 0.0 else (e / (1.0 + e), 1.0 / (1.0 + e))
                return math.log(q + s * one_m_q2 / q), math.log(s), math.log(t)

            def f(v):  # p log r + log((r + rho) / (1 + rho r)) - L, with log(...) = v - log q
                return p * parts(v)[0] + v - log_q - big

            bound = min(abs(big) / (p + 1.0), -log_q)  # |log r*| <= bound
            lo, hi = log_q + big - p * bound - 1.0, log_q + big + p * bound + 1.0
            v = brentq(f, lo, hi, xtol=4 * _EPS, rtol=4 * _EPS, maxiter=200)
            log_r, _, log_t = parts(v)
            log_den = log_t + math.log(one_m_q2)  # log(1 + rho r)
        else:

            def log_terms(x):  # (log(r + rho), log(1 + rho r)) with r = exp(x), no overflow
                if x >= 0.0:
                    return x + math.log1p(rho * math.exp(-x)), x + math.log(math.exp(-x) + rho)
                return math.log(math.exp(x) + rho), math.log1p(rho * math.exp(x))

            def f(x):
                num, den = log_terms(x)
                return p * x + num - den - big

            bound = abs(big) / p + 1.0  # |log r*| <= |L| / p
            x = brentq(f, -bound, bound, xtol=4 * _EPS, rtol=4 * _EPS, maxiter=200)
            log_r, log_den = x, log_terms(x)[1]
        log_x1 = ((p - 1.0) * ln1 - log_den) / (p + 1.0)  # x1^(1 + p) (1 + rho r) = c1
        return np.array([math.exp(log_x1 - ln1), math.exp(log_x1 + log_r - ln2)])

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        if inputs.gram is None:
            raise ValueError("FairGrad needs the Gram matrix of the task gradients (inputs.gram)")
        gram = inputs.gram.detach().to("cpu", torch.float64).numpy()
        gram = 0.5 * (gram + gram.T)
        k = gram.shape[0]
        live = np.flatnonzero(np.diag(gram) > 0)
        w = np.zeros(k)
        rel, failures, exp = 0.0, 0, self.alpha / (1.0 + self.alpha)
        scale = float(np.max(np.diag(gram))) if live.size else 1.0
        sub = gram[np.ix_(live, live)]
        if live.size == 1:  # ||g||^2 w = w^(-1/alpha)
            w[live] = float(sub[0, 0]) ** -exp
        elif live.size == 2:
            try:
                w[live] = self.solve_two(sub, self.alpha, torch.finfo(inputs.gram.dtype).eps)
            except RuntimeError:
                if self.w_n.numel() != k:
                    raise
                # a Pareto-stationary point: no solution; reuse the previous step's weights,
                # rescaled to the current scale (as Nash-MTL does)
                warnings.warn(
                    "FairGrad: the two task gradients are opposed (a Pareto-stationary point), "
                    "no solution; reusing the previous step's weights",
                    RuntimeWarning,
                    stacklevel=2,
                )
                w[live] = self.w_n.numpy()[live] * scale**-exp
                failures = 1
        elif live.size:
            w[live] = self.solve(sub)
        if live.size:
            target = w[live] ** (-1.0 / self.alpha)
            rel = float(np.linalg.norm(sub @ w[live] - target) / np.linalg.norm(target))
            # (two tasks: the scalar solve is exact; its residual is rounding in M w, of order
            # eps / (1 + cos) near cos = -1)
            if live.size > 2 and not rel <= 1e-6:
                warnings.warn(
                    f"FairGrad: the solve stopped with relative residual {rel:.2e}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        pending = (torch.from_numpy(w * scale**exp), failures)
        solution = torch.as_tensor(w, dtype=torch.float64, device=inputs.losses.device)
        official = self.wiring == "official"
        shared = solution * k if official else solution  # overwrite_grad: "* n_tasks"
        norm, factor = clip_factor(shared, inputs.gram, self.max_norm)
        heads = torch.ones_like(solution) if official else solution
        return Aggregation(
            weights=shared * factor,
            head_weights=heads,
            extras={"residual": rel, "solver_failures": failures, "solution": solution.clone(),
                    "update_norm": norm * factor, "clip": factor},
            pending=pending,
        )

    def commit(self, pending: Any) -> None:
        self.w_n, failures = pending
        self.failures += failures

    def state_dict(self) -> dict[str, Any]:
        return {"failures": self.failures, "w_n": self.w_n.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"failures", "w_n"} - set(state)
        if missing:
            raise ValueError(f"FairGrad state is missing {sorted(missing)}")
        self.failures = int(state["failures"])
        self.w_n = state["w_n"].detach().double().cpu().clone()
