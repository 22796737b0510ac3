"""What every benchmark script shares: where results go, progress bars, tables, the environment line."""

from __future__ import annotations

import os
import platform
import random
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def progress(iterable: Iterable, **kwargs):
    """``tqdm`` over ``iterable`` on stderr; off when ``GRADBALANCE_NO_PROGRESS`` is set (the tests set it)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", bool(os.environ.get("GRADBALANCE_NO_PROGRESS")))
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a fresh torch generator seeded the same."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; floats are printed as given (format them before)."""
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def mean_std(values: Sequence[float], fmt: str = ".2f") -> str:
    """``"m ± s"`` over seeds (sample standard deviation; ``± 0`` for one value)."""
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:{fmt}} ± {s:{fmt}}"


def environment() -> str:
    """One line naming what the numbers were measured on."""
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {platform.machine()}, "
            f"Python {platform.python_version()}, {dev}")


def write_result(out: Path, text: str) -> Path:
    """Write ``text`` to ``out`` (creating its folder) and echo where it went."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}", file=sys.stderr)
    return out


#: one curve of :func:`plot_against_k`: label, line style, points ``(k, time ratio, memory ratio or None)``
Curve = tuple[str, str, list[tuple[int, float, "float | None"]]]


def plot_against_k(panels: dict[str, tuple[str, list[Curve]]], path: Path) -> None:
    """Time (top row) and peak memory (bottom row), as multiples of a plain step, against the
    number of tasks k, on log-log axes: one column per model (``{model: (device, curves)}``).
    A curve's memory points that are ``None`` are left out of the bottom row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(panels), figsize=(6 * len(panels), 8), squeeze=False)
    for j, (model, (device, curves)) in enumerate(panels.items()):
        for label, style, pts in curves:
            pts = sorted(pts)
            axes[0][j].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
            mem = [(p[0], p[2]) for p in pts if p[2] is not None]
            if mem:
                axes[1][j].plot([m[0] for m in mem], [m[1] for m in mem], style, marker="o", label=label)
        for i, what in enumerate(("time", "peak memory")):
            ax = axes[i][j]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("k (tasks)")
            ax.set_ylabel(f"{what} / plain step")
            ax.set_title(f"{model} ({device}): {what}")
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)
