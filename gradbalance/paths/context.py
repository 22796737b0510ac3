"""What every step path is given (:class:`StepContext`) and returns (:class:`StepResult`), and the
one place where a ``GradScaler``'s scale is applied and removed (:class:`Scaling`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gradbalance import distributed as distributed_mod
from gradbalance.info import StepInfo, gram_diagnostics
from gradbalance.methods.base import Aggregation, Method, TaskInputs
from gradbalance.paths.grads import GradWrite
from gradbalance.paths.reduce import Reducer
from gradbalance.paths.window import Window

__all__ = ["Scaling", "StepContext", "StepResult"]


class Scaling:
    """A ``torch.amp.GradScaler`` seen from a balancing step, or no scaling at all.

    The losses are scaled for the backward passes (each on its own: a stacked tensor would route
    every task's backward through every other task's graph); the task gradients are unscaled
    (:meth:`unscale`) before the method sees them, and what is written to ``.grad`` is scaled
    back (:meth:`rescale`) because ``scaler.step`` unscales ``.grad`` itself. Without a scaler,
    or at scale 1, both return their argument unchanged (no copy).
    """

    def __init__(self, scaler: Any = None) -> None:
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.factor = 1.0

    @property
    def active(self) -> bool:
        return self.scaler is not None

    def scale_losses(self, values: list[Tensor]) -> list[Tensor]:
        """The losses to differentiate (``scaler.scale`` also initialises the scaler's state)."""
        if self.scaler is None:
            return values
        scaled = [self.scaler.scale(v) for v in values]
        self.factor = float(self.scaler.get_scale())
        return scaled

    def unscale(self, t: Tensor) -> Tensor:
        return t if self.factor == 1.0 else t / self.factor

    def unscale_gram(self, gram: Tensor) -> Tensor:
        """The Gram matrix of the unscaled gradients (the scaled ones' divided by the scale squared)."""
        return gram if self.factor == 1.0 else gram / self.factor**2

    def unscale_rows(self, rows: list[list[Tensor | None]]) -> list[list[Tensor | None]]:
        if self.factor == 1.0:
            return rows
        return [[None if g is None else g / self.factor for g in row] for row in rows]

    def rescale(self, grads: list[Tensor | None]) -> list[Tensor | None]:
        if self.factor == 1.0:
            return grads
        return [None if g is None else g * self.factor for g in grads]

    @staticmethod
    def poison(target: Tensor) -> None:
        """An overflow under the scaler: one ``inf`` in ``target.grad`` makes ``scaler.step()``
        skip the optimizer step (and with it the method's commit), and ``scaler.update()``
        lower the scale, exactly as for a plain optimizer."""
        if target.grad is None:
            target.grad = torch.zeros_like(target)
        flat = distributed_mod.local(target.grad).view(-1)  # an FSDP shard may be empty
        if flat.numel():
            flat[0] = float("inf")


@dataclass
class StepContext:
    """Everything one call of a step path reads (the paths never read the balancer).

    Attributes:
        method: the balancing method (its ``aggregate`` is pure; state is committed later).
        names: the present tasks' names.
        values: their losses (scaled when a ``GradScaler`` is active), still with their graph.
        params: every trainable parameter of the optimizer.
        shared: the shared parameters (explicit, or inferred for this call), or ``None``.
        call: ``(k,)`` float64 detached losses of this call, unscaled.
        window: the accumulation window so far (:meth:`Window.empty` when nothing is carried).
        step: optimizer steps committed so far.
        scaling: the GradScaler's view.
        reducer: the multi-process reducer (:class:`~gradbalance.paths.reduce.Local`: no-op).
        features: the shared representation ``z``, or ``None``.
        engine: the engine to use for task gradients (``"loop"``/``"batched"``; resolved).
        chunk_size: tasks per batched call.
        walk_is_blind: an earlier successful call found that the graph walk cannot see the
            shared parameters of these tasks (compiled graphs) and confirmed their reach by
            ``autograd.grad``; the reach check then trusts them.
        lonely_shared: first call only: the given shared parameters that one task alone reaches
            (the balancer warns; no path reads it).
        gram_off: ``engine="gram"`` cannot continue this exact window: the balancer switches
            the Gram engine off for good if the call succeeds, and warns (no path reads it).
    """

    method: Method
    names: tuple[str, ...]
    values: list[Tensor]
    params: list[Tensor]
    shared: list[Tensor] | None
    call: Tensor
    window: Window
    step: int
    scaling: Scaling
    reducer: Reducer
    features: Tensor | None = None
    engine: str = "loop"
    chunk_size: int | str | None = None
    walk_is_blind: bool = False
    lonely_shared: list[Tensor] = field(default_factory=list)
    gram_off: bool = False

    @property
    def label(self) -> str:
        return type(self.method).__name__

    def heads(self, shared: Sequence[Tensor]) -> list[Tensor]:
        """The task-specific parameters: every parameter not in ``shared``."""
        ids = {id(p) for p in shared}
        return [p for p in self.params if id(p) not in ids]

    def total(self, call: Tensor) -> Tensor:
        """The window's losses after this call (``call`` already averaged across ranks)."""
        total = self.window.total(call)
        self.reducer.check_total(self.names, total)
        return total

    def aggregate(self, losses: Tensor, gram: Tensor | None = None, grads: Tensor | None = None) -> Aggregation:
        """Run the method (``grads`` only reaches it when it ``requires="grads"``)."""
        inputs = TaskInputs(losses=losses, gram=gram, grads=grads if self.method.requires == "grads" else None,
                            task_names=self.names, step=self.step)
        # distributed: a method that raises, or returns other weights, on one rank only is caught
        # at the method checkpoint, which every rank joins (see gradbalance.distributed.Sync)
        self.reducer.expect_method()
        agg = self.method.aggregate(inputs)
        if agg.weights is None and agg.direction is None:
            raise RuntimeError(f"{self.label} returned neither weights nor direction")
        self.reducer.method_done(agg)
        return agg


@dataclass
class StepResult:
    """What a path computed; the balancer commits it (writes, window, flags) only if no error
    was raised anywhere in the call.

    Attributes:
        aggregation: the method's answer.
        losses: ``(k,)`` the window's loss totals the method saw.
        engine: ``StepInfo.engine``.
        write: the ``.grad`` change.
        window: the window after this call.
        gram: the Gram matrix the method saw (diagnostics), or ``None``.
        walk_is_blind: this call needed ``autograd.grad`` to confirm the losses' reach.
        gram_failed: why the Gram engine raised (this call took the exact path; the balancer
            switches the Gram engine off for good if the call succeeds), or ``""``.
        batched_failed: why the batched engine raised (this call reran with the loop; the
            balancer switches to the loop for good if the call succeeds), or ``""``.
        weights_changed: a path that writes each call with its own weights saw them change
            within the window (the balancer warns once).
        extras: added to ``StepInfo.extras``.
    """

    aggregation: Aggregation
    losses: Tensor
    engine: str
    write: GradWrite
    window: Window
    gram: Tensor | None = None
    walk_is_blind: bool = False
    batched_failed: str = ""
    gram_failed: str = ""
    weights_changed: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    def info(self, names: tuple[str, ...], reducer: Reducer, shared_known: bool) -> StepInfo:
        norms = cosine = None
        if self.gram is not None:
            norms, cosine = gram_diagnostics(self.gram)
        agg = self.aggregation
        weights = agg.weights.detach() if agg.weights is not None else None
        # what the heads got (StepInfo.head_weights): the method's own head weights where the
        # heads are known, ones for a direction-only method, None when they got `weights`
        head_weights = None
        if agg.head_weights is not None and shared_known:
            head_weights = agg.head_weights.detach()
        elif weights is None:
            head_weights = torch.ones(len(names), dtype=torch.float64, device=self.losses.device)
        extras = dict(agg.extras)
        extras.update(self.extras)
        extras.update(reducer.extras())
        return StepInfo(
            weights=weights,
            losses=self.losses.detach(),
            grad_norms=norms,
            cosine=cosine,
            engine=self.engine,
            task_names=names,
            extras=extras,
            head_weights=head_weights,
        )

