"""The contract every balancing method follows, and the registry of method names.

A method never calls ``backward()`` and never touches a model: it maps what the engine measured
(per-task losses and, when it asks for them, per-task gradients or their Gram matrix) to an
:class:`Aggregation`, and can be tested on plain tensors.

Methods are *pure within a step*: :meth:`Method.aggregate` must not change the method's state.
Any change (a learned weight's update, a loss history, a random generator's advance) is returned
as ``Aggregation.pending`` and applied by :meth:`Method.commit` when the wrapped optimizer really
steps. This is what lets exact-mode gradient accumulation re-run the method on the accumulated
inputs of every micro-batch from the same state, lets ``GradScaler`` skip a step without touching
method state, and leaves everything unchanged when a step raises.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

__all__ = [
    "Aggregation",
    "Method",
    "SeededMethod",
    "TaskInputs",
    "available_methods",
    "make_method",
    "register",
]

Requires = Literal["losses", "gram", "grads"]


@dataclass
class TaskInputs:
    """What the engine hands a method for one step.

    Attributes:
        losses: ``(k,)`` detached loss values after the static ``task_weights``, in float64 on
            the losses' device. With ``accumulation="exact"``, summed over the calls of the
            current accumulation window so far; with ``"combine"``, this call's only.
        gram: ``(k, k)`` Gram matrix ``M = G G^T`` of the task gradients, float64, or ``None`` for
            methods with ``requires = "losses"``.
        grads: ``(k, P)`` task gradients, flattened, for methods with ``requires = "grads"``;
            otherwise ``None``.
        task_names: names of the k tasks, in order.
        step: number of optimizer steps committed so far (0 on the first step).
    """

    losses: Tensor
    gram: Tensor | None = None
    grads: Tensor | None = None
    task_names: tuple[str, ...] = ()
    step: int = 0

    @property
    def num_tasks(self) -> int:
        return int(self.losses.shape[0])


@dataclass
class Aggregation:
    """A method's answer for one step.

    Attributes:
        weights: ``(k,)`` weights of the task gradients on the shared parameters: the update of
            the shared parameters is ``sum_i weights[i] * g_i``. Methods that act coordinate-wise
            (GradDrop, ...) may set ``weights`` to ``None`` and return ``direction`` instead.
        direction: ``(P,)`` explicit update of the shared parameters (flattened, in the order of
            the engine's shared parameters), or ``None``.
        head_weights: ``(k,)`` weights applied to each task's gradient on the task-specific
            parameters. ``None`` means "the same as ``weights``" (for direction-only methods,
            ``None`` means all ones).
        extras: diagnostics copied into :class:`~gradbalance.StepInfo` ``.extras``.
        pending: the state change that :meth:`Method.commit` applies once the step is taken.
        max_norm: ask the engine to clip the norm of the shared parameters' combined gradient
            to this value after weighting (``torch.nn.utils.clip_grad_norm_`` on the shared
            parameters, as the official FAMO code does after its backward), or ``None``. For
            methods that do not see the Gram matrix (``requires="losses"``), whose update norm
            the method cannot compute; a method that sees ``M`` folds a clip into ``weights``
            instead (``n = sqrt(w^T M w)``, weights times ``min(1, max_norm / (n + 1e-6))``).
            Applied on the engine's losses path to each ``backward`` call's contribution
            (the shared parameters: explicit, or inferred as those reached by two or more
            losses; under FSDP they must be explicit). Ignored on the other paths, where the
            method sees ``M`` and must fold the clip into its weights.
    """

    weights: Tensor | None
    direction: Tensor | None = None
    head_weights: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    pending: Any = None
    max_norm: float | None = None


class Method:
    """Base class of balancing methods.

    Subclasses set :attr:`requires` and implement :meth:`aggregate`; stateful ones also
    implement :meth:`commit`, :meth:`state_dict` and :meth:`load_state_dict`.

    Attributes:
        requires: ``"losses"`` (weights from loss values and state only: the step costs one
            ordinary backward), ``"gram"`` (needs only ``M = G G^T``) or ``"grads"`` (needs the
            task gradients themselves).
        mode: ``"exact"`` (gradients on the shared parameters) or ``"representation"``
            (gradients on the shared features passed as ``features=``; the weights are then
            applied by one backward of ``sum_i w_i L_i``).
    """

    requires: ClassVar[Requires] = "gram"
    #: ``True`` for ``requires="losses"`` methods whose weights depend on the current loss
    #: values (FAMO, GLS, STCH): under accumulation each micro-batch is then weighted from the
    #: window's running loss totals, which differs from one big batch (see the accumulation guide).
    loss_dependent: ClassVar[bool] = False
    name: ClassVar[str] = ""
    mode: str = "exact"

    def aggregate(self, inputs: TaskInputs) -> Aggregation:  # pragma: no cover - abstract
        """Map one step's inputs to an :class:`Aggregation`, without changing any state.

        Called once per ``backward`` call (several times per optimizer step under gradient
        accumulation, each time from the state of the last committed step); return the state
        change as ``Aggregation.pending``.

        Args:
            inputs: the losses, and the Gram matrix or gradients if :attr:`requires` asks.

        Returns:
            The weights (or direction) to apply, with diagnostics and the pending state.
        """
        raise NotImplementedError

    def commit(self, pending: Any) -> None:
        """Apply the state change returned as ``Aggregation.pending`` (default: stateless)."""

    def shared_subset(self, shared: list[Tensor]) -> list[Tensor]:
        """The shared parameters on which this method needs task gradients (default: all).

        A method that returns a strict subset (GradNorm's last shared layer) gets its gradients
        on that subset only, and its weights are applied by one backward of ``sum_i w_i L_i``.
        """
        return shared

    def choose_subset(self, shared: list[Tensor], losses: Sequence[Tensor]) -> list[Tensor]:
        """:meth:`shared_subset` with this step's losses at hand (their autograd graphs), for a
        method that chooses its subset from the graph (GradNorm's default layer). The engine
        calls this where it has the graph; the default ignores ``losses``."""
        return self.shared_subset(shared)

    def state_dict(self) -> dict[str, Any]:
        """The method's state: tensors, ints and floats only (saved under ``"gradbalance"``
        in the wrapper's ``state_dict()``). Default: ``{}`` (stateless)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` so that training continues bit-identically.

        Raises:
            ValueError: a stateless method is given a non-empty state.
        """
        if state:
            raise ValueError(f"{type(self).__name__} is stateless but got state {sorted(state)}")

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor arguments, for ``__repr__`` and the docs."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, tuple[Callable[[], Method], str]] = {}


def register(name: str, description: str) -> Callable[[type], type]:
    """Class decorator: make ``method=name`` build ``cls()`` with the paper's defaults.

    Args:
        name: the lower-case registry name.
        description: one line for :func:`available_methods`.

    Raises:
        ValueError: the name is already registered.
    """

    def wrap(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"method name {name!r} registered twice")
        _REGISTRY[name] = (cls, description)
        return cls

    return wrap


def register_factory(name: str, description: str, factory: Callable[[], Method]) -> None:
    """Register a name that builds a configured instance (e.g. ``"mgda_ub"``)."""
    if name in _REGISTRY:
        raise ValueError(f"method name {name!r} registered twice")
    _REGISTRY[name] = (factory, description)


def available_methods() -> dict[str, str]:
    """Every registered method name with a one-line description, sorted by name.

    Returns:
        ``{name: description}``; each name is a valid ``method=`` argument.

    Example:
        >>> import gradbalance as gb
        >>> "mean" in gb.available_methods() and "sum" in gb.available_methods()
        True
        >>> gb.available_methods()["sum"]
        'Linear scalarization: the plain sum of the task losses (weights 1)'
    """
    return {name: desc for name, (_, desc) in sorted(_REGISTRY.items())}


def make_method(method: str | Method) -> Method:
    """Turn a registered name (case-insensitive) or a :class:`Method` instance into a method
    instance; an instance is returned as it is.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
        TypeError: a method class instead of an instance, or another type.

    Example:
        >>> from gradbalance.methods import make_method
        >>> make_method("Mean")
        Mean()
    """
    if isinstance(method, Method):
        return method
    if isinstance(method, type) and issubclass(method, Method):
        raise TypeError(f"pass an instance, e.g. {method.__name__}(), not the class itself")
    if not isinstance(method, str):
        raise TypeError(f"method must be a name or a gradbalance Method, got {type(method).__name__}")
    key = method.lower()
    if key not in _REGISTRY:
        valid = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown method {method!r}; valid names: {valid}")
    return _REGISTRY[key][0]()


# --------------------------------------------------------------------------- helpers for methods


def check_num_tasks(expected: int | None, got: int, method: str) -> None:
    """Raise the standard error when a method with per-task state sees a new number of tasks."""
    if expected is not None and expected != got:
        raise ValueError(
            f"{method} keeps per-task state for {expected} tasks but this step has {got}. Its state is "
            f"positional, so it cannot skip or add a task (a task given as None in a dict of losses "
            f"counts as missing): pass all {expected} tasks at every step, or start a new method object "
            "for a new task set. Methods that key their state by task name (uw, gradnorm, dwa, and the "
            "stateless ones) accept a task missing from a step."
        )


def state_keys(inputs: TaskInputs, tasks: Sequence[str], method: str) -> list[str]:
    """The names under which a method keeps this step's per-task state.

    Named tasks (a dict of losses; the optimizer names a list's tasks ``task0, task1, ...``) are
    matched by name, so tasks may be missing from a step or new. Unnamed tasks (a method called
    directly without ``task_names``) are positional, and their number must not change once
    ``tasks`` is known.
    """
    k = inputs.num_tasks
    if not inputs.task_names and tasks:
        check_num_tasks(len(tasks), k, method)
    return list(inputs.task_names) or [f"task{i}" for i in range(k)]


def require_gram(inputs: TaskInputs, method: str) -> Tensor:
    """``inputs.gram`` for a ``requires="gram"`` method, or a clear error when a direct caller left it out
    (the engine always fills it for such methods)."""
    if inputs.gram is None:
        raise ValueError(f"{method} needs the Gram matrix of the task gradients (inputs.gram), got None")
    return inputs.gram


def require_grads(inputs: TaskInputs, method: str) -> Tensor:
    """``inputs.grads`` for a ``requires="grads"`` method, or a clear error when a direct caller left them out
    (the engine always fills them for such methods)."""
    if inputs.grads is None:
        raise ValueError(f"{method} needs the (k, P) task gradients (inputs.grads), got None")
    return inputs.grads


def clip_factor(weights: Tensor, gram: Tensor, max_norm: float | None) -> tuple[float, float]:
    """``(norm, factor)`` of the update ``d = sum_i w_i g_i``: ``norm = sqrt(w^T M w)`` and the
    factor ``min(1, max_norm / (norm + 1e-6))`` by which ``torch.nn.utils.clip_grad_norm_``
    would scale it (``1.0`` when ``max_norm`` is ``None``)."""
    w = weights.detach().to(gram.device, torch.float64)
    norm = float(w @ gram.double() @ w) ** 0.5
    if max_norm is None:
        return norm, 1.0
    return norm, min(1.0, max_norm / (norm + 1e-6))


def check_number(name: str, value: Any, *, positive: bool = False, minimum: float | None = None,
                 integer: bool = False) -> Any:
    """Validate one numeric hyper-parameter the same way in every method.

    Booleans are not numbers (``lr=True`` is refused). Messages name the argument and the
    value, e.g. ``"alpha must be positive, got -1"``.

    Args:
        name: the argument's name, for the message.
        value: the value given.
        positive: require ``value > 0``.
        minimum: require ``value >= minimum``.
        integer: require an ``int`` (otherwise an ``int`` or a ``float``).

    Returns:
        ``value`` as an ``int`` (``integer=True``) or a ``float``.

    Raises:
        TypeError: not a number (or not an int where one is required).
        ValueError: NaN, infinite, or out of range.
    """
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        what = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    if minimum is not None and not value >= minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value) if integer else float(value)


def check_max_norm(max_norm: Any) -> float | None:
    """Validate a ``max_norm`` argument: a finite number > 0, or ``None`` (no clipping)."""
    if max_norm is None:
        return None
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
        raise TypeError(f"max_norm must be a number or None, got {type(max_norm).__name__}")
    if not 0.0 < max_norm < float("inf"):
        raise ValueError(f"max_norm must be a finite number > 0 or None (no clipping), got {max_norm!r}")
    return float(max_norm)


def generator_from_state(state: Tensor) -> torch.Generator:
    """A fresh CPU generator positioned at ``state`` (so a draw never advances the original)."""
    gen = torch.Generator()
    gen.set_state(state)
    return gen


class SeededMethod(Method):
    """Base of methods whose only state is one seeded random generator (PCGrad, RLW, GradDrop).

    The generator lives on the CPU as a state tensor; :meth:`draw` hands out a copy positioned
    at the committed state, and the advanced copy's state is returned as ``pending`` so that the
    generator moves only when the optimizer steps: every micro-batch of an accumulation window
    draws the same numbers, and the same seed gives the same run.
    """

    def __init__(self, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed).get_state()

    def draw(self) -> torch.Generator:
        """A generator at the committed state (return ``gen.get_state()`` as ``pending``)."""
        return generator_from_state(self._generator)

    def commit(self, pending: Tensor) -> None:
        self._generator = pending

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._generator.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"generator"}:
            raise ValueError(
                f"{type(self).__name__} state must have the key 'generator', got {sorted(state)}"
            )
        self._generator = state["generator"].clone()
