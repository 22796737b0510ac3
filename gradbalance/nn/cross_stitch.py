"""Cross-stitch networks: task towers mixed by learned k x k units after chosen layers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from gradbalance.nn._util import corresponding_parameters, task_dict, unique

__all__ = ["CrossStitch", "CrossStitchUnit"]

MODES = ("layer", "channel")
SCOPES = ("stitch", "reached")


class CrossStitchUnit(nn.Module):
    """One cross-stitch unit: ``y_i = sum_j alpha[i, j] x_j`` over the k task activations.

    ``mode="layer"``: one k x k matrix ``alpha``. ``mode="channel"``: one k x k matrix per
    channel (dimension 1 of the activations, the feature dimension of an ``(N, C)`` tensor),
    stored as ``alpha`` of shape ``(C, k, k)``. Initialised with ``init[0]`` on the diagonal and
    ``init[1] / (k - 1)`` off it, so with the default ``(0.9, 0.1)`` every row sums to 1 and two
    tasks get the paper's ``(alpha_S, alpha_D) = (0.9, 0.1)``.
    """

    def __init__(self, num_tasks: int, channels: int | None = None,
                 init: tuple[float, float] = (0.9, 0.1)) -> None:
        super().__init__()
        if not isinstance(num_tasks, int) or num_tasks < 2:
            raise ValueError(f"num_tasks must be an int >= 2, got {num_tasks!r}")
        if channels is not None and (not isinstance(channels, int) or channels < 1):
            raise ValueError(f"channels must be None or a positive int, got {channels!r}")
        same, diff = (float(v) for v in init)
        if not (math.isfinite(same) and math.isfinite(diff)):
            raise ValueError(f"init must be two finite numbers, got {init!r}")
        k = num_tasks
        alpha = torch.full((k, k), diff / (k - 1))
        alpha.fill_diagonal_(same)
        if channels is not None:
            alpha = alpha.expand(channels, k, k).clone()
        self.num_tasks, self.channels = k, channels
        self.alpha = nn.Parameter(alpha)

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        if len(xs) != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} task activations, got {len(xs)}")
        x = torch.stack(list(xs))  # (k, N, ...)
        a = self.alpha.to(x.dtype)
        if self.channels is None:
            y = (a @ x.reshape(self.num_tasks, -1)).reshape(x.shape)
        else:
            if x.ndim < 3 or x.shape[2] != self.channels:
                raise ValueError(
                    f"per-channel cross-stitch expects activations (N, {self.channels}, ...), "
                    f"got {tuple(x.shape[1:])}"
                )
            flat = x.reshape(x.shape[0], x.shape[1], self.channels, -1)
            # contiguous: the einsum result is strided channel-major, and downstream layers fed a
            # strided input take other kernels (different rounding from the same numbers)
            y = torch.einsum("cij,jncr->incr", a, flat).contiguous().reshape(x.shape)
        return list(y.unbind(0))

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, channels={self.channels}"


def _out_channels(layers: Sequence[nn.Module]) -> int | None:
    for m in reversed(list(layers)):
        for attr in ("out_features", "out_channels", "num_features"):
            c = getattr(m, attr, None)
            if isinstance(c, int):
                return c
    return None


class CrossStitch(nn.Module):
    """Cross-stitch network: k task towers whose activations are mixed after chosen layers.

    Each task has its own tower (an ``nn.Sequential``; all towers of the same structure). After
    each layer index in ``after``, a :class:`CrossStitchUnit` replaces the k activations
    ``x_1 .. x_k`` by ``y_i = sum_j alpha[i, j] x_j``, so every task can learn how much of
    the others' features to use (Misra et al., 2016). ``alpha = I`` gives k independent
    networks; all-equal rows give fully shared features.

    What counts as shared for ``GradBalance``: by default (``shared_parameters()``, scope
    ``"stitch"``) the stitch parameters ``alpha``. They are the part of the network whose only
    role is to be shared, every task's loss reaches every one of them, and they are few, so the
    per-task Gram matrix costs almost nothing beyond the k backward passes. The towers are the
    task parameters: the engine gives them the method's weighted sum of the task gradients
    that reach them (through ``alpha``, task j's loss also reaches tower i's layers before the
    last stitch). ``shared_parameters("reached")`` returns the stitch parameters and every
    tower parameter before the last stitch, i.e. everything more than one loss reaches (what
    ``GradBalance`` would infer with ``shared_params=None``); use it to let gradient methods
    see and resolve the conflicts inside the towers as well, at the cost of a larger Jacobian.

    Learning rate: the paper scales the learning rate of the cross-stitch units up relative to
    the base network (by factors up to 10^3 in its ablation, with SGD; 10^3 is the default
    here), because ``alpha`` lives on a different scale from the layer weights.
    :meth:`param_groups` builds the two parameter groups; the factor is a property of SGD on
    the paper's networks: with Adam-like
    optimizers (steps of size ~lr whatever the gradient's scale) use a far smaller factor
    (e.g. 10), and no weight decay on ``alpha``.

    Args:
        towers: a list (names ``task0``, ``task1``, ...) or a dict ``{task: nn.Sequential}``,
            at least 2, with the same layer types and parameter shapes.
        after: layer indices (into each ``nn.Sequential``) after which a unit mixes the tasks.
        mode: ``"layer"`` (default; one k x k matrix per unit) or ``"channel"`` (one per
            channel, dimension 1 of the activations).
        channels: for ``mode="channel"``, the channel count at each ``after`` index; ``None``
            (default) reads it from the last ``out_features``/``out_channels``/``num_features``
            at or before that layer.
        init: ``(diagonal, total off-diagonal)`` of every row at initialisation, default
            ``(0.9, 0.1)`` as in the paper; off-diagonal entries get ``init[1] / (k - 1)``.

    Example:
        >>> import torch, gradbalance as gb
        >>> from gradbalance.nn import CrossStitch
        >>> def tower():
        ...     return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> model = CrossStitch({"a": tower(), "b": tower()}, after=[1])
        >>> opt = gb.GradBalance(torch.optim.SGD(model.param_groups(lr=0.01, stitch_lr_mult=100)),
        ...                      "mean", shared_params=model)
        >>> out = model(torch.randn(5, 4))
        >>> info = opt.backward({t: o.pow(2).mean() for t, o in out.items()})
        >>> opt.step()
        >>> tuple(g["lr"] for g in opt.param_groups)
        (0.01, 1.0)

    References:
        Misra, Shrivastava, Gupta, Hebert. "Cross-stitch Networks for Multi-task Learning",
        CVPR 2016.
    """

    def __init__(self, towers: Any, after: Sequence[int], mode: str = "layer",
                 channels: Sequence[int] | None = None, init: tuple[float, float] = (0.9, 0.1)) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.towers = task_dict(towers, "towers")
        if len(self.towers) < 2:
            raise ValueError(f"cross-stitch needs at least 2 towers, got {len(self.towers)}")
        if not all(isinstance(s, nn.Sequential) for s in self.towers.values()):
            raise TypeError("towers must be nn.Sequential (the layer indices in `after` index them)")
        seqs = self._sequentials()
        depth = len(seqs[0])
        for name, s in zip(self.towers.keys(), seqs):
            if [type(m) for m in s] != [type(m) for m in seqs[0]]:
                raise ValueError(f"tower {name!r} does not have the same layers as the first tower")
        corresponding_parameters(self.towers)  # same parameter names and shapes
        after = list(after)
        if not after or any(isinstance(i, bool) or not isinstance(i, int) for i in after):
            raise ValueError(f"after must be a non-empty list of layer indices, got {after!r}")
        if len(set(after)) != len(after) or min(after) < 0 or max(after) >= depth:
            raise ValueError(f"after must hold distinct indices in [0, {depth - 1}], got {after!r}")
        after = sorted(after)
        per: list[int | None] = [None] * len(after)  # channels of each unit (None: mode="layer")
        if mode == "channel":
            if channels is None:
                read = [_out_channels(list(seqs[0])[: i + 1]) for i in after]
                if None in read:
                    raise ValueError("could not read the channel count; pass channels=[...]")
                per = read
            elif len(channels) != len(after):
                raise ValueError(f"channels needs one entry per index in after ({len(after)})")
            else:
                per = list(channels)
        k = len(seqs)
        self.after = after
        self.mode = mode
        self.stitches = nn.ModuleDict(
            {str(i): CrossStitchUnit(k, c, init) for i, c in zip(after, per)}
        )

    def _sequentials(self) -> list[nn.Sequential]:
        # __init__ checked that every tower is an nn.Sequential
        return [cast(nn.Sequential, t) for t in self.towers.values()]

    @property
    def task_names(self) -> list[str]:
        return list(self.towers.keys())

    def forward(self, x: Any) -> dict[str, Any]:
        """``{task: output}``; ``x`` is one input for every tower, or a dict ``{task: input}``."""
        names = self.task_names
        if isinstance(x, Mapping):
            if set(x) != set(names):
                raise KeyError(f"x must hold an input for every task {names}, got {list(x)}")
            xs = [x[t] for t in names]
        else:
            xs = [x] * len(names)
        towers = self._sequentials()
        for i in range(len(towers[0])):
            xs = [t[i](h) for t, h in zip(towers, xs)]
            if str(i) in self.stitches:
                xs = self.stitches[str(i)](xs)
        return dict(zip(names, xs))

    def stitch_parameters(self) -> list[Tensor]:
        """The mixing parameters ``alpha`` of every unit."""
        return unique(self.stitches.parameters())

    def shared_parameters(self, scope: str = "stitch") -> list[Tensor]:
        """What ``GradBalance(..., shared_params=model)`` treats as shared (class docstring):
        ``"stitch"`` (default) the units' ``alpha``; ``"reached"`` also every tower parameter
        up to the last unit."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        out = self.stitch_parameters()
        if scope == "reached":
            last = self.after[-1]
            out = out + [p for t in self._sequentials() for p in t[: last + 1].parameters()]
        return unique(out)

    def task_parameters(self, name: str) -> list[Tensor]:
        """The parameters of task ``name``'s tower."""
        if name not in self.towers:
            raise KeyError(f"unknown task {name!r}; tasks are {self.task_names}")
        return unique(self.towers[name].parameters())

    def param_groups(self, lr: float, stitch_lr_mult: float = 1e3) -> list[dict[str, Any]]:
        """Two optimizer parameter groups: the towers at ``lr``, the stitch units at
        ``lr * stitch_lr_mult`` (default 10^3, the paper's factor for SGD; see the class
        docstring for other optimizers)."""
        for what, v in (("lr", lr), ("stitch_lr_mult", stitch_lr_mult)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{what} must be a finite number > 0, got {v!r}")
        stitch = {id(p) for p in self.stitch_parameters()}
        towers = [p for p in unique(self.parameters()) if id(p) not in stitch]
        return [
            {"params": towers, "lr": float(lr)},
            {"params": self.stitch_parameters(), "lr": float(lr) * float(stitch_lr_mult)},
        ]
