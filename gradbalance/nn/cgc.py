"""Customized Gate Control (CGC): shared and task-specific experts, one gate per task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from gradbalance.nn._util import default_gate_input, task_dict, unique

__all__ = ["CGC"]


class CGC(nn.Module):
    """Customized Gate Control (CGC), the single-level form of Progressive Layered Extraction.

    MMoE with experts split into *shared* ones, which every task's gate may select, and
    *task-specific* ones, which only their task's gate sees. For task t with own experts
    ``f^t_1 .. f^t_{m_t}`` and shared experts ``f^s_1 .. f^s_{m_s}``:

    $$ y_t = h_t\\Big(\\sum_{e} g_t(x)_e\\, [f^t_1(x), \\dots, f^t_{m_t}(x), f^s_1(x), \\dots,
       f^s_{m_s}(x)]_e\\Big), \\qquad g_t(x) = \\operatorname{softmax}(W_t x) $$

    Task-specific experts give each task capacity that the others cannot pull on, which is how
    the paper reduces the "seesaw" between tasks. The shared experts are the shared parameters;
    a task's own experts, gate and tower are its task parameters. With no task-specific experts
    this is :class:`~gradbalance.nn.MMoE` over the shared experts.

    PLE's stacking of several CGC levels (with a shared gate feeding the next level) is
    :class:`~gradbalance.nn.PLE`; with one level it equals this block.

    Args:
        shared_experts: list of modules (at least one) mapping the input to ``(N, d)``.
        task_experts: ``{task: [modules]}`` with the same task names as ``towers`` (lists may
            be empty), or a list of lists in the towers' order.
        towers: ``{task: module}`` or a list (tasks ``task0``, ``task1``, ...).
        in_features: the number of input features per example, read by the default linear gates
            (on the input flattened per example: an image batch ``(N, C, H, W)`` needs
            ``C * H * W``); needed unless ``gates`` is given.
        gates: optional ``{task: module}`` giving ``m_t + m_s`` logits per example; they get the
            input as it is (no flattening).

    Example:
        >>> import torch, gradbalance as gb
        >>> from gradbalance.nn import CGC
        >>> lin = lambda: torch.nn.Linear(4, 8)
        >>> model = CGC([lin(), lin()], {"a": [lin()], "b": [lin()]},
        ...             {"a": torch.nn.Linear(8, 1), "b": torch.nn.Linear(8, 1)}, in_features=4)
        >>> opt = gb.GradBalance(torch.optim.Adam(model.parameters()), "mean", shared_params=model)
        >>> info = opt.backward({t: o.pow(2).mean() for t, o in model(torch.randn(5, 4)).items()})
        >>> opt.step()
        >>> model.gate_weights(torch.randn(3, 4))["a"].shape  # 1 own + 2 shared experts
        torch.Size([3, 3])

    References:
        Tang, Liu, Zhao, Gong. "Progressive Layered Extraction (PLE): A Novel Multi-Task
        Learning (MTL) Model for Personalized Recommendations", RecSys 2020.
    """

    def __init__(self, shared_experts: Sequence[nn.Module], task_experts: Any, towers: Any,
                 in_features: int | None = None, gates: Any = None) -> None:
        super().__init__()
        shared_experts = list(shared_experts)
        if not shared_experts or not all(isinstance(e, nn.Module) for e in shared_experts):
            raise ValueError("shared_experts must be a non-empty list of nn.Module")
        self.shared_experts = nn.ModuleList(shared_experts)
        self.towers = task_dict(towers, "towers")
        names = list(self.towers.keys())
        if not isinstance(task_experts, Mapping):
            task_experts = list(task_experts)
            if len(task_experts) != len(names):
                raise ValueError(f"got {len(task_experts)} task expert lists for {len(names)} towers")
            task_experts = dict(zip(names, task_experts))
        if sorted(task_experts) != sorted(names):
            raise ValueError(f"task_experts must name the tasks {names}, got {list(task_experts)}")
        own_experts = {t: nn.ModuleList(list(task_experts[t])) for t in names}
        self.task_experts = nn.ModuleDict(own_experts)
        sizes = {t: len(own_experts[t]) + len(self.shared_experts) for t in names}
        # the default gates read the input flattened per example, and check its size
        self._gate_features: int | None = in_features if gates is None else None
        if gates is None:
            if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
                raise ValueError(f"in_features must be a positive int when gates=None, got {in_features!r}")
            gates = {t: nn.Linear(in_features, sizes[t]) for t in names}
        self.gates = task_dict(gates, "gates")
        if list(self.gates.keys()) != names:
            raise ValueError(f"gates must name the tasks {names} in order, got {list(self.gates)}")
        shared_ids = {id(p) for p in self.shared_experts.parameters()}
        owner: dict[int, str] = {}
        for t in names:
            for p in self.task_parameters(t):
                if id(p) in shared_ids or owner.setdefault(id(p), t) != t:
                    raise ValueError(f"task {t!r} holds a parameter of the shared experts or of "
                                     "another task (tied weights)")

    def _own(self, t: str) -> nn.ModuleList:
        # __init__ stores one nn.ModuleList of own experts per task
        return cast(nn.ModuleList, self.task_experts[t])

    @property
    def task_names(self) -> list[str]:
        return list(self.towers.keys())

    def gate_weights(self, x: Tensor) -> dict[str, Tensor]:
        """``{task: (N, m_t + m_s)}`` mixing weights over [own experts, shared experts].

        The default gates read ``x`` flattened per example (an image batch needs
        ``in_features = C * H * W``); gates of your own get ``x`` as it is.

        Raises:
            ValueError: the default gates get an input whose per-example size is not ``in_features``.
        """
        if self._gate_features is not None:
            x = default_gate_input(x, self._gate_features, "CGC", "m_t + m_s")
        return {t: torch.softmax(g(x), dim=-1) for t, g in self.gates.items()}

    def forward(self, x: Tensor, return_features: bool = False) -> Any:
        """``{task: output}``; with ``return_features=True`` also the stacked shared-expert
        outputs ``(N, m_s, d)`` (what every task reads)."""
        z = torch.stack([e(x) for e in self.shared_experts], dim=1)
        out = {}
        for t, w in self.gate_weights(x).items():
            own = [e(x) for e in self._own(t)]
            all_e = torch.cat([torch.stack(own, dim=1), z], dim=1) if own else z
            if w.shape != all_e.shape[:2]:
                raise ValueError(f"gate {t!r} gives shape {tuple(w.shape)}, expected {tuple(all_e.shape[:2])}")
            mixed = (w.to(z.dtype).unsqueeze(-1) * all_e.reshape(*all_e.shape[:2], -1)).sum(1)
            out[t] = self.towers[t](mixed.reshape(z.shape[:1] + z.shape[2:]))
        return (out, z) if return_features else out

    def shared_parameters(self) -> list[Tensor]:
        """The shared experts' parameters."""
        return unique(self.shared_experts.parameters())

    def task_parameters(self, name: str) -> list[Tensor]:
        """Task ``name``'s own experts, gate and tower."""
        if name not in self.towers:
            raise KeyError(f"unknown task {name!r}; tasks are {self.task_names}")
        mods = (self.task_experts[name], self.gates[name], self.towers[name])
        return unique(p for m in mods for p in m.parameters())
