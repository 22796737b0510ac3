"""Uncertainty weighting, implemented from the paper (Kendall et al. 2018, eqs. 7 and 10)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gradbalance.methods.base import (
    Aggregation,
    Method,
    TaskInputs,
    check_num_tasks,
    register,
    register_factory,
)

__all__ = ["UW"]

KINDS = {"regression": 0.5, "classification": 1.0}  # the factor c in front of exp(-s) L
OPTIMIZERS = ("adam", "sgd")
_BETAS, _EPS = (0.9, 0.999), 1e-8


@register("uw", "Uncertainty weighting (Kendall et al. 2018): learned homoscedastic log-variances")
class UW(Method):
    """Uncertainty Weighting (UW): each task's homoscedastic noise ``sigma_i`` is learned.

    With ``s_i = log sigma_i^2``, the total loss is Kendall et al.'s
    ``sum_i c_i exp(-s_i) L_i + s_i / 2``, ``c_i = 1/2`` for a regression task (eq. 7:
    ``L / (2 sigma^2) + log sigma``) and ``c_i = 1`` for a classification task (eq. 10:
    ``L / sigma^2 + log sigma``). The task weights are ``c_i exp(-s_i)``; the gradient of the
    total with respect to ``s_i`` is ``1/2 - c_i exp(-s_i) L_i`` (closed form, from the loss
    values), so the stationary point is ``s_i* = log(2 c_i L_i)`` (``log L_i`` for regression).

    Args:
        kind: ``"regression"`` (default), ``"classification"``, or one of them per task.
        init: initial ``s_i`` (a float, default 0.0, or one per task).
        lr: learning rate ``> 0`` of the method's own optimizer for ``s`` (default 0.01: with
            Adam, ``s`` moves by about ``lr`` per step, i.e. each weight by about 1%).
        optimizer: ``"adam"`` (default; betas 0.9/0.999, eps 1e-8, no weight decay) or ``"sgd"``.

    Task-specific parameters: head ``i`` gets ``c_i exp(-s_i)`` times its task's gradient (the
    gradient of the total loss, as in the paper).

    State: ``s`` and the optimizer's moments and step, stepped when the wrapped optimizer steps
    (the user never adds ``s`` to an optimizer). ``extras`` reports ``"log_variance"`` (``s``)
    and ``"total"``, the value of the objective, which is NEGATIVE whenever ``L_i < 1/(2 c_i)``
    at the optimum: that is expected, not a bug, and nothing is clamped.

    Cost: one ordinary backward per step (no per-task gradients).

    Deviations: the paper trains ``s`` with the network's optimizer; here ``s`` has its own
    (Adam, no weight decay), stepped at each ``opt.step()``. With gradient accumulation
    ``L_i`` is the window's summed loss.

    Example:
        >>> import torch
        >>> from gradbalance.methods import UW, TaskInputs
        >>> m = UW(kind=["regression", "classification"])
        >>> m.aggregate(TaskInputs(losses=torch.tensor([0.3, 0.3], dtype=torch.float64))).weights
        tensor([0.5000, 1.0000], dtype=torch.float64)

    References:
        A. Kendall, Y. Gal, R. Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses
        for Scene Geometry and Semantics", CVPR 2018, eqs. 7 and 10.
    """

    requires = "losses"

    def __init__(self, kind: str | Sequence[str] = "regression", init: float | Sequence[float] = 0.0,
                 lr: float = 0.01, optimizer: str = "adam") -> None:
        kinds = [kind] if isinstance(kind, str) else list(kind)
        if not kinds or any(kd not in KINDS for kd in kinds):
            raise ValueError(f"kind must be 'regression', 'classification' or a list of them, got {kind!r}")
        inits = [init] if isinstance(init, (int, float)) else list(init)
        if not inits or not all(isinstance(v, (int, float)) and abs(float(v)) < float("inf") for v in inits):
            raise ValueError(f"init must be a finite float or a list of them, got {init!r}")
        if not float(lr) > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.kind, self.init, self.lr, self.optimizer = kind, init, float(lr), optimizer
        self._kinds, self._inits = kinds, [float(v) for v in inits]
        self.load_state_dict({})

    def hyperparameters(self) -> dict[str, Any]:
        return {"kind": self.kind, "init": self.init, "lr": self.lr, "optimizer": self.optimizer}

    @property
    def log_variances(self) -> Tensor:
        """The current ``s = log sigma^2`` (empty before the first step)."""
        return self._s.clone()

    def _per_task(self, values: list, k: int, what: str) -> Tensor:
        if len(values) > 1:
            check_num_tasks(len(values), k, f"UW ({what} per task)")
        return torch.tensor(values * (k if len(values) == 1 else 1), dtype=torch.float64)

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        k = inputs.num_tasks
        losses = inputs.losses.detach().double()
        c = self._per_task([KINDS[kd] for kd in self._kinds], k, "kind").to(losses.device)
        if self._s.numel() == 0:
            s = self._per_task(self._inits, k, "init").to(losses.device)
        else:
            check_num_tasks(self._s.numel(), k, "UW")
            s = self._s.to(losses.device)
        weights = c * torch.exp(-s)
        total = (weights * losses + 0.5 * s).sum()
        return Aggregation(
            weights=weights,
            extras={"total": float(total), "log_variance": s.clone()},
            pending={"s": s.cpu(), "grad": (0.5 - weights * losses).cpu()},
        )

    def commit(self, pending: dict[str, Tensor]) -> None:
        s, grad = pending["s"], pending["grad"]
        if self._s.numel() == 0:
            self._m, self._v = torch.zeros_like(s), torch.zeros_like(s)
        self._t += 1
        if self.optimizer == "sgd":
            self._s = s - self.lr * grad
            return
        b1, b2 = _BETAS
        self._m = b1 * self._m + (1 - b1) * grad
        self._v = b2 * self._v + (1 - b2) * grad * grad
        m_hat, v_hat = self._m / (1 - b1**self._t), self._v / (1 - b2**self._t)
        self._s = s - self.lr * m_hat / (v_hat.sqrt() + _EPS)

    def state_dict(self) -> dict[str, Any]:
        return {"s": self._s.clone(), "m": self._m.clone(), "v": self._v.clone(), "t": self._t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:  # a fresh method
            empty = torch.zeros(0, dtype=torch.float64)
            self._s, self._m, self._v, self._t = empty, empty, empty, 0
            return
        if set(state) != {"s", "m", "v", "t"}:
            raise ValueError(f"UW state needs keys s, m, v, t; got {sorted(state)}")
        if len({state[key].numel() for key in ("s", "m", "v")}) != 1:
            raise ValueError("UW state tensors s, m, v must have the same length")
        self._s, self._m = state["s"].double().clone(), state["m"].double().clone()
        self._v, self._t = state["v"].double().clone(), int(state["t"])


register_factory("uncertainty", "Alias of 'uw' (uncertainty weighting, Kendall et al. 2018)", UW)
