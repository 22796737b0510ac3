"""The options shared by :class:`~gradbalance.GradBalance`, :func:`gradbalance.backward` and the
:class:`~gradbalance.balancer.Balancer` behind both: one definition, one validation.

The public constructors keep their keyword arguments (that is what users type and what IDEs
show); each builds one :class:`Options` from them, which validates every value once, before
anything is built. Bad types raise :class:`TypeError`, bad values :class:`ValueError`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gradbalance import distributed as distributed_mod

__all__ = ["ACCUMULATIONS", "ENGINES", "OptionTypeError", "Options"]

ENGINES = ("auto", "loop", "batched", "gram")
ACCUMULATIONS = ("exact", "combine", "buffered")

TaskWeights = Sequence[float] | Mapping[str, float]


class OptionTypeError(TypeError, ValueError):
    """An option of the wrong type: a :class:`TypeError`, and also a :class:`ValueError` because
    these were raised as ``ValueError`` before (``except ValueError`` keeps working)."""


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        raise OptionTypeError(f"{name} must be a string, one of {valid}; got {type(value).__name__}")
    if value not in valid:
        raise ValueError(f"{name} must be one of {valid}, got {value!r}")


def _check_weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise OptionTypeError(f"task_weights[{name!r}] must be a number, got {type(value).__name__}")
    weight = float(value)
    if not math.isfinite(weight) or weight <= 0.0:
        raise ValueError(
            f"task_weights[{name!r}] = {weight!r}: a static task weight must be a finite number > 0 "
            "(leave a task out of the losses to drop it)"
        )
    return weight


def normalize_task_weights(task_weights: Any) -> tuple[float, ...] | dict[str, float] | None:
    """Validate ``task_weights`` once: a sequence of numbers or a ``{name: number}`` mapping,
    every weight finite and > 0. Returns an immutable copy."""
    if task_weights is None:
        return None
    if isinstance(task_weights, Mapping):
        out: dict[str, float] = {}
        for key, value in task_weights.items():
            if not isinstance(key, str):
                raise OptionTypeError(f"task_weights keys must be task names (str), got {type(key).__name__}")
            out[key] = _check_weight(key, value)
        return out
    if isinstance(task_weights, (str, bytes)) or not isinstance(task_weights, Sequence):
        raise OptionTypeError(
            "task_weights must be a sequence of numbers or a dict {task name: weight}, "
            f"got {type(task_weights).__name__}"
        )
    return tuple(_check_weight(str(i), w) for i, w in enumerate(task_weights))


@dataclass(frozen=True)
class Options:
    """How a balancer runs (every field is a keyword argument of :class:`~gradbalance.GradBalance`).

    Attributes:
        engine: ``"auto"``, ``"loop"``, ``"batched"`` or ``"gram"``: how per-task gradients (or,
            for ``"gram"``, only their Gram matrix) are computed.
        chunk_size: at most this many tasks per batched call; ``"auto"``: sized from the free
            memory; ``None``: all at once (``"auto"`` when ``engine="auto"`` picks batched).
        task_weights: static weights multiplied into the losses before the method sees them:
            k positive numbers, or ``{task name: weight}`` (missing names: 1).
        accumulation: ``"exact"``, ``"buffered"`` or ``"combine"`` (the accumulation guide).
        recompute_every: recompute the weights of a method that needs per-task gradients every
            this many optimizer steps and reuse them in between at the cost of one ordinary
            backward (``1``: every step). Not the same as Nash-MTL's own ``update_every``, which
            still computes the Gram matrix on every step and only skips its solver.
        distributed: ``"auto"``, ``"off"``, ``"allreduce"``, ``"reduce_scatter"`` or
            ``"local_gram"`` (:mod:`gradbalance.distributed`).
        process_group: the ``torch.distributed`` group to average over (``None``: the default).

    Raises:
        TypeError: a value of the wrong type (:class:`OptionTypeError`, also a ``ValueError``
            for code written when these were ``ValueError``).
        ValueError: a value out of range (the message names the valid ones).

    Example:
        >>> from gradbalance.options import Options
        >>> Options(engine="loop", recompute_every=5).recompute_every
        5
    """

    engine: str = "auto"
    chunk_size: int | str | None = None
    task_weights: Any = None
    accumulation: str = "exact"
    recompute_every: int = 1
    distributed: str = "auto"
    process_group: Any = None

    def __post_init__(self) -> None:
        _choice("engine", self.engine, ENGINES)
        if self.chunk_size is not None and not (isinstance(self.chunk_size, str) and self.chunk_size == "auto"):
            if isinstance(self.chunk_size, str):
                raise ValueError(f"chunk_size must be a positive int, 'auto' or None, got {self.chunk_size!r}")
            _positive_int("chunk_size", self.chunk_size)
        _choice("accumulation", self.accumulation, ACCUMULATIONS)
        _positive_int("recompute_every", self.recompute_every)
        _choice("distributed", self.distributed, distributed_mod.STRATEGIES)
        object.__setattr__(self, "task_weights", normalize_task_weights(self.task_weights))

    @property
    def keeps_window(self) -> bool:
        """Whether the backward calls between two steps are combined on the window's totals."""
        return self.accumulation in ("exact", "buffered")

    @classmethod
    def build(cls, update_every: int | None = None, **kwargs: Any) -> Options:
        """``Options(**kwargs)``, accepting the old name ``update_every`` of ``recompute_every``."""
        if update_every is not None:
            if kwargs.get("recompute_every", 1) != 1:
                raise TypeError("pass recompute_every or its old name update_every, not both")
            warnings.warn(
                "GradBalance(update_every=...) is now called recompute_every= (it recomputes the "
                "weights every n steps; Nash-MTL's own update_every only skips its solver)",
                DeprecationWarning, stacklevel=3,
            )
            kwargs["recompute_every"] = update_every
        return cls(**kwargs)
