"""Uncertainty weighting, implemented from the paper (Kendall et al. 2018, eqs. 7 and 10)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradbalance.methods.adam import adam_update
from gradbalance.methods.base import (
    Aggregation,
    Method,
    TaskInputs,
    check_number,
    register,
    register_factory,
    state_keys,
)

__all__ = ["UW"]

KINDS = {"regression": 0.5, "classification": 1.0}  # the factor c in front of exp(-s) L
OPTIMIZERS = ("adam", "sgd")


@register("uw", "Uncertainty weighting (Kendall et al. 2018): learned homoscedastic log-variances")
class UW(Method):
    """Uncertainty Weighting (UW): each task's homoscedastic noise ``sigma_i`` is learned.

    With ``s_i = log sigma_i^2``, the total loss is Kendall et al.'s
    ``sum_i c_i exp(-s_i) L_i + s_i / 2``, ``c_i = 1/2`` for a regression task (eq. 7:
    ``L / (2 sigma^2) + log sigma``) and ``c_i = 1`` for a classification task (eq. 10:
    ``L / sigma^2 + log sigma``). The task weights are ``c_i exp(-s_i)``; the gradient of the
    total with respect to ``s_i`` is ``1/2 - c_i exp(-s_i) L_i`` (closed form, from the loss
    values), so the stationary point is ``s_i* = log(2 c_i L_i)`` (``log L_i`` for regression).

    Which form a task takes follows its likelihood: a Gaussian (L1/L2-type regression loss,
    eq. 7, ``1 / (2 sigma^2)``) or a Boltzmann/softmax one (cross-entropy, binary or not,
    eq. 10, ``1 / sigma^2``). For the seed scenario (L1 age, BCE gender, CE race):
    ``UW(kind={"age": "regression", "gender": "classification", "race": "classification"})``
    with the losses passed as a dict under those names. LibMTL's UW uses the regression form
    for every task (``1 / (2 sigma^2) L + log sigma``), which is ``kind="regression"``, the
    default.

    Args:
        kind: ``"regression"`` (default), ``"classification"``, one of them per task (a list,
            in the order of the losses), or a dict ``{task name: kind}`` (every task of a step
            must be named in it; a task the dict does not name raises ``ValueError``).
        init: initial ``s_i`` (a float, default 0.0, or one per task).
        lr: learning rate ``> 0`` of the method's own optimizer for ``s`` (default 0.01: with
            Adam, ``s`` moves by about ``lr`` per step, i.e. each weight by about 1%).
        optimizer: ``"adam"`` (default; betas 0.9/0.999, eps 1e-8, no weight decay) or ``"sgd"``.

    Task-specific parameters: head ``i`` gets ``c_i exp(-s_i)`` times its task's gradient (the
    gradient of the total loss, as in the paper).

    State: ``s`` and the optimizer's moments and step count, per task name, stepped when the
    wrapped optimizer steps (the user never adds ``s`` to an optimizer). Tasks are keyed by
    name: pass losses as a dict with ``None`` for a task without labels in a batch and its
    ``s`` and moments are left untouched until it returns (a new name starts at ``init``).
    ``extras`` reports ``"log_variance"`` (``s``) and ``"total"``, the value of the objective,
    which is NEGATIVE whenever ``L_i < 1/(2 c_i)`` at the optimum: that is expected, not a bug,
    and nothing is clamped.

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

    # state, set by load_state_dict (a fresh method loads {})
    _tasks: list[str]
    _s: Tensor
    _m: Tensor
    _v: Tensor
    _t: Tensor

    def __init__(self, kind: str | Sequence[str] | Mapping[str, str] = "regression",
                 init: float | Sequence[float] = 0.0, lr: float = 0.01, optimizer: str = "adam") -> None:
        self._kind_map: dict[str, str] | None = None
        if isinstance(kind, Mapping):
            self._kind_map = {str(n): kd for n, kd in kind.items()}
            kinds = list(self._kind_map.values())
        else:
            kinds = [kind] if isinstance(kind, str) else list(kind)
        if not kinds or any(kd not in KINDS for kd in kinds):
            raise ValueError("kind must be 'regression', 'classification', a list of them or a dict "
                             f"{{task name: kind}}, got {kind!r}")
        inits = [init] if isinstance(init, (int, float)) else list(init)
        if not inits or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                and abs(float(v)) < float("inf") for v in inits):
            raise ValueError(f"init must be a finite float or a list of them, got {init!r}")
        lr = check_number("lr", lr, positive=True)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.kind, self.init, self.lr, self.optimizer = kind, init, float(lr), optimizer
        self._kinds, self._inits = kinds, [float(v) for v in inits]
        self.load_state_dict({})

    def hyperparameters(self) -> dict[str, Any]:
        return {"kind": self.kind, "init": self.init, "lr": self.lr, "optimizer": self.optimizer}

    @property
    def log_variances(self) -> Tensor:
        """The current ``s = log sigma^2``, one per task seen, in :attr:`tasks` order."""
        return self._s.clone()

    @property
    def tasks(self) -> tuple[str, ...]:
        """The task names the state is kept for, in first-seen order."""
        return tuple(self._tasks)

    def _per_task(self, values: list, k: int, what: str) -> Tensor:
        if len(values) > 1 and len(values) < k:
            raise ValueError(f"UW got {len(values)} values of {what} but has seen {k} tasks")
        return torch.tensor(values * k if len(values) == 1 else values[:k], dtype=torch.float64)

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        names = state_keys(inputs, self._tasks, "UW")
        tasks = self._tasks + [n for n in names if n not in self._tasks]
        index = torch.tensor([tasks.index(n) for n in names])
        losses = inputs.losses.detach().double()
        n_all = len(tasks)
        if self._kind_map is not None:
            missing = [n for n in tasks if n not in self._kind_map]
            if missing:
                raise ValueError(f"UW: kind gives no kind for task(s) {missing} (it names "
                                 f"{sorted(self._kind_map)})")
            c_all = torch.tensor([KINDS[self._kind_map[n]] for n in tasks], dtype=torch.float64)
        else:
            c_all = self._per_task([KINDS[kd] for kd in self._kinds], n_all, "kind")
        s_all = torch.cat([self._s, self._per_task(self._inits, n_all, "init")[len(self._tasks):]])
        s, c = s_all[index].to(losses.device), c_all[index].to(losses.device)
        weights = c * torch.exp(-s)
        total = (weights * losses + 0.5 * s).sum()
        return Aggregation(
            weights=weights,
            extras={"total": float(total), "log_variance": s.clone()},
            pending={"tasks": tasks, "s": s_all, "index": index, "grad": (0.5 - weights * losses).cpu()},
        )

    def commit(self, pending: dict[str, Any]) -> None:
        """Step ``s`` of the tasks present in this step; absent tasks keep their state."""
        s, grad, index = pending["s"].clone(), pending["grad"], pending["index"]
        grow = len(pending["tasks"]) - len(self._tasks)
        zeros = torch.zeros(grow, dtype=torch.float64)
        self._m, self._v = torch.cat([self._m, zeros]), torch.cat([self._v, zeros])
        self._t = torch.cat([self._t, torch.zeros(grow, dtype=torch.int64)])
        self._tasks = list(pending["tasks"])
        self._t[index] += 1
        if self.optimizer == "sgd":
            s[index] = s[index] - self.lr * grad
            self._s = s
            return
        # Adam with eps after the bias correction (Adam paper's Algorithm 1; module adam)
        s[index], self._m[index], self._v[index] = adam_update(
            s[index], grad, self._m[index], self._v[index], self._t[index].double(),
            lr=self.lr, eps_placement="kingma")
        self._s = s

    def state_dict(self) -> dict[str, Any]:
        return {"tasks": list(self._tasks), "s": self._s.clone(), "m": self._m.clone(),
                "v": self._v.clone(), "t": self._t.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:  # a fresh method
            empty = torch.zeros(0, dtype=torch.float64)
            self._tasks = []
            self._s, self._m, self._v = empty, empty, empty
            self._t = torch.zeros(0, dtype=torch.int64)
            return
        if set(state) != {"tasks", "s", "m", "v", "t"}:
            raise ValueError(f"UW state needs keys tasks, s, m, v, t; got {sorted(state)}")
        if len({len(state["tasks"])} | {state[key].numel() for key in ("s", "m", "v", "t")}) != 1:
            raise ValueError("UW state: tasks, s, m, v and t must have the same length")
        self._tasks = [str(n) for n in state["tasks"]]
        self._s, self._m = state["s"].double().clone(), state["m"].double().clone()
        self._v, self._t = state["v"].double().clone(), state["t"].long().clone()


register_factory("uncertainty", "Alias of 'uw' (uncertainty weighting, Kendall et al. 2018)", UW)
