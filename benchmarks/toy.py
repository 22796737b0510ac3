"""The 2-D two-task toy problem of CAGrad, Nash-MTL and FAMO: trajectories of every method.

The problem (``experiments/toy/problem.py`` of Nash-MTL and FAMO, after CAGrad's ``toy.py``),
with ``x = (x1, x2)`` and ``LOWER = 5e-6``::

    f1 = log(max(|0.5(-x1-7) - tanh(-x2)|, LOWER)) + 6
    f2 = log(max(|0.5(-x1+3) + tanh(-x2) + 2|, LOWER)) + 6
    g1 = ((-x1+7)^2 + 0.1(-x2-8)^2)/10 - 20
    g2 = ((-x1-7)^2 + 0.1(-x2-8)^2)/10 - 20
    c1 = max(tanh(0.5 x2), 0),  c2 = max(tanh(-0.5 x2), 0)
    L1 = 0.1 (c1 f1 + c2 g1),   L2 = c1 f2 + c2 g2        (Nash-MTL / FAMO scale L1 by 0.1)

Every registered method runs from the five starts of Nash-MTL / FAMO with ``Adam(lr=1e-3)`` for
35,000 steps (Nash-MTL's count), through the ordinary ``GradBalance`` path
(``opt.backward([L1, L2]); opt.step()``). The losses are computed by one small autograd
function with the analytic Jacobian (checked against the plain torch formula in the tests),
which is what makes 26 methods x 5 starts x 35,000 steps affordable on one CPU core.

The Pareto set is computed, not assumed: in the lower half plane the losses are
``c(x2) g_i(x)`` with ``c = tanh(-x2/2)``, so the Pareto-stationary points are the stationary
points of ``c (w1 g1 + w2 g2)`` over weights ``w >= 0``, which gives ``x1 = 7 (w1 - w2)`` in
``[-7, 7]`` and, for each ``x1``, one ``x2`` solving
``d/dx2 [c(x2) (0.01 (x2 + 8)^2 - 15.1 - 0.1 x1^2)] = 0``: a curve from ``x2 = -8.4345`` at
the ends to ``x2 = -8.3551`` at ``x1 = 0`` (the line ``x2 = -8.3552`` usually drawn is its
value at ``x1 = 0``; it is up to 0.08 off at the ends). A point's distance to the front is its
distance to that curve.

    python -m benchmarks toy                 # full: every method, 5 starts, 35,000 steps
    python -m benchmarks toy --quick         # seconds: 2 starts, larger decaying lr, 250 steps
                                             # (writes toy-quick.md / toy-quick.png)
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import gradbalance as gb
from benchmarks import common

LOWER = 5e-6
SCALE = 0.1  # Nash-MTL / FAMO multiply L1 by 0.1
STARTS = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))
LR = 1e-3
STEPS = 35_000  # Nash-MTL's toy (FAMO: 50,000; CAGrad: 100,000 with 3 starts)
#: lower bounds of (L1, L2): every method sees L_i + SHIFT_i > 0 (same gradients; the log- and
#: ratio-based methods need positive losses; FAMO's toy gives FAMO such bounds as min_losses)
SHIFT = (2.1, 21.0)
TOL = 0.05  # "reached the front": final distance below this (50 Adam steps of lr 1e-3)
#: --quick: the two starts below the x1 axis, Adam lr 0.2 decaying linearly to 0 over 250 steps
#: (MGDA reaches the front from (-7.5, -0.5) this way; the upper starts need thousands of steps)
QUICK = {"steps": 250, "lr": 0.2, "starts": STARTS[3:]}
REPRESENTATION = ("mgda_ub", "aligned_mtl_ub")  # features = x itself (the whole "trunk" output)


# ------------------------------------------------------------------------------ the problem
def toy_losses_reference(x: torch.Tensor, scale: float = SCALE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L1, L2)`` written with torch ops, as in the papers' code (autograd gives the gradients)."""
    x1, x2 = x[0], x[1]
    f1 = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), LOWER).log() + 6
    f2 = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), LOWER).log() + 6
    c1 = torch.clamp(torch.tanh(x2 * 0.5), 0)
    g1 = ((-x1 + 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    g2 = ((-x1 - 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    c2 = torch.clamp(torch.tanh(-x2 * 0.5), 0)
    return scale * (f1 * c1 + g1 * c2), f2 * c1 + g2 * c2


def toy_values_and_jacobian(x1: float, x2: float, scale: float = SCALE):
    """``((L1, L2), J)`` in plain floats, ``J[i][j] = dL_i/dx_j``, with torch's subgradient
    conventions (``clamp`` passes the gradient where ``input >= min``; ``|0|`` has slope 0)."""
    t2, th = math.tanh(x2), math.tanh(0.5 * x2)
    sech2, sech2h = 1.0 - t2 * t2, 1.0 - th * th
    a = -0.5 * x1 - 3.5 + t2  # 0.5(-x1-7) - tanh(-x2)
    b = -0.5 * x1 + 3.5 - t2  # 0.5(-x1+3) + tanh(-x2) + 2
    f1 = math.log(max(abs(a), LOWER)) + 6
    f2 = math.log(max(abs(b), LOWER)) + 6
    df1 = (-0.5 / a, sech2 / a) if abs(a) >= LOWER else (0.0, 0.0)
    df2 = (-0.5 / b, -sech2 / b) if abs(b) >= LOWER else (0.0, 0.0)
    c1, dc1 = (th, 0.5 * sech2h) if th >= 0 else (0.0, 0.0)
    c2, dc2 = (-th, -0.5 * sech2h) if -th >= 0 else (0.0, 0.0)
    q = 0.01 * (x2 + 8) ** 2 - 20
    g1, g2 = (x1 - 7) ** 2 / 10 + q, (x1 + 7) ** 2 / 10 + q
    dg1, dg2 = ((x1 - 7) / 5, 0.02 * (x2 + 8)), ((x1 + 7) / 5, 0.02 * (x2 + 8))
    l1 = scale * (c1 * f1 + c2 * g1)
    l2 = c1 * f2 + c2 * g2
    j1 = (scale * (c1 * df1[0] + c2 * dg1[0]), scale * (dc1 * f1 + c1 * df1[1] + dc2 * g1 + c2 * dg1[1]))
    j2 = (c1 * df2[0] + c2 * dg2[0], dc1 * f2 + c1 * df2[1] + dc2 * g2 + c2 * dg2[1])
    return (l1, l2), (j1, j2)


class _Toy(torch.autograd.Function):
    """The two losses as one autograd node (the analytic Jacobian): cheap forward and backward."""

    @staticmethod
    def forward(ctx, x):
        x1, x2 = (float(v) for v in x.detach().cpu())
        (l1, l2), jac = toy_values_and_jacobian(x1, x2)
        ctx.save_for_backward(torch.tensor(jac, dtype=x.dtype, device=x.device))
        return x.new_tensor(l1), x.new_tensor(l2)

    @staticmethod
    def backward(ctx, g1, g2):
        (jac,) = ctx.saved_tensors
        return g1 * jac[0] + g2 * jac[1]


def toy_losses(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L1, L2)`` of the Nash-MTL/FAMO toy (L1 scaled by 0.1), differentiable in ``x``."""
    return _Toy.apply(x)


# ------------------------------------------------------------------------------ the Pareto front
def _front_x2(x1: np.ndarray, iters: int = 100) -> np.ndarray:
    """For each ``x1`` in [-7, 7], the ``x2`` where ``d/dx2 [c(x2) h(x1, x2)] = 0`` (bisection)."""

    def dfdx2(x2):
        c = np.tanh(-0.5 * x2)
        h = 0.01 * (x2 + 8) ** 2 - 15.1 - 0.1 * x1**2
        return -0.5 * (1 - c**2) * h + c * 0.02 * (x2 + 8)

    lo, hi = np.full_like(x1, -12.0), np.full_like(x1, -7.0)  # dfdx2(lo) < 0 < dfdx2(hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        neg = dfdx2(mid) < 0
        lo, hi = np.where(neg, mid, lo), np.where(neg, hi, mid)
    return 0.5 * (lo + hi)


def pareto_front(n: int = 1401) -> np.ndarray:
    """``(n, 2)`` points of the Pareto set, ``x1`` from -7 to 7."""
    x1 = np.linspace(-7.0, 7.0, n)
    return np.stack([x1, _front_x2(x1)], axis=1)


_FRONT = pareto_front()


def distance_to_front(points) -> np.ndarray:
    """Euclidean distance of each point (``(..., 2)``) to the Pareto set (a polyline of 1401
    points; the curve's sagitta between them is below 1e-7)."""
    p = np.asarray(points, dtype=np.float64)[..., None, :]
    a, b = _FRONT[:-1], _FRONT[1:]
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / (ab * ab).sum(-1), 0.0, 1.0)
    d = np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)
    return d.min(-1)


# ------------------------------------------------------------------------------ running a method
def run(name: str, start, steps: int, lr: float = LR, decay: bool = False, record: int = 200) -> dict:
    """Run method ``name`` from ``start``; returns final point, trajectory, time, warnings, error."""
    x = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    inner = torch.optim.Adam([x], lr=lr)
    opt = gb.GradBalance(inner, method=name, shared_params=[x])
    sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda i: 1 - i / steps) if decay else None
    shift = [torch.tensor(s, dtype=torch.float64) for s in SHIFT]
    features = x if name in REPRESENTATION else None
    traj, error, t0 = [tuple(start)], None, time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for i in range(steps):
                opt.zero_grad()
                l1, l2 = toy_losses(x)
                opt.backward([l1 + shift[0], l2 + shift[1]], features=features)
                opt.step()
                if sched is not None:
                    sched.step()
                if (i + 1) % record == 0 or i + 1 == steps:
                    traj.append(tuple(x.detach().tolist()))
        except Exception as e:  # reported in the table, never hidden
            error = f"{type(e).__name__} at step {i}: {str(e).splitlines()[0][:160]}"
            traj.append(tuple(x.detach().tolist()))
    seconds = time.perf_counter() - t0
    final = x.detach().numpy().copy()
    counts: dict[str, int] = {}
    for w in caught:
        key = _generic(str(w.message))
        counts[key] = counts.get(key, 0) + 1
    return {"final": final, "traj": np.array(traj), "distance": float(distance_to_front(final)),
            "seconds": seconds, "steps_done": i + 1 if error is None else i, "error": error,
            "warnings": len(caught), "warning_counts": counts}


def _generic(message: str) -> str:
    """A warning's first line with its numbers replaced by ``#`` (to count kinds of warnings)."""
    return re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "#", message.splitlines()[0])[:110]


# ------------------------------------------------------------------------------ report
def _plot(results: dict, methods: list[str], starts, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = np.linspace(-10, 10, 201)
    xx, yy = np.meshgrid(g, g)
    zz = np.array([[sum(toy_values_and_jacobian(a, b)[0]) for a in g] for b in g])
    cols = 6
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.0 * rows), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, name in zip(axes.flat, methods, strict=False):
        ax.contour(xx, yy, zz, levels=20, linewidths=0.5, cmap="Greys", alpha=0.8)
        ax.plot(_FRONT[:, 0], _FRONT[:, 1], color="black", lw=2.5, alpha=0.6)
        reached = 0
        for j, s in enumerate(starts):
            r = results[name, j]
            ax.plot(r["traj"][:, 0], r["traj"][:, 1], color=colors(j), lw=1.2)
            ax.plot(*s, "o", color=colors(j), ms=4)
            ax.plot(*r["final"], "*", color=colors(j), ms=8, mec="black", mew=0.4)
            reached += r["distance"] < TOL and r["error"] is None
        ax.set_title(f"{name} ({reached}/{len(starts)})", fontsize=10)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    fig.suptitle("Toy (L1 x 0.1): trajectories over the contour of L1 + L2; black: Pareto set; "
                 "o start, * end; (reached/starts)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt_point(p) -> str:
    return f"({p[0]:.3f}, {p[1]:.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks toy", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"starts {QUICK['starts']}, {QUICK['steps']} steps, Adam lr {QUICK['lr']} "
                             "decaying linearly to 0 (seconds)")
    parser.add_argument("--steps", type=int, default=None, help=f"steps per run (default {STEPS})")
    parser.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default {LR})")
    parser.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    parser.add_argument("--out", type=Path, default=common.RESULTS,
                        help="folder of toy.md and toy.png (--quick: toy-quick.md, toy-quick.png)")
    parser.add_argument("--no-plot", action="store_true", help="skip toy.png")
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder of per-run results: reused when present (same steps and lr), "
                             "so several processes can share a long run")
    args = parser.parse_args(argv)

    steps = args.steps or (QUICK["steps"] if args.quick else STEPS)
    lr = args.lr or (QUICK["lr"] if args.quick else LR)
    decay = args.quick
    starts = QUICK["starts"] if args.quick else STARTS
    methods = args.methods.split(",") if args.methods else gb.available_methods()
    unknown = sorted(set(methods) - set(gb.available_methods()))
    if unknown:
        parser.error(f"unknown methods {unknown}; available: {gb.available_methods()}")
    torch.set_num_threads(1)

    results: dict = {}
    jobs = [(m, j) for m in methods for j in range(len(starts))]
    for m, j in common.progress(jobs, desc="toy"):
        cached = None if args.cache is None else Path(args.cache) / f"{m}-{starts[j]}-{steps}-{lr}-{int(decay)}.pkl"
        if cached is not None and cached.exists():
            results[m, j] = pickle.loads(cached.read_bytes())
            continue
        results[m, j] = run(m, starts[j], steps, lr=lr, decay=decay)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_bytes(pickle.dumps(results[m, j]))

    rows, summary = [], []
    for m in methods:
        reached, secs, notes, warned = 0, 0.0, set(), {}
        for j, s in enumerate(starts):
            r = results[m, j]
            ok = r["error"] is None and r["distance"] < TOL
            reached += ok
            secs += r["seconds"]
            status = "yes" if ok else ("**error**" if r["error"] else "no")
            tr = r["traj"]
            moved = float(np.linalg.norm(tr[-1] - tr[round(0.8 * (len(tr) - 1))]))
            rows.append([m, _fmt_point(s), _fmt_point(r["final"]), f"{r['distance']:.4f}", status,
                         f"{moved:.3f}"])
            if r["error"]:
                notes.add(r["error"])
            for msg, n in r.get("warning_counts", {}).items():
                warned[msg] = warned.get(msg, 0) + n
        steps_per_s = len(starts) * steps / secs if secs else float("nan")
        notes.update(f"{n} warnings: {msg}" for msg, n in warned.items())
        summary.append([m, f"{reached}/{len(starts)}", f"{steps_per_s:.0f}",
                        "; ".join(sorted(notes)).replace("|", "\\|")])

    mode = "quick" if args.quick else "full"
    command = "python -m benchmarks toy " + " ".join(argv if argv is not None else [])
    text = [
        f"# Toy: the two-objective problem of CAGrad / Nash-MTL / FAMO ({mode} mode)\n",
        f"Environment: {common.environment()}\n",
        f"Command: `{command.strip()}`\n",
        "Settings: L1 scaled by 0.1 (Nash-MTL / FAMO variant); starts "
        + ", ".join(map(str, starts))
        + f"; Adam lr {lr}{' decaying linearly to 0' if decay else ''}; {steps} steps per run; "
        "float64; every method with its registered defaults through `GradBalance`, shared "
        f"parameters = x; every method sees L_i + {SHIFT} (same gradients, positive losses); "
        f"representation-mode methods ({', '.join(REPRESENTATION)}) get features = x. "
        f"Reached = final distance to the computed Pareto set < {TOL}.\n",
        "## Summary per method\n",
        common.markdown_table(["method", "reached", "steps/s", "errors / warnings"], summary),
        "## Final point per method and start\n",
        "The last column is how far the point moved over the last 20% of the steps: near 0 means "
        "the run has settled (on the front, or stalled), large means it was still travelling.\n",
        common.markdown_table(["method", "start", "final x", "distance to front", "reached",
                               "moved (last 20%)"], rows),
    ]
    name = "toy-quick" if args.quick else "toy"  # --quick never overwrites the full results
    if not args.no_plot:
        text.append(f"![trajectories of every method over the summed loss]({name}.png)\n")
    common.write_result(Path(args.out) / f"{name}.md", "\n".join(text))
    print(common.markdown_table(["method", "reached", "steps/s", "errors / warnings"], summary))
    if not args.no_plot:
        _plot(results, methods, starts, Path(args.out) / f"{name}.png")
    return 0
