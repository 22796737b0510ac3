"""The accumulation window: what the ``backward`` calls between two optimizer steps have added up.

A :class:`Window` is immutable in practice: a step path reads the window it was given and returns
the next one (:meth:`Window.extended`); the balancer stores it only when the whole call succeeded,
so a call that raises leaves the window as it was.

With ``accumulation="combine"`` the paths are given :meth:`Window.empty` every call (nothing is
carried), and the stored window only remembers the pending method state for ``commit``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from gradbalance.methods.base import Aggregation

__all__ = ["Window", "merge_head_grads", "weights_changed_warning"]

HeadGrads = list[list[Tensor | None]]


def merge_head_grads(a: HeadGrads, b: HeadGrads | None) -> HeadGrads:
    """Per task and head parameter, ``a + b`` where both exist, else whichever exists."""
    if b is None:
        return a
    return [
        [x if y is None else (y if x is None else x + y) for x, y in zip(ra, rb)]
        for ra, rb in zip(a, b)
    ]


@dataclass(frozen=True)
class Window:
    """Totals of the current accumulation window.

    Attributes:
        names: the task names every call of the window passes.
        losses: ``(k,)`` float64 losses summed over the window's calls (``None`` before the first).
        grads: ``(k, n)`` task gradients summed over the window: on all shared parameters (exact
            and buffered paths; under ``reduce_scatter`` this rank's columns) or on a method's
            ``shared_subset`` (subset path).
        gram: representation mode: the window's summed Gram matrix of the feature gradients.
        heads: ``heads[i][j]``: task ``i``'s summed gradient on task-specific parameter ``j``.
        written: what the window has added to each parameter's ``.grad`` (exact paths rewrite it).
        last_weights: the weights of the previous call (the "weights changed" check).
        calls: number of successful calls in the window.
        aggregation: the last call's :class:`~gradbalance.methods.Aggregation`.
        commit: whether ``aggregation.pending`` is applied at the optimizer step (``False`` on
            reused weights).
    """

    names: tuple[str, ...]
    losses: Tensor | None = None
    grads: Tensor | None = None
    gram: Tensor | None = None
    heads: HeadGrads | None = None
    written: list[Tensor | None] | None = None
    last_weights: Tensor | None = None
    calls: int = 0
    aggregation: Aggregation | None = None
    commit: bool = False

    @classmethod
    def empty(cls, names: tuple[str, ...]) -> Window:
        return cls(names=names)

    # ------------------------------------------------------------------ reading
    @property
    def pending(self) -> Any:
        """The method state the optimizer step will commit (the last call's ``pending``)."""
        return None if self.aggregation is None else self.aggregation.pending

    def total(self, call: Tensor) -> Tensor:
        """The window's losses after a call whose (rank-averaged) losses are ``call``."""
        return call if self.losses is None else call + self.losses

    def add_grads(self, grads: Tensor) -> Tensor:
        """This call's task gradients plus the window's (same coordinates every call)."""
        return grads if self.grads is None else grads + self.grads

    def add_gram(self, gram: Tensor) -> Tensor:
        """Representation mode: the micro-batches' features are different rows of the
        concatenated batch's ``z``, so the window's Gram matrix is the sum of theirs."""
        return gram if self.gram is None else gram + self.gram

    def add_heads(self, heads: HeadGrads) -> HeadGrads:
        return merge_head_grads(heads, self.heads)

    def weights_changed(self, weights: Tensor) -> bool:
        """Whether ``weights`` differ from the previous call's in this window."""
        last = self.last_weights
        if self.losses is None or last is None:
            return False
        return not (last.shape == weights.shape and torch.equal(last, weights.detach().to(last.device)))

    # ------------------------------------------------------------------ the next window
    def extended(
        self,
        losses: Tensor,
        aggregation: Aggregation,
        *,
        commit: bool = True,
        grads: Tensor | None = None,
        gram: Tensor | None = None,
        heads: HeadGrads | None = None,
        written: list[Tensor | None] | None = None,
    ) -> Window:
        """The window after one more call (totals replaced by the call's new totals)."""
        weights = aggregation.weights
        return replace(
            self,
            losses=losses,
            grads=grads,
            gram=gram,
            heads=heads,
            written=written,
            last_weights=None if weights is None else weights.detach(),
            calls=self.calls + 1,
            aggregation=aggregation,
            commit=commit,
        )

    def continued(self, after: Window, keep_totals: bool) -> Window:
        """Store ``after`` (the window a path returned) as the continuation of ``self``:
        with ``accumulation="combine"`` the totals are not kept, only the call count and the
        pending state."""
        if keep_totals:
            return after
        return replace(self, losses=after.losses, calls=self.calls + 1, aggregation=after.aggregation,
                       commit=after.commit, last_weights=after.last_weights)


def weights_changed_warning(method_name: str) -> None:
    """Said once per balancer, when a window's calls got different weights (see the guide)."""
    warnings.warn(
        f"accumulation='exact': {method_name}'s weights changed within the "
        "accumulation window (they depend on the current losses or on this micro-batch's "
        "representation gradients), so the window is not exactly one big batch: each "
        "micro-batch is weighted from the window's totals so far. Pass "
        "accumulation='buffered' for an exact window (the k per-task gradients of every "
        "parameter, computed and kept on every step) or accumulation='combine' to choose "
        "the per-micro-batch combination explicitly. See the accumulation guide.",
        UserWarning, stacklevel=6,
    )

