"""FairGrad, from the paper and the official code (scipy least squares on the k x k system)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from scipy.optimize import least_squares

from gradbalance.methods.base import Aggregation, Method, TaskInputs, register

__all__ = ["FairGrad"]


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

    The system is solved as in the official code, by ``scipy.optimize.least_squares`` on the
    residual ``M w - w^(-1/alpha)`` with bounds ``w >= 0`` from ``w = 1/k``, here with its exact
    Jacobian ``M + diag(w^(-1/alpha - 1)) / alpha`` and tolerances ``1e-12``. To make the
    solve independent of the gradients' scale it runs on ``M / s`` (``s`` the largest
    diagonal entry of ``M``) and rescales: if ``M -> s M`` the solution is
    ``w -> s^(-alpha / (1 + alpha)) w``. A task whose shared gradient is zero has no finite
    solution (its row reads ``0 = w_i^(-1/alpha)``); it gets weight 0 and the others are
    solved without it. A solve whose relative residual exceeds ``1e-6`` warns and is
    reported in ``extras["residual"]``.

    Args:
        alpha: fairness exponent ``alpha > 0``. Default ``1.0`` (the LibMTL default; the paper
            tunes alpha per benchmark, e.g. 1, 2, 5).

    Scale: the weights carry ``1 / ||g||``-like units, so the update's size does not grow with
    the loss scale for ``alpha = 1`` (like Nash-MTL); no norm clipping is applied here.

    Task-specific parameters: head ``i`` gets ``w_i`` times its task's gradient, as the official
    code backpropagates ``sum_i w_i L_i``.

    State: none. Cost: ``k`` gradient passes for ``M``, then a small CPU solve (one host copy
    of ``M``).

    Example:
        >>> import torch
        >>> from gradbalance.methods import FairGrad, TaskInputs
        >>> g = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
        >>> agg = FairGrad().aggregate(TaskInputs(losses=torch.ones(2, dtype=torch.float64), gram=g @ g.T))
        >>> agg.weights  # orthogonal gradients: w_i = 1 / ||g_i|| when alpha = 1
        tensor([0.5000, 2.0000], dtype=torch.float64)

    References:
        H. Ban, K. Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024.
    """

    requires = "gram"

    def __init__(self, alpha: float = 1.0) -> None:
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not 0.0 < alpha < float("inf")
        ):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        self.alpha = float(alpha)

    def hyperparameters(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def solve(self, gram: np.ndarray) -> np.ndarray:
        """Solve ``gram @ w = w ** (-1 / alpha)`` for ``w > 0`` (``gram`` positive definite)."""
        a = self.alpha
        k = gram.shape[0]
        scale = float(np.max(np.diag(gram)))
        m = gram / scale

        def residual(w):
            return m @ w - w ** (-1.0 / a)

        def jacobian(w):
            return m + np.diag(w ** (-1.0 / a - 1.0) / a)

        res = least_squares(
            residual,
            np.full(k, 1.0 / k),
            jac=jacobian,
            bounds=(0.0, np.inf),
            ftol=1e-12,
            xtol=1e-12,
            gtol=1e-12,
        )
        return res.x * scale ** (-a / (1.0 + a))

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        gram = inputs.gram.detach().to("cpu", torch.float64).numpy()
        k = gram.shape[0]
        live = np.flatnonzero(np.diag(gram) > 0)
        w = np.zeros(k)
        rel = 0.0
        if live.size:
            sub = gram[np.ix_(live, live)]
            w[live] = self.solve(sub)
            target = w[live] ** (-1.0 / self.alpha)
            rel = float(np.linalg.norm(sub @ w[live] - target) / np.linalg.norm(target))
            if not rel <= 1e-6:
                warnings.warn(
                    f"FairGrad: the solve stopped with relative residual {rel:.2e}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        weights = torch.as_tensor(w, dtype=torch.float64, device=inputs.losses.device)
        return Aggregation(weights=weights, extras={"residual": rel})
