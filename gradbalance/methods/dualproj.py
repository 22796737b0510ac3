"""DualProj (Quinton & Rey 2024), implemented from the paper in Gram form."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gradbalance.cone import project_weights
from gradbalance.methods.base import Aggregation, Method, TaskInputs, check_number, register, require_gram
from gradbalance.methods.upgrad import check_pref, pref_vector

__all__ = ["DualProj"]


@register("dualproj", "DualProj: the mean gradient projected onto the dual cone of the tasks")
class DualProj(Method):
    """Dual Projection (DualProj).

    Projects the (preference-weighted) mean gradient ``g_p = sum_i p_i g_i`` onto the dual cone
    ``{d : g_j . d >= 0 for all j}``: the closest direction to the mean that conflicts with no
    task; it is the mean itself when the mean conflicts with no task. In Gram form::

        w = argmin_{v >= p} v^T M v,        d = w^T G

    solved exactly by :func:`gradbalance.cone.project_weights`.

    Args:
        pref: non-negative preference weights ``p``; ``None`` (default): ``p_i = 1/k``.
        reg: ``reg * I`` added to the trace-normalised Gram matrix (default ``0.0``: exact;
            torchjd uses ``1e-4``).

    Task-specific parameters: each head gets its own task's plain gradient (weight 1), as in
    torchjd's ``mtl_backward``; the projection acts on the shared parameters only. Stateless.

    Example:
        >>> import torch
        >>> from gradbalance.methods import DualProj, TaskInputs
        >>> M = torch.tensor([[1.0, -0.4], [-0.4, 0.25]], dtype=torch.float64)
        >>> DualProj().aggregate(TaskInputs(losses=torch.ones(2, dtype=torch.float64), gram=M)).weights
        tensor([0.5000, 0.8000], dtype=torch.float64)

    References:
        P. Quinton, V. Rey. "Jacobian Descent for Multi-Objective Optimization."
        arXiv:2406.16232, 2024.
    """

    requires = "gram"

    def __init__(self, pref: Sequence[float] | None = None, reg: float = 0.0) -> None:
        self.pref = check_pref(pref, "DualProj")
        self.reg = check_number("reg", reg, minimum=0.0)

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        p = pref_vector(self.pref, inputs)
        w = project_weights(require_gram(inputs, "DualProj"), p, reg=self.reg)
        w = w.to(inputs.losses.device)
        return Aggregation(weights=w, head_weights=torch.ones_like(w))

    def hyperparameters(self) -> dict[str, Any]:
        return {"pref": None if self.pref is None else list(self.pref), "reg": self.reg}
