"""Multi-Task Attention Network (MTAN): a shared backbone, per-task soft attention at every stage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gradbalance.nn._util import task_dict, unique

__all__ = ["MTAN"]


def _fit(t: Tensor, size: torch.Size) -> Tensor:
    """``t`` max-pooled (or, if smaller, repeated) to the spatial ``size``; unchanged if it has it."""
    return t if t.shape[-2:] == size else F.adaptive_max_pool2d(t, tuple(size))


def _attention(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    """``g``: [1x1 conv, BN, ReLU], [1x1 conv, BN, sigmoid] (the paper's attention block)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_mid, kernel_size=1), nn.BatchNorm2d(c_mid), nn.ReLU(),
        nn.Conv2d(c_mid, c_out, kernel_size=1), nn.BatchNorm2d(c_out), nn.Sigmoid(),
    )


def _extractor(c_in: int, c_out: int) -> nn.Sequential:
    """``f``: [3x3 conv, BN, ReLU] (the paper's shared feature extractor)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


class MTAN(nn.Module):
    """Multi-Task Attention Network (MTAN): one shared backbone, a soft-attention module per task
    at every stage of it.

    The backbone is given as ``J`` stages; stage ``j`` is an ``nn.Sequential`` whose last module
    gives its output ``p^(j)`` and whose other modules give the intermediate feature ``u^(j)``
    (for ResNet stages: all blocks but the last, then the last block). Task i has an attention
    module ``g^(j)_i`` at every stage, and a shared feature extractor ``f^(j)`` carries each
    task's attended features to the next stage:

    $$ a^{(1)}_i = g^{(1)}_i\\big(u^{(1)}\\big), \\qquad
       a^{(j)}_i = g^{(j)}_i\\big([\\,u^{(j)};\\ f^{(j)}(\\hat a^{(j-1)}_i)\\,]\\big) \\ (j \\ge 2), \\qquad
       \\hat a^{(j)}_i = a^{(j)}_i \\odot p^{(j)}, $$

    and task i's output is ``y_i = h_i(\\hat a^{(J)}_i)``. As in the paper: ``g`` is
    [1x1 conv, BN, ReLU] then [1x1 conv, BN, sigmoid], so every mask entry lies in (0, 1) and
    has ``p^(j)``'s shape; ``f`` is [3x3 conv, BN, ReLU] followed by pooling to the next
    resolution, and is shared by the tasks (the authors' code shares it too); ``[;]`` concatenates
    channels. Generalisation to any backbone: ``u^(j)`` and ``f^(j)(...)`` are brought to
    ``p^(j)``'s spatial size by adaptive max pooling when they differ (the paper's 2x2 max
    pooling when the resolution halves), so a stage may downsample anywhere. With every mask
    equal to 1, each task reads the backbone's output: MTAN is then hard sharing (tested).

    Shapes are inferred at construction from one forward of ``example_input`` through the
    backbone (in eval mode and without gradient, so batch-norm statistics do not move; each
    module's train/eval mode is restored). ``f^(j)`` maps ``p^(j-1)``'s channels to
    ``u^(j)``'s; ``g^(j)`` maps ``u^(j)``'s channels (twice that for ``j >= 2``) to
    ``p^(j)``'s, through ``C_p / reduction`` hidden channels.

    What is shared: :meth:`shared_parameters` returns the backbone and the shared extractors
    ``f^(j)`` (every task's loss reaches both); :meth:`task_parameters` a task's attention
    modules and its head. ``forward`` has no ``return_features``: there is no single shared
    representation. Each task reads the backbone at every stage (``u^(j)`` and ``p^(j)``), and
    the shared ``f^(j)`` acts on task-specific inputs, so no one tensor lies on every path from
    the shared parameters to the losses (what ``opt.backward(losses, features=z)`` needs).

    Args:
        stages: ``J >= 1`` ``nn.Sequential`` of at least 2 modules each, the backbone in order;
            every stage must output a ``(N, C, H, W)`` tensor (a convolutional backbone).
        heads: ``{task: module}`` or a list (tasks ``task0``, ...), each reading ``\\hat a^(J)_i``
            (the shape of the backbone's output).
        example_input: one input batch (any batch size) to infer the channel counts from.
        reduction: hidden channels of the attention modules are ``max(1, C_p // reduction)``
            (default 1: ``C_p``, as in the authors' SegNet code; their ResNet variants use 4).

    Raises:
        TypeError: a stage that is not an ``nn.Sequential`` or ``example_input`` not a tensor.
        ValueError: fewer than 2 modules in a stage, a stage output that is not 4-D, no stages,
            a bad ``reduction``, or a head that holds a backbone parameter (tied weights).

    Example:
        >>> import torch, gradbalance as gb
        >>> from torch import nn
        >>> from gradbalance.nn import MTAN
        >>> def conv(a, b, s=1):
        ...     return nn.Sequential(nn.Conv2d(a, b, 3, s, 1), nn.BatchNorm2d(b), nn.ReLU())
        >>> stages = [nn.Sequential(conv(3, 8), conv(8, 8)), nn.Sequential(conv(8, 16, 2), conv(16, 16))]
        >>> head = lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 1))
        >>> model = MTAN(stages, {"a": head(), "b": head()}, example_input=torch.zeros(1, 3, 16, 16))
        >>> opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "mean", shared_params=model)
        >>> info = opt.backward({t: o.pow(2).mean() for t, o in model(torch.randn(4, 3, 16, 16)).items()})
        >>> opt.step()
        >>> masks = model.attention_masks(torch.randn(2, 3, 16, 16))["a"]  # one per stage
        >>> masks[0].shape, masks[1].shape
        (torch.Size([2, 8, 16, 16]), torch.Size([2, 16, 8, 8]))

    References:
        Liu, Johns, Davison. "End-to-End Multi-Task Learning with Attention", CVPR 2019.
    """

    def __init__(self, stages: Sequence[nn.Module], heads: Any, example_input: Tensor, reduction: int = 1) -> None:
        super().__init__()
        if isinstance(stages, nn.Module) and not isinstance(stages, (nn.ModuleList, nn.Sequential)):
            raise TypeError("stages must be a list of nn.Sequential stages")
        stages = list(stages)
        if not stages:
            raise ValueError("stages is empty: give the backbone as a list of stages")
        for j, s in enumerate(stages):
            if not isinstance(s, nn.Sequential):
                raise TypeError(f"stage {j} must be an nn.Sequential (its last module gives p, the others u), "
                                f"got {type(s).__name__}")
            if len(s) < 2:
                raise ValueError(f"stage {j} has {len(s)} module(s); it needs at least 2 (u = all but the last, "
                                 "p = the last); wrap a single block as nn.Sequential(nn.Identity(), block)")
        if not isinstance(example_input, Tensor):
            raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
        if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f"reduction must be a positive int, got {reduction!r}")
        self.stages = nn.ModuleList(stages)
        self.heads = task_dict(heads, "heads")
        backbone_ids = {id(p) for p in self.stages.parameters()}
        for name, head in self.heads.items():
            if any(id(p) in backbone_ids for p in head.parameters()):
                raise ValueError(f"head {name!r} holds a parameter of the backbone (tied weights)")
        shapes = self._probe(example_input)
        self.reduction = reduction
        self.extractors = nn.ModuleList(
            [_extractor(shapes[j - 1][1][0], shapes[j][0][0]) for j in range(1, len(stages))]
        )
        self.attention = nn.ModuleDict()
        for t in self.heads:
            mods = []
            for j, ((c_u, *_), (c_p, *_)) in enumerate(shapes):
                mods.append(_attention(c_u if j == 0 else 2 * c_u, max(1, c_p // reduction), c_p))
            self.attention[t] = nn.ModuleList(mods)

    def _probe(self, x: Tensor) -> list[tuple[torch.Size, torch.Size]]:
        """``[(u shape, p shape)]`` per stage, without the batch dimension, from one eval-mode pass."""
        modes = {m: m.training for m in self.stages.modules()}
        shapes = []
        try:
            self.stages.eval()
            with torch.no_grad():
                for j, stage in enumerate(self._stages()):
                    u = stage[:-1](x)
                    x = stage[-1](u)
                    for what, t in (("u", u), ("p", x)):
                        if not isinstance(t, Tensor) or t.ndim != 4:
                            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                            raise ValueError(f"stage {j}: {what} must be a (N, C, H, W) tensor, got {got}")
                    shapes.append((u.shape[1:], x.shape[1:]))
        finally:
            for m, mode in modes.items():
                m.train(mode)
        return shapes

    def _stages(self) -> list[nn.Sequential]:
        return [cast(nn.Sequential, s) for s in self.stages]

    @property
    def task_names(self) -> list[str]:
        return list(self.heads.keys())

    def _run(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, list[Tensor]]]:
        names = self.task_names
        attended: dict[str, Tensor] = {}
        masks: dict[str, list[Tensor]] = {t: [] for t in names}
        for j, stage in enumerate(self._stages()):
            u = stage[:-1](x)
            p = stage[-1](u)
            size = p.shape[-2:]
            u_fit = _fit(u, size)
            for t in names:
                g_in = u_fit if j == 0 else torch.cat([u_fit, _fit(self.extractors[j - 1](attended[t]), size)], 1)
                a = cast(nn.ModuleList, self.attention[t])[j](g_in)
                masks[t].append(a)
                attended[t] = a * p
            x = p
        return {t: self.heads[t](attended[t]) for t in names}, masks

    def forward(self, x: Tensor) -> dict[str, Any]:
        """``{task: heads[task](a^(J) * p^(J))}`` (class docstring)."""
        return self._run(x)[0]

    def attention_masks(self, x: Tensor) -> dict[str, list[Tensor]]:
        """``{task: [a^(1), ..., a^(J)]}``: each mask has its stage output's shape, entries in (0, 1)."""
        return self._run(x)[1]

    def backbone_parameters(self) -> list[Tensor]:
        """The backbone stages' parameters only."""
        return unique(self.stages.parameters())

    def shared_parameters(self) -> list[Tensor]:
        """The backbone and the shared feature extractors ``f^(j)`` (what
        ``GradBalance(..., shared_params=model)`` uses)."""
        return unique(list(self.stages.parameters()) + list(self.extractors.parameters()))

    def task_parameters(self, name: str) -> list[Tensor]:
        """Task ``name``'s attention modules (every stage) and head."""
        if name not in self.heads:
            raise KeyError(f"unknown task {name!r}; tasks are {self.task_names}")
        return unique(list(self.attention[name].parameters()) + list(self.heads[name].parameters()))
