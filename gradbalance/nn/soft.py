"""Soft parameter sharing: one network per task, tied by a penalty on their parameters."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gradbalance.nn._util import corresponding_parameters, task_dict, unique

__all__ = ["SoftSharing", "soft_sharing_penalty"]

KINDS = ("l2", "trace")


def check_weight(weight: float) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"weight must be a number, got {type(weight).__name__}")
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight must be a finite number >= 0, got {weight}")
    return float(weight)


def soft_sharing_penalty(
    towers: Any,
    kind: str = "l2",
    weight: float = 1.0,
    include: Callable[[str], bool] | None = None,
) -> Tensor:
    """The penalty that ties same-architecture task networks (soft parameter sharing).

    For every parameter name, the k towers' tensors ``theta_1 .. theta_k`` of that name are
    compared:

    - ``kind="l2"`` (Duong et al., 2015): the sum over **pairs** of squared Frobenius distances,
      ``sum_{i<j} ||theta_i - theta_j||^2``. With two towers this is Duong et al.'s
      ``||W_1 - W_2||^2``; for k towers it equals ``k * sum_i ||theta_i - mean||^2``, so the
      "distance to the mean" form is this penalty divided by k (a rescaled ``weight``).
    - ``kind="trace"`` (Yang & Hospedales, 2017): the trace (nuclear) norm of the k x n matrix
      whose rows are the flattened ``theta_i``: the sum of its singular values. This is the
      paper's "last axis flattening" variant of the tensor trace norm; it pulls the k tensors
      towards a low-dimensional common subspace rather than towards one common value.

    The result is ``weight`` times the sum over parameter names.

    Args:
        towers: a dict or list of same-architecture modules, or a :class:`SoftSharing`.
        kind: ``"l2"`` (default) or ``"trace"``.
        weight: the penalty's factor, >= 0 (default 1.0). 0 leaves the towers independent.
        include: optional predicate on parameter names (as in ``named_parameters()``); only
            names for which it returns True are tied (e.g. to leave differently shaped output
            layers out: ``include=lambda n: not n.startswith("2.")``).

    Returns:
        A scalar tensor, differentiable w.r.t. every tied parameter. It is a regulariser, not a
        task: call ``penalty.backward()`` after ``opt.backward(losses)`` and before
        ``opt.step()`` (both add into ``.grad``), so that the balancing method neither weights
        it nor counts it in the task losses it sees.

    Raises:
        ValueError: unknown ``kind``, negative ``weight``, fewer than 2 towers, towers whose
            (included) parameters differ in names or shapes, or nothing left to tie.

    Example:
        >>> import torch
        >>> from gradbalance.nn import soft_sharing_penalty
        >>> a, b = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = a.weight.copy_(torch.tensor([[1.0, 2.0]])), b.weight.copy_(torch.tensor([[1.0, 0.0]]))
        >>> soft_sharing_penalty([a, b], "l2", weight=0.5)
        tensor(2., grad_fn=<MulBackward0>)

    References:
        Duong, Cohn, Bird, Cook. "Low Resource Dependency Parsing: Cross-lingual Parameter
        Sharing in a Neural Network Parser", ACL 2015.
        Yang, Hospedales. "Trace Norm Regularised Deep Multi-Task Learning", ICLR 2017 workshop.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    weight = check_weight(weight)
    groups = corresponding_parameters(towers, include=include)
    if not groups:
        raise ValueError("no parameter left to tie (check `include`)")
    total: Tensor | None = None
    for _, ps in groups:
        flat = torch.stack([p.reshape(-1) for p in ps])  # (k, n)
        if kind == "l2":
            k = flat.shape[0]
            term = k * (flat - flat.mean(0)).pow(2).sum()
        else:
            # svdvals' gradient is stable even at repeated or zero singular values (identical
            # towers at initialisation), unlike differentiating through the full SVD.
            term = torch.linalg.svdvals(flat).sum()
        total = term if total is None else total + term
    assert total is not None  # groups is non-empty (checked above), so the loop set it
    return total * weight


class SoftSharing(nn.Module):
    """Soft parameter sharing: one network per task, no parameter in common.

    Each task has its own tower; the towers are tied only through a penalty on the distance
    between their corresponding parameters (:func:`soft_sharing_penalty`, available as the
    :meth:`penalty` method), whose gradient is added to the balanced task gradients.

    What this means for balancing: there are **no shared parameters**, so
    :meth:`shared_parameters` returns ``[]``. Loss-weighting methods (``requires="losses"``:
    ``"mean"``, ``"uw"``, ``"dwa"``, ...) work unchanged, because each tower receives its own
    task's gradient times that task's weight. Gradient-combining methods (MGDA, PCGrad, ...) have
    nothing to combine: ``GradBalance(opt, "mgda", shared_params=model)`` raises a ValueError that
    says so.

    Args:
        towers: ``{task name: module}`` or a list of modules (named ``task0``, ``task1``, ...),
            usually of the same architecture (needed by the penalty, not by the forward).

    Example:
        >>> import torch, gradbalance as gb
        >>> from gradbalance.nn import SoftSharing
        >>> model = SoftSharing({t: torch.nn.Linear(4, 1) for t in ("a", "b")})
        >>> opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "mean", shared_params=model)
        >>> out = model(torch.randn(5, 4))
        >>> info = opt.backward({t: o.pow(2).mean() for t, o in out.items()})
        >>> model.penalty("l2", weight=1e-2).backward()  # a regulariser, not a task: not balanced
        >>> opt.step()
        >>> model.shared_parameters()
        []
    """

    def __init__(self, towers: Any) -> None:
        super().__init__()
        self.towers = task_dict(towers, "towers")

    @property
    def task_names(self) -> list[str]:
        return list(self.towers.keys())

    def forward(self, x: Any) -> dict[str, Any]:
        """``{task: towers[task](x)}``; ``x`` may be a dict ``{task: input}`` (each tower then
        gets its own input, and only the tasks in ``x`` are run)."""
        if isinstance(x, Mapping):
            unknown = [t for t in x if t not in self.towers]
            if unknown:
                raise KeyError(f"unknown task(s) {unknown}; tasks are {self.task_names}")
            return {t: self.towers[t](xt) for t, xt in x.items()}
        return {t: tower(x) for t, tower in self.towers.items()}

    def shared_parameters(self) -> list[Tensor]:
        """Always ``[]``: the towers share no parameter."""
        return []

    def task_parameters(self, name: str) -> list[Tensor]:
        """The parameters of task ``name``'s tower."""
        if name not in self.towers:
            raise KeyError(f"unknown task {name!r}; tasks are {self.task_names}")
        return unique(self.towers[name].parameters())

    def penalty(self, kind: str = "l2", weight: float = 1.0,
                include: Callable[[str], bool] | None = None) -> Tensor:
        """:func:`soft_sharing_penalty` over this model's towers."""
        return soft_sharing_penalty(self.towers, kind=kind, weight=weight, include=include)
