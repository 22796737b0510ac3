"""FAMO (Fast Adaptive Multitask Optimization), from the paper and the official code."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from gradbalance.methods.base import Aggregation, Method, TaskInputs, check_num_tasks, register

__all__ = ["FAMO"]

_BETAS, _EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, as in the official code


@register(
    "famo", "FAMO (Liu et al. 2023): O(1) loss weighting that equalises loss improvement rates"
)
class FAMO(Method):
    """Fast Adaptive Multitask Optimization (FAMO): balance the rates at which the losses fall.

    FAMO keeps logits ``xi`` (``xi = 0`` at first), ``z = softmax(xi)``, and minimises
    ``sum_i z_i log(L_i - m_i) / c`` with ``c = sum_j z_j / (L_j - m_j)`` held constant
    (``m`` the ``min_losses``). The task weights on the raw losses are therefore

    ``w_i = z_i / (c (L_i - m_i))``, which sum to 1.

    The logits learn from how much each log loss fell over one step,
    ``delta_i = log(L_i^prev - m_i) - log(L_i^now - m_i)``: their gradient is
    ``J_softmax^T delta = z * (delta - z . delta)``, stepped by Adam (``lr``, L2 ``weight_decay``,
    betas ``(0.9, 0.999)``, eps ``1e-8``). So a task whose loss fell less than the
    z-weighted average gains weight.

    Delayed update, no extra forward pass: the official trainers evaluate ``L^now`` by a second
    forward pass after each step; here (as in the official toy example) ``L^now`` is the
    losses of the NEXT step. Each step first applies the logit update from the previous
    committed step's losses to this step's, then computes the weights from the new logits.
    The whole update is computed in :meth:`aggregate` and stored at commit, so skipped or
    re-run steps never change the logits. With mini-batches, ``L^prev`` and ``L^now`` come
    from different batches (noise that Adam averages out). With gradient accumulation the
    losses are the window's sums, so keep the number of micro-batches per step fixed.

    Args:
        lr: Adam learning rate of the logits, > 0. Default ``0.025`` (paper).
        weight_decay: L2 penalty ``gamma >= 0`` on the logits. Default ``1e-3`` (paper).
        min_losses: lower bounds ``m_i`` of the losses (a number, or a sequence of ``k``).
            Default ``0.0``. Every loss must stay ``> m_i``: a ``ValueError`` names the task
            otherwise (the official code adds ``1e-8`` instead and silently takes the log of
            a tiny number).

    Needs no per-task gradients (``requires="losses"``): a step costs one ordinary backward.
    Task-specific parameters get the same weights ``w_i`` (one backward of ``sum_i w_i L_i``).

    State: ``xi``, Adam's two moments and step count, and the previous step's losses;
    ``state_dict()`` returns them (on the losses' device).

    Example:
        >>> import torch
        >>> from gradbalance.methods import FAMO, TaskInputs
        >>> FAMO().aggregate(TaskInputs(losses=torch.tensor([1.0, 3.0], dtype=torch.float64))).weights
        tensor([0.7500, 0.2500], dtype=torch.float64)

    References:
        B. Liu, Y. Feng, P. Stone, Q. Liu, "FAMO: Fast Adaptive Multitask Optimization",
        NeurIPS 2023.
    """

    requires = "losses"
    loss_dependent = True

    def __init__(
        self,
        lr: float = 0.025,
        weight_decay: float = 1e-3,
        min_losses: float | Sequence[float] = 0.0,
    ) -> None:
        for name, value in (("lr", lr), ("weight_decay", weight_decay)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        mins = [min_losses] if isinstance(min_losses, (int, float)) else list(min_losses)
        if not mins or any(
            isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m)
            for m in mins
        ):
            raise ValueError(
                f"min_losses must be a finite number or a sequence of them, got {min_losses!r}"
            )
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.min_losses = (
            float(min_losses) if isinstance(min_losses, (int, float)) else tuple(map(float, mins))
        )
        self.reset()

    def reset(self) -> None:
        """Forget the logits, Adam's state and the previous losses."""
        empty = torch.zeros(0, dtype=torch.float64)
        self._xi, self._m, self._v, self._prev = empty, empty, empty, empty
        self._adam_steps = 0

    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.lr, "weight_decay": self.weight_decay, "min_losses": self.min_losses}

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        losses = inputs.losses
        k = inputs.num_tasks
        check_num_tasks(self._xi.shape[0] if self._xi.numel() else None, k, "FAMO")
        if isinstance(self.min_losses, tuple) and len(self.min_losses) != k:
            raise ValueError(f"min_losses has {len(self.min_losses)} entries but got {k} losses")
        mins = torch.as_tensor(self.min_losses, dtype=torch.float64, device=losses.device).expand(k)
        above = (losses > mins).tolist()
        if not all(above):
            bad = [
                inputs.task_names[i] if inputs.task_names else i for i in range(k) if not above[i]
            ]
            raise ValueError(
                f"FAMO needs every loss > its min_losses; task(s) {bad} have losses "
                f"{losses.tolist()} <= {mins.tolist()}"
            )
        log_gap = torch.log(losses - mins)
        fresh = not self._xi.numel()
        xi, m, v = (
            torch.zeros(k, dtype=torch.float64, device=losses.device)
            if fresh
            else t.to(losses.device)
            for t in (self._xi, self._m, self._v)
        )
        steps = self._adam_steps
        if self._prev.numel():
            delta = torch.log(self._prev.to(losses.device) - mins) - log_gap
            z = torch.softmax(xi, 0)
            grad = z * (delta - z @ delta) + self.weight_decay * xi
            steps += 1
            m = _BETAS[0] * m + (1 - _BETAS[0]) * grad
            v = _BETAS[1] * v + (1 - _BETAS[1]) * grad * grad
            denom = v.sqrt() / math.sqrt(1 - _BETAS[1] ** steps) + _EPS
            xi = xi - (self.lr / (1 - _BETAS[0] ** steps)) * m / denom
        z = torch.softmax(xi, 0)
        inv = z * torch.exp(-log_gap)
        weights = inv / inv.sum()
        return Aggregation(
            weights=weights,
            extras={"logits": xi.clone()},
            pending=(xi, m, v, steps, losses.clone()),
        )

    def commit(self, pending: Any) -> None:
        self._xi, self._m, self._v, self._adam_steps, self._prev = pending

    def state_dict(self) -> dict[str, Any]:
        return {
            "logits": self._xi.clone(),
            "exp_avg": self._m.clone(),
            "exp_avg_sq": self._v.clone(),
            "adam_steps": self._adam_steps,
            "prev_losses": self._prev.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = {"logits", "exp_avg", "exp_avg_sq", "adam_steps", "prev_losses"}
        if set(state) != keys:
            raise ValueError(f"FAMO state must have keys {sorted(keys)}, got {sorted(state)}")
        self._xi, self._m, self._v, self._prev = (
            state[n].detach().to(torch.float64).clone()
            for n in ("logits", "exp_avg", "exp_avg_sq", "prev_losses")
        )
        self._adam_steps = int(state["adam_steps"])
