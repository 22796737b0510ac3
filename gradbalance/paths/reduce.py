"""The reducer interface: what a step path asks of multi-process training, and its local no-op.

Every path calls the same reducer methods whether or not training is distributed; in a single
process :class:`Local` returns its inputs unchanged, so no path branches on "distributed or
not". The distributed reducers (one per ``distributed=`` strategy) live in
:mod:`gradbalance.distributed`, the only module that calls ``torch.distributed``.

Which method runs where (``R`` ranks; every call is a no-op in :class:`Local`):

==========================  ==========================  =============================================
method                      path                        distributed effect
==========================  ==========================  =============================================
``open_call``               every call, first           reset the byte counter; arm the call
                                                        checkpoint (one 32-byte all-gather run by the
                                                        call's first collective: same tasks/call/step
                                                        on every rank, or every rank raises)
``begin``                   every call, after checks    first call: the checkpoint also compares state
``expect_method``           before the method           arm the method checkpoint (24 bytes: no rank
                                                        raised, same weights everywhere)
``method_done``             after the method            the weights the checkpoint compares
``flush``                   fsdp start, end of a call   run the armed checkpoint now
``fail``                    a rank raised               join the armed checkpoint with the error
``check_call``              every call, before all      ``Local``: NaN/inf losses raise here
``check_total``             after the losses' reduce    distributed: NaN/inf losses raise here
``mean``                    losses / reused             average the ``k`` losses
``mean_present``            losses / reused / subsets   average the written gradients (one buffer)
``feature_gram``            representation              sum of local Grams ``/ R^2`` with the losses
``mean_rows``               subset                      average ``[G_subset | losses]``
``share_task_grads``        exact                       allreduce: average ``[G | losses]``;
                                                        reduce_scatter: keep ``P/R`` columns
``exact_gram``              exact                       reduce_scatter / local_gram: sum the Grams
``check_direction``         exact                       a direction needs the full ``G``
``gather_direction``        exact                       reduce_scatter: all-gather the columns
``finish``                  exact                       average the heads (local_gram: everything)
``extras``                  every call                  ``{"distributed": ..., "comm_bytes": ...}``
==========================  ==========================  =============================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from gradbalance.inputs import check_finite_losses

__all__ = ["Local", "Reducer"]


class Reducer:
    """Base class: the single-process behaviour (every method is the identity)."""

    #: ``True`` for the multi-process reducers.
    distributed: bool = False
    #: ``True`` when the optimizer holds FSDP2 (``DTensor``) parameters.
    fsdp: bool = False

    def open_call(self, fingerprint: Sequence[int], device: Any) -> None:
        """Start a call. Distributed: reset the byte count and arm the call checkpoint (every rank
        makes the same call, or every rank raises :class:`~gradbalance.RankMismatchError`), which the
        call's first collective runs (single process: nothing to agree on)."""

    def begin(self, names: Sequence[str], method: Any, step: int, params: Sequence[Tensor]) -> None:
        """The call's tasks are known (distributed, first call: the call checkpoint also checks that
        the ranks agree on tasks, method state, step and parameters)."""

    def expect_method(self) -> None:
        """Before the method runs. Distributed: arm the method checkpoint (it raised on no rank and
        returned the same weights on every rank), which the next collective runs."""

    def method_done(self, aggregation: Any) -> None:
        """The method returned ``aggregation`` on this rank (distributed: compared at the checkpoint)."""

    def flush(self) -> None:
        """Distributed: run the armed checkpoint now (before collectives that are not ours, such as
        FSDP's, and at the end of a call)."""

    def fail(self, error: BaseException) -> None:
        """This rank raised ``error``. Distributed: join the armed checkpoint with it, so that every
        rank raises together instead of the others waiting for this one in a collective."""

    def check_call(self, names: Sequence[str], call: Tensor) -> None:
        """Single process: raise on NaN/inf losses at once (distributed: after the average, so
        that every rank raises the same error)."""
        check_finite_losses(names, call)

    def check_total(self, names: Sequence[str], total: Tensor) -> None:
        """Distributed: raise on NaN/inf in the rank-averaged window losses."""

    def mean(self, call: Tensor) -> Tensor:
        return call

    def mean_present(self, grads: list[Tensor | None], params: Sequence[Tensor]) -> list[Tensor | None]:
        return grads

    def feature_gram(self, grads: Tensor, call: Tensor, method: Any) -> tuple[Tensor, Tensor]:
        """Representation mode: ``(Gram of dL/dz over the global batch, mean losses)``."""
        return (grads @ grads.T).double(), call

    def mean_rows(self, grads: Tensor, call: Tensor) -> tuple[Tensor, Tensor]:
        """Subset mode: the rank-average of ``(task gradients on the subset, losses)``."""
        return grads, call

    def share_task_grads(self, grads: Tensor, call: Tensor) -> tuple[Tensor, Tensor]:
        """Exact path, before the window sum: what this rank keeps of the task gradients."""
        return grads, call

    def exact_gram(self, grads: Tensor, call: Tensor) -> tuple[Tensor, Tensor]:
        """Exact path: ``(the Gram the method sees, mean losses)`` from the kept gradients."""
        return (grads @ grads.T).double(), call

    def check_direction(self, method_name: str) -> None:
        """A method returned a direction: it needs the full task gradients on this rank."""

    def gather_direction(self, direction: Tensor, width: int) -> Tensor:
        return direction

    def finish(
        self, new: list[Tensor | None], head_out: list[Tensor | None], shared: Sequence[Tensor],
        heads: Sequence[Tensor],
    ) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """Exact path: the combined shared and head gradients as every rank must write them."""
        return new, head_out

    def extras(self) -> dict[str, Any]:
        """Diagnostics for ``StepInfo.extras``."""
        return {}


class Local(Reducer):
    """Single-process training: nothing to reduce."""
