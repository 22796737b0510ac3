"""DB-MTL (Dual-Balancing Multi-Task Learning), from the paper and LibMTL (its authors' code)."""

from __future__ import annotations

from typing import Any

import torch

from gradbalance.methods.base import Aggregation, Method, TaskInputs, check_num_tasks, register, require_grads

__all__ = ["DBMTL"]


@register(
    "db_mtl", "DB-MTL (Lin et al. 2023): log losses, EMA gradients rescaled to the largest norm"
)
class DBMTL(Method):
    """Dual-Balancing Multi-Task Learning (DB-MTL): balance loss scales and gradient magnitudes.

    Loss-scale balancing: every task is trained on ``log L_i``, whose gradient is
    ``g_i / L_i`` (so multiplying a loss by a constant changes nothing). Gradient-magnitude
    balancing: an exponential moving average of those gradients,

    ``h_i <- beta_t h_i + (1 - beta_t) g_i / L_i``, ``beta_t = beta / t^sigma``, ``h_i = 0`` at first,

    (``t`` the step, counting from 1) is rescaled so that every task has the norm of the
    largest: ``d = sum_i (max_j ||h_j|| / ||h_i||) h_i``. The update is not a weighted sum of
    the current gradients, so the method needs the ``k x P`` gradients (``requires="grads"``)
    and returns an explicit direction; ``extras["alpha"]`` holds the scales
    ``max_j ||h_j|| / ||h_i||``.

    Args:
        beta: EMA rate, in ``[0, 1)``. Default ``0.9`` (LibMTL's ``DB_beta``).
        beta_sigma: decay exponent ``sigma >= 0`` of ``beta_t``. Default ``0.0`` (LibMTL's
            ``DB_beta_sigma``: a constant ``beta``).

    Every loss must be > 0 (its log is taken); a ``ValueError`` says which one is not. A task
    whose EMA gradient is zero gets scale 0.

    Task-specific parameters: head ``i`` gets the gradient of ``log L_i``, i.e. ``1 / L_i``
    times its task's gradient (``head_weights = 1 / L``), as in LibMTL, where each log loss is
    backpropagated and only the shared gradients are replaced.

    State: the ``k x P`` EMA ``h`` (in the gradients' dtype and device) and the step count
    ``t``; ``state_dict()`` returns both. Memory: one extra ``k x P`` buffer.

    Deviations: LibMTL adds ``1e-8`` inside the log and to the norms; here a non-positive loss
    raises instead and a zero norm gets scale 0. The EMA starts at 0 without bias correction,
    as in LibMTL (the first update is ``(1 - beta)`` times the balanced gradient).

    Example:
        >>> import torch
        >>> from gradbalance.methods import DBMTL, TaskInputs
        >>> g = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
        >>> DBMTL(beta=0.0).aggregate(TaskInputs(losses=torch.tensor([1.0, 0.5]), grads=g)).direction
        tensor([3., 3.])

    References:
        B. Lin, W. Jiang, F. Ye, Y. Zhang, P. Chen, Y.-C. Chen, S. Liu, J. T. Kwok,
        "Dual-Balancing for Multi-Task Learning", arXiv:2308.12029, 2023.
    """

    requires = "grads"

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
        if (
            isinstance(beta_sigma, bool)
            or not isinstance(beta_sigma, (int, float))
            or not beta_sigma >= 0
        ):
            raise ValueError(f"beta_sigma must be a number >= 0, got {beta_sigma!r}")
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.reset()

    def reset(self) -> None:
        """Forget the EMA (the next step starts from ``h = 0``, ``t = 1``)."""
        self._ema = torch.zeros(0, 0)
        self._steps = 0

    def hyperparameters(self) -> dict[str, Any]:
        return {"beta": self.beta, "beta_sigma": self.beta_sigma}

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        grads, losses = require_grads(inputs, "DB-MTL"), inputs.losses
        k = grads.shape[0]
        if self._ema.numel():
            check_num_tasks(self._ema.shape[0], k, "DB-MTL")
            if self._ema.shape[1] != grads.shape[1]:
                raise ValueError(
                    f"DB-MTL keeps a {tuple(self._ema.shape)} EMA but got gradients "
                    f"of shape {tuple(grads.shape)}; call reset() after changing the model"
                )
        positive = (losses > 0).tolist()
        bad = [
            inputs.task_names[i] if inputs.task_names else i for i in range(k) if not positive[i]
        ]
        if bad:
            raise ValueError(
                f"DB-MTL takes the log of each loss; the loss of task(s) {bad} is <= 0"
            )
        t = self._steps + 1
        beta_t = self.beta / t**self.beta_sigma
        log_grads = grads / losses.to(grads.dtype)[:, None]
        ema = self._ema.to(grads) if self._ema.numel() else torch.zeros_like(grads)
        ema = beta_t * ema + (1 - beta_t) * log_grads
        norms = torch.linalg.vector_norm(ema, dim=1)
        alpha = torch.where(norms > 0, norms.max() / torch.where(norms > 0, norms, 1), 0)
        return Aggregation(
            weights=None,
            direction=alpha @ ema,
            head_weights=1 / losses,
            extras={"alpha": alpha.double()},
            pending=(ema, t),
        )

    def commit(self, pending: Any) -> None:
        self._ema, self._steps = pending

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self._ema.clone(), "steps": self._steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"ema", "steps"}:
            raise ValueError(f"DB-MTL state must have keys 'ema' and 'steps', got {sorted(state)}")
        self._ema = state["ema"].detach().clone()
        self._steps = int(state["steps"])
