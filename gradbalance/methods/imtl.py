"""IMTL-G (Liu et al. 2021), implemented from the paper's closed form, in Gram form."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradbalance.methods.base import Aggregation, Method, TaskInputs, register, require_gram

__all__ = ["IMTLG", "imtl_g_weights"]

MODES = ("exact", "representation")


def imtl_g_weights(gram: Tensor) -> Tensor:
    """IMTL-G's weights ``alpha`` (summing to 1) from the Gram matrix ``M`` of the gradients.

    With ``u_i = g_i / ||g_i||``, ``D = g_1 - g_{2:}`` and ``U = u_1 - u_{2:}`` (rows), the paper's
    ``alpha_{2:} = g_1 U^T (D U^T)^{-1}`` only needs ``N = M diag(1/||g||)`` (``N_ij = g_i . u_j``):
    ``(g_1 U^T)_j = N_11 - N_1j`` and ``(D U^T)_ij = N_11 - N_1j - N_i1 + N_ij``. The system is
    solved with a pseudo-inverse (the paper writes an inverse; they agree when it exists). Tasks
    whose gradient is zero (below ``1e-12`` of the largest norm) have no direction ``u_i``: they
    get weight 0 and the rule runs on the others.
    """
    m = gram.detach().double()
    m = 0.5 * (m + m.T)
    k = m.shape[0]
    norms = m.diagonal().clamp(min=0.0).sqrt()
    alive = norms > 1e-12 * norms.max()
    out = torch.zeros(k, dtype=torch.float64, device=m.device)
    idx = alive.nonzero().flatten()
    if idx.numel() == 0:
        return out
    if idx.numel() == 1:
        out[idx] = 1.0
        return out
    n = m[idx][:, idx] / norms[idx]  # n[i, j] = g_i . u_j
    rhs = n[0, 0] - n[0, 1:]  # g_1 U^T
    a = n[0, 0] - n[0, 1:][None, :] - n[1:, 0][:, None] + n[1:, 1:]  # D U^T
    tail = rhs[None, :] @ torch.linalg.pinv(a)
    out[idx[1:]] = tail.flatten()
    out[idx[0]] = 1.0 - tail.sum()
    return out


@register("imtl_g", "IMTL-G: the update with equal projections on every task's unit gradient")
class IMTLG(Method):
    """Impartial Multi-Task Learning, gradient part (IMTL-G).

    Finds the update ``d = sum_i alpha_i g_i`` with ``sum_i alpha_i = 1`` whose projections on
    every unit task gradient ``u_i = g_i / ||g_i||`` are equal, so no task is favoured in
    direction. Closed form (paper, eq. 9), with ``D = g_1 - g_{2:}`` and ``U = u_1 - u_{2:}``::

        alpha_{2:} = g_1 U^T (D U^T)^{-1},     alpha_1 = 1 - sum_{i>=2} alpha_i

    computed from ``M = G G^T`` alone (:func:`imtl_g_weights`). The result does not depend on
    the order of the tasks.

    Args:
        mode: ``"exact"`` (default: gradients on the shared parameters) or
            ``"representation"`` (gradients on the shared features passed as
            ``opt.backward(losses, features=z)``, then one backward of ``sum_i alpha_i L_i``;
            the paper's Algorithm 1 computes the gradients on the shared feature ``z`` to save
            cost; both modes are offered, exact being the rule as stated).

    Task-specific parameters get their own task's plain gradient (weight 1), as in the
    paper's Algorithm 1. Stateless. Deviation: a pseudo-inverse replaces the inverse, and
    zero gradients get weight 0 (the paper's formula divides by their norm).

    Example:
        >>> import torch
        >>> from gradbalance.methods import IMTLG, TaskInputs
        >>> M = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> IMTLG().aggregate(TaskInputs(losses=torch.ones(2, dtype=torch.float64), gram=M)).weights
        tensor([0.3333, 0.6667], dtype=torch.float64)

    References:
        L. Liu, Y. Li, Z. Kuang, J.-H. Xue, Y. Chen, W. Yang, Q. Liao, W. Zhang. "Towards
        Impartial Multi-task Learning." ICLR 2021.
    """

    requires = "gram"

    def __init__(self, mode: str = "exact") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        alpha = imtl_g_weights(require_gram(inputs, "IMTLG")).to(inputs.losses.device)
        return Aggregation(weights=alpha, head_weights=torch.ones_like(alpha))

    def hyperparameters(self) -> dict[str, Any]:
        return {"mode": self.mode}
