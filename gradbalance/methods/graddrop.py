"""Gradient Sign Dropout (GradDrop), implemented from the paper (Algorithm 1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gradbalance.methods.base import Aggregation, SeededMethod, TaskInputs, register, require_grads

__all__ = ["GradDrop"]


@register(
    "graddrop", "GradDrop (Chen et al. 2020): keep one gradient sign per coordinate at random"
)
class GradDrop(SeededMethod):
    """Gradient Sign Dropout (GradDrop): per coordinate, keep only the positive or negative parts.

    For every coordinate ``p`` of the shared parameters, the positive sign purity is

    ``P_p = 0.5 (1 + sum_i g_ip / sum_i |g_ip|)``  (``0.5`` where every ``g_ip = 0``),

    a uniform ``U_p`` is drawn, and task ``i``'s entry is kept when its sign is the chosen one:
    ``M_ip = [U_p < P_p][g_ip > 0] + [U_p > P_p][g_ip < 0]``. The update is
    ``sum_i (l_i + (1 - l_i) M_i) * g_i`` with the leak ``l_i``. Where all tasks agree in sign
    (``P_p`` is 0 or 1) the coordinate is kept exactly; the more they disagree, the more
    often one side is dropped.

    Args:
        leak: ``l_i`` in ``[0, 1]``, one number for every task or a sequence of ``k``: the
            fraction of task ``i``'s gradient that always passes. Default ``0.0`` (plain
            GradDrop); ``1.0`` gives the sum of the gradients.
        seed: seed (int >= 0) of the method's own generator for ``U``. Default 0.

    Where it acts: the paper applies GradDrop to the gradients w.r.t. a shared activation
    layer (summing each task's gradient over the batch before taking signs). Here, as in
    torchjd, it acts coordinate-wise on the task gradients of the shared PARAMETERS (so it
    needs the ``k x P`` gradients, ``requires = "grads"``, and returns an explicit direction;
    representation mode is not supported, since the result is not a weighted sum of the
    task gradients).

    Task-specific parameters: each head gets its own task's gradient (weight 1).

    State: the generator state only, advanced once per committed step (one ``rand(P)`` draw on
    the CPU in the gradients' dtype, copied to their device: ``P`` numbers per step).

    Example:
        >>> import torch
        >>> from gradbalance.methods import GradDrop, TaskInputs
        >>> g = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # all signs agree: nothing is dropped
        >>> GradDrop().aggregate(TaskInputs(losses=torch.ones(2), grads=g)).direction
        tensor([4., 6.])

    References:
        Z. Chen, J. Ngiam, Y. Huang, T. Luong, H. Kretzschmar, Y. Chai, D. Anguelov, "Just Pick
        a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020.
    """

    requires = "grads"

    def __init__(self, leak: float | Sequence[float] = 0.0, seed: int = 0) -> None:
        values = [leak] if isinstance(leak, (int, float)) else list(leak)
        if not values or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0
            for v in values
        ):
            raise ValueError(
                f"leak must be a number in [0, 1] or a non-empty sequence of them, got {leak!r}"
            )
        self.leak = (
            float(leak) if isinstance(leak, (int, float)) else tuple(float(v) for v in values)
        )
        super().__init__(seed)

    def hyperparameters(self) -> dict[str, Any]:
        return {"leak": self.leak, "seed": self.seed}

    def reset(self) -> None:
        """Re-seed the generator."""
        self._generator = torch.Generator().manual_seed(self.seed).get_state()

    @staticmethod
    def purity(grads: torch.Tensor) -> torch.Tensor:
        """Positive sign purity ``P`` per coordinate (0.5 where all gradients are 0)."""
        total = grads.abs().sum(0)
        ratio = torch.where(total > 0, grads.sum(0) / torch.where(total > 0, total, 1), 0)
        return 0.5 * (1 + ratio)

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        grads = require_grads(inputs, "GradDrop")
        k = grads.shape[0]
        if isinstance(self.leak, tuple) and len(self.leak) != k:
            raise ValueError(f"leak has {len(self.leak)} entries but got {k} losses")
        leak = torch.as_tensor(self.leak, dtype=grads.dtype, device=grads.device).expand(k)
        prob = self.purity(grads)
        gen = self.draw()
        u = torch.rand(prob.shape, generator=gen, dtype=grads.dtype).to(grads.device)
        keep = ((u < prob) & (grads > 0)) | ((u > prob) & (grads < 0))
        mask = leak[:, None] + (1 - leak[:, None]) * keep.to(grads.dtype)
        device = inputs.losses.device
        return Aggregation(
            weights=None,
            direction=(mask * grads).sum(0),
            head_weights=torch.ones(k, dtype=torch.float64, device=device),
            pending=gen.get_state(),
        )

