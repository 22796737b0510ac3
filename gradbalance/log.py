"""Send :class:`~gradbalance.StepInfo` to TensorBoard or any ``log(dict, step)`` callable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradbalance.info import StepInfo

__all__ = ["log_info"]


def log_info(
    info: StepInfo,
    sink: Any | Callable[[dict[str, float], int], Any],
    step: int,
    *,
    prefix: str = "gradbalance/",
) -> dict[str, float]:
    """Write the scalars of ``info.to_dict()`` to ``sink`` and return them.

    Args:
        info: the :class:`~gradbalance.StepInfo` of a step (e.g. ``opt.last_info``).
        sink: a ``torch.utils.tensorboard.SummaryWriter`` (anything with ``add_scalar``), or a
            callable ``log(metrics: dict, step: int)`` such as ``wandb.log``-style wrappers or
            Lightning's ``self.log_dict`` adapted to take a step.
        step: the global step to log at.
        prefix: prepended to every key (``"gradbalance/weight/depth"``, ...).

    Returns:
        The numeric metrics that were written (the string ``engine`` is left out of scalar
        sinks; read it from ``info.engine``).

    Example:
        >>> import torch
        >>> from gradbalance import StepInfo
        >>> from gradbalance.log import log_info
        >>> info = StepInfo(weights=torch.tensor([0.5, 0.5]), losses=torch.tensor([1.0, 2.0]),
        ...                 grad_norms=None, cosine=None, engine="loop", task_names=("a", "b"))
        >>> seen = {}
        >>> _ = log_info(info, lambda metrics, step: seen.update(metrics), step=0)
        >>> seen["gradbalance/weight/b"]
        0.5
    """
    metrics = {
        f"{prefix}{key}": float(value)
        for key, value in info.to_dict().items()
        if not isinstance(value, str)
    }
    add_scalar = getattr(sink, "add_scalar", None)
    if callable(add_scalar):
        for key, value in metrics.items():
            add_scalar(key, value, step)
    elif callable(sink):
        sink(metrics, step)
    else:
        raise TypeError(
            f"sink must have add_scalar (a SummaryWriter) or be a callable log(dict, step), "
            f"got {type(sink).__name__}"
        )
    return metrics
