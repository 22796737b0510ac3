"""PCGrad, implemented from the paper (Algorithm 1), in Gram form."""

from __future__ import annotations

from typing import Any

import torch

from gradbalance.methods.base import Aggregation, SeededMethod, TaskInputs, register, require_gram

__all__ = ["PCGrad"]

REDUCTIONS = ("sum", "mean")


@register("pcgrad", "PCGrad (Yu et al. 2020): project conflicting gradients, random order per task")
class PCGrad(SeededMethod):
    """Projecting Conflicting Gradients (PCGrad), "gradient surgery".

    For each task ``i``, and for every other task ``j`` in a fresh random order, if
    ``g_i^PC . g_j < 0`` the running ``g_i^PC`` (initially ``g_i``) is projected onto the normal
    plane of the ORIGINAL ``g_j``: ``g_i^PC <- g_i^PC - (g_i^PC . g_j / ||g_j||^2) g_j``. The
    shared update is ``sum_i g_i^PC`` (``reduction="sum"``, Algorithm 1) or its mean.

    Every ``g_i^PC`` stays a linear combination ``sum_m C[i, m] g_m`` of the original gradients,
    so the method runs on the ``k x k`` Gram matrix ``M`` alone (``g_i^PC . g_j = C[i] @ M[:, j]``)
    and returns ``weights = C.sum(0)`` (or ``C.mean(0)``); ``extras`` holds ``C`` as
    ``"coefficients"`` and the number of projections as ``"projections"``. With 3 or more tasks
    the projected gradients may still conflict with each other (as in the paper).

    Args:
        reduction: ``"sum"`` (default, the paper's) or ``"mean"`` (``1/k`` of it).
        seed: seed (int >= 0) of the method's own generator for the orders. Default 0.

    Task-specific parameters: each head gets its own task's unprojected gradient, times 1
    (``"sum"``) or ``1/k`` (``"mean"``), so heads see the same scale as with ``"sum"``/``"mean"``.

    State: the generator's state only (saved by ``state_dict()``, advanced at each committed
    step), so the same seed gives the same orders. The orders are drawn as one
    ``randperm(k - 1)`` per task ``i`` over the other tasks in index order.

    Cost: the ``k x k`` Gram matrix (k gradient passes), then ``O(k^3)`` on the CPU (one host
    copy of ``M``), then one weighted sum. Needs ``k >= 2`` (raises ``ValueError`` otherwise:
    with one task there is nothing to project, see the docs).

    Deviations: none from Algorithm 1 (the official TF code never applies its shuffle; we do).

    Example:
        >>> import torch
        >>> from gradbalance.methods import PCGrad, TaskInputs
        >>> g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> agg = PCGrad().aggregate(TaskInputs(losses=torch.ones(2, dtype=torch.float64), gram=g @ g.T))
        >>> agg.weights @ g  # (g1 + 0.5 g2) + (g1 + g2)
        tensor([0.5000, 1.5000], dtype=torch.float64)

    References:
        T. Yu, S. Kumar, A. Gupta, S. Levine, K. Hausman, C. Finn, "Gradient Surgery for
        Multi-Task Learning", NeurIPS 2020, Algorithm 1.
    """

    requires = "gram"

    def __init__(self, reduction: str = "sum", seed: int = 0) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        super().__init__(seed)

    def hyperparameters(self) -> dict[str, Any]:
        return {"reduction": self.reduction, "seed": self.seed}

    def orders(self, k: int, generator: torch.Generator) -> list[list[int]]:
        """For each task i, a fresh random order of the other k - 1 tasks."""
        out = []
        for i in range(k):
            others = [j for j in range(k) if j != i]
            out.append([others[int(p)] for p in torch.randperm(k - 1, generator=generator)])
        return out

    def project(self, gram: torch.Tensor, orders: list[list[int]]) -> tuple[torch.Tensor, int]:
        """Algorithm 1 on the Gram matrix: the coefficients ``C`` and the number of projections."""
        k = gram.shape[0]
        coef = torch.eye(k, dtype=torch.float64)
        count = 0
        for i in range(k):
            for j in orders[i]:
                dot = coef[i] @ gram[:, j]  # g_i^PC . g_j, g_j the ORIGINAL gradient
                if dot < 0 and gram[j, j] > 0:
                    coef[i, j] -= dot / gram[j, j]
                    count += 1
        return coef, count

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        k = inputs.num_tasks
        if k < 2:
            raise ValueError(
                f"PCGrad needs at least 2 task losses, got {k}: pass one loss per task, not their sum"
            )
        gram = require_gram(inputs, "PCGrad").detach().to("cpu", torch.float64)
        gen = self.draw()
        coef, count = self.project(gram, self.orders(k, gen))
        scale = 1.0 if self.reduction == "sum" else 1.0 / k
        device = inputs.losses.device
        weights = (coef.sum(0) * scale).to(device)
        return Aggregation(
            weights=weights,
            head_weights=torch.full((k,), scale, dtype=torch.float64, device=device),
            extras={"projections": count, "coefficients": coef * scale},
            pending=gen.get_state(),
        )

