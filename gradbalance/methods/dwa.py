"""Dynamic Weight Average, implemented from the paper (Liu et al. 2019, eq. 7)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from gradbalance.methods.base import Aggregation, Method, TaskInputs, check_num_tasks, register

__all__ = ["DWA"]

WINDOWS = ("epoch", "step")


@register("dwa", "Dynamic Weight Average (Liu et al. 2019): weights from the ratio of recent losses")
class DWA(Method):
    """Dynamic Weight Average (DWA): weight the tasks whose loss falls slowest.

    ``lambda_i = k exp(r_i / T) / sum_j exp(r_j / T)`` with ``r_i = Lbar_i(e-1) / Lbar_i(e-2)``,
    the ratio of task ``i``'s last two average losses; ``lambda_i = 1`` until two averages exist.

    Args:
        temperature: ``T > 0`` (default 2.0, the paper's); large ``T`` gives equal weights.
        window: ``"epoch"`` (default, the paper's): ``Lbar`` is the mean loss of the committed
            steps of an epoch, and an epoch ends when you call :meth:`epoch_end` (e.g.
            ``opt.method.epoch_end()`` after each pass over the data); ``"step"``: every
            committed step is its own average (``r_i = L_i(t-1) / L_i(t-2)``, no hook needed).

    Task-specific parameters: head ``i`` gets ``lambda_i`` times its task's gradient (the
    gradient of ``sum_i lambda_i L_i``, as in the paper).

    State: the running sum and count of the current epoch's losses, and the last two averages.
    Only committed steps count (a skipped ``GradScaler`` step or an accumulation re-run adds
    nothing); with accumulation a step's loss is the window's summed loss.

    Cost: one ordinary backward per step (no per-task gradients).

    Deviations: none. Losses must stay positive for the ratios to mean anything (raises
    ``ValueError`` on a non-positive average).

    Example:
        >>> import torch
        >>> from gradbalance.methods import DWA, TaskInputs
        >>> m = DWA(window="step")
        >>> for loss in ([1.0, 1.0], [0.5, 1.0], [0.25, 1.0]):
        ...     agg = m.aggregate(TaskInputs(losses=torch.tensor(loss, dtype=torch.float64)))
        ...     m.commit(agg.pending)
        >>> agg.weights  # r = (0.5, 1): 2 softmax(r / 2)
        tensor([0.8756, 1.1244], dtype=torch.float64)

    References:
        S. Liu, E. Johns, A. J. Davison, "End-to-End Multi-Task Learning with Attention",
        CVPR 2019, eq. 7.
    """

    requires = "losses"

    def __init__(self, temperature: float = 2.0, window: str = "epoch") -> None:
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
        self.temperature, self.window = float(temperature), window
        self.load_state_dict({})

    def hyperparameters(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "window": self.window}

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        k = inputs.num_tasks
        if self._sum.numel():
            check_num_tasks(self._sum.numel(), k, "DWA")
        losses = inputs.losses.detach().double()
        if self._averages < 2:
            weights = torch.ones_like(losses)
        else:
            prev, older = self._history[1].to(losses.device), self._history[0].to(losses.device)
            if bool((older <= 0).any()):
                raise ValueError(f"DWA needs positive average losses, got {older.tolist()}")
            weights = k * torch.softmax(prev / older / self.temperature, dim=0)
        return Aggregation(weights=weights, extras={"averages": self._averages},
                           pending=losses.cpu())

    def commit(self, pending: Tensor) -> None:
        if self._sum.numel() == 0:
            k = pending.numel()
            self._sum, self._history = torch.zeros(k, dtype=torch.float64), torch.zeros(2, k, dtype=torch.float64)
        self._sum = self._sum + pending
        self._count += 1
        if self.window == "step":
            self.epoch_end()

    def epoch_end(self) -> None:
        """Close the current epoch: its mean loss becomes the latest average (window="epoch").

        Warns and does nothing when no step was committed since the last call.
        """
        if self._count == 0:
            warnings.warn("DWA.epoch_end(): no step was committed in this epoch; ignored",
                          RuntimeWarning, stacklevel=2)
            return
        self._history = torch.stack([self._history[1], self._sum / self._count])
        self._averages += 1
        self._sum, self._count = torch.zeros_like(self._sum), 0

    def state_dict(self) -> dict[str, Any]:
        return {"sum": self._sum.clone(), "count": self._count, "history": self._history.clone(),
                "averages": self._averages}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:  # a fresh method
            self._sum, self._history = torch.zeros(0, dtype=torch.float64), torch.zeros(2, 0, dtype=torch.float64)
            self._count = self._averages = 0
            return
        if set(state) != {"sum", "count", "history", "averages"}:
            raise ValueError(f"DWA state needs keys sum, count, history, averages; got {sorted(state)}")
        if state["history"].shape != (2, state["sum"].numel()):
            raise ValueError("DWA state: history must have shape (2, k) with k = len(sum)")
        self._sum, self._history = state["sum"].double().clone(), state["history"].double().clone()
        self._count, self._averages = int(state["count"]), int(state["averages"])
