"""Geometric Loss Strategy (GLS): minimise the geometric mean of the task losses."""

from __future__ import annotations

import torch

from gradbalance.methods.base import Aggregation, Method, TaskInputs, register

__all__ = ["GLS"]


@register("gls", "Geometric Loss Strategy (Chennupati et al. 2019): geometric mean of the losses")
class GLS(Method):
    """Geometric Loss Strategy (GLS): the k-th root of the product of the task losses.

    The objective is ``L = (prod_i L_i)^(1/k)``; its gradient is ``sum_i w_i g_i`` with

    ``w_i = dL / dL_i = (prod_j L_j)^(1/k) / (k L_i)``,

    computed in log space (``exp(mean_j log L_j) / (k L_i)``) so that a product of many small or
    large losses does not under- or overflow. A task whose loss is small relative to the
    others gets a large weight: the strategy is invariant to each loss's scale up to a common
    factor (scaling ``L_i`` by ``c`` scales every weight-times-loss term by ``c^(1/k)``).

    Every loss must be > 0 (``ValueError`` otherwise). Needs no per-task gradients
    (``requires="losses"``): a step costs one ordinary backward, of ``sum_i w_i L_i``, which
    equals the gradient of the geometric mean. Task-specific parameters get the same weights.
    Stateless; no hyper-parameters.

    Example:
        >>> import torch
        >>> from gradbalance.methods import GLS, TaskInputs
        >>> GLS().aggregate(TaskInputs(losses=torch.tensor([1.0, 4.0], dtype=torch.float64))).weights
        tensor([1.0000, 0.2500], dtype=torch.float64)

    References:
        S. Chennupati, G. Sistu, S. Yogamani, S. A. Rawashdeh, "MultiNet++: Multi-Stream Feature
        Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019.
    """

    requires = "losses"
    loss_dependent = True

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        losses = inputs.losses
        positive = (losses > 0).tolist()
        if not all(positive):
            bad = [
                inputs.task_names[i] if inputs.task_names else i
                for i, ok in enumerate(positive)
                if not ok
            ]
            raise ValueError(
                f"GLS takes the geometric mean of the losses; task(s) {bad} have a "
                f"loss <= 0: {losses.tolist()}"
            )
        k = inputs.num_tasks
        log = torch.log(losses)
        return Aggregation(weights=torch.exp(log.mean() - log) / k)
