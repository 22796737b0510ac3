"""CAGrad (Liu et al. 2021), implemented from the paper and checked against the official code's rule."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize

from gradbalance.methods.base import Aggregation, Method, TaskInputs, register, require_gram

__all__ = ["CAGrad"]

_RESCALE = {0: "none", 1: "1 / (1 + c^2)", 2: "1 / (1 + c)"}


@register("cagrad", "CAGrad: the best worst-task direction within c*||g0|| of the mean gradient")
class CAGrad(Method):
    """Conflict-Averse Gradient descent (CAGrad).

    Looks for the update ``d`` that maximises the worst task's first-order improvement
    ``min_i g_i . d`` within a ball of radius ``c ||g0||`` around the mean gradient
    ``g0 = (1/k) sum_i g_i``. Through its dual, with ``g_w = sum_i w_i g_i``::

        w* = argmin_{w in simplex} g_w . g0 + c ||g0|| ||g_w||
        d  = g0 + (c ||g0|| / ||g_w*||) g_w*,     then divided by the rescale factor

    so ``d = sum_i (1/k + lam w*_i) g_i`` with ``lam = c ||g0|| / ||g_w*||``: a weighted sum of the
    task gradients computed from ``M = G G^T`` alone. The dual is solved by SLSQP on the ``k``
    weights (as in the official code) on the trace-normalised ``M``, which does not change
    ``w*`` or ``lam``.

    Args:
        c: radius of the ball, ``>= 0`` (default ``0.4``, the paper's NYUv2 / CityScapes value;
            ``0.5`` in its other experiments). ``c = 0`` gives the mean gradient.
        rescale: ``0`` no rescaling (the paper's rule), ``1`` divide by ``1 + c^2`` (default,
            the official NYUv2 code), ``2`` divide by ``1 + c`` (the official toy code).

    Task-specific parameters get their own task's plain gradient (weight 1), as in the official
    code, which overwrites only the shared gradients. Stateless.

    ``extras``: ``lambda`` (the multiplier ``lam``) and ``solver_iterations``. If ``||g_w*||``
    is zero (numerically below ``1e-12`` of the gradient scale), the extra term is dropped
    (``lam = 0``) instead of dividing by zero; the official code adds ``1e-8`` instead.

    Example:
        >>> import torch
        >>> from gradbalance.methods import CAGrad, TaskInputs
        >>> M = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> CAGrad(c=0.0).aggregate(TaskInputs(losses=torch.ones(2, dtype=torch.float64), gram=M)).weights
        tensor([0.5000, 0.5000], dtype=torch.float64)

    References:
        B. Liu, X. Liu, X. Jin, P. Stone, Q. Liu. "Conflict-Averse Gradient Descent for
        Multi-task Learning." NeurIPS 2021. Official code: github.com/Cranial-XIX/CAGrad.
    """

    requires = "gram"

    def __init__(self, c: float = 0.4, rescale: int = 1) -> None:
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c >= 0.0 or math.isinf(c):
            raise ValueError(f"c must be a finite number >= 0, got {c!r}")
        if rescale not in _RESCALE or isinstance(rescale, bool):
            raise ValueError(f"rescale must be 0 (none), 1 (1/(1+c^2)) or 2 (1/(1+c)), got {rescale!r}")
        self.c = float(c)
        self.rescale = int(rescale)

    def solve(self, gram: torch.Tensor) -> tuple[np.ndarray, float, int]:
        """The dual weights ``w*`` on the simplex, the multiplier ``lam`` and the iterations."""
        m = gram.detach().double().cpu().numpy()
        k = m.shape[0]
        m = 0.5 * (m + m.T)
        uniform = np.full(k, 1.0 / k)
        scale = float(np.trace(m)) / k
        g0_sq = float(uniform @ m @ uniform) / scale if scale > 0 else 0.0
        if self.c == 0.0 or not g0_sq > 0.0:
            return uniform, 0.0, 0
        a = m / scale
        b = a @ uniform
        phi = self.c * math.sqrt(g0_sq)

        def objective(w):
            return float(w @ b + phi * math.sqrt(max(w @ a @ w, 0.0) + 1e-16))

        def gradient(w):
            return b + phi * (a @ w) / math.sqrt(max(w @ a @ w, 0.0) + 1e-16)

        res = minimize(
            objective, uniform, jac=gradient, method="SLSQP", bounds=[(0.0, 1.0)] * k,
            constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(k)},),
            options={"ftol": 1e-12, "maxiter": 500},
        )
        w = np.clip(res.x, 0.0, None)
        w = w / w.sum()
        if not res.success and objective(w) > objective(uniform):
            warnings.warn(f"CAGrad: SLSQP did not converge ({res.message})", RuntimeWarning, stacklevel=3)
        gw_norm = math.sqrt(max(float(w @ a @ w), 0.0))
        lam = phi / gw_norm if gw_norm > 1e-12 else 0.0
        return w, lam, int(res.nit)

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        w, lam, nit = self.solve(require_gram(inputs, "CAGrad"))
        factor = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        weights = torch.from_numpy((1.0 / len(w) + lam * w) / factor).to(inputs.losses.device)
        return Aggregation(
            weights=weights,
            head_weights=torch.ones_like(weights),
            extras={"lambda": lam, "solver_iterations": nit},
        )

    def hyperparameters(self) -> dict[str, Any]:
        return {"c": self.c, "rescale": self.rescale}
