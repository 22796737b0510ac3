"""Aligned-MTL (Senushkin et al. 2023), following the official code (SamsungLabs/MTL)."""

from __future__ import annotations

from typing import Any

import torch

from gradbalance.methods.base import Aggregation, Method, TaskInputs, register, register_factory, require_gram

__all__ = ["AlignedMTL", "aligned_weights"]

SCALES = ("min", "median", "rmse")
MODES = ("exact", "representation")
_EPS32 = float(torch.finfo(torch.float32).eps)


def aligned_weights(gram: torch.Tensor, scale: str = "min") -> tuple[torch.Tensor, torch.Tensor]:
    """The alignment matrix ``W`` (k x k) and the kept eigenvalues of ``M`` (descending).

    ``M = V diag(lambda) V^T``; eigenvalues at or below ``lambda_max * k * eps_float32`` are
    dropped (the official tolerance); ``W = V_r diag(sqrt(sigma / lambda_r)) V_r^T`` with
    ``sigma`` = the smallest kept eigenvalue (``"min"``), their lower median (``"median"``,
    ``torch.median`` as in the official code) or their mean (``"rmse"``).
    """
    m = gram.detach().double()
    m = 0.5 * (m + m.T)
    lam, vec = torch.linalg.eigh(m)
    lam, vec = lam.flip(0), vec.flip(1)
    keep = lam > lam[0] * m.shape[0] * _EPS32
    lam, vec = lam[keep], vec[:, keep]
    if lam.numel() == 0:
        return torch.zeros_like(m), lam
    sigma = {"min": lam[-1], "median": lam.median(), "rmse": lam.mean()}[scale]
    return (vec * (sigma / lam).sqrt()) @ vec.T, lam


@register("aligned_mtl", "Aligned-MTL: align the task gradients into an orthogonal, equal-norm system")
class AlignedMTL(Method):
    """Aligned Multi-Task Learning (Aligned-MTL).

    Replaces the task gradients ``G`` (rows ``g_i``) by the closest (Procrustes) system of
    orthogonal gradients of equal norm, ``G^ = W G``, whose Gram matrix
    ``G^ G^^T = W M W = sigma V_r V_r^T`` has condition number 1 on the span of the gradients,
    and steps along the sum of the aligned gradients. With ``M = G G^T = V diag(lambda) V^T``::

        W = sqrt(sigma) V diag(lambda)^{-1/2} V^T,    d = 1^T G^ = sum_i alpha_i g_i,  alpha = W 1

    (the paper's ``B = sqrt(lambda_min) V Sigma^{-1} V^T``; eigenvalues below a relative
    tolerance are dropped, which handles linearly dependent gradients).

    Args:
        scale: the scale ``sigma`` of the aligned gradients: ``"min"`` (default, the smallest
            kept eigenvalue, as in the paper), ``"median"`` or ``"rmse"`` (their mean).
        mode: ``"exact"`` (default: gradients on the shared parameters) or ``"representation"``
            (Aligned-MTL-UB: gradients on the shared features ``z`` passed as
            ``opt.backward(losses, features=z)``; registered as ``"aligned_mtl_ub"``).
        scale_heads: if ``True``, task-specific parameters get ``alpha_i`` times their own
            gradient (the official ``scale_decoder_grad=True``); default ``False``: their plain
            gradient (weight 1), the official default in both modes.

    Follows the official code (``ProcrustesSolver`` and ``AlignedMTLBalancer``): the update is
    the unweighted sum of the aligned gradients; the pseudocode's task weights ``omega`` are not
    used there and not here. Stateless.

    Example:
        >>> import torch
        >>> from gradbalance.methods import AlignedMTL, TaskInputs
        >>> M = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> AlignedMTL().aggregate(TaskInputs(losses=torch.ones(2, dtype=torch.float64), gram=M)).weights
        tensor([0.5000, 1.0000], dtype=torch.float64)

    References:
        D. Senushkin, N. Patakin, A. Kuznetsov, A. Konushin. "Independent Component Alignment
        for Multi-Task Learning." CVPR 2023. Official code: github.com/SamsungLabs/MTL.
    """

    requires = "gram"

    def __init__(self, scale: str = "min", mode: str = "exact", scale_heads: bool = False) -> None:
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(scale_heads, bool):
            raise TypeError(f"scale_heads must be a bool, got {type(scale_heads).__name__}")
        self.scale, self.mode, self.scale_heads = scale, mode, scale_heads

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        w, lam = aligned_weights(require_gram(inputs, "AlignedMTL"), self.scale)
        alpha = w.sum(dim=1).to(inputs.losses.device)
        heads = alpha if self.scale_heads else torch.ones_like(alpha)
        return Aggregation(weights=alpha, head_weights=heads, extras={"rank": int(lam.numel())})

    def hyperparameters(self) -> dict[str, Any]:
        return {"scale": self.scale, "mode": self.mode, "scale_heads": self.scale_heads}


register_factory(
    "aligned_mtl_ub",
    "Aligned-MTL-UB: Aligned-MTL on the gradients w.r.t. the shared representation",
    lambda: AlignedMTL(mode="representation"),
)
