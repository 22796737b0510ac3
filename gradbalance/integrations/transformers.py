"""Hugging Face ``transformers.Trainer`` with gradient balancing.

Recipe: the model's ``forward`` returns a dict holding ``"losses"`` (a dict or list of per-task
scalar losses) and optionally ``"features"`` (the shared representation); train with
:class:`GradBalanceTrainer` instead of ``Trainer``::

    trainer = GradBalanceTrainer(model=model, args=args, train_dataset=ds,
                                 gradbalance_method="mgda", shared_params=model.encoder)
    trainer.train()

The trainer wraps the optimizer that ``Trainer`` builds from ``args`` in a
:class:`~gradbalance.GradBalance` and overrides ``training_step`` to call its ``backward``.
Everything else stays ``Trainer``'s: the LR schedule, ``max_grad_norm`` clipping, and gradient
accumulation (the losses are divided by the size of the current accumulation window, as ``Trainer``
does: ``gradient_accumulation_steps``, or fewer for the last window of an epoch that does not divide
evenly; the ``GradBalance`` window makes the accumulated update exact). ``trainer.gradbalance_info``
holds the last :class:`~gradbalance.StepInfo`. fp16 training through ``Trainer``'s own scaler is
not wired (bf16 autocast works, as it needs no scaler).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from gradbalance.info import StepInfo
from gradbalance.integrations.lightning import find_gradbalance
from gradbalance.optim import GradBalance

__all__ = ["GradBalanceTrainer"]


class GradBalanceTrainer(Trainer):
    """A ``transformers.Trainer`` whose training step balances the model's task losses.

    Args:
        *args: passed to ``Trainer``.
        gradbalance_method: method name or object for :class:`~gradbalance.GradBalance`.
        shared_params: shared parameters (tensors or a module); ``None`` infers them.
        gradbalance_kwargs: further keyword arguments for :class:`~gradbalance.GradBalance`.
        **kwargs: passed to ``Trainer``.
    """

    def __init__(
        self,
        *args: Any,
        gradbalance_method: Any = "mean",
        shared_params: Any = None,
        gradbalance_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.gradbalance_method = gradbalance_method
        self.gradbalance_shared = shared_params
        self.gradbalance_kwargs = dict(gradbalance_kwargs or {})
        self.gradbalance_info: StepInfo | None = None

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(*args, **kwargs)
        if not isinstance(self.optimizer, GradBalance):
            self.optimizer = GradBalance(
                optimizer, self.gradbalance_method, self.gradbalance_shared, **self.gradbalance_kwargs
            )
        return self.optimizer

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any,
                      **kwargs: Any) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        outputs = model(**inputs)
        if not isinstance(outputs, dict) or "losses" not in outputs:
            raise TypeError(
                "GradBalanceTrainer needs model(**inputs) to return a dict with 'losses' "
                "(per-task scalar losses) and optionally 'features'"
            )
        losses = outputs["losses"]
        # Trainer's own rule: the current window's size (the last window of an epoch may be shorter
        # than gradient_accumulation_steps); transformers < 4.46 has only the configured size.
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        if steps > 1:
            losses = (
                {k: None if v is None else v / steps for k, v in losses.items()}
                if isinstance(losses, dict)
                else [v / steps for v in losses]
            )
        self.gradbalance_info = find_gradbalance(self.optimizer).backward(
            losses, features=outputs.get("features")
        )
        values = losses.values() if isinstance(losses, dict) else losses
        return torch.stack([v.detach() for v in values if v is not None]).sum()
