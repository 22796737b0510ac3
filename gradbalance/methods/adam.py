"""One Adam update for the methods that learn their own small parameter vector.

FAMO's logits, GradNorm's task weights, uncertainty weighting's ``log sigma^2`` and IMTL-L's
loss scales are stepped by Adam inside the method (so they are owned, stepped and checkpointed
by gradbalance, never by the user's optimizer). They all use :func:`adam_update`; the one
thing that differs between them is the order of the operations around eps, and each method
states its own:

``"torch"``: ``torch.optim.Adam``'s order,
    ``p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``. Used where the official
    code steps the parameter with ``torch.optim.Adam`` (FAMO: ``famo.py`` line 20 of
    Cranial-XIX/FAMO).

``"kingma"``: Algorithm 1 of the Adam paper written literally,
    ``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 - b2^t)``, ``p - lr * m_hat / (sqrt(v_hat) + eps)``.
    Used by the methods without an official PyTorch optimizer for their parameters (GradNorm,
    uncertainty weighting, IMTL-L).

In exact arithmetic the two are the same update (eps is added to the bias-corrected
``sqrt(v_hat)`` in both); they differ by rounding only, a few units in the last place. Both
are kept so that every method stays bit-identical to its reference (and to its checkpoints).
TensorFlow/Keras's "eps-hat" form, ``lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``,
which adds ``eps / sqrt(1 - b2^t)`` instead, is a different update and is used by none of them.

Weight decay is L2 (added to the gradient before the moments), as ``torch.optim.Adam``'s
``weight_decay``; FAMO's ``gamma`` is this decay.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor

__all__ = ["ADAM_BETAS", "ADAM_EPS", "EPS_PLACEMENTS", "adam_update"]

ADAM_BETAS: tuple[float, float] = (0.9, 0.999)  # torch.optim.Adam's defaults
ADAM_EPS = 1e-8
EPS_PLACEMENTS = ("torch", "kingma")
EpsPlacement = Literal["torch", "kingma"]


def adam_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int | Tensor,
    *,
    lr: float,
    eps_placement: EpsPlacement,
    weight_decay: float | None = None,
    betas: tuple[float, float] = ADAM_BETAS,
    eps: float = ADAM_EPS,
) -> tuple[Tensor, Tensor, Tensor]:
    """One Adam step, out of place: ``(new_param, new_exp_avg, new_exp_avg_sq)``.

    Args:
        param: the current parameter.
        grad: its gradient.
        exp_avg: the first moment before this step (zeros at first).
        exp_avg_sq: the second moment before this step (zeros at first).
        step: this step's number, counting from 1 (an int, or a tensor of per-entry counts for
            methods whose tasks join at different steps).
        lr: the learning rate.
        eps_placement: ``"torch"`` or ``"kingma"`` (module docstring).
        weight_decay: L2 coefficient added to the gradient (``None``: none; ``0.0`` adds
            ``0 * param``, which is the same gradient).
        betas: the moments' decay rates.
        eps: the denominator's offset.

    Returns:
        The updated parameter and moments (new tensors; the inputs are not modified).

    Raises:
        ValueError: an unknown ``eps_placement``.

    Example:
        >>> import torch
        >>> p, m, v = adam_update(torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64),
        ...                       torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), 1,
        ...                       lr=0.1, eps_placement="torch")
        >>> round(float(p), 6)  # the first Adam step moves by about lr against the gradient's sign
        -0.1
    """
    if eps_placement not in EPS_PLACEMENTS:
        raise ValueError(f"eps_placement must be one of {EPS_PLACEMENTS}, got {eps_placement!r}")
    if weight_decay is not None:
        grad = grad + weight_decay * param
    b1, b2 = betas
    m = b1 * exp_avg + (1 - b1) * grad
    v = b2 * exp_avg_sq + (1 - b2) * grad * grad
    if eps_placement == "torch":
        if isinstance(step, Tensor):
            denom = v.sqrt() / (1 - b2**step).sqrt() + eps
        else:
            denom = v.sqrt() / math.sqrt(1 - b2**step) + eps
        new = param - (lr / (1 - b1**step)) * m / denom
    else:
        m_hat, v_hat = m / (1 - b1**step), v / (1 - b2**step)
        new = param - lr * m_hat / (v_hat.sqrt() + eps)
    return new, m, v
