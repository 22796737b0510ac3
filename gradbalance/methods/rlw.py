"""Random Loss Weighting, implemented from the paper (Lin et al. 2022)."""

from __future__ import annotations

from typing import Any

import torch

from gradbalance.methods.base import Aggregation, SeededMethod, TaskInputs, register

__all__ = ["RLW"]

DISTRIBUTIONS = ("normal", "uniform")
SCALES = ("sum_to_one", "sum_to_k")


@register("rlw", "Random Loss Weighting (Lin et al. 2022): softmax of random normal draws per step")
class RLW(SeededMethod):
    """Random Loss Weighting (RLW): fresh random task weights at every step.

    ``lambda = softmax(z)``, ``z ~ N(0, I_k)`` (or ``U(0, 1)^k``) drawn at each optimizer step
    from the method's own seeded generator; the update is ``sum_i lambda_i g_i``.

    Args:
        seed: seed (int >= 0) of the method's generator (default 0).
        distribution: ``"normal"`` (default, the paper's main choice) or ``"uniform"``, the
            distribution of ``z`` before the softmax.
        scale: ``"sum_to_one"`` (default, the paper's: on average each task gets ``1/k``, like
            ``"mean"``; compared with ``"sum"`` this is an implicit ``1/k`` learning rate) or
            ``"sum_to_k"`` (``k softmax(z)``: on average 1, like ``"sum"``).

    Task-specific parameters: head ``i`` gets ``lambda_i`` times its task's gradient (the
    gradient of ``sum_i lambda_i L_i``, as in the paper).

    State: the generator's state (saved by ``state_dict()``; same seed, same weights). The draw
    is committed only when the wrapped optimizer steps, so every micro-batch of an
    accumulation window uses the same weights, and a skipped step redraws nothing.

    Cost: one ordinary backward per step (no per-task gradients).

    Deviations: none.

    Example:
        >>> import torch
        >>> from gradbalance.methods import RLW, TaskInputs
        >>> w = RLW(seed=3).aggregate(TaskInputs(losses=torch.ones(4, dtype=torch.float64))).weights
        >>> round(float(w.sum()), 12), bool((w > 0).all())
        (1.0, True)

    References:
        B. Lin, F. Ye, Y. Zhang, I. W. Tsang, "Reasonable Effectiveness of Random Weighting: A
        Litmus Test for Multi-Task Learning", TMLR 2022.
    """

    requires = "losses"

    def __init__(self, seed: int = 0, distribution: str = "normal", scale: str = "sum_to_one") -> None:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        super().__init__(seed)
        self.distribution, self.scale = distribution, scale

    def hyperparameters(self) -> dict[str, Any]:
        return {"seed": self.seed, "distribution": self.distribution, "scale": self.scale}

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        k = inputs.num_tasks
        gen = self.draw()
        draw = torch.randn if self.distribution == "normal" else torch.rand
        z = draw(k, generator=gen, dtype=torch.float64)
        weights = torch.softmax(z, dim=0) * (k if self.scale == "sum_to_k" else 1)
        return Aggregation(weights=weights.to(inputs.losses.device), pending=gen.get_state())

