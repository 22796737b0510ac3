"""UPGrad (Quinton & Rey 2024), implemented from the paper in Gram form."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gradbalance.cone import project_weights
from gradbalance.methods.base import Aggregation, Method, TaskInputs, check_number, register, require_gram

__all__ = ["UPGrad", "check_pref"]


def check_pref(pref: Sequence[float] | None, name: str) -> tuple[float, ...] | None:
    """Validate a preference vector (non-negative, not all zero); ``None`` means ``1/k`` each."""
    if pref is None:
        return None
    values = tuple(float(p) for p in pref)
    if not values or any(not p >= 0.0 for p in values) or sum(values) <= 0.0:
        raise ValueError(f"{name}: pref must be non-negative and not all zero, got {list(pref)}")
    return values


def pref_vector(pref: tuple[float, ...] | None, inputs: TaskInputs) -> torch.Tensor:
    k = inputs.num_tasks
    if pref is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    if len(pref) != k:
        raise ValueError(f"pref has {len(pref)} entries but got {k} tasks")
    return torch.tensor(pref, dtype=torch.float64)


@register("upgrad", "UPGrad: mean of the projections of every task gradient onto the dual cone")
class UPGrad(Method):
    """Unconflicting Projection of Gradients (UPGrad).

    Projects every task gradient ``g_i`` onto the dual cone ``{d : g_j . d >= 0 for all j}`` of
    the task gradients and averages the projections, so the update conflicts with no task and
    equals the mean gradient when no pair of tasks conflicts. In Gram form (``M = G G^T``)::

        v_i = argmin_{v >= p_i e_i} v^T M v        (dual of the projection of p_i g_i)
        d   = sum_i (v_i)^T G = w^T G,             w = sum_i v_i

    solved exactly by :func:`gradbalance.cone.project_weights` (NNLS on a factor of ``M``).

    Args:
        pref: non-negative preference weights ``p`` (one per task); ``None`` (default) gives
            ``p_i = 1/k``, the paper's UPGrad (the result is then the mean of the projections).
        reg: ``reg * I`` added to the trace-normalised Gram matrix before solving (default
            ``0.0``, the exact projection; torchjd uses ``1e-4`` because its QP solver needs a
            positive-definite matrix; a positive ``reg`` allows conflicts of order ``reg``).

    Task-specific parameters: each head gets its own task's plain gradient (weight 1), as in
    torchjd's ``mtl_backward``; the projection acts on the shared parameters only. Stateless.

    Example:
        >>> import torch
        >>> from gradbalance.methods import TaskInputs, UPGrad
        >>> M = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64)
        >>> UPGrad().aggregate(TaskInputs(losses=torch.ones(2, dtype=torch.float64), gram=M)).weights
        tensor([0.7500, 0.7500], dtype=torch.float64)

    References:
        P. Quinton, V. Rey. "Jacobian Descent for Multi-Objective Optimization."
        arXiv:2406.16232, 2024.
    """

    requires = "gram"

    def __init__(self, pref: Sequence[float] | None = None, reg: float = 0.0) -> None:
        self.pref = check_pref(pref, "UPGrad")
        self.reg = check_number("reg", reg, minimum=0.0)

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        p = pref_vector(self.pref, inputs)
        v = project_weights(require_gram(inputs, "UPGrad"), torch.diag(p), reg=self.reg)
        weights = v.sum(dim=1).to(inputs.losses.device)
        # number of task gradients that the projection changed (they conflicted with some task)
        moved = int((v - torch.diag(p) > 1e-12).any(dim=0).sum())
        return Aggregation(weights=weights, head_weights=torch.ones_like(weights),
                           extras={"projected": moved})

    def hyperparameters(self) -> dict[str, Any]:
        return {"pref": None if self.pref is None else list(self.pref), "reg": self.reg}
