"""The exceptions gradbalance raises on purpose (besides plain ``TypeError`` / ``ValueError``).

Both are subclasses of :class:`ValueError`, so ``except ValueError`` keeps catching them.
"""

from __future__ import annotations

__all__ = ["NonFiniteError", "RankMismatchError"]


class NonFiniteError(ValueError):
    """A task gradient (or the combined gradient) contains NaN or inf.

    Without a ``GradScaler`` this is an error and nothing is changed: lower the learning rate,
    check the inputs and the loss functions (``sqrt``/``log`` at 0, division by zero), or clip
    the losses. With ``scaler=`` it is an overflow instead: the step is skipped as plain AMP
    skips it, and :class:`~gradbalance.StepInfo` reports ``engine == "skipped"``.

    Example:
        >>> import torch, gradbalance as gb
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> losses = [w.sum() + torch.sqrt(w.abs()).sum(), w.sum()]  # d sqrt(|w|)/dw is inf at 0
        >>> try:
        ...     gb.backward(losses, [w], method="mgda")
        ... except gb.NonFiniteError as err:
        ...     print("NaN or inf" in str(err))
        True
    """


class RankMismatchError(ValueError):
    """Under ``torch.distributed`` the ranks disagree about a call (its tasks, the call within the
    accumulation window, the method's step; at the first step also the method's state and the
    parameters), a rank could not prepare it, or the balancing method raised on some ranks only
    or returned different weights on them.

    Raised on every rank at once, with the same message, from the same collective, so that no
    rank hangs in a collective the others never join and the ranks never take different steps.
    Nothing is changed; the next call can go on.

    Example:
        >>> import gradbalance as gb
        >>> issubclass(gb.RankMismatchError, ValueError)
        True
    """
