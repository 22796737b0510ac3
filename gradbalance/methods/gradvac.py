"""Gradient Vaccine (GradVac), implemented from the paper (Algorithm 1), in Gram form."""

from __future__ import annotations

from typing import Any

import torch

from gradbalance.methods.base import (
    Aggregation,
    Method,
    TaskInputs,
    check_num_tasks,
    generator_from_state,
    register,
    require_gram,
)

__all__ = ["GradVac"]


@register("gradvac", "Gradient Vaccine (Wang et al. 2021): raise pairwise cosines to EMA targets")
class GradVac(Method):
    """Gradient Vaccine (GradVac): align each task gradient with the others up to a learned target.

    GradVac keeps, for every ordered pair of tasks ``(i, j)``, an exponential moving average
    ``phi_hat_ij`` of their gradient cosine (initially 0). For each task ``i`` and every other
    task ``j`` in a fresh random order, with ``phi_ij = cos(g_i^v, g_j)`` (``g_i^v`` the running
    modified gradient, initially ``g_i``; ``g_j`` the ORIGINAL gradient): if
    ``phi_ij < phi_hat_ij`` then

    ``g_i^v <- g_i^v + ||g_i^v|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
    / (||g_j|| sqrt(1 - phi_hat^2)) g_j``,

    the smallest move along ``g_j`` that makes ``cos(g_i^v, g_j) = phi_hat_ij`` exactly; then
    ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi_ij`` (for every pair, corrected or not,
    with the cosine measured before the correction). The shared update is ``sum_i g_i^v``.

    Every ``g_i^v`` stays a combination ``sum_m C[i, m] g_m`` of the original gradients, so
    the method works on the Gram matrix ``M`` alone (``g_i^v . g_j = C[i] @ M[:, j]``,
    ``||g_i^v||^2 = C[i] @ M @ C[i]``) and returns ``weights = C.sum(0)``; ``extras`` holds
    ``C`` as ``"coefficients"`` and the number of corrections as ``"corrections"``.

    Args:
        beta: EMA rate of the targets, in ``[0, 1]``. Default ``0.01`` (the paper's
            ``beta = 1e-2``; LibMTL and torchjd default to ``0.5``).
        seed: seed (int >= 0) of the method's own generator for the task orders. Default 0.

    Task-specific parameters: each head gets its own task's unmodified gradient (weight 1).

    State: the ``k x k`` targets ``phi_hat`` (float64) and the generator state, both changed
    only when the optimizer steps; saved by ``state_dict()``. The orders are one
    ``randperm(k - 1)`` per task over the other tasks in index order.

    Cost: ``k`` gradient passes for ``M``, then ``O(k^3)`` scalar work on the CPU.

    Deviations: the paper can apply GradVac per layer ("all_layer"/"all_matrix" groups);
    this implementation treats all shared parameters as one vector (LibMTL's "whole_model").
    A pair with a zero-norm gradient is skipped (no correction, its target unchanged). A target
    of exactly 1 (reached by rounding after many steps of parallel gradients) cannot be reached
    by a finite move: that pair is not corrected (its target still follows the EMA); LibMTL adds
    ``1e-8`` to the denominator instead, a move of about ``1e8 ||g_i|| / ||g_j||``.

    Example:
        >>> import torch
        >>> from gradbalance.methods import GradVac, TaskInputs
        >>> g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> agg = GradVac().aggregate(TaskInputs(losses=torch.ones(2, dtype=torch.float64), gram=g @ g.T))
        >>> agg.weights @ g  # each g_i raised to cosine 0 with the other (targets start at 0)
        tensor([0.5000, 1.5000], dtype=torch.float64)

    References:
        Z. Wang, Y. Tsvetkov, O. Firat, Y. Cao, "Gradient Vaccine: Investigating and Improving
        Multi-task Optimization in Massively Multilingual Models", ICLR 2021, Algorithm 1.
    """

    requires = "gram"

    def __init__(self, beta: float = 0.01, seed: int = 0) -> None:
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.beta = float(beta)
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        """Forget the targets (next step starts from ``phi_hat = 0``) and re-seed."""
        self._targets = torch.zeros(0, 0, dtype=torch.float64)
        self._generator = torch.Generator().manual_seed(self.seed).get_state()

    def hyperparameters(self) -> dict[str, Any]:
        return {"beta": self.beta, "seed": self.seed}

    def vaccinate(self, gram: torch.Tensor, targets: torch.Tensor, orders: list[list[int]]):
        """Algorithm 1 on the Gram matrix: coefficients ``C``, new targets, corrections."""
        k = gram.shape[0]
        coef = torch.eye(k, dtype=torch.float64)
        new = targets.clone()
        count = 0
        norms = gram.diagonal().clamp_min(0).sqrt()
        for i in range(k):
            for j in orders[i]:
                norm_i = (coef[i] @ gram @ coef[i]).clamp_min(0).sqrt()
                if norm_i == 0 or norms[j] == 0:
                    continue
                phi = ((coef[i] @ gram[:, j]) / (norm_i * norms[j])).clamp(-1.0, 1.0)
                target = targets[i, j]
                root_t = (1 - target**2).clamp_min(0).sqrt()
                # a target of exactly 1 (the EMA rounds to it after many steps of parallel
                # gradients) cannot be reached by a finite move along g_j: no correction
                if phi < target and root_t > 0:
                    root_p = (1 - phi**2).sqrt()
                    coef[i, j] += norm_i * (target * root_p - phi * root_t) / (norms[j] * root_t)
                    count += 1
                new[i, j] = (1 - self.beta) * target + self.beta * phi
        return coef, new, count

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        k = inputs.num_tasks
        if k < 2:
            raise ValueError(f"GradVac needs at least 2 task losses, got {k}")
        targets = self._targets if self._targets.numel() else torch.zeros(k, k, dtype=torch.float64)
        check_num_tasks(targets.shape[0], k, "GradVac")
        gen = generator_from_state(self._generator)
        orders = []
        for i in range(k):
            others = [j for j in range(k) if j != i]
            orders.append([others[int(p)] for p in torch.randperm(k - 1, generator=gen)])
        gram = require_gram(inputs, "GradVac").detach().to("cpu", torch.float64)
        coef, new, count = self.vaccinate(gram, targets, orders)
        device = inputs.losses.device
        return Aggregation(
            weights=coef.sum(0).to(device),
            head_weights=torch.ones(k, dtype=torch.float64, device=device),
            extras={"corrections": count, "coefficients": coef},
            pending=(new, gen.get_state()),
        )

    def commit(self, pending: Any) -> None:
        self._targets, self._generator = pending

    def state_dict(self) -> dict[str, Any]:
        return {"targets": self._targets.clone(), "generator": self._generator.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"targets", "generator"}:
            raise ValueError(
                f"GradVac state must have keys 'targets' and 'generator', got {sorted(state)}"
            )
        self._targets = state["targets"].detach().to("cpu", torch.float64).clone()
        self._generator = state["generator"].clone()
