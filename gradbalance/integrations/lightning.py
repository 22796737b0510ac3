"""PyTorch Lightning: balance task losses inside ``training_step`` with manual optimisation.

Lightning's automatic optimisation calls ``loss.backward()`` on one loss, which is exactly what
gradient balancing must replace, so a ``LightningModule`` that uses gradbalance sets
``self.automatic_optimization = False`` and, in ``training_step``::

    opt = self.optimizers()                      # Lightning's wrapper around the GradBalance
    opt.zero_grad()
    info = balance_backward(self, [loss_a, loss_b], features=z)
    self.clip_gradients(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    opt.step()

:func:`balance_backward` finds the ``GradBalance`` behind ``self.optimizers()`` and passes it
the precision plugin's ``GradScaler`` (``precision="16-mixed"``), so losses are scaled for the
backward passes and the task gradients unscaled before the method sees them; ``opt.step()``
then goes through Lightning's precision plugin (``scaler.step``/``update``) as usual, and
``self.clip_gradients`` unscales before clipping. For gradient accumulation, call ``opt.step()``
and ``opt.zero_grad()`` every ``n`` batches only: the ``GradBalance`` window makes the
accumulated update exact.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from gradbalance.info import StepInfo
from gradbalance.inputs import Losses
from gradbalance.optim import GradBalance

__all__ = ["balance_backward", "find_gradbalance"]


def find_gradbalance(optimizer: Any) -> GradBalance:
    """The :class:`~gradbalance.GradBalance` inside a ``LightningOptimizer`` (or itself)."""
    seen = 0
    while not isinstance(optimizer, GradBalance):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or seen > 4:
            raise TypeError(
                f"no GradBalance found behind {type(optimizer).__name__}; return "
                "gb.GradBalance(...) from configure_optimizers"
            )
        optimizer, seen = inner, seen + 1
    return optimizer


def balance_backward(
    module: Any,
    losses: Losses,
    *,
    features: Tensor | None = None,
    optimizer: Any = None,
) -> StepInfo:
    """``GradBalance.backward`` for a ``LightningModule`` under manual optimisation.

    Args:
        module: the ``LightningModule`` (``automatic_optimization = False``).
        losses: per-task losses (list or dict).
        features: the shared representation, as for :meth:`GradBalance.backward`.
        optimizer: which optimizer (default: ``module.optimizers()``, which must be one).

    Returns:
        The :class:`~gradbalance.StepInfo` of the step.

    Raises:
        RuntimeError: the module uses automatic optimisation.
        TypeError: no ``GradBalance`` behind the optimizer.
    """
    if getattr(module, "automatic_optimization", True):
        raise RuntimeError(
            "set self.automatic_optimization = False in the LightningModule: gradbalance "
            "replaces loss.backward(), which automatic optimisation calls itself"
        )
    opt = find_gradbalance(optimizer if optimizer is not None else module.optimizers())
    scaler = getattr(getattr(module.trainer, "precision_plugin", None), "scaler", None)
    return opt.backward(losses, features=features, scaler=scaler)
