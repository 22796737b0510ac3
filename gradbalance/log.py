"""See what the balancing does: send :class:`~gradbalance.StepInfo` to TensorBoard or any
``log(dict, step)`` callable (:func:`log_info`), record it over training (:class:`History`:
weights, per-task losses, gradient norms, cosines; saved as JSON or NPZ) and plot it
(:meth:`History.plot`, :func:`cosine_heatmap`).

matplotlib is needed only to plot (and for TensorBoard heatmap images); it is imported when
used, with an ImportError that says so when it is missing.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from gradbalance.info import StepInfo

__all__ = ["History", "cosine_heatmap", "log_info"]

#: the per-task vectors a :class:`History` keeps, each a ``(k,)`` field of :class:`StepInfo`
FIELDS = ("weights", "head_weights", "losses", "grad_norms")


def _figure_class(what: str) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            f"{what} needs matplotlib, which is not installed (pip install matplotlib); recording "
            "a History and saving/loading it work without it"
        ) from err
    return Figure


def log_info(
    info: StepInfo,
    sink: Any | Callable[[dict[str, float], int], Any],
    step: int,
    *,
    prefix: str = "gradbalance/",
    cosines: Literal["summary", "matrix"] = "summary",
    heatmap: bool = False,
) -> dict[str, float]:
    """Write the scalars of ``info.to_dict(cosines)`` to ``sink`` and return them.

    Args:
        info: the :class:`~gradbalance.StepInfo` of a step (e.g. ``opt.last_info``).
        sink: a ``torch.utils.tensorboard.SummaryWriter`` (anything with ``add_scalar``), or a
            callable ``log(metrics: dict, step: int)`` such as ``wandb.log``-style wrappers or
            Lightning's ``self.log_dict`` adapted to take a step.
        step: the global step to log at.
        prefix: prepended to every key (``"gradbalance/weight/depth"``, ...).
        cosines: ``"summary"`` (mean, min, number of conflicting pairs) or ``"matrix"`` (also
            every pair ``cosine/<task i>/<task j>``), as in :meth:`StepInfo.to_dict`.
        heatmap: also write the cosine matrix as an image ``<prefix>cosine`` (drawn by
            :func:`cosine_heatmap`, needs matplotlib) with ``sink.add_image``; nothing is drawn
            for a step without cosines (loss-weighting methods). Images are large next to
            scalars: pass e.g. ``heatmap=step % 100 == 0``.

    Returns:
        The numeric metrics that were written (the string ``engine`` is left out of scalar
        sinks; read it from ``info.engine``).

    Raises:
        TypeError: ``sink`` is neither a writer nor a callable, or ``heatmap=True`` and it has
            no ``add_image``.

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
    add_scalar = getattr(sink, "add_scalar", None)
    if not callable(add_scalar) and not callable(sink):
        raise TypeError(
            f"sink must have add_scalar (a SummaryWriter) or be a callable log(dict, step), "
            f"got {type(sink).__name__}"
        )
    add_image = getattr(sink, "add_image", None)
    if heatmap and not callable(add_image):
        raise TypeError(f"heatmap=True needs a sink with add_image (a SummaryWriter), got {type(sink).__name__}")
    metrics = {
        f"{prefix}{key}": float(value)
        for key, value in info.to_dict(cosines=cosines).items()
        if not isinstance(value, str)
    }
    if callable(add_scalar):
        for key, value in metrics.items():
            add_scalar(key, value, step)
    else:
        sink(metrics, step)
    if heatmap and info.cosine is not None and add_image is not None:
        image = _render(lambda ax: cosine_heatmap(info.cosine, info.task_names, ax=ax,
                                                  title=f"gradient cosines, step {step}"))
        add_image(f"{prefix}cosine", image, step, dataformats="HWC")
    return metrics


def cosine_heatmap(cosine: Any, task_names: Sequence[str], ax: Any = None, *, title: str | None = None) -> Any:
    """Draw a ``(k, k)`` cosine matrix as a heatmap (red: conflict, blue: agreement), with values.

    Args:
        cosine: ``(k, k)`` tensor or array in [-1, 1] (NaN cells are left blank).
        task_names: the k labels.
        ax: a matplotlib ``Axes`` to draw into; ``None`` makes a new figure.
        title: the axes' title.

    Returns:
        The ``Axes``.
    """
    c = np.asarray(torch.as_tensor(cosine).detach().cpu().double() if torch.is_tensor(cosine) else cosine,
                   dtype=np.float64)
    k = len(task_names)
    if c.shape != (k, k):
        raise ValueError(f"cosine has shape {c.shape}, expected ({k}, {k}) for {k} task names")
    if ax is None:
        fig = _figure_class("cosine_heatmap")(figsize=(1.2 + 0.7 * k, 1.0 + 0.6 * k))
        ax = fig.add_subplot()
    im = ax.imshow(c, cmap="RdBu", vmin=-1.0, vmax=1.0)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(task_names, rotation=45, ha="right")
    ax.set_yticklabels(task_names)
    for i in range(k):
        for j in range(k):
            if math.isfinite(c[i, j]):
                ax.text(j, i, f"{c[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(c[i, j]) > 0.6 else "black")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def _render(draw: Callable[[Any], Any]) -> np.ndarray:
    """Draw into a fresh one-axes figure (no pyplot state) and return it as (H, W, 3) uint8 RGB."""
    figure = _figure_class("log_info(heatmap=True)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = figure(figsize=(4.0, 3.4), dpi=80)
    canvas = FigureCanvasAgg(fig)
    draw(fig.add_subplot())
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class History:
    """Record :class:`~gradbalance.StepInfo` over training, save it, and plot it.

    ``record(info)`` after each step keeps the weights, the heads' weights (when they differ,
    see :attr:`StepInfo.head_weights`), the per-task losses, gradient norms and the cosine
    matrix. Tasks may come and go (dict losses with ``None``): a task absent from a step is NaN
    there. Everything is kept in memory as floats: about ``(4k + k^2) * 8`` bytes a step.

    Read it back as arrays (:meth:`values`, :meth:`cosines`, :meth:`mean_cosine`,
    :meth:`grad_norm_ratios`), save it as plain JSON or NPZ (:meth:`save`, :meth:`load`), and
    plot it (:meth:`plot`: weights over time, losses, gradient-norm ratios, the mean cosine
    matrix as a heatmap; matplotlib needed).

    Example:
        >>> import torch, gradbalance as gb
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        >>> history = gb.log.History()
        >>> for _ in range(3):
        ...     info = gb.backward({"a": w.sum() ** 2, "b": (w[0] - 2) ** 2}, [w], method="mgda")
        ...     history.record(info)
        >>> history.task_names, len(history)
        (('a', 'b'), 3)
        >>> history.values("weights").shape, history.cosines().shape
        ((3, 2), (3, 2, 2))
    """

    def __init__(self) -> None:
        self._names: list[str] = []
        self.steps: list[int] = []
        # per step: (indices of its tasks, {field: values or None}, cosine or None, engine)
        self._records: list[tuple[tuple[int, ...], dict[str, np.ndarray | None], np.ndarray | None, str]] = []

    @property
    def task_names(self) -> tuple[str, ...]:
        """Every task seen, in first-seen order (the columns of the arrays)."""
        return tuple(self._names)

    @property
    def engines(self) -> list[str]:
        """``StepInfo.engine`` of each recorded step."""
        return [r[3] for r in self._records]

    def __len__(self) -> int:
        return len(self._records)

    def record(self, info: StepInfo, step: int | None = None) -> None:
        """Append one step.

        Args:
            info: what ``opt.backward(...)`` returned.
            step: the global step (default: the last recorded step + 1, from 0).

        Raises:
            TypeError: ``info`` is not a StepInfo, or ``step`` not an int.
            ValueError: ``step`` is not larger than the last recorded one.
        """
        if not isinstance(info, StepInfo):
            raise TypeError(f"History.record takes a StepInfo, got {type(info).__name__}")
        if step is None:
            step = self.steps[-1] + 1 if self.steps else 0
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        if self.steps and step <= self.steps[-1]:
            raise ValueError(f"step {step} is not after the last recorded step {self.steps[-1]}")
        for name in info.task_names:
            if name not in self._names:
                self._names.append(name)
        idx = tuple(self._names.index(n) for n in info.task_names)
        row = {f: None if getattr(info, f) is None else _numpy(getattr(info, f)) for f in FIELDS}
        cos = None if info.cosine is None else _numpy(info.cosine)
        self.steps.append(int(step))
        self._records.append((idx, row, cos, info.engine))

    # ------------------------------------------------------------------ arrays
    def values(self, field: str) -> np.ndarray:
        """``(steps, tasks)`` array of ``field``, one of ``"weights"``, ``"head_weights"``,
        ``"losses"``, ``"grad_norms"``; NaN where a step did not have it (a task absent, no
        gradients on the loss path, a skipped step, heads that got ``weights``)."""
        if field not in FIELDS:
            raise ValueError(f"field must be one of {FIELDS}, got {field!r}")
        out = np.full((len(self), len(self._names)), np.nan)
        for s, (idx, row, _, _) in enumerate(self._records):
            if row[field] is not None:
                out[s, list(idx)] = row[field]
        return out

    def head_weights(self) -> np.ndarray:
        """``(steps, tasks)``: what the heads' gradients were scaled by (``head_weights`` where a
        step reported them, else ``weights``)."""
        hw, w = self.values("head_weights"), self.values("weights")
        return np.where(np.isnan(hw), w, hw)

    def cosines(self) -> np.ndarray:
        """``(steps, tasks, tasks)`` cosine matrices; NaN where a step had none."""
        k = len(self._names)
        out = np.full((len(self), k, k), np.nan)
        for s, (idx, _, cos, _) in enumerate(self._records):
            if cos is not None:
                out[s][np.ix_(idx, idx)] = cos
        return out

    def mean_cosine(self, last: int | None = None) -> np.ndarray:
        """``(tasks, tasks)`` mean cosine over the recorded steps (the ``last`` ones if given),
        ignoring steps without it; NaN where no step had the pair."""
        cos = self.cosines()
        if last is not None:
            if isinstance(last, bool) or not isinstance(last, int) or last < 1:
                raise ValueError(f"last must be a positive int or None, got {last!r}")
            cos = cos[-last:]
        k = len(self._names)
        count = np.sum(~np.isnan(cos), axis=0)
        total = np.nansum(cos, axis=0) if len(cos) else np.zeros((k, k))
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def grad_norm_ratios(self) -> np.ndarray:
        """``(steps, tasks)``: each task's gradient norm over the mean norm of the step's tasks
        (1 everywhere: balanced gradients; GradNorm drives these towards 1)."""
        g = self.values("grad_norms")
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: steps without gradients
            return g / np.nanmean(g, axis=1, keepdims=True)

    # ------------------------------------------------------------------ save / load
    def state_dict(self) -> dict[str, Any]:
        """The history as plain arrays: ``format``, ``task_names``, ``steps``, ``engines``, one
        ``(steps, tasks)`` array per field (NaN where missing) and ``cosine`` ``(steps, tasks,
        tasks)``."""
        state: dict[str, Any] = {"format": 1, "task_names": list(self._names), "steps": list(self.steps),
                                 "engines": self.engines}
        for f in FIELDS:
            state[f] = self.values(f)
        state["cosine"] = self.cosines()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the content by a :meth:`state_dict` (checked before anything changes)."""
        if int(np.asarray(state.get("format", -1))) != 1:
            raise ValueError(f"unknown History format {state.get('format')!r}")
        names = [str(n) for n in state["task_names"]]
        steps = [int(s) for s in state["steps"]]
        engines = [str(e) for e in state["engines"]]
        n, k = len(steps), len(names)
        arrays = {f: np.asarray(state[f], dtype=np.float64).reshape(n, k) for f in FIELDS}
        cos = np.asarray(state["cosine"], dtype=np.float64).reshape(n, k, k)
        if len(engines) != n:
            raise ValueError(f"History state: {len(engines)} engines for {n} steps")
        records = []
        for s in range(n):
            present = np.flatnonzero(~np.isnan(arrays["losses"][s]))  # every recorded task has a loss
            idx = tuple(int(i) for i in present)
            row = {}
            for f in FIELDS:
                v = arrays[f][s, present]
                row[f] = None if np.isnan(v).all() else v
            c = cos[s][np.ix_(present, present)]
            records.append((idx, row, None if np.isnan(c).all() else c, engines[s]))
        self._names, self.steps, self._records = names, steps, records

    def save(self, path: str | Path) -> Path:
        """Write to ``path``: ``.json`` (plain JSON, ``null`` for missing values) or ``.npz``
        (numpy arrays, NaN for missing). Returns the path."""
        path = Path(path)
        state = self.state_dict()
        if path.suffix == ".json":
            plain = {key: _nan_to_none(v.tolist()) if isinstance(v, np.ndarray) else v for key, v in state.items()}
            path.write_text(json.dumps(plain))
        elif path.suffix == ".npz":
            arrays: dict[str, Any] = {key: np.asarray(v) for key, v in state.items()}
            np.savez(path, **arrays)
        else:
            raise ValueError(f"History.save writes .json or .npz, got {path.name!r}")
        return path

    @classmethod
    def load(cls, path: str | Path) -> History:
        """Read a file written by :meth:`save`."""
        path = Path(path)
        if path.suffix == ".json":
            state = json.loads(path.read_text())
            for f in (*FIELDS, "cosine"):
                state[f] = np.asarray(_none_to_nan(state[f]), dtype=np.float64)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                state = {key: data[key] for key in data.files}
            state["task_names"] = state["task_names"].tolist()
            state["engines"] = state["engines"].tolist()
        else:
            raise ValueError(f"History.load reads .json or .npz, got {path.name!r}")
        history = cls()
        history.load_state_dict(state)
        return history

    # ------------------------------------------------------------------ plots
    def plot_weights(self, ax: Any) -> Any:
        """Weights over steps (solid), and the heads' weights (dashed) where a step had them."""
        steps = np.asarray(self.steps)
        w, hw = self.values("weights"), self.values("head_weights")
        for i, name in enumerate(self._names):
            (line,) = ax.plot(steps, w[:, i], label=name)
            if not np.isnan(hw[:, i]).all():
                ax.plot(steps, hw[:, i], ls="--", color=line.get_color(), label=f"{name} (heads)")
        ax.set_title("task weights", fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        return ax

    def plot_losses(self, ax: Any) -> Any:
        """Per-task losses over steps (log scale when they are all positive)."""
        steps, losses = np.asarray(self.steps), self.values("losses")
        for i, name in enumerate(self._names):
            ax.plot(steps, losses[:, i], label=name)
        if np.nanmin(losses, initial=np.inf) > 0:
            ax.set_yscale("log")
        ax.set_title("task losses", fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        return ax

    def plot_grad_norm_ratios(self, ax: Any) -> Any:
        """Each task's gradient norm over the step's mean norm (log scale; 1 = balanced)."""
        ratios = self.grad_norm_ratios()
        if np.isnan(ratios).all():
            ax.text(0.5, 0.5, "no per-task gradients\n(loss-weighting method)", ha="center", va="center",
                    transform=ax.transAxes)
        else:
            for i, name in enumerate(self._names):
                ax.plot(np.asarray(self.steps), ratios[:, i], label=name)
            ax.set_yscale("log")
            ax.axhline(1.0, color="gray", lw=0.8, ls=":")
            ax.legend(fontsize=7)
        ax.set_title("gradient norm / mean norm", fontsize=10)
        ax.set_xlabel("step")
        return ax

    def plot_cosine(self, ax: Any, last: int | None = None) -> Any:
        """The mean cosine matrix (of the ``last`` steps if given) as a heatmap."""
        cos = self.mean_cosine(last)
        if np.isnan(cos).all():
            ax.text(0.5, 0.5, "no cosines\n(loss-weighting method)", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_title("gradient cosines", fontsize=10)
            return ax
        span = f"last {min(last, len(self))} steps" if last else f"{len(self)} steps"
        return cosine_heatmap(cos, self._names, ax=ax, title=f"mean gradient cosine, {span}")

    def plot(self, path: str | Path | None = None, *, last: int | None = None, title: str | None = None) -> Any:
        """One figure, four panels: weights, losses, gradient-norm ratios, mean cosine heatmap.

        Args:
            path: also save the figure there (any format matplotlib writes: .png, .pdf, .svg).
            last: average the heatmap over the last ``last`` steps only.
            title: the figure's title.

        Returns:
            The matplotlib ``Figure`` (made without pyplot, so nothing is left open).

        Raises:
            ImportError: matplotlib is not installed.
            ValueError: nothing was recorded.
        """
        if not len(self):
            raise ValueError("History.plot: nothing recorded yet")
        fig = _figure_class("History.plot")(figsize=(11, 7.5))
        axes = fig.subplots(2, 2)
        self.plot_weights(axes[0, 0])
        self.plot_losses(axes[0, 1])
        self.plot_grad_norm_ratios(axes[1, 0])
        self.plot_cosine(axes[1, 1], last=last)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
        return fig


def _numpy(t: Any) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy().copy()


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def _none_to_nan(x: Any) -> Any:
    if isinstance(x, list):
        return [_none_to_nan(v) for v in x]
    return math.nan if x is None else x
