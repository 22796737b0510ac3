"""Dynamic Weight Average, implemented from the paper (Liu et al. 2019, eq. 7)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from gradbalance.methods.base import Aggregation, Method, TaskInputs, check_number, register, state_keys

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

    State, per task name: the running sum and count of the current epoch's losses, and the last
    two averages. Tasks missing from a step (``None`` in a dict of losses) keep their state; the
    tasks present with two averages share ``n`` of the weight by the softmax above (``n`` their
    number), and a present task without two averages yet (new, or seen in only one epoch)
    gets 1, so the weights of the present tasks still sum to their number.

    Only committed steps count (a skipped ``GradScaler`` step or an accumulation re-run adds
    nothing); with accumulation a step's loss is the window's summed loss.

    With ``window="epoch"`` the weights stay 1 until :meth:`epoch_end` has been called twice.
    If :attr:`epoch_warning_steps` (default 1000) steps are committed and ``epoch_end()`` was
    never called, DWA warns once (a ``RuntimeWarning``): it is then plain equal weighting. Set
    ``opt.method.epoch_warning_steps = None`` to silence it (e.g. epochs longer than that).

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
    #: committed steps without any ``epoch_end()`` call after which DWA warns once (``None``: never)
    epoch_warning_steps: int | None = 1000

    # state, set by load_state_dict (a fresh method loads {})
    _tasks: list[str]
    _sum: torch.Tensor
    _count: torch.Tensor
    _history: torch.Tensor
    _averages: torch.Tensor

    def __init__(self, temperature: float = 2.0, window: str = "epoch") -> None:
        temperature = check_number("temperature", temperature, positive=True)
        if window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
        self.temperature, self.window = float(temperature), window
        self._warned = False  # the missing-epoch_end warning was given (not state)
        self.load_state_dict({})

    def hyperparameters(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "window": self.window}

    @property
    def tasks(self) -> tuple[str, ...]:
        """The task names the state is kept for, in first-seen order."""
        return tuple(self._tasks)

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        k = inputs.num_tasks
        names = state_keys(inputs, self._tasks, "DWA")
        losses = inputs.losses.detach().double()
        known = [self._tasks.index(n) if n in self._tasks else -1 for n in names]
        ready = torch.tensor([i >= 0 and int(self._averages[i]) >= 2 for i in known], dtype=torch.bool)
        weights = torch.ones(k, dtype=torch.float64)
        if bool(ready.any()):
            rows = torch.tensor([i for i in known if i >= 0 and int(self._averages[i]) >= 2])
            prev, older = self._history[1, rows], self._history[0, rows]
            if bool((older <= 0).any()):
                raise ValueError(f"DWA needs positive average losses, got {older.tolist()}")
            weights[ready] = len(rows) * torch.softmax(prev / older / self.temperature, dim=0)
        return Aggregation(weights=weights.to(losses.device),
                           extras={"averages": int(self._averages.min()) if len(self._tasks) else 0},
                           pending={"tasks": names, "losses": losses.cpu()})

    def commit(self, pending: dict[str, Any]) -> None:
        new = [n for n in pending["tasks"] if n not in self._tasks]
        if new:
            grow = len(new)
            self._tasks = self._tasks + new
            self._sum = torch.cat([self._sum, torch.zeros(grow, dtype=torch.float64)])
            self._count = torch.cat([self._count, torch.zeros(grow, dtype=torch.int64)])
            self._history = torch.cat([self._history, torch.zeros(2, grow, dtype=torch.float64)], dim=1)
            self._averages = torch.cat([self._averages, torch.zeros(grow, dtype=torch.int64)])
        index = torch.tensor([self._tasks.index(n) for n in pending["tasks"]])
        self._sum[index] += pending["losses"]
        self._count[index] += 1
        if self.window == "step":
            self.epoch_end()
        elif not self._warned and self.epoch_warning_steps is not None and int(self._averages.max()) == 0 \
                and int(self._count.max()) >= self.epoch_warning_steps:  # no epoch has ever ended
            self._warned = True
            warnings.warn(
                f"DWA(window='epoch') has committed {int(self._count.max())} steps and epoch_end() was "
                "never called, so its weights are still all 1 (equal weighting) and will stay so: call "
                "opt.method.epoch_end() after each pass over the data, or use DWA(window='step'). "
                "(Epochs longer than this? set opt.method.epoch_warning_steps = None.)",
                RuntimeWarning, stacklevel=2,
            )

    def epoch_end(self) -> None:
        """Close the current epoch: each task's mean loss over the steps it was present in
        becomes its latest average (window="epoch"). A task absent for the whole epoch keeps
        its averages.

        Warns and does nothing when no step was committed since the last call.
        """
        seen = self._count > 0
        if not bool(seen.any()):
            warnings.warn("DWA.epoch_end(): no step was committed in this epoch; ignored",
                          RuntimeWarning, stacklevel=2)
            return
        self._history[0, seen] = self._history[1, seen]
        self._history[1, seen] = self._sum[seen] / self._count[seen]
        self._averages[seen] += 1
        self._sum.zero_()
        self._count.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"tasks": list(self._tasks), "sum": self._sum.clone(), "count": self._count.clone(),
                "history": self._history.clone(), "averages": self._averages.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:  # a fresh method
            self._tasks = []
            self._sum, self._history = torch.zeros(0, dtype=torch.float64), torch.zeros(2, 0, dtype=torch.float64)
            self._count = torch.zeros(0, dtype=torch.int64)
            self._averages = torch.zeros(0, dtype=torch.int64)
            return
        keys = {"tasks", "sum", "count", "history", "averages"}
        if set(state) != keys:
            raise ValueError(f"DWA state needs keys {sorted(keys)}; got {sorted(state)}")
        n = len(state["tasks"])
        if (state["sum"].shape, state["count"].shape, state["averages"].shape) != ((n,),) * 3 \
                or state["history"].shape != (2, n):
            raise ValueError("DWA state: sum, count, averages must have one entry per task and history shape (2, k)")
        self._tasks = list(state["tasks"])
        self._sum, self._history = state["sum"].double().clone(), state["history"].double().clone()
        self._count, self._averages = state["count"].long().clone(), state["averages"].long().clone()
