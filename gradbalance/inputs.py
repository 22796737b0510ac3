"""Input preparation and checks: everything a balancing step verifies before it computes anything.

Pure functions: they read the losses, the parameters and the options, and return values or raise
a :class:`TypeError` / :class:`ValueError` naming the problem; none of them keeps state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradbalance import jacobian
from gradbalance.errors import NonFiniteError

__all__ = [
    "Losses",
    "all_task_names",
    "apply_task_weights",
    "as_parameter_list",
    "check_features",
    "check_finite_losses",
    "check_reach",
    "check_task_weight_names",
    "infer_shared",
    "reaches_any",
    "single_task_shared",
    "prepare_losses",
]

Losses = Sequence[Tensor] | Mapping[str, Tensor | None]


def as_parameter_list(params: Any, what: str = "shared_params") -> list[Tensor]:
    """Accept an ``nn.Module`` (its ``shared_parameters()`` if it has one), or an iterable of tensors.

    Tensors that do not require grad are dropped and duplicates (tied weights) kept once.
    """
    if isinstance(params, torch.nn.Module):
        getter = getattr(params, "shared_parameters", None)
        params = getter() if callable(getter) else params.parameters()
    if isinstance(params, Tensor):
        raise TypeError(f"{what} must be an iterable of tensors or an nn.Module, not a single tensor")
    if not isinstance(params, Iterable):
        raise TypeError(f"{what} must be an iterable of tensors or an nn.Module, got {type(params).__name__}")
    out: list[Tensor] = []
    seen: set[int] = set()
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"{what} must contain tensors, got {type(p).__name__}")
        if id(p) not in seen and p.requires_grad:
            seen.add(id(p))
            out.append(p)
    return out


def all_task_names(losses: Losses) -> tuple[str, ...]:
    """Every task the caller names this call, present or ``None`` (a list's tasks: ``task0, ...``)."""
    if isinstance(losses, Mapping):
        return tuple(str(k) for k in losses)
    return tuple(f"task{i}" for i in range(len(losses)))


def prepare_losses(losses: Losses) -> tuple[tuple[str, ...], list[Tensor]]:
    """The present tasks' names and scalar losses (``None`` values of a dict dropped).

    Raises:
        TypeError: not a list/dict, a single tensor, or an entry that is not a tensor.
        ValueError: empty, a non-scalar loss, a loss that does not require grad, duplicate names.
    """
    if isinstance(losses, Tensor):
        raise TypeError(
            "losses must be a list (or dict) of per-task scalar losses, not one tensor; "
            "balancing needs each task's loss separately"
        )
    if isinstance(losses, Mapping):
        items = [(str(k), v) for k, v in losses.items() if v is not None]
    elif isinstance(losses, Iterable):
        items = [(f"task{i}", v) for i, v in enumerate(losses)]
    else:
        raise TypeError(f"losses must be a list or dict of tensors, got {type(losses).__name__}")
    if not items:
        raise ValueError("losses is empty: pass one scalar loss per task")
    names, values = [], []
    for name, loss in items:
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss {name!r} is a {type(loss).__name__}, not a tensor")
        if loss.numel() != 1:
            raise ValueError(
                f"loss {name!r} is not a scalar (shape {tuple(loss.shape)}); reduce it "
                "(e.g. .mean()) before passing it"
            )
        if not loss.requires_grad:
            raise ValueError(
                f"loss {name!r} does not require grad: it is not connected to any parameter"
            )
        names.append(name)
        values.append(loss.reshape(()))
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    return tuple(names), values


def check_task_weight_names(task_weights: Any, names: Sequence[str]) -> None:
    """A ``{name: weight}`` key that names no task is a typo: say so (checked at the first step)."""
    if not isinstance(task_weights, Mapping):
        return
    unknown = sorted(set(task_weights) - set(names))
    if unknown:
        raise ValueError(
            f"task_weights names task(s) {unknown}, but the losses' tasks are {list(names)}; "
            "fix the keys (a list of losses names its tasks task0, task1, ...)"
        )


def apply_task_weights(task_weights: Any, names: Sequence[str], values: list[Tensor]) -> list[Tensor]:
    """Multiply the static ``task_weights`` (validated by :class:`~gradbalance.options.Options`)
    into the losses: a sequence matches the losses by position, a mapping by name (missing: 1)."""
    if task_weights is None:
        return values
    if isinstance(task_weights, Mapping):
        factors = [float(task_weights.get(n, 1.0)) for n in names]
    else:
        factors = [float(w) for w in task_weights]
        if len(factors) != len(values):
            raise ValueError(
                f"task_weights has {len(factors)} entries but got {len(values)} losses; "
                "pass one weight per task, or a dict {task name: weight}"
            )
    return [v * f if f != 1.0 else v for v, f in zip(values, factors)]


def check_finite_losses(names: Sequence[str], losses: Tensor) -> None:
    """Raise a :class:`~gradbalance.NonFiniteError` (a ValueError) naming the tasks whose loss is
    NaN or inf (a host synchronisation); under a GradScaler the balancer makes it a skipped step."""
    finite = torch.isfinite(losses)
    if not bool(finite.all()):
        bad = [names[i] for i in range(len(names)) if not bool(finite[i])]
        raise NonFiniteError(
            f"loss of task(s) {bad} is NaN or inf: {losses.tolist()}; check the inputs and the "
            "loss functions (log/sqrt/division at 0) before the step"
        )


def check_features(features: Any) -> None:
    """``features`` must be a tensor in the losses' graph (a detached one cannot be)."""
    if features is None:
        return
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a tensor, got {type(features).__name__}")
    if not features.requires_grad:
        raise ValueError(
            "features does not require grad, so it is not in the losses' graph (was it detached, or "
            "computed under torch.no_grad()?): pass the representation tensor the heads read"
        )


def infer_shared(values: Sequence[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
    """The parameters reached by more than one loss (with one loss: every parameter it reaches),
    found by walking the autograd graph (nothing is computed)."""
    hits = [jacobian.reached_parameters(v, params) for v in values]
    counts = [sum(h[j] for h in hits) for j in range(len(params))]
    need = 2 if len(values) > 1 else 1
    shared = [p for p, c in zip(params, counts) if c >= need]
    if not shared:
        raise ValueError(
            "could not infer shared parameters: no parameter is reached by more than one "
            "loss. Pass shared_params explicitly (gradient-based methods need shared "
            "parameters; loss-weighting methods such as 'mean' or 'uw' do not)"
        )
    return shared


def reaches_any(loss: Tensor, ids: set[int]) -> bool:
    """Whether the autograd graph of ``loss`` reaches a tensor whose ``id`` is in ``ids``: a walk
    over ``grad_fn.next_functions`` that stops at the first hit (nothing is computed)."""
    if id(loss) in ids:
        return True
    stack, seen = [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None and id(variable) in ids:
            return True
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return False


def single_task_shared(values: Sequence[Tensor], shared: Sequence[Tensor]) -> list[Tensor]:
    """The "shared" parameters that exactly one of two or more losses reaches (a graph walk per
    loss): most likely task-specific ones, e.g. the heads of ``shared_params=model``."""
    if len(values) < 2 or not shared:
        return []
    hits = [jacobian.reached_parameters(v, shared) for v in values]
    return [p for j, p in enumerate(shared) if sum(h[j] for h in hits) == 1]


def check_reach(names: Sequence[str], values: Sequence[Tensor], shared: Sequence[Tensor],
                walk_is_blind: bool = False) -> bool:
    """Every loss must reach a shared parameter; checked on every call.

    A graph walk (stopping at the first shared parameter it meets) settles it in eager mode at
    the cost of a few graph nodes per task. Where the walk finds nothing, one ``autograd.grad``
    per such loss confirms it: compiled graphs hide their parameters inside one opaque node.
    ``walk_is_blind=True`` (the caller confirmed these tasks that way before) skips that
    confirmation, which would cost a backward pass per task on every step.

    Returns:
        Whether a confirmation was needed (the walk is blind for these losses).

    Raises:
        ValueError: a loss does not reach any shared parameter.
    """
    ids = {id(p) for p in shared}
    blind = False
    for name, v in zip(names, values):
        if reaches_any(v, ids) or walk_is_blind:
            continue
        grads = torch.autograd.grad(v, list(shared), retain_graph=True, allow_unused=True)
        if all(g is None for g in grads):
            raise ValueError(
                f"loss {name!r} does not reach any shared parameter; check shared_params "
                "or whether the loss was computed from detached tensors"
            )
        blind = True
    return blind
