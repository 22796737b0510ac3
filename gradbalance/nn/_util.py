"""Small helpers shared by the sharing blocks (private)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor, nn


def task_dict(modules: Any, what: str) -> nn.ModuleDict:
    """A ``{name: module}`` mapping, or a sequence (named ``task0``, ``task1``, ... like the
    default names ``GradBalance.backward`` gives a list of losses), as an ``nn.ModuleDict``."""
    if isinstance(modules, nn.Module) and not isinstance(modules, (nn.ModuleList, nn.ModuleDict)):
        raise TypeError(f"{what} must be a dict or a list of modules, not one {type(modules).__name__}")
    if isinstance(modules, nn.ModuleDict) and modules and all("." not in k for k in modules):
        return modules
    if isinstance(modules, (Mapping, nn.ModuleDict)):
        items = [(str(k), v) for k, v in modules.items()]
    elif isinstance(modules, Iterable):
        items = [(f"task{i}", v) for i, v in enumerate(modules)]
    else:
        raise TypeError(f"{what} must be a dict or a list of modules, got {type(modules).__name__}")
    if not items:
        raise ValueError(f"{what} is empty: give one module per task")
    checked: dict[str, nn.Module] = {}
    for name, m in items:
        if not isinstance(m, nn.Module):
            raise TypeError(f"{what}[{name!r}] is a {type(m).__name__}, not an nn.Module")
        if not name or "." in name:
            raise ValueError(f"task names must be non-empty and contain no '.', got {name!r}")
        checked[name] = m
    return nn.ModuleDict(checked)


def unique(params: Iterable[Tensor]) -> list[Tensor]:
    """Parameters in order, each once."""
    out, seen = [], set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def corresponding_parameters(towers: Any, what: str = "towers",
                             include: Callable[[str], bool] | None = None) -> list[tuple[str, list[Tensor]]]:
    """Group the parameters of same-architecture task networks by name: ``[(name, [p_1..p_k])]``.

    ``towers`` is a dict or a list of modules, or any module with a ``towers`` attribute
    (:class:`~gradbalance.nn.SoftSharing`, :class:`~gradbalance.nn.CrossStitch`). ``include``
    (a predicate on parameter names) selects the names first: only the selected ones must match
    across the towers in name and shape, so differently sized output layers can be left out.
    """
    if isinstance(towers, nn.Module) and hasattr(towers, "towers"):
        towers = towers.towers
    mods = list(task_dict(towers, what).values())
    if len(mods) < 2:
        raise ValueError(f"{what} needs at least 2 task networks, got {len(mods)}")
    named = [{n: p for n, p in m.named_parameters() if include is None or include(n)} for m in mods]
    names = list(named[0])
    for i, n in enumerate(named[1:], start=1):
        if list(n) != names:
            raise ValueError(
                f"{what} must have the same architecture: tower 0 has parameters {names[:4]}..., "
                f"tower {i} has {list(n)[:4]}..."
            )
    groups: list[tuple[str, list[Tensor]]] = []
    for name in names:
        ps: list[Tensor] = [n[name] for n in named]
        shapes = {tuple(p.shape) for p in ps}
        if len(shapes) != 1:
            raise ValueError(f"parameter {name!r} has different shapes across {what}: {sorted(shapes)}")
        if len({id(p) for p in ps}) != len(ps):
            raise ValueError(f"parameter {name!r} is the same tensor in several {what}; give each task its own copy")
        groups.append((name, ps))
    return groups


def default_gate_input(x: Tensor, in_features: int, owner: str, experts: int | str) -> Tensor:
    """The input of default linear gates ``nn.Linear(in_features, experts)``: ``x`` flattened per
    example (an image batch ``(N, C, H, W)`` becomes ``(N, C*H*W)``), checked against ``in_features``.

    Raises:
        ValueError: ``x`` has no batch dimension or the wrong number of features per example; the
            message names ``owner``, the input's shape and what to pass instead.
    """
    flat = x.flatten(1) if x.ndim > 1 else x
    if x.ndim < 2 or flat.shape[1] != in_features:
        raise ValueError(
            f"{owner}'s default gates are nn.Linear(in_features={in_features}, {experts}) on the input "
            f"flattened per example, but the input has shape {tuple(x.shape)} "
            f"({flat.shape[1] if x.ndim > 1 else 'no batch dimension'} features per example): pass "
            "in_features equal to the product of the non-batch dimensions, or gates= of your own"
        )
    return flat
