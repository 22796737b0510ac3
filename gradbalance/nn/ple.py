"""Progressive Layered Extraction (PLE): stacked CGC levels with progressive routing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from gradbalance.nn._util import task_dict, unique

__all__ = ["PLE"]

SCOPES = ("shared", "reached")


def _out_features(module: nn.Module) -> int | None:
    """The ``out_features`` of the last linear layer in ``module`` (None if there is none)."""
    for m in reversed(list(module.modules())):
        c = getattr(m, "out_features", None)
        if isinstance(c, int):
            return c
    return None


def _positive_int(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= 1


def _mix(w: Tensor, experts: list[Tensor], what: str) -> Tensor:
    """``sum_e w[:, e] * experts[e]`` over expert outputs of one shape ``(N, ...)``."""
    stacked = torch.stack(experts, dim=1)
    if w.shape != stacked.shape[:2]:
        raise ValueError(f"{what} gives shape {tuple(w.shape)}, expected {tuple(stacked.shape[:2])}")
    mixed = (w.to(stacked.dtype).unsqueeze(-1) * stacked.reshape(*stacked.shape[:2], -1)).sum(1)
    return mixed.reshape(stacked.shape[:1] + stacked.shape[2:])


class PLE(nn.Module):
    """Progressive Layered Extraction (PLE): ``L`` levels of CGC with progressive routing.

    Level ``l`` (``l = 1..L``) has shared experts ``E^l_s`` and, for each task t, its own experts
    ``E^l_t``. Each task has an input ``x^{l-1}_t``, and the shared part an input ``x^{l-1}_s``
    (all equal to ``x`` at the first level). Task t's gate mixes its own and the shared experts
    (the CGC rule), and at every level but the last a *shared gate* mixes **all** the experts of
    the level (every task's and the shared ones); the mixtures are the next level's inputs:

    $$ S^l_t = [E^l_t(x^{l-1}_t),\\ E^l_s(x^{l-1}_s)], \\qquad
       x^l_t = w^l_t(x^{l-1}_t)^\\top S^l_t, \\qquad w^l_t(z) = \\operatorname{softmax}(W^l_t z) $$

    $$ S^l_s = [E^l_1(x^{l-1}_1), \\dots, E^l_k(x^{l-1}_k),\\ E^l_s(x^{l-1}_s)], \\qquad
       x^l_s = w^l_s(x^{l-1}_s)^\\top S^l_s \\quad (l < L), \\qquad y_t = h_t(x^L_t) $$

    (the paper's progressive routing, where ``E^l_t(z)`` stands for the outputs of all of task t's
    experts at level l). The last level has no shared gate: its shared mixture would feed
    nothing. With ``L = 1`` this is exactly :class:`~gradbalance.nn.CGC` (tested with copied
    weights). Each level's experts read the previous level's mixture, so their input size is
    the previous experts' output size.

    What is shared: :meth:`shared_parameters` (``scope="shared"``, what ``GradBalance(...,
    shared_params=model)`` uses) returns every level's shared experts and the shared gates:
    the parts whose role is to be shared. Task t's experts at a level ``l < L`` are task
    parameters, but every task's loss reaches them through the shared gate ``w^l_s``; like
    :class:`~gradbalance.nn.CrossStitch`, ``shared_parameters("reached")`` adds them, so that a
    gradient method also resolves the conflicts there (the engine otherwise gives them the
    method's weighted sum of the task gradients that reach them). Task t's gates, its
    last-level experts and its tower are reached by its own loss only.

    ``forward(x, return_features=True)`` also returns a representation ``z`` through which
    every shared parameter reaches every loss (a cut of the graph, what
    ``opt.backward(losses, features=z)`` needs): with one level, CGC's stacked shared-expert
    outputs ``(N, m_s, d)``; with ``L > 1``, the inputs that the last level's task parts read
    and the outputs of its shared experts, flattened and concatenated:
    ``cat([x^{L-1}_1, ..., x^{L-1}_k, E^L_s(x^{L-1}_s)], dim=1)`` of shape
    ``(N, k d_{L-1} + m_s d_L)`` (the last level reads slices of this tensor).

    Args:
        shared_experts: one list per level (``L = len(shared_experts)``) of at least one module;
            at a level, all experts (shared and task) map their input to outputs of one shape.
        task_experts: one entry per level: ``{task: [modules]}`` with the towers' task names
            (lists may be empty) or a list of lists in the towers' order.
        towers: ``{task: module}`` or a list (tasks ``task0``, ``task1``, ...), reading ``x^L_t``.
        in_features: the flat input size of each level's default linear gates: one int per
            level, or one int (the size of ``x``) from which later levels' sizes are read from
            the previous level's experts (the ``out_features`` of the last linear layer of its
            first shared expert; pass the list when that is not the size). Not needed when
            every gate is given.
        gates: optional, one ``{task: module}`` (or list) per level, each giving
            ``m^l_t + m^l_s`` logits (softmax applied here). Default ``nn.Linear``.
        shared_gates: optional, one module per level except the last, each giving
            ``sum_t m^l_t + m^l_s`` logits. Default ``nn.Linear``.

    Raises:
        ValueError: no level, a level without shared experts, task names that differ from the
            towers', a missing input size, a parameter held by two parts (tied weights), or
            (in forward) a gate with the wrong number of logits.

    Example:
        >>> import torch, gradbalance as gb
        >>> from gradbalance.nn import PLE
        >>> lin = lambda d: torch.nn.Linear(d, 8)
        >>> model = PLE([[lin(4)], [lin(8)]], [{"a": [lin(4)], "b": [lin(4)]}, {"a": [lin(8)], "b": []}],
        ...             {"a": torch.nn.Linear(8, 1), "b": torch.nn.Linear(8, 1)}, in_features=4)
        >>> opt = gb.GradBalance(torch.optim.Adam(model.parameters()), "mean", shared_params=model)
        >>> out, z = model(torch.randn(5, 4), return_features=True)
        >>> info = opt.backward({t: o.pow(2).mean() for t, o in out.items()}, features=z)
        >>> opt.step()
        >>> [w.shape[-1] for w in model.gate_weights(torch.randn(3, 4))["shared"]]  # 1 + 1 + 1 experts
        [3]

    References:
        Tang, Liu, Zhao, Gong. "Progressive Layered Extraction (PLE): A Novel Multi-Task
        Learning (MTL) Model for Personalized Recommendations", RecSys 2020.
    """

    def __init__(self, shared_experts: Sequence[Sequence[nn.Module]], task_experts: Sequence[Any], towers: Any,
                 in_features: int | Sequence[int] | None = None, gates: Sequence[Any] | None = None,
                 shared_gates: Sequence[nn.Module] | None = None) -> None:
        super().__init__()
        if isinstance(shared_experts, nn.Module) or not isinstance(shared_experts, Sequence):
            raise TypeError("shared_experts must be a list with one list of modules per level")
        levels = len(shared_experts)
        if levels < 1:
            raise ValueError("shared_experts is empty: give one list of shared experts per level")
        self.towers = task_dict(towers, "towers")
        names = list(self.towers.keys())
        if "shared" in names:
            raise ValueError("'shared' is reserved for the shared gate; rename that task")
        task_experts = list(task_experts)
        if len(task_experts) != levels:
            raise ValueError(f"task_experts has {len(task_experts)} levels, shared_experts has {levels}")
        self.shared_experts = nn.ModuleList()
        self.task_experts = nn.ModuleList()
        for lv in range(levels):
            shared = list(shared_experts[lv])
            if not shared or not all(isinstance(e, nn.Module) for e in shared):
                raise ValueError(f"shared_experts[{lv}] must be a non-empty list of nn.Module")
            own = task_experts[lv]
            if not isinstance(own, Mapping):
                own = list(own)
                if len(own) != len(names):
                    raise ValueError(f"task_experts[{lv}] has {len(own)} lists for {len(names)} towers")
                own = dict(zip(names, own))
            if sorted(own) != sorted(names):
                raise ValueError(f"task_experts[{lv}] must name the tasks {names}, got {list(own)}")
            for t in names:
                if not all(isinstance(e, nn.Module) for e in own[t]):
                    raise ValueError(f"task_experts[{lv}][{t!r}] must be a list of nn.Module")
            self.shared_experts.append(nn.ModuleList(shared))
            self.task_experts.append(nn.ModuleDict({t: nn.ModuleList(list(own[t])) for t in names}))

        sizes = self._gate_sizes(levels, in_features, gates, shared_gates)
        self.gates = nn.ModuleList()
        for lv in range(levels):
            n_out = {t: len(self._own(lv, t)) + len(self._shared(lv)) for t in names}
            given = None if gates is None else gates[lv]
            if given is None:
                given = {t: nn.Linear(sizes[lv], n_out[t]) for t in names}
            elif isinstance(given, (list, tuple, nn.ModuleList)):
                if len(given) != len(names):
                    raise ValueError(f"gates[{lv}] has {len(given)} gates for {len(names)} towers")
                given = dict(zip(names, given))
            level_gates = task_dict(given, f"gates[{lv}]")
            if list(level_gates.keys()) != names:
                raise ValueError(f"gates[{lv}] must name the tasks {names} in order, got {list(level_gates)}")
            self.gates.append(level_gates)
        self.shared_gates = nn.ModuleList()
        for lv in range(levels - 1):
            n_all = sum(len(self._own(lv, t)) for t in names) + len(self._shared(lv))
            g = nn.Linear(sizes[lv], n_all) if shared_gates is None else shared_gates[lv]
            if not isinstance(g, nn.Module):
                raise TypeError(f"shared_gates[{lv}] must be an nn.Module, got {type(g).__name__}")
            self.shared_gates.append(g)
        self._check_partition()

    def _gate_sizes(self, levels, in_features, gates, shared_gates) -> list[int]:
        if gates is not None and len(gates) != levels:
            raise ValueError(f"gates has {len(gates)} levels, expected {levels}")
        if shared_gates is not None and len(shared_gates) != levels - 1:
            raise ValueError(f"shared_gates needs one module per level but the last ({levels - 1}), "
                             f"got {len(shared_gates)}")
        if gates is not None and (shared_gates is not None or levels == 1):
            return [0] * levels  # every gate given: no size needed
        if isinstance(in_features, Sequence):
            sizes = list(in_features)
            if len(sizes) != levels or not all(_positive_int(s) for s in sizes):
                raise ValueError(f"in_features must list {levels} positive ints (one per level), got {in_features!r}")
            return sizes
        if not _positive_int(in_features):
            raise ValueError(f"in_features must be a positive int or a list of them when gates are not all "
                             f"given, got {in_features!r}")
        sizes = [int(in_features)]  # type: ignore[arg-type]
        for lv in range(1, levels):
            d = _out_features(self._shared(lv - 1)[0])
            if d is None:
                raise ValueError(f"cannot read the output size of the level-{lv - 1} experts; pass in_features "
                                 "as a list with one size per level")
            sizes.append(d)
        return sizes

    def _check_partition(self) -> None:
        owner: dict[int, str] = {}
        parts = [("shared", p) for p in self.shared_parameters()]
        parts += [(t, p) for t in self.task_names for p in self.task_parameters(t)]
        for who, p in parts:
            if owner.setdefault(id(p), who) != who:
                raise ValueError(f"a parameter is held by both {owner[id(p)]!r} and {who!r} (tied weights); "
                                 "give each part its own modules")

    def _own(self, lv: int, t: str) -> nn.ModuleList:
        return cast(nn.ModuleList, cast(nn.ModuleDict, self.task_experts[lv])[t])

    def _shared(self, lv: int) -> nn.ModuleList:
        return cast(nn.ModuleList, self.shared_experts[lv])

    @property
    def task_names(self) -> list[str]:
        return list(self.towers.keys())

    @property
    def levels(self) -> int:
        """The number of CGC levels ``L``."""
        return len(self.shared_experts)

    def _run(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor, dict[str, list[Tensor]]]:
        names = self.task_names
        last = self.levels - 1
        inputs = dict.fromkeys(names, x)
        shared_in = x
        weights: dict[str, list[Tensor]] = {t: [] for t in [*names, "shared"]}
        features = None
        for lv in range(self.levels):
            shared_out = [e(shared_in) for e in self._shared(lv)]
            if lv == last:
                # the cut through which every shared parameter reaches the losses (class docstring)
                if lv == 0:
                    features = torch.stack(shared_out, dim=1)
                    shared_out = list(features.unbind(1))
                else:
                    pieces = [inputs[t] for t in names] + shared_out
                    features = torch.cat([p.reshape(p.shape[0], -1) for p in pieces], dim=1)
                    split = features.split([p[0].numel() for p in pieces], dim=1)
                    split = [s.reshape(p.shape) for s, p in zip(split, pieces)]
                    inputs = dict(zip(names, split[: len(names)]))
                    shared_out = split[len(names):]
            own = {t: [e(inputs[t]) for e in self._own(lv, t)] for t in names}
            new_inputs = {}
            for t in names:
                g = inputs[t]
                gate = cast(nn.ModuleDict, self.gates[lv])[t]
                w = torch.softmax(gate(g.reshape(g.shape[0], -1) if lv else g), dim=-1)
                weights[t].append(w)
                new_inputs[t] = _mix(w, own[t] + shared_out, f"gate {t!r} of level {lv}")
            if lv < last:
                g = shared_in
                w = torch.softmax(self.shared_gates[lv](g.reshape(g.shape[0], -1) if lv else g), dim=-1)
                weights["shared"].append(w)
                shared_in = _mix(w, [o for t in names for o in own[t]] + shared_out, f"shared gate of level {lv}")
            inputs = new_inputs
        out = {t: self.towers[t](inputs[t]) for t in names}
        assert features is not None
        return out, features, weights

    def forward(self, x: Tensor, return_features: bool = False) -> Any:
        """``{task: output}``; with ``return_features=True``, ``(outputs, z)`` (class docstring)."""
        out, z, _ = self._run(x)
        return (out, z) if return_features else out

    def gate_weights(self, x: Tensor) -> dict[str, list[Tensor]]:
        """``{task: [w^1_t, ..., w^L_t], "shared": [w^1_s, ..., w^{L-1}_s]}``: each ``(N, n)``,
        rows are distributions; a task's over [own experts, shared experts], the shared gate's
        over [task 1's experts, ..., task k's experts, shared experts]."""
        return self._run(x)[2]

    def shared_parameters(self, scope: str = "shared") -> list[Tensor]:
        """``"shared"`` (default): every level's shared experts and the shared gates;
        ``"reached"``: also the task experts of levels ``< L`` (class docstring)."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        out = list(self.shared_experts.parameters()) + list(self.shared_gates.parameters())
        if scope == "reached":
            out += [p for lv in range(self.levels - 1) for p in self.task_experts[lv].parameters()]
        return unique(out)

    def task_parameters(self, name: str) -> list[Tensor]:
        """Task ``name``'s experts and gates at every level, and its tower."""
        if name not in self.towers:
            raise KeyError(f"unknown task {name!r}; tasks are {self.task_names}")
        mods = [*(self._own(lv, name) for lv in range(self.levels)),
                *(cast(nn.ModuleDict, g)[name] for g in self.gates), self.towers[name]]
        return unique(p for m in mods for p in m.parameters())
