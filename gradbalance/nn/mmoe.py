"""Multi-gate mixture of experts (MMoE): shared experts, one softmax gate and tower per task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradbalance.nn._util import default_gate_input, task_dict, unique

__all__ = ["MMoE"]


def expert_list(experts: Any) -> list[nn.Module]:
    """``experts`` as a list, checked: a non-empty sequence of modules (not one module)."""
    if isinstance(experts, nn.Module) and not isinstance(experts, nn.ModuleList):
        raise TypeError("experts must be a list of modules")
    experts = list(experts)
    if not experts or not all(isinstance(e, nn.Module) for e in experts):
        raise ValueError("experts must be a non-empty list of nn.Module")
    return experts


class MMoE(nn.Module):
    """Multi-gate Mixture-of-Experts (MMoE): tasks share experts, each mixes them its own way.

    With experts ``f_1 .. f_n`` (each maps the input to a ``d``-vector) and, for task t, a gate
    ``g_t(x) = softmax(W_t x)`` over the n experts and a tower ``h_t``:

    $$ y_t = h_t\\Big(\\sum_{e=1}^{n} g_t(x)_e \\, f_e(x)\\Big) $$

    The experts are the shared parameters (:meth:`shared_parameters`); each task's gate and tower
    are its own (:meth:`task_parameters`). With one expert every gate is the constant 1 and the
    model is hard sharing with that expert as the trunk.

    ``forward(x, return_features=True)`` also returns the stacked expert outputs
    ``(N, n, d)``: the representation every task reads (the gates read ``x`` directly, and the
    gates are task parameters), ready for ``opt.backward(losses, features=...)``.

    Args:
        experts: a list of n >= 1 modules with outputs of the same shape ``(N, d)``.
        towers: ``{task: module}`` or a list (names ``task0``, ...), each reading a ``(N, d)``
            mixture.
        in_features: the number of input features per example, read by the default gates
            ``nn.Linear(in_features, n)``; needed unless ``gates`` is given. The default gates
            read the input flattened per example (``x.flatten(1)``), so an image batch
            ``(N, C, H, W)`` needs ``in_features = C * H * W``; a mismatch raises a ValueError
            naming the input's shape.
        gates: optional ``{task: module}`` (or list, same order as ``towers``) mapping the input
            to n logits (softmax is applied here); they get ``x`` as it is (no flattening).
            Default: linear gates, as in the paper.

    Example:
        >>> import torch, gradbalance as gb
        >>> from gradbalance.nn import MMoE
        >>> model = MMoE([torch.nn.Linear(4, 8) for _ in range(3)],
        ...              {"a": torch.nn.Linear(8, 1), "b": torch.nn.Linear(8, 1)}, in_features=4)
        >>> opt = gb.GradBalance(torch.optim.Adam(model.parameters()), "mean", shared_params=model)
        >>> out = model(torch.randn(5, 4))
        >>> info = opt.backward({t: o.pow(2).mean() for t, o in out.items()})
        >>> opt.step()
        >>> bool(torch.allclose(model.gate_weights(torch.randn(2, 4))["a"].sum(-1), torch.ones(2)))
        True

    References:
        Ma, Zhao, Yi, Chen, Hong, Chi. "Modeling Task Relationships in Multi-task Learning with
        Multi-gate Mixture-of-Experts", KDD 2018.
    """

    def __init__(self, experts: Sequence[nn.Module], towers: Any, in_features: int | None = None,
                 gates: Any = None) -> None:
        super().__init__()
        experts = expert_list(experts)
        self.experts = nn.ModuleList(experts)
        self.towers = task_dict(towers, "towers")
        n = len(experts)
        # the default gates read the input flattened per example, and check its size
        self._gate_features: int | None = None
        if gates is None:
            if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
                raise ValueError(f"in_features must be a positive int when gates=None, got {in_features!r}")
            gates = {t: nn.Linear(in_features, n) for t in self.towers}
            self._gate_features = in_features
        elif isinstance(gates, (list, tuple, nn.ModuleList)):
            if len(gates) != len(self.towers):
                raise ValueError(f"got {len(gates)} gates for {len(self.towers)} towers")
            gates = dict(zip(self.towers.keys(), gates))
        self.gates = task_dict(gates, "gates")
        if list(self.gates.keys()) != list(self.towers.keys()):
            raise ValueError(
                f"gates and towers must name the same tasks, got {list(self.gates)} and {list(self.towers)}"
            )
        expert_ids = {id(p) for p in self.experts.parameters()}
        for t in self.towers:
            if any(id(p) in expert_ids for p in self.task_parameters(t)):
                raise ValueError(f"task {t!r} holds a parameter of the experts (tied weights)")

    @property
    def task_names(self) -> list[str]:
        return list(self.towers.keys())

    def gate_weights(self, x: Tensor) -> dict[str, Tensor]:
        """``{task: (N, n)}`` mixing weights; each row is a probability distribution.

        Raises:
            ValueError: the default gates get an input whose per-example size is not
                ``in_features``.
        """
        if self._gate_features is not None:
            x = default_gate_input(x, self._gate_features, "MMoE", len(self.experts))
        return {t: torch.softmax(g(x), dim=-1) for t, g in self.gates.items()}

    def forward(self, x: Tensor, return_features: bool = False) -> Any:
        """``{task: output}``; with ``return_features=True``, ``(outputs, expert outputs)``."""
        z = torch.stack([e(x) for e in self.experts], dim=1)  # (N, n, d)
        out = {}
        for t, w in self.gate_weights(x).items():
            if w.shape != z.shape[:2]:
                raise ValueError(f"gate {t!r} gives shape {tuple(w.shape)}, expected {tuple(z.shape[:2])}")
            mixed = (w.to(z.dtype).unsqueeze(-1) * z.reshape(*z.shape[:2], -1)).sum(1)
            out[t] = self.towers[t](mixed.reshape(z.shape[:1] + z.shape[2:]))
        return (out, z) if return_features else out

    def shared_parameters(self) -> list[Tensor]:
        """The experts' parameters."""
        return unique(self.experts.parameters())

    def task_parameters(self, name: str) -> list[Tensor]:
        """Task ``name``'s gate and tower parameters."""
        if name not in self.towers:
            raise KeyError(f"unknown task {name!r}; tasks are {self.task_names}")
        return unique(list(self.gates[name].parameters()) + list(self.towers[name].parameters()))
