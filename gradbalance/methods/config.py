"""ConFIG, implemented from the paper (Eq. 2), in Gram form."""

from __future__ import annotations

from typing import Any

import torch

from gradbalance.methods.base import Aggregation, Method, TaskInputs, register, require_gram

__all__ = ["ConFIG"]


@register(
    "config", "ConFIG (Liu et al. 2025): conflict-free direction, equal cosine with every task"
)
class ConFIG(Method):
    """Conflict-Free Inverse Gradients (ConFIG): one direction at equal angle to every task.

    With the unit gradients ``u_i = g_i / ||g_i||`` stacked as the rows of ``U``, ConFIG takes
    the minimum-norm solution ``g_v = U^+ 1`` of ``U g_v = 1`` (so every ``u_i . g_v = 1``: the
    direction has the same positive cosine with every task gradient), normalises it,
    ``g_u = g_v / ||g_v||``, and scales it by the sum of the projections of the raw gradients:

    ``d = (sum_i g_i . g_u) g_u``.

    In Gram form, with ``D = diag(||g_i||)`` and the cosine matrix ``N = D^-1 M D^-1``,
    ``g_v = G^T c`` with ``c = D^-1 N^+ 1``, so ``d = (1^T M c / c^T M c) G^T c``: the weights
    are ``(1^T M c / c^T M c) c``. ``N^+`` is the pseudo-inverse from the eigendecomposition of
    ``N`` with eigenvalues below ``rcond * max eigenvalue`` dropped.

    Args:
        rcond: relative cut-off, in ``[0, 1)``, for the eigenvalues of the cosine matrix in the
            pseudo-inverse. Default ``1e-8`` (the Gram is float64 but usually computed from
            float32 gradients; smaller eigenvalues are rounding noise and would blow up ``c``).

    When the gradients are linearly dependent and ``1`` is not in the range of ``N``, ``g_v``
    is the least-squares solution (cosines as equal as possible). When ``g_v = 0`` (e.g.
    ``g_2 = -g_1``) or every gradient is zero, the update is zero (``extras["degenerate"]``).
    Tasks with a zero gradient get weight 0.

    Task-specific parameters: each head gets its own task's gradient (weight 1): the paper
    trains networks without heads, and ConFIG's weights have no meaning on a head.

    State: none. Cost: ``k`` gradient passes for ``M`` and an ``O(k^3)`` eigendecomposition.

    Deviations: the official code solves ``U g = 1`` with ``torch.linalg.lstsq``/``pinv`` on
    the ``k x P`` unit-gradient matrix; the Gram form gives the same minimum-norm solution.
    The preference ("weight model") and momentum (M-ConFIG) variants are not included.

    Example:
        >>> import torch
        >>> from gradbalance.methods import ConFIG, TaskInputs
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> w = ConFIG().aggregate(TaskInputs(losses=torch.ones(2, dtype=torch.float64), gram=g @ g.T)).weights
        >>> w @ g  # the bisector of the unit gradients, length (1 + 2) / sqrt(2)
        tensor([1.5000, 1.5000], dtype=torch.float64)

    References:
        Q. Liu, M. Chu, N. Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed
        Neural Networks", ICLR 2025, Eq. 2.
    """

    requires = "gram"

    def __init__(self, rcond: float = 1e-8) -> None:
        if isinstance(rcond, bool) or not isinstance(rcond, (int, float)) or not 0.0 <= rcond < 1.0:
            raise ValueError(f"rcond must be a number in [0, 1), got {rcond!r}")
        self.rcond = float(rcond)

    def hyperparameters(self) -> dict[str, Any]:
        return {"rcond": self.rcond}

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        device = inputs.losses.device
        gram = require_gram(inputs, "ConFIG").detach().to("cpu", torch.float64)
        k = gram.shape[0]
        norms = gram.diagonal().clamp_min(0).sqrt()
        inv = torch.where(norms > 0, 1 / torch.where(norms > 0, norms, 1), 0)
        cosine = inv[:, None] * gram * inv[None, :]
        vals, vecs = torch.linalg.eigh(cosine)
        keep = vals > self.rcond * vals.max().clamp_min(0)
        vals_inv = torch.where(keep & (vals > 0), 1 / torch.where(keep, vals, 1), 0)
        c = inv * (vecs @ (vals_inv * (vecs.T @ torch.ones(k, dtype=torch.float64))))
        norm_sq = c @ gram @ c
        degenerate = not bool(norm_sq > 0)
        if degenerate:
            weights = torch.zeros(k, dtype=torch.float64)
        else:
            weights = (gram.sum(0) @ c / norm_sq) * c
        return Aggregation(
            weights=weights.to(device),
            head_weights=torch.ones(k, dtype=torch.float64, device=device),
            extras={"degenerate": degenerate},
        )
