"""Training loop, method selection and plots shared by the real-data benchmarks
(:mod:`benchmarks.multidigits`, :mod:`benchmarks.mixed`)."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

import gradbalance as gb
from benchmarks.common import mean_std, progress, seed_everything

LossFn = Callable[[list[torch.Tensor], Sequence[torch.Tensor]], list[torch.Tensor]]


def default_methods() -> tuple[list[str], list[tuple[str, str]]]:
    """Every registered method, less aliases; returns ``(methods, [(skipped, reason)])``."""
    methods, skipped = [], []
    for name, desc in gb.available_methods().items():
        if desc.lower().startswith("alias of"):
            skipped.append((name, desc[0].lower() + desc[1:] + ": same method, not run twice"))
        else:
            methods.append(name)
    return methods, skipped


def preflight(methods: Sequence[str], make_model: Callable[[], nn.Module], batch: Sequence[torch.Tensor],
              loss_fn: LossFn) -> tuple[list[str], list[tuple[str, str]]]:
    """Keep the methods that can take two steps on ``batch``; the others with the error's text."""
    ok, skipped = [], []
    for name in methods:
        if name not in gb.available_methods():
            skipped.append((name, "not registered"))
            continue
        try:
            model = make_model()
            opt = gb.GradBalance(torch.optim.Adam(model.parameters(), lr=1e-3), method=name,
                                 shared_params=model.trunk)
            for _ in range(2):
                step(model, opt, batch, loss_fn)
        except Exception as err:  # noqa: BLE001 - reported in the results, not hidden
            skipped.append((name, f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"))
        else:
            ok.append(name)
    return ok, skipped


def step(model: nn.Module, opt: gb.GradBalance, batch: Sequence[torch.Tensor], loss_fn: LossFn):
    """One training step: forward, per-task losses, ``opt.backward(..., features=z)``, ``opt.step()``."""
    x, *ys = batch
    opt.zero_grad()
    z, outs = model(x)
    info = opt.backward(loss_fn(outs, ys), features=z)
    opt.step()
    return info


def fit(model: nn.Module, method: str, train: TensorDataset, loss_fn: LossFn, *, epochs: int, batch: int,
        lr: float, seed: int, desc: str = "") -> tuple[list[float], list[float]]:
    """Train with Adam(lr) wrapped in GradBalance(method) on ``train`` (shuffled by ``seed``).

    Returns the wall-clock and the CPU seconds of each epoch (training steps only). Methods with
    an ``epoch_end()`` hook (DWA) get it called after each pass over the data.
    """
    opt = gb.GradBalance(torch.optim.Adam(model.parameters(), lr=lr), method=method, shared_params=model.trunk)
    gen = seed_everything(seed)
    tensors = train.tensors
    n = len(tensors[0])
    walls, cpus = [], []
    model.train()
    for _ in progress(range(epochs), desc=desc or method):
        w0, c0 = time.perf_counter(), time.process_time()
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, batch):
            idx = order[s : s + batch]
            step(model, opt, [t[idx] for t in tensors], loss_fn)
        if hasattr(opt.method, "epoch_end"):
            opt.method.epoch_end()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    model.eval()
    return walls, cpus


def select_methods(requested: Sequence[str] | None, make_model: Callable[[], nn.Module],
                   probe: Sequence[torch.Tensor], loss_fn: LossFn) -> tuple[list[str], list[tuple[str, str]]]:
    """The methods to run (every registered one when ``requested`` is None) and the skipped ones
    with their reasons (aliases, unknown names, methods that fail a two-step preflight)."""
    if requested is None:
        wanted, skipped = default_methods()
    else:
        wanted, skipped = list(dict.fromkeys(requested)), []
    methods, failed = preflight(wanted, make_model, probe, loss_fn)
    return methods, skipped + failed


def train_seeds(methods: Sequence[str], make_model: Callable[[], nn.Module], train: TensorDataset,
                loss_fn: LossFn, evaluate: Callable[[nn.Module], dict[str, float]], *, seeds: int,
                epochs: int, batch: int, lr: float) -> dict[str, dict]:
    """Train every method from seeds ``0..seeds-1``; per method, each metric's values over the
    seeds and the mean wall/CPU seconds of an epoch. Prints one line per method to stderr."""
    results = {}
    for m in methods:
        values: dict[str, list[float]] = {}
        walls, cpus = [], []
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = make_model()
            w, c = fit(model, m, train, loss_fn, epochs=epochs, batch=batch, lr=lr, seed=seed,
                       desc=f"{m} seed {seed}")
            walls += w
            cpus += c
            for t, v in evaluate(model).items():
                values.setdefault(t, []).append(v)
        results[m] = {**values, "wall": statistics.fmean(walls), "cpu": statistics.fmean(cpus)}
        print(f"{m:16s} " + " ".join(f"{t} {mean_std(v)}" for t, v in values.items())
              + f" wall {results[m]['wall']:.3f} s/epoch", file=sys.stderr, flush=True)
    return results


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, chunk: int = 1024) -> list[torch.Tensor]:
    """Head outputs on ``x``, concatenated over chunks."""
    parts = [model(x[s : s + chunk])[1] for s in range(0, len(x), chunk)]
    return [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]


def standard_error_gaps(values: dict[str, list[float]], base: str, higher_is_better: bool = True):
    """``{method: (diff, 2*se)}`` of each method's mean against ``base``'s (Welch standard error of
    the difference of two means over seeds)."""
    out = {}
    b = values[base]
    for m, v in values.items():
        if m == base or len(v) < 2 or len(b) < 2:
            continue
        diff = statistics.fmean(v) - statistics.fmean(b)
        se = (statistics.variance(v) / len(v) + statistics.variance(b) / len(b)) ** 0.5
        out[m] = (diff if higher_is_better else -diff, 2 * se)
    return out


def bar_plot(path: Path, methods: Sequence[str], tasks: Sequence[str], ylabels: Sequence[str],
             values: dict[str, dict[str, list[float]]], title: str, baseline: str | None = "mean") -> Path:
    """One panel per task: the mean over seeds of each method, error bar = std over seeds; a
    dashed line at ``baseline``'s mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tasks), 1, figsize=(max(6.0, 0.42 * len(methods) + 1.5), 2.6 * len(tasks)),
                             squeeze=False)
    xs = range(len(methods))
    for ax, task, ylabel in zip(axes[:, 0], tasks, ylabels):
        means = [statistics.fmean(values[m][task]) for m in methods]
        stds = [statistics.stdev(values[m][task]) if len(values[m][task]) > 1 else 0.0 for m in methods]
        colors = ["tab:orange" if m == baseline else "tab:blue" for m in methods]
        ax.bar(xs, means, yerr=stds, color=colors, capsize=2)
        lo = min(a - b for a, b in zip(means, stds))
        hi = max(a + b for a, b in zip(means, stds))
        pad = 0.15 * (hi - lo) + 1e-9
        ax.set_ylim(lo - pad, hi + pad)
        if baseline in methods:
            ax.axhline(means[list(methods).index(baseline)], color="tab:orange", ls="--", lw=1)
        ax.set_ylabel(ylabel)
        ax.set_title(task, fontsize=10)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(methods, rotation=60, ha="right", fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
