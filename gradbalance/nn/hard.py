"""Hard parameter sharing: one shared trunk, one head per task."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from gradbalance.nn._util import task_dict, unique

__all__ = ["HardSharing"]


class HardSharing(nn.Module):
    """Hard parameter sharing: a trunk every task reads, and one head per task.

    ``z = trunk(x)``, ``out[t] = heads[t](z)``. The trunk's parameters are the shared ones, each
    head's are its task's own. This is the default multi-task architecture (Caruana, 1997; the
    "hard parameter sharing" of Ruder's 2017 overview), and the one every balancing method in
    gradbalance is written for: the methods combine the task gradients on the trunk, and each
    head gets its own task's gradient times that task's weight.

    ``GradBalance(opt, method, shared_params=model)`` reads :meth:`shared_parameters`, so no
    parameter list has to be written by hand; ``forward(x, return_features=True)`` also returns
    ``z`` for ``opt.backward(losses, features=z)`` (the fast batched engine, and MGDA-UB).

    Args:
        trunk: the shared module, ``z = trunk(x)``.
        heads: ``{task name: module}``, or a list of modules (named ``task0``, ``task1``, ...,
            the names ``opt.backward`` gives a list of losses). Each head reads ``z``.

    Raises:
        TypeError: ``trunk`` or a head is not an ``nn.Module``.
        ValueError: no heads, or a parameter held both by the trunk and by a head (tied
            weights make the shared/task partition ambiguous).

    Example:
        >>> import torch, gradbalance as gb
        >>> from gradbalance.nn import HardSharing
        >>> model = HardSharing(torch.nn.Linear(4, 8), {"a": torch.nn.Linear(8, 1), "b": torch.nn.Linear(8, 3)})
        >>> opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "mean", shared_params=model)
        >>> out, z = model(torch.randn(5, 4), return_features=True)
        >>> info = opt.backward({t: o.pow(2).mean() for t, o in out.items()}, features=z)
        >>> opt.step()
        >>> tuple(tuple(p.shape) for p in model.shared_parameters())
        ((8, 4), (8,))
    """

    def __init__(self, trunk: nn.Module, heads: Any) -> None:
        super().__init__()
        if not isinstance(trunk, nn.Module):
            raise TypeError(f"trunk must be an nn.Module, got {type(trunk).__name__}")
        self.trunk = trunk
        self.heads = task_dict(heads, "heads")
        trunk_ids = {id(p) for p in trunk.parameters()}
        for name, head in self.heads.items():
            if any(id(p) in trunk_ids for p in head.parameters()):
                raise ValueError(f"head {name!r} holds a parameter of the trunk (tied weights)")

    @property
    def task_names(self) -> list[str]:
        """The task names, in the order of the outputs."""
        return list(self.heads.keys())

    def forward(self, x: Any, return_features: bool = False) -> Any:
        """``{task: heads[task](trunk(x))}``; with ``return_features=True``, ``(outputs, z)``."""
        z = self.trunk(x)
        out = {name: head(z) for name, head in self.heads.items()}
        return (out, z) if return_features else out

    def shared_parameters(self) -> list[Tensor]:
        """The trunk's parameters (what ``GradBalance(..., shared_params=model)`` uses)."""
        return unique(self.trunk.parameters())

    def task_parameters(self, name: str) -> list[Tensor]:
        """The parameters of task ``name``'s head."""
        if name not in self.heads:
            raise KeyError(f"unknown task {name!r}; tasks are {self.task_names}")
        return unique(self.heads[name].parameters())
