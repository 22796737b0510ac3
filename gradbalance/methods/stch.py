"""Smooth Tchebycheff scalarization (STCH), from the paper and the official MTL code."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from gradbalance.methods.base import Aggregation, Method, TaskInputs, check_num_tasks, register

__all__ = ["STCH"]

OBJECTIVES = ("log", "linear")


def _numbers(value: Any, name: str, positive: bool) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = list(value) if not isinstance(value, (int, float)) else None
    if not values or any(
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or not math.isfinite(v)
        or (positive and not v > 0)
        for v in values
    ):
        kind = "positive numbers" if positive else "finite numbers"
        raise ValueError(f"{name} must be None or a non-empty sequence of {kind}, got {value!r}")
    return tuple(float(v) for v in values)


@register(
    "stch", "Smooth Tchebycheff (Lin et al. 2024): mu * logsumexp of the task objectives / mu"
)
class STCH(Method):
    """Smooth Tchebycheff scalarization (STCH): a smooth maximum of the (normalised) losses.

    With per-task objectives ``f_i`` and a preference ``lambda``, STCH minimises

    ``S = k mu log sum_i exp(lambda_i f_i / mu)``,

    a smooth upper bound of ``k max_i lambda_i f_i`` (within ``k mu log k``). Its gradient is
    ``sum_i w_i g_i`` with ``w_i = k lambda_i softmax(lambda f / mu)_i f_i'(L_i)``: as
    ``mu -> 0`` all the weight goes to the worst task, as ``mu -> inf`` the weights become
    uniform in ``f``. Two objectives:

    - ``"log"`` (default, the official multi-task code): ``f_i = log(L_i / n_i)``, with the
      nadir ``n_i`` the mean of ``L_i`` over the last ``nadir_steps`` of ``warmup_steps``
      warm-up steps (1 without warm-up), so ``f_i' = 1 / L_i``. During warm-up the weights
      are ``1 / L_i`` (the gradient of ``sum_i log L_i``, as in the official code).
    - ``"linear"`` (the paper's Eq. 5): ``f_i = L_i - z_i`` with the ideal point ``z``
      (``ideal``, default 0), ``f_i' = 1``.

    Args:
        mu: smoothing ``mu > 0``. Default ``1.0`` (the official MTL configuration).
        objective: ``"log"`` or ``"linear"`` (above). Default ``"log"``.
        preference: ``lambda``, ``k`` positive numbers, or ``None`` (all ones, as the official
            MTL code). Default ``None``.
        ideal: ideal point ``z`` of the ``"linear"`` objective, ``k`` numbers or ``None`` (0).
        warmup_steps: steps (int >= 0) of log-loss warm-up in the ``"log"`` objective.
            Default 0. The official code warms up for 4 epochs and averages the nadir over the
            5th: use ``warmup_steps = 5 * steps_per_epoch, nadir_steps = steps_per_epoch``.
        nadir_steps: how many of the last warm-up steps the nadir averages (``1 <= nadir_steps
            <= warmup_steps``), or ``None`` (all of them). Default ``None``.

    Scale: the factor ``k`` is the official code's (``task_num``); with equal objectives the
    weights sum to ``k`` (``"linear"``), as for ``"sum"``.

    Needs no per-task gradients (``requires="losses"``); every loss must be > 0 with
    ``"log"``. Task-specific parameters get the same weights.

    State: the running sum of the losses and the number of steps averaged for the nadir
    (empty and 0 without warm-up).

    Example:
        >>> import torch
        >>> from gradbalance.methods import STCH, TaskInputs
        >>> w = STCH(objective="linear", mu=0.01).aggregate(
        ...     TaskInputs(losses=torch.tensor([1.0, 2.0], dtype=torch.float64))).weights
        >>> w.round(decimals=3)  # nearly all the weight (k = 2) on the worst task
        tensor([0., 2.], dtype=torch.float64)

    References:
        X. Lin, X. Zhang, Z. Yang, F. Liu, Z. Wang, Q. Zhang, "Smooth Tchebycheff Scalarization
        for Multi-Objective Optimization", ICML 2024, Eq. 5.
    """

    requires = "losses"
    loss_dependent = True

    def __init__(
        self,
        mu: float = 1.0,
        objective: str = "log",
        preference: Sequence[float] | None = None,
        ideal: Sequence[float] | None = None,
        warmup_steps: int = 0,
        nadir_steps: int | None = None,
    ) -> None:
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0 < mu < float("inf"):
            raise ValueError(f"mu must be a finite number > 0, got {mu!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if nadir_steps is not None and (
            isinstance(nadir_steps, bool)
            or not isinstance(nadir_steps, int)
            or not 1 <= nadir_steps <= warmup_steps
        ):
            raise ValueError(
                f"nadir_steps must be None or an int in [1, warmup_steps={warmup_steps}], "
                f"got {nadir_steps!r}"
            )
        if objective == "linear" and warmup_steps:
            raise ValueError(
                "warmup_steps is for the 'log' objective; the 'linear' one uses ideal="
            )
        if objective == "log" and ideal is not None:
            raise ValueError(
                "ideal is for the 'linear' objective; the 'log' one normalises by the nadir"
            )
        self.mu, self.objective = float(mu), objective
        self.preference = _numbers(preference, "preference", positive=True)
        self.ideal = _numbers(ideal, "ideal", positive=False)
        self.warmup_steps, self.nadir_steps = warmup_steps, nadir_steps
        self.reset()

    def reset(self) -> None:
        """Forget the nadir estimate."""
        self._sum = torch.zeros(0, dtype=torch.float64)
        self._count = 0

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "mu": self.mu,
            "objective": self.objective,
            "preference": self.preference,
            "ideal": self.ideal,
            "warmup_steps": self.warmup_steps,
            "nadir_steps": self.nadir_steps,
        }

    def _vector(
        self,
        values: tuple[float, ...] | None,
        default: float,
        k: int,
        like: torch.Tensor,
        name: str,
    ):
        if values is not None and len(values) != k:
            raise ValueError(f"{name} has {len(values)} entries but got {k} losses")
        return torch.as_tensor(
            values if values is not None else default, dtype=torch.float64, device=like.device
        ).expand(k)

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        losses, k = inputs.losses, inputs.num_tasks
        check_num_tasks(self._sum.shape[0] if self._sum.numel() else None, k, "STCH")
        pref = self._vector(self.preference, 1.0, k, losses, "preference")
        if self.objective == "linear":
            f = losses - self._vector(self.ideal, 0.0, k, losses, "ideal")
            slope = torch.ones_like(losses)
        else:
            positive = (losses > 0).tolist()
            if not all(positive):
                bad = [
                    inputs.task_names[i] if inputs.task_names else i
                    for i in range(k)
                    if not positive[i]
                ]
                raise ValueError(
                    f"STCH's 'log' objective needs every loss > 0; task(s) {bad} are not"
                )
            slope = 1 / losses
            if inputs.step < self.warmup_steps:
                averaged = self.nadir_steps if self.nadir_steps is not None else self.warmup_steps
                pending = None
                if inputs.step >= self.warmup_steps - averaged:
                    total = (
                        self._sum.to(losses.device)
                        if self._sum.numel()
                        else torch.zeros_like(losses)
                    )
                    pending = (total + losses, self._count + 1)
                return Aggregation(weights=slope, extras={"phase": "warmup"}, pending=pending)
            nadir = (
                self._sum.to(losses.device) / self._count
                if self._count
                else torch.ones_like(losses)
            )
            f = torch.log(losses / nadir)
        soft = torch.softmax(pref * f / self.mu, 0)
        return Aggregation(weights=k * pref * soft * slope)

    def commit(self, pending: Any) -> None:
        if pending is not None:
            self._sum, self._count = pending

    def state_dict(self) -> dict[str, Any]:
        return {"nadir_sum": self._sum.clone(), "nadir_count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"nadir_sum", "nadir_count"}:
            raise ValueError(
                f"STCH state must have keys 'nadir_sum' and 'nadir_count', got {sorted(state)}"
            )
        self._sum = state["nadir_sum"].detach().to(torch.float64).clone()
        self._count = int(state["nadir_count"])
