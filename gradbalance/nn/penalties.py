"""Block-sparse (l1/lq, "group lasso") penalty across the tasks' corresponding parameters."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradbalance.nn._util import corresponding_parameters
from gradbalance.nn.soft import check_weight

__all__ = ["group_sparsity_penalty"]


def group_sparsity_penalty(
    towers: Any,
    q: float = 2,
    weight: float = 1.0,
    dim: int | None = None,
    include: Callable[[str], bool] | None = None,
) -> Tensor:
    """The l1/lq block-sparse penalty that lets tasks choose which parameters they use jointly.

    Each *group* collects one position of a parameter across the k task networks; the penalty
    is the l1 norm (sum) over groups of each group's lq norm:

    $$ \\Omega(\\theta) = \\lambda \\sum_{\\text{names}} \\sum_g \\big\\| (\\theta_1[g], \\dots,
       \\theta_k[g]) \\big\\|_q $$

    Like the lasso on the group norms, it drives whole groups to zero **for every task at
    once**, while inside a surviving group the lq norm (q > 1) lets all tasks use it: the
    tasks come to share a common sparse set of features (Obozinski, Taskar & Jordan's l1/l2;
    with ``q=inf``, the l1/l-infinity block of Jalali et al.'s "dirty model"). ``q=1`` is the
    plain, ungrouped l1 penalty.

    Args:
        towers: a dict or list of same-architecture modules, or a module with ``.towers``
            (:class:`~gradbalance.nn.SoftSharing`, :class:`~gradbalance.nn.CrossStitch`).
        q: the within-group norm, a number >= 1 or ``math.inf`` (default 2).
        weight: the factor lambda >= 0 (default 1.0).
        dim: ``None`` (default): a group is one scalar position ``theta_t[i, j, ...]`` across the
            tasks. An int: a group is a whole slice along that dimension across the tasks, e.g.
            ``dim=1`` groups a ``Linear`` weight's columns, i.e. the input features, as in
            multi-task feature selection. Parameters with ``ndim <= dim`` (biases) are grouped
            per position.
        include: optional predicate on parameter names; only those are penalised.

    Returns:
        A scalar tensor. Its gradient is finite everywhere (0, a valid subgradient, at a group
        that is exactly zero). Like :func:`~gradbalance.nn.soft_sharing_penalty`, it is a
        regulariser: ``penalty.backward()`` after ``opt.backward(losses)``.

    Raises:
        ValueError: ``q < 1``, negative ``weight``, negative ``dim``, fewer than 2 towers,
            mismatched towers, or nothing left to penalise.

    Example:
        >>> import torch
        >>> from gradbalance.nn import group_sparsity_penalty
        >>> a, b = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = a.weight.copy_(torch.tensor([[3.0, 0.0]])), b.weight.copy_(torch.tensor([[4.0, 0.0]]))
        >>> group_sparsity_penalty([a, b], q=2)  # ||(3, 4)|| + ||(0, 0)||
        tensor(5., grad_fn=<MulBackward0>)

    References:
        Obozinski, Taskar, Jordan. "Joint covariate selection and joint subspace selection for
        multiple classification problems", Statistics and Computing 2010.
        Jalali, Ravikumar, Sanghavi, Ruan. "A Dirty Model for Multi-task Learning", NeurIPS 2010.
    """
    if isinstance(q, bool) or not isinstance(q, (int, float)) or math.isnan(q) or q < 1:
        raise ValueError(f"q must be a number >= 1 (or math.inf), got {q!r}")
    weight = check_weight(weight)
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 0):
        raise ValueError(f"dim must be None or an int >= 0, got {dim!r}")
    groups = corresponding_parameters(towers, include=include)
    if not groups:
        raise ValueError("no parameter left to penalise (check `include`)")
    total: Tensor | None = None
    for _, ps in groups:
        stacked = torch.stack(ps)  # (k, *shape)
        if dim is None or ps[0].ndim <= dim:
            blocks = stacked.reshape(len(ps), -1).T  # (positions, k)
        else:
            blocks = stacked.movedim(dim + 1, 0).reshape(stacked.shape[dim + 1], -1)
        term = torch.linalg.vector_norm(blocks, ord=q, dim=1).sum()
        total = term if total is None else total + term
    assert total is not None  # groups is non-empty (checked above), so the loop set it
    return total * weight
