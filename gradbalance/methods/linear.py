"""Linear scalarization: equal weights (``"sum"`` and ``"mean"``)."""

from __future__ import annotations

import torch

from gradbalance.methods.base import Aggregation, Method, TaskInputs, register

__all__ = ["Mean", "Sum"]


@register("sum", "Linear scalarization: the plain sum of the task losses (weights 1)")
class Sum(Method):
    """Sum of the task losses: ``L = sum_i L_i``.

    The update equals that of ``sum(losses).backward()``. Task-specific parameters get their
    own task's gradient (weight 1). Stateless; needs no per-task gradients, so a step costs one
    ordinary backward.

    Example:
        >>> import gradbalance as gb
        >>> gb.methods.Sum()
        Sum()
    """

    requires = "losses"

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        return Aggregation(weights=torch.ones_like(inputs.losses))


@register("mean", "Linear scalarization with equal weights 1/k (the mean of the task losses)")
class Mean(Method):
    """Mean of the task losses: ``L = (1/k) sum_i L_i``, the equal-weighting baseline.

    Task-specific parameters get ``1/k`` times their task's gradient, exactly as with
    ``torch.stack(losses).mean().backward()``. Stateless; one ordinary backward per step.

    Example:
        >>> import gradbalance as gb
        >>> gb.methods.Mean()
        Mean()
    """

    requires = "losses"

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        k = inputs.num_tasks
        return Aggregation(weights=torch.full_like(inputs.losses, 1.0 / k))
