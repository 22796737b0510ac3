"""FAMO (Fast Adaptive Multitask Optimization), from the paper and the official code."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from gradbalance.methods.adam import adam_update
from gradbalance.methods.base import (
    Aggregation,
    Method,
    TaskInputs,
    check_max_norm,
    check_num_tasks,
    clip_factor,
    register,
)

__all__ = ["FAMO"]

_UNSET: Any = object()


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
    ``J_softmax^T delta = z * (delta - z . delta)``, stepped by Adam (``lr``, L2 decay
    ``gamma``, betas ``(0.9, 0.999)``, eps ``1e-8`` placed as ``torch.optim.Adam`` places it,
    which is what the official code uses: ``famo.py`` line 20). So a task whose loss fell less
    than the z-weighted average gains weight.

    Shared-gradient clipping (``max_norm``, default ``1.0``): the official ``FAMO.backward``
    (Cranial-XIX/FAMO ``famo.py`` lines 66-69) back-propagates ``sum_i w_i L_i`` and then
    clips the shared parameters' gradient norm with ``torch.nn.utils.clip_grad_norm_(shared,
    max_norm)``, ``max_norm = 1.0`` by default (also the default of ``--max_norm`` in its
    ``experiments/utils.py``). gradbalance does the same: the engine clips the shared part of
    the weighted gradient after the backward (``Aggregation.max_norm``); heads are not
    clipped. ``max_norm=None`` turns it off. Note: in the repository's experiment code
    (``methods/weight_methods.py`` lines 77-80, used by every trainer, the toy included) the
    clip is called BEFORE ``loss.backward()``, right after ``optimizer.zero_grad()``, so it
    clips zero gradients and has no effect on the published runs; ``max_norm=None``
    reproduces those runs. LibMTL's FAMO (``LibMTL/weighting/FAMO.py``) does not clip either
    (and defaults to ``gamma = 1e-3``, ``FAMO_w_gamma``).

    Delayed update, no extra forward pass: the official trainers evaluate ``L^now`` by a second
    forward pass after each step; here (as in the official toy trainer,
    ``experiments/toy/trainer.py``, which calls ``update`` with the next iterate's losses)
    ``L^now`` is the losses of the NEXT step. Each step first applies the logit update from
    the previous committed step's losses to this step's, then computes the weights from the
    new logits. The whole update is computed in :meth:`aggregate` and stored at commit, so
    skipped or re-run steps never change the logits. With mini-batches, ``L^prev`` and
    ``L^now`` come from different batches (noise that Adam averages out). With gradient
    accumulation the losses are the window's sums, so keep the number of micro-batches per
    step fixed; the clip then applies to each micro-batch's contribution.

    Args:
        lr: Adam learning rate of the logits, > 0. Default ``0.025`` (the official ``w_lr``
            and ``--method-params-lr`` default).
        gamma: L2 decay ``gamma >= 0`` of the logits (``torch.optim.Adam``'s
            ``weight_decay``, as in the official code). Default ``1e-3``: what the official
            run scripts use for NYU-v2, CelebA and QM9 (``experiments/*/run.sh``); Cityscapes
            uses ``1e-2``, the toy ``0.0``. The class default of the official ``famo.py`` is
            ``0.01``, of ``weight_methods.FAMO`` ``1e-5``, of the ``--gamma`` flag ``0.01``.
            LibMTL's default is ``1e-3``. The paper introduces the decay as a regulariser that
            keeps the weighting focused on recent updates and tunes it per benchmark; it states
            no single default.
        min_losses: lower bounds ``m_i`` of the losses (a number, or a sequence of ``k``).
            Default ``0.0``. Every loss must stay ``> m_i``: a ``ValueError`` names the task
            otherwise (the official code adds ``1e-8`` instead and silently takes the log of
            a tiny number).
        max_norm: clip the norm of the shared parameters' gradient to this value after
            weighting (default ``1.0``, the official ``FAMO``); ``None`` turns it off.
        weight_decay: deprecated name of ``gamma`` (a ``FutureWarning``).

    Needs no per-task gradients (``requires="losses"``): a step costs one ordinary backward.
    Task-specific parameters get the same weights ``w_i`` (one backward of ``sum_i w_i L_i``),
    unclipped.

    State: ``xi``, Adam's two moments and step count, and the previous step's losses;
    ``state_dict()`` returns them (on the losses' device).

    Example:
        >>> import torch
        >>> from gradbalance.methods import FAMO, TaskInputs
        >>> FAMO().aggregate(TaskInputs(losses=torch.tensor([1.0, 3.0], dtype=torch.float64))).weights
        tensor([0.7500, 0.2500], dtype=torch.float64)

    References:
        B. Liu, Y. Feng, P. Stone, Q. Liu, "FAMO: Fast Adaptive Multitask Optimization",
        NeurIPS 2023. Official code: github.com/Cranial-XIX/FAMO.
    """

    requires = "losses"
    loss_dependent = True

    def __init__(
        self,
        lr: float = 0.025,
        gamma: float = 1e-3,
        min_losses: float | Sequence[float] = 0.0,
        max_norm: float | None = 1.0,
        weight_decay: float = _UNSET,
    ) -> None:
        if weight_decay is not _UNSET:
            warnings.warn("FAMO(weight_decay=...) is deprecated: the argument is now called gamma",
                          FutureWarning, stacklevel=2)
            gamma = weight_decay
        for name, value in (("lr", lr), ("gamma", gamma)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma!r}")
        mins = [min_losses] if isinstance(min_losses, (int, float)) else list(min_losses)
        if not mins or any(
            isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m)
            for m in mins
        ):
            raise ValueError(
                f"min_losses must be a finite number or a sequence of them, got {min_losses!r}"
            )
        self.max_norm = check_max_norm(max_norm)
        self.lr, self.gamma = float(lr), float(gamma)
        self.min_losses = (
            float(min_losses) if isinstance(min_losses, (int, float)) else tuple(map(float, mins))
        )
        self.reset()

    @property
    def weight_decay(self) -> float:
        """Deprecated name of :attr:`gamma`."""
        return self.gamma

    def reset(self) -> None:
        """Forget the logits, Adam's state and the previous losses."""
        empty = torch.zeros(0, dtype=torch.float64)
        self._xi, self._m, self._v, self._prev = empty, empty, empty, empty
        self._adam_steps = 0

    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.lr, "gamma": self.gamma, "min_losses": self.min_losses,
                "max_norm": self.max_norm}

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
            steps += 1
            # torch.optim.Adam(weight_decay=gamma), as the official code (eps after sqrt(v_hat))
            xi, m, v = adam_update(xi, z * (delta - z @ delta), m, v, steps, lr=self.lr,
                                   weight_decay=self.gamma, eps_placement="torch")
        z = torch.softmax(xi, 0)
        inv = z * torch.exp(-log_gap)
        weights = inv / inv.sum()
        extras: dict[str, Any] = {"logits": xi.clone()}
        clip, head_weights = self.max_norm, None
        if clip is not None and inputs.gram is not None:
            # the engine measured the Gram matrix anyway (accumulation="buffered"): clip exactly,
            # in the weights; the heads keep the unclipped weights
            norm, factor = clip_factor(weights, inputs.gram, clip)
            extras.update(update_norm=norm * factor, clip=factor)
            weights, head_weights, clip = weights * factor, weights, None
        return Aggregation(
            weights=weights,
            head_weights=head_weights,
            extras=extras,
            pending=(xi, m, v, steps, losses.clone()),
            max_norm=clip,
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
