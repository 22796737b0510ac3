"""IMTL, the hybrid of IMTL-L and IMTL-G (Liu et al. 2021), implemented from the paper."""

from __future__ import annotations

from typing import Any

import torch

from gradbalance.methods.adam import adam_update
from gradbalance.methods.base import (
    Aggregation,
    Method,
    TaskInputs,
    check_num_tasks,
    check_number,
    register,
    require_gram,
)
from gradbalance.methods.imtl import MODES, imtl_g_weights

__all__ = ["IMTL"]



@register("imtl", "IMTL: learned loss scales (IMTL-L) combined with IMTL-G's impartial gradient")
class IMTL(Method):
    """Impartial Multi-Task Learning (IMTL = IMTL-L + IMTL-G, the paper's hybrid).

    IMTL-L learns a log-scale ``s_i`` per task and trains on the scaled losses
    ``e^{s_i} L_i - s_i`` (their minimiser over ``s_i`` makes every scaled loss equal to 1).
    IMTL-G is then applied to the gradients of the scaled losses ``e^{s_i} g_i``. In the paper's
    Algorithm 1, per step:

    1. scaled gradients ``g~_i = e^{s_i} g_i`` (their Gram matrix is ``E M E``, ``E = diag(e^s)``);
    2. ``alpha = IMTL-G(g~)`` (:func:`~gradbalance.methods.imtl.imtl_g_weights`, sums to 1);
    3. shared parameters get ``sum_i alpha_i g~_i``, so the weights on the raw gradients are
       ``w_i = alpha_i e^{s_i}``;
    4. task-specific parameters get the gradient of their scaled loss, ``e^{s_i}`` times their own
       gradient (``head_weights = e^s``);
    5. ``s`` takes a step on the gradient of ``sum_i (e^{s_i} L_i - s_i)``: ``e^{s_i} L_i - 1``.

    ``s`` is owned by the method and stepped by its own optimizer at ``commit`` (when the wrapped
    optimizer really steps); the paper does not give that optimizer, so it is configurable.

    Args:
        lr: learning rate of ``s`` (default ``1e-3``), ``> 0``.
        optimizer: ``"adam"`` (default; betas ``(0.9, 0.999)``, eps ``1e-8``, no weight decay)
            or ``"sgd"``.
        init: initial value of every ``s_i`` (default ``0.0``, scales 1).
        mode: ``"exact"`` (default) or ``"representation"`` (IMTL-G on the gradients w.r.t. the
            shared features ``z``, as the paper's Algorithm 1 does for speed; pass
            ``opt.backward(losses, features=z)``).

    State: ``s``, the optimizer's moments and step count, the number of tasks.

    Example:
        >>> import torch
        >>> from gradbalance.methods import IMTL, TaskInputs
        >>> M = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> IMTL().aggregate(TaskInputs(losses=torch.ones(2, dtype=torch.float64), gram=M)).weights
        tensor([0.3333, 0.6667], dtype=torch.float64)

    References:
        L. Liu, Y. Li, Z. Kuang, J.-H. Xue, Y. Chen, W. Yang, Q. Liao, W. Zhang. "Towards
        Impartial Multi-task Learning." ICLR 2021.
    """

    requires = "gram"

    def __init__(self, lr: float = 1e-3, optimizer: str = "adam", init: float = 0.0,
                 mode: str = "exact") -> None:
        lr = check_number("lr", lr, positive=True)
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        init = check_number("init", init)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.lr, self.optimizer, self.init, self.mode = float(lr), optimizer, float(init), mode
        self.reset()

    def reset(self) -> None:
        """Forget the learned scales (the next step starts from ``init``)."""
        self.num_tasks, self.t = 0, 0
        self.s = self.exp_avg = self.exp_avg_sq = torch.zeros(0, dtype=torch.float64)

    def _current(self, k: int) -> torch.Tensor:
        check_num_tasks(self.num_tasks or None, k, "IMTL")
        return self.s if self.num_tasks else torch.full((k,), self.init, dtype=torch.float64)

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        k = inputs.num_tasks
        s = self._current(k).to(inputs.losses.device)
        scale = s.exp()
        alpha = imtl_g_weights(require_gram(inputs, "IMTL") * scale[:, None] * scale[None, :])
        grad_s = scale * inputs.losses.double() - 1.0
        extras = {f"scale/{n}": float(v) for n, v in zip(inputs.task_names, scale.tolist())}
        return Aggregation(weights=alpha * scale, head_weights=scale, extras=extras,
                           pending=(k, grad_s.detach().cpu()))

    def commit(self, pending: Any) -> None:
        k, grad = pending
        s = self._current(k)
        if not self.num_tasks:
            self.exp_avg = torch.zeros(k, dtype=torch.float64)
            self.exp_avg_sq = torch.zeros(k, dtype=torch.float64)
        self.num_tasks, self.t = k, self.t + 1
        if self.optimizer == "sgd":
            self.s = s - self.lr * grad
            return
        # Adam with eps after the bias correction (Adam paper's Algorithm 1; module adam)
        self.s, self.exp_avg, self.exp_avg_sq = adam_update(
            s, grad, self.exp_avg, self.exp_avg_sq, self.t, lr=self.lr, eps_placement="kingma")

    def state_dict(self) -> dict[str, Any]:
        return {"num_tasks": self.num_tasks, "t": self.t, "s": self.s.clone(),
                "exp_avg": self.exp_avg.clone(), "exp_avg_sq": self.exp_avg_sq.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"num_tasks", "t", "s", "exp_avg", "exp_avg_sq"} - set(state)
        if missing:
            raise ValueError(f"IMTL state is missing {sorted(missing)}")
        self.num_tasks, self.t = int(state["num_tasks"]), int(state["t"])
        self.s = state["s"].detach().double().cpu().clone()
        self.exp_avg = state["exp_avg"].detach().double().cpu().clone()
        self.exp_avg_sq = state["exp_avg_sq"].detach().double().cpu().clone()

    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.lr, "optimizer": self.optimizer, "init": self.init, "mode": self.mode}
