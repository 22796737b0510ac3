"""The 2-D two-task toy problem of CAGrad, Nash-MTL and FAMO: trajectories, against the papers' figures.

The problem (``experiments/toy/problem.py`` of Nash-MTL and FAMO, after CAGrad's ``toy.py``),
with ``x = (x1, x2)`` and ``LOWER = 5e-6``::

    f1 = log(max(|0.5(-x1-7) - tanh(-x2)|, LOWER)) + 6
    f2 = log(max(|0.5(-x1+3) + tanh(-x2) + 2|, LOWER)) + 6
    g1 = ((-x1+7)^2 + 0.1(-x2-8)^2)/10 - 20
    g2 = ((-x1-7)^2 + 0.1(-x2-8)^2)/10 - 20
    c1 = max(tanh(0.5 x2), 0),  c2 = max(tanh(-0.5 x2), 0)
    L1 = s (c1 f1 + c2 g1),     L2 = c1 f2 + c2 g2

with ``s = 0.1`` in Nash-MTL and FAMO and ``s = 1`` in CAGrad. Each method runs with its own
paper's toy protocol where the paper has one (read from the official code; see ``SETTINGS``):

* Nash-MTL (``experiments/toy/trainer.py``): ``s = 0.1``, the five starts below, Adam lr 1e-3,
  35,000 steps; its figure shows LS, PCGrad, CAGrad (c = 0.4), MGDA and Nash-MTL.
* FAMO (``experiments/toy/trainer.py`` and ``run.sh``): the same but 50,000 steps, ``gamma = 0``
  and the loss offsets ``min_losses = (-21 s, -21)``.
* CAGrad (``toy.py``): ``s = 1``, starts (-8.5, 7.5), (-8.5, -5), (9, 9), Adam lr 1e-3,
  100,000 steps, ``c = 0.5`` with the toy's rescale ``1 / (1 + c)``; its figure shows GD
  (the mean), MGDA, PCGrad and CAGrad.

Methods without a toy protocol of their own run Nash-MTL's. Everything goes through the
ordinary ``GradBalance`` path (``opt.backward([L1, L2]); opt.step()``); where an official toy
clips the shared gradient's norm and the library method does not (yet), the harness applies
``torch.nn.utils.clip_grad_norm_`` on ``x`` after ``opt.backward``, as the official scripts do.
The losses are one small autograd function with the analytic Jacobian (checked against the
plain torch formula in the tests), which keeps 100,000-step runs affordable on one CPU core.

"Reaching the front" is judged in loss space, as the papers' figures show it: the distance of
``(L1 / s, L2)`` to the image of the Pareto set (below ``TOL``). The Pareto set is computed, not
assumed: in the lower half plane the losses are ``c(x2) g_i(x)`` with ``c = tanh(-x2/2)``, so
the Pareto-stationary points are the stationary points of ``c (w1 g1 + w2 g2)`` over weights
``w >= 0``, which gives ``x1 = 7 (w1 - w2)`` in ``[-7, 7]`` and, for each ``x1``, one ``x2``
solving ``d/dx2 [c(x2) (0.01 (x2 + 8)^2 - 15.1 - 0.1 x1^2)] = 0``: a curve from
``x2 = -8.4345`` at the ends to ``x2 = -8.3551`` at ``x1 = 0`` (the line ``x2 = -8.3552``
usually drawn is its value at ``x1 = 0``). The distance in ``x`` to that curve is reported too;
it is much looser: along ``x2`` the losses are flat (``0.01 (x2 + 8)^2``), so a point 1 unit
above the set can have losses within 0.01 of the front.

    python -m benchmarks toy --quick     # the demo, about a minute: mean, MGDA, Nash-MTL, FairGrad
                                         # from the five starts (writes toy-quick.md / .png)
    python -m benchmarks toy             # every method, its paper's protocol: core-hours
                                         # (--methods, --cache let several processes share it)
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import gradbalance as gb
from benchmarks import common
from gradbalance.methods.base import make_method

LOWER = 5e-6
SCALE = 0.1  # Nash-MTL / FAMO multiply L1 by 0.1
STARTS = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))
CAGRAD_STARTS = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))
LR = 1e-3
STEPS = 35_000  # Nash-MTL's toy
#: "reached the front": distance of (L1 / s, L2) to the front's image below this (the front
#: spans about 20 loss units; the papers draw it as a line about 0.5 units thick)
TOL = 0.1
REPRESENTATION = ("mgda_ub", "aligned_mtl_ub")  # features = x itself (the whole "trunk" output)
POINTS = 1000  # recorded points per trajectory (every steps // POINTS steps)


def shift(scale: float) -> tuple[float, float]:
    """Offsets making both losses positive: every method sees ``L_i + shift_i`` (same gradients).

    These are FAMO's toy offsets (``set_min_losses([-21 s, -21])``): ``L_i > -21`` everywhere.
    """
    return (21.0 * scale, 21.0)


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
    def forward(ctx, x, scale):
        x1, x2 = (float(v) for v in x.detach().cpu())
        (l1, l2), jac = toy_values_and_jacobian(x1, x2, scale)
        ctx.save_for_backward(torch.tensor(jac, dtype=x.dtype, device=x.device))
        return x.new_tensor(l1), x.new_tensor(l2)

    @staticmethod
    def backward(ctx, g1, g2):
        (jac,) = ctx.saved_tensors
        return g1 * jac[0] + g2 * jac[1], None


def toy_losses(x: torch.Tensor, scale: float = SCALE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L1, L2)`` of the toy (``L1`` scaled by ``scale``), differentiable in ``x``."""
    return _Toy.apply(x, scale)


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


def unscaled_losses(points) -> np.ndarray:
    """``(L1 / s, L2)`` of each point (``(..., 2)``): the loss vector whatever the scale ``s``."""
    p = np.asarray(points, dtype=np.float64)
    flat = [toy_values_and_jacobian(float(a), float(b), 1.0)[0] for a, b in p.reshape(-1, 2)]
    return np.array(flat, dtype=np.float64).reshape(p.shape)


_FRONT = pareto_front()
_FRONT_LOSSES = unscaled_losses(_FRONT)


def _polyline_distance(points, line: np.ndarray) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)[..., None, :]
    a, b = line[:-1], line[1:]
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / (ab * ab).sum(-1), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1).min(-1)


def distance_to_front(points) -> np.ndarray:
    """Euclidean distance in ``x`` of each point (``(..., 2)``) to the Pareto set (a polyline of
    1401 points; the curve's sagitta between them is below 1e-7)."""
    return _polyline_distance(points, _FRONT)


def loss_gap(points) -> np.ndarray:
    """Distance of each point's ``(L1 / s, L2)`` to the Pareto front (the Pareto set's image):
    how far from the front the point is in the papers' loss-space figures."""
    return _polyline_distance(unscaled_losses(points), _FRONT_LOSSES)


# ------------------------------------------------------------------------------ protocols and settings
@dataclass(frozen=True)
class Protocol:
    """A paper's toy protocol: loss scale, starts, Adam steps and learning rate."""

    name: str
    scale: float
    starts: tuple
    steps: int
    lr: float
    source: str
    lr_end: float = 1.0  # lr decays linearly to lr * lr_end at the last step (the demo only)


PROTOCOLS = {
    "nash": Protocol("nash", 0.1, STARTS, 35_000, 1e-3,
                     "Nash-MTL experiments/toy/trainer.py: n_epochs=35000, Adam lr 1e-3, scale 0.1"),
    "famo": Protocol("famo", 0.1, STARTS, 50_000, 1e-3,
                     "FAMO experiments/toy/trainer.py + run.sh: n_epochs=50000, Adam lr 1e-3, scale 0.1"),
    "cagrad": Protocol("cagrad", 1.0, CAGRAD_STARTS, 100_000, 1e-3,
                       "CAGrad toy.py: n_iter=100000, Adam lr 1e-3, no scale, 3 starts"),
}
#: the demo: Nash-MTL's problem and starts, 35,000 x 1e-3 compressed into a decaying schedule
QUICK = Protocol("quick", 0.1, STARTS, 1_800, 0.035,
                 "demo: Nash-MTL's problem and starts, Adam lr 0.035 decaying linearly to 0.0105", lr_end=0.3)

NASH_FIG = "Nash-MTL's toy figure (its repo's misc/toy_pareto_2d.png)"
FAMO_FIG = "FAMO's toy figure (its repo's misc/fig.png)"
CAGRAD_FIG = "CAGrad's toy figure (its repo's misc/cagrad.gif)"
FAIRGRAD_FIG = "FairGrad's toy figure, panel (b) (its repo's misc/toy.png)"


@dataclass(frozen=True)
class Setting:
    """One method with one protocol, its arguments, the harness clip and what the paper shows.

    ``paper_fails`` are the starts whose trajectory does not reach the front in ``figure``
    (read from the figure; ``None``: no figure to compare with).
    """

    label: str
    method: str
    protocol: str
    kwargs: tuple = ()
    clip: float = 0.0  # clip_grad_norm_(x, clip) after opt.backward; 0: none
    figure: str = ""
    paper_fails: tuple | None = None
    source: str = ""  # where the arguments come from

    @property
    def key(self) -> str:
        return f"{self.protocol}:{self.label}"


SETTINGS = (
    # Nash-MTL's figure: LS, PCGrad, CAGrad (c = 0.4), MGDA, Nash-MTL (35,000 steps)
    Setting("mean", "mean", "nash", figure=NASH_FIG, paper_fails=((9.0, 9.0),),
            source="LS (Nash-MTL's ls: sum of the losses; Adam sees the same direction)"),
    Setting("mgda", "mgda", "nash", figure=NASH_FIG, paper_fails=(),
            source="Nash-MTL's MGDA: params='shared', normalization='none'"),
    Setting("pcgrad", "pcgrad", "nash", figure=NASH_FIG, paper_fails=((9.0, 9.0),),
            source="Nash-MTL's PCGrad"),
    Setting("cagrad", "cagrad", "nash", (("c", 0.4), ("rescale", 1)), figure=NASH_FIG, paper_fails=((9.0, 9.0),),
            source="Nash-MTL's CAGrad: c=0.4 (--c default), rescale 1/(1+c^2), no clip"),
    Setting("nash_mtl", "nash_mtl", "nash", figure=NASH_FIG, paper_fails=(),
            source="Nash-MTL: optim_niter=20, max_norm=1.0 (the library's defaults, clip inside the method)"),
    # FairGrad: no toy code published; its figure is drawn on this problem (L1 x 0.1, 5 starts)
    Setting("fairgrad", "fairgrad", "nash", (("alpha", 1.0),), clip=1.0, figure=FAIRGRAD_FIG, paper_fails=(),
            source="FairGrad alpha=1 (proportional fair, panel (b)); clip max_norm=1.0 as its trainers' "
                   "FairGrad.backward; steps not published (Nash-MTL's used)"),
    # FAMO's own protocol, with and without the clip
    Setting("famo", "famo", "famo", (("gamma", 0.0),), clip=1.0, figure=FAMO_FIG, paper_fails=(),
            source="FAMO run.sh gamma=0.0, w_lr=0.025, min_losses (-2.1, -21); clip max_norm=1.0 after "
                   "the backward, as famo.py's FAMO.backward"),
    Setting("famo (no clip)", "famo", "famo", (("gamma", 0.0),), clip=0.0, figure=FAMO_FIG, paper_fails=(),
            source="as above without the clip: the toy's WeightMethod.backward calls clip_grad_norm_ "
                   "before loss.backward(), on gradients zero_grad() just cleared (a no-op)"),
    # CAGrad's figure: GD, MGDA, PCGrad, CAGrad (c = 0.5), unscaled, 100,000 steps
    Setting("mean", "mean", "cagrad", figure=CAGRAD_FIG, paper_fails=((-8.5, 7.5), (9.0, 9.0)),
            source="CAGrad toy 'sgd': the mean gradient"),
    Setting("mgda", "mgda", "cagrad", figure=CAGRAD_FIG, paper_fails=(),
            source="CAGrad toy 'mgd': the two-vector min-norm rule"),
    Setting("pcgrad", "pcgrad", "cagrad", figure=CAGRAD_FIG, paper_fails=(),
            source="CAGrad toy 'pcgrad'"),
    Setting("cagrad", "cagrad", "cagrad", (("c", 0.5), ("rescale", 2)), figure=CAGRAD_FIG, paper_fails=(),
            source="CAGrad toy: c=0.5, rescale 1/(1+c)"),
)
#: the demo's methods: equal weighting and the three that reach the front from every start
QUICK_METHODS = ("mean", "mgda", "nash_mtl", "fairgrad")


def settings_for(methods, quick: bool = False) -> list[Setting]:
    """The paper settings of ``methods``, then the Nash-MTL protocol with the registered defaults
    for methods no paper setting covers. ``quick``: one setting per method on the demo protocol."""
    paper = [s for s in SETTINGS if s.method in methods]
    if quick:
        chosen = []
        for m in methods:
            own = [s for s in paper if s.method == m and s.protocol == "nash"]
            chosen.append(replace(own[0], protocol="quick") if own else
                          Setting(m, m, "quick", source="registered defaults"))
        return chosen
    covered = {s.method for s in paper}
    return paper + [Setting(m, m, "nash", source="registered defaults (no toy in its paper)")
                    for m in methods if m not in covered]


def build_method(setting: Setting):
    """The method object of ``setting`` (a name when it has no arguments). The library's own clip
    of FAMO and FairGrad (``max_norm``, 1.0 by default) is switched off: the harness clips where
    the setting says so, after ``opt.backward``, as the official scripts do, so a clip is never
    applied twice or hidden."""
    kwargs = dict(setting.kwargs)
    if setting.method in ("famo", "fairgrad"):
        kwargs["max_norm"] = None
    if not kwargs:
        return setting.method
    return type(make_method(setting.method))(**kwargs)


# ------------------------------------------------------------------------------ running a method
def run(method, start, steps: int, lr: float = LR, scale: float = SCALE, clip: float = 0.0,
        lr_end: float = 1.0, points: int = POINTS, name: str | None = None) -> dict:
    """Run ``method`` (a name or a method object) from ``start``; returns the final point, the
    trajectory (``points + 1`` rows at most), time, warnings and any error."""
    name = name or (method if isinstance(method, str) else type(method).__name__.lower())
    x = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    inner = torch.optim.Adam([x], lr=lr)
    opt = gb.GradBalance(inner, method=method, shared_params=[x])
    sched = (torch.optim.lr_scheduler.LambdaLR(inner, lambda i: 1 - (1 - lr_end) * i / steps)
             if lr_end != 1.0 else None)
    offsets = [torch.tensor(s, dtype=torch.float64) for s in shift(scale)]
    features = x if name in REPRESENTATION else None
    every = max(1, steps // points)
    traj, error, max_grad, t0 = [tuple(start)], None, 0.0, time.perf_counter()
    i = -1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for i in range(steps):
                opt.zero_grad()
                l1, l2 = toy_losses(x, scale)
                opt.backward([l1 + offsets[0], l2 + offsets[1]], features=features)
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_([x], clip)
                max_grad = max(max_grad, float(x.grad.norm()))
                opt.step()
                if sched is not None:
                    sched.step()
                if (i + 1) % every == 0 or i + 1 == steps:
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
            "gap": float(loss_gap(final)), "seconds": seconds,
            "steps_done": steps if error is None else i, "error": error, "max_grad": max_grad,
            "warnings": len(caught), "warning_counts": counts}


def reached(result: dict) -> bool:
    """On the front: no error and the final loss vector within ``TOL`` of the front."""
    return result["error"] is None and result["gap"] < TOL


def _generic(message: str) -> str:
    """A warning's first line with its numbers replaced by ``#`` (to count kinds of warnings)."""
    return re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "#", message.splitlines()[0])[:110]


def run_setting(setting: Setting, protocol: Protocol, start) -> dict:
    """Run one setting from one start under ``protocol``."""
    return run(build_method(setting), start, protocol.steps, lr=protocol.lr, scale=protocol.scale,
               clip=setting.clip, lr_end=protocol.lr_end, name=setting.method)


# ------------------------------------------------------------------------------ report
_TAG = {"nash": "", "quick": "", "famo": " [FAMO's toy]", "cagrad": " [CAGrad's toy]"}


def _pt(p) -> str:
    return f"({p[0]:g}, {p[1]:g})"


def _fmt_point(p) -> str:
    return f"({p[0]:.3f}, {p[1]:.3f})"


def comparison(setting: Setting, failed: list, starts) -> str:
    """``match`` / ``differs: ...`` of the measured failing starts against the paper's figure
    (restricted to the ``starts`` that were run)."""
    if setting.paper_fails is None:
        return "no figure"
    ran = {tuple(map(float, s)) for s in starts}
    want = {tuple(map(float, s)) for s in setting.paper_fails} & ran
    got = {tuple(map(float, s)) for s in failed}
    if want == got:
        return "match"
    parts = []
    if got - want:
        parts.append("fails here from " + ", ".join(_pt(s) for s in sorted(got - want)))
    if want - got:
        parts.append("reaches here from " + ", ".join(_pt(s) for s in sorted(want - got)))
    return "differs: " + "; ".join(parts)


def _paper_text(setting: Setting, starts) -> str:
    if setting.paper_fails is None:
        return ""
    fails = [s for s in setting.paper_fails if tuple(s) in {tuple(t) for t in starts}]
    n = len(starts)
    if not fails:
        return f"{n}/{n}"
    return f"{n - len(fails)}/{n}, fails from " + ", ".join(_pt(s) for s in fails)


def _contours(scale: float):
    g = np.linspace(-10, 10, 161)
    zz = np.array([[sum(toy_values_and_jacobian(a, b, scale)[0]) for a in g] for b in g])
    return g, zz


def _plot(results: dict, settings: list[Setting], protocols: dict, path: Path, cols: int,
          loss_row: bool, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = math.ceil(len(settings) / cols)
    per = 2 if loss_row else 1
    size = 3.6 if loss_row else 3.0
    fig, axes = plt.subplots(blocks * per, cols, figsize=(size * cols, size * blocks * per + 0.9),
                             squeeze=False)
    colors = plt.get_cmap("tab10")
    contour_cache: dict = {}
    all_starts: dict = {}
    for n, st in enumerate(settings):
        proto = protocols[st.protocol]
        ax = axes[(n // cols) * per, n % cols]
        if proto.scale not in contour_cache:
            contour_cache[proto.scale] = _contours(proto.scale)
        g, zz = contour_cache[proto.scale]
        ax.contour(g, g, zz, levels=18, linewidths=0.6, cmap="Greys", alpha=0.7)
        ax.plot(_FRONT[:, 0], _FRONT[:, 1], color="0.35", lw=4, alpha=0.6, solid_capstyle="round")
        ok, ran = 0, 0
        for j, s in enumerate(proto.starts):
            if (st.key, j) not in results:
                continue
            r, ran = results[st.key, j], ran + 1
            color = colors(STARTS.index(s) if s in STARTS else 5 + CAGRAD_STARTS.index(s))
            all_starts[s] = color
            ax.plot(r["traj"][:, 0], r["traj"][:, 1], color=color, lw=1.4)
            ax.plot(*s, "o", color=color, ms=6, mec="black", mew=0.5)
            hit = reached(r)
            ok += hit
            ax.plot(*r["final"], "*" if hit else "X", color=color, ms=11 if hit else 9, mec="black", mew=0.6)
        head = st.label + _TAG[st.protocol]
        ax.set_title(f"{head}: {ok}/{ran} reach the front", fontsize=10)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
        if loss_row:
            lx = axes[(n // cols) * per + 1, n % cols]
            lx.plot(proto.scale * _FRONT_LOSSES[:, 0], _FRONT_LOSSES[:, 1], color="0.35", lw=4, alpha=0.6)
            for j, s in enumerate(proto.starts):
                if (st.key, j) not in results:
                    continue
                r = results[st.key, j]
                color = all_starts[s]
                ll = unscaled_losses(r["traj"])
                lx.plot(proto.scale * ll[:, 0], ll[:, 1], color=color, lw=1.2)
                lx.plot(proto.scale * ll[0, 0], ll[0, 1], "o", color=color, ms=6, mec="black", mew=0.5)
                lx.plot(proto.scale * ll[-1, 0], ll[-1, 1], "*" if reached(r) else "X", color=color,
                        ms=11 if reached(r) else 9, mec="black", mew=0.6)
            lx.set_xlim(-21 * proto.scale, 9 * proto.scale)
            lx.set_ylim(-21, 9)
            lx.set_xlabel(f"L1{' (x 0.1)' if proto.scale != 1 else ''}", fontsize=8)
            lx.set_ylabel("L2", fontsize=8)
            lx.tick_params(labelsize=7)
            lx.set_title("the same runs in loss space", fontsize=9)
    for k in range(len(settings), blocks * cols):
        for r in range(per):
            axes[(k // cols) * per + r, k % cols].axis("off")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", mec="black", lw=1.4, label=f"start {_pt(s)}")
               for s, c in all_starts.items()]
    handles += [Line2D([], [], color="0.35", lw=4, alpha=0.6, label="Pareto front"),
                Line2D([], [], color="0.5", marker="*", lw=0, ms=10, mec="black", label="end on the front"),
                Line2D([], [], color="0.5", marker="X", lw=0, ms=8, mec="black", label="end off the front")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06 if blocks * per <= 2 else 0.03, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summarize(results: dict, settings: list[Setting], protocols: dict) -> list[dict]:
    """Per setting: which starts reach the front (from the final points), against the paper."""
    out = []
    for st in settings:
        proto = protocols[st.protocol]
        ran = [s for j, s in enumerate(proto.starts) if (st.key, j) in results]
        if not ran:
            continue
        rs = [results[st.key, j] for j in range(len(proto.starts)) if (st.key, j) in results]
        failed = [s for s, r in zip(ran, rs, strict=True) if not reached(r)]
        out.append({"setting": st, "protocol": proto, "reached": len(ran) - len(failed),
                    "starts": len(ran), "failed": failed, "vs_paper": comparison(st, failed, ran),
                    "paper": _paper_text(st, ran), "not_run": [s for s in proto.starts if s not in ran],
                    "steps_per_s": sum(r["steps_done"] for r in rs) / max(sum(r["seconds"] for r in rs), 1e-9),
                    "errors": sorted({r["error"] for r in rs if r["error"]}),
                    "warnings": {k: sum(r["warning_counts"].get(k, 0) for r in rs)
                                 for r in rs for k in r["warning_counts"]}})
    return out


def terminal_summary(summary: list[dict]) -> str:
    """The short text the demo prints: per method, the starts that reach the front, vs the paper."""
    lines = []
    for row in summary:
        st = row["setting"]
        failed = row["failed"]
        status = "all starts" if not failed else "not from " + ", ".join(_pt(s) for s in failed)
        paper = f"; paper: {row['paper']} -> {row['vs_paper']}" if st.paper_fails is not None else ""
        if row["not_run"]:
            paper += "; not run from " + ", ".join(_pt(s) for s in row["not_run"])
        label = st.label + _TAG[st.protocol]
        lines.append(f"  {label:<10} reaches the front {row['reached']}/{row['starts']} ({status}){paper}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks toy", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"the demo: {', '.join(QUICK_METHODS)} from the 5 starts, {QUICK.steps} steps, "
                             f"Adam lr {QUICK.lr} decaying linearly to {QUICK.lr * QUICK.lr_end:g} (under a minute)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: each protocol's)")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: each protocol's)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated method names (default: every method; --quick: "
                             f"{','.join(QUICK_METHODS)})")
    parser.add_argument("--settings", default=None,
                        help="comma-separated setting keys protocol:label, e.g. 'cagrad:cagrad,nash:mean' "
                             "(a subset of what --methods selects; to split a full run between processes)")
    parser.add_argument("--starts", default=None,
                        help="override the starts, e.g. --starts='9,9;-7.5,-0.5' (with \"=\" when it begins "
                             "with a minus sign; default: each protocol's)")
    parser.add_argument("--out", type=Path, default=common.RESULTS,
                        help="folder of toy.md and the plots (--quick: toy-quick.md, toy-quick.png)")
    parser.add_argument("--no-plot", action="store_true", help="skip the plots")
    parser.add_argument("--cached-only", action="store_true",
                        help="with --cache: report only the runs already in the cache (the others are "
                             "listed as not run)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder of per-run results: reused when present (same settings), "
                             "so several processes can share a long run")
    args = parser.parse_args(argv)

    available = gb.available_methods()
    methods = args.methods.split(",") if args.methods else list(QUICK_METHODS if args.quick else available)
    unknown = sorted(set(methods) - set(available))
    if unknown:
        parser.error(f"unknown methods {unknown}; available: {list(available)}")
    protocols = dict(PROTOCOLS, quick=QUICK)
    if args.starts:
        try:
            starts = tuple(tuple(float(v) for v in p.split(",")) for p in args.starts.split(";"))
        except ValueError:
            parser.error(f"--starts must look like '9,9;-7.5,-0.5', got {args.starts!r}")
        if not starts or any(len(s) != 2 for s in starts):
            parser.error(f"--starts must look like '9,9;-7.5,-0.5', got {args.starts!r}")
        protocols = {k: replace(p, starts=starts) for k, p in protocols.items()}
    if args.steps or args.lr:
        protocols = {k: replace(p, steps=args.steps or p.steps, lr=args.lr or p.lr) for k, p in protocols.items()}
    settings = settings_for(methods, quick=args.quick)
    if args.settings:
        keys = args.settings.split(",")
        missing = sorted(set(keys) - {st.key for st in settings})
        if missing:
            parser.error(f"unknown settings {missing}; available: {[st.key for st in settings]}")
        settings = [st for st in settings if st.key in keys]
    torch.set_num_threads(1)

    results: dict = {}
    jobs = [(st, j) for st in settings for j in range(len(protocols[st.protocol].starts))]
    t0, c0 = time.perf_counter(), time.process_time()
    for st, j in common.progress(jobs, desc="toy"):
        proto = protocols[st.protocol]
        start = proto.starts[j]
        cached = None
        if args.cache is not None:
            tag = re.sub(r"[^\w.,=-]+", "_", f"{st.key}-{st.kwargs}-{st.clip}-{start}-{proto.scale}-"
                                              f"{proto.steps}-{proto.lr}-"
                                              f"{'0' if proto.lr_end == 1 else f'end{proto.lr_end}'}")
            cached = Path(args.cache) / f"{tag}.pkl"
        if cached is not None and cached.exists():
            results[st.key, j] = pickle.loads(cached.read_bytes())
            continue
        if args.cached_only:
            continue
        results[st.key, j] = run_setting(st, proto, start)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_bytes(pickle.dumps(results[st.key, j]))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0

    summary = summarize(results, settings, protocols)
    name = "toy-quick" if args.quick else "toy"  # --quick never overwrites the full results
    command = "python -m benchmarks toy " + " ".join(argv if argv is not None else [])
    text = [f"# Toy: the two-objective problem of CAGrad / Nash-MTL / FAMO ({'demo' if args.quick else 'full'})\n",
            f"Environment: {common.environment()}\n",
            f"Command: `{command.strip()}` (runs not in the cache: {elapsed:.0f} s wall, {cpu:.0f} s CPU here)\n"]
    used = sorted({st.protocol for st in settings}, key=list(protocols).index)
    text.append("## Protocols\n")
    text.append(common.markdown_table(
        ["protocol", "L1 scale", "starts", "Adam steps", "lr", "from"],
        [[p.name, p.scale, ", ".join(map(_pt, p.starts)), p.steps,
          f"{p.lr:g}" + (f" decaying linearly to {p.lr * p.lr_end:g}" if p.lr_end != 1 else ""), p.source]
         for p in (protocols[k] for k in used)]))
    text.append(f"Every method sees L_i + (21 s, 21) (FAMO's toy offsets: same gradients, positive "
                f"losses); representation-mode methods ({', '.join(REPRESENTATION)}) get features = x. "
                f"A start *reaches the front* when the final (L1 / s, L2) is within {TOL} of the "
                "Pareto front's image (the papers' loss-space figures); the distance in x is listed too.\n")
    text.append("## Settings per method\n")
    text.append(common.markdown_table(
        ["method", "protocol", "arguments", "harness clip", "from"],
        [[st.label, st.protocol, ", ".join(f"{k}={v}" for k, v in st.kwargs) or "defaults",
          f"max_norm {st.clip:g}" if st.clip else "none", st.source.replace("|", "\\|")] for st in settings]))
    text.append("## Against the papers' figures\n")
    text.append(common.markdown_table(
        ["method", "protocol", "reached", "not reached from", "paper's figure", "figure shows", "verdict",
         "steps/s", "errors / warnings"],
        [[row["setting"].label, row["protocol"].name,
          f"{row['reached']}/{row['starts']}" + (f" (not run from {', '.join(map(_pt, row['not_run']))})"
                                                 if row["not_run"] else ""),
          ", ".join(map(_pt, row["failed"])) or "-", row["setting"].figure or "-", row["paper"] or "-",
          row["vs_paper"], f"{row['steps_per_s']:.0f}",
          "; ".join(row["errors"] + [f"{n} x {m}" for m, n in row["warnings"].items()]).replace("|", "\\|")]
         for row in summary]))
    rows = []
    for st in settings:
        proto = protocols[st.protocol]
        for j, s in enumerate(proto.starts):
            if (st.key, j) not in results:
                rows.append([st.label, st.protocol, _fmt_point(s), "not run", "", "", "", ""])
                continue
            r = results[st.key, j]
            tr = r["traj"]
            moved = float(np.linalg.norm(tr[-1] - tr[round(0.8 * (len(tr) - 1))]))
            status = "yes" if reached(r) else ("**error**" if r["error"] else "no")
            rows.append([st.label, st.protocol, _fmt_point(s), _fmt_point(r["final"]), f"{r['gap']:.4f}",
                         f"{r['distance']:.4f}", status, f"{moved:.3f}"])
    text.append("## Final point per method and start\n")
    text.append("Loss gap: distance of (L1 / s, L2) to the front; x distance: to the Pareto set in x. "
                "The last column is how far the point moved over the last 20% of the steps: near 0 "
                "means it has settled (on the front, or stalled), large means it was still travelling.\n")
    text.append(common.markdown_table(["method", "protocol", "start", "final x", "loss gap", "x distance",
                                       "reached", "moved (last 20%)"], rows))
    if not args.no_plot:
        text.append(f"![trajectories over the contours of L1 + L2, and in loss space]({name}.png)\n")
    common.write_result(Path(args.out) / f"{name}.md", "\n".join(text))
    q = protocols["quick"]
    quick_note = (f" (demo: {q.steps} Adam steps, lr {q.lr:g} decaying linearly to {q.lr * q.lr_end:g}; "
                  "the papers run 35,000 steps at lr 1e-3)") if args.quick else ""
    print(f"Toy problem: which starts reach the Pareto front{quick_note}\n" + terminal_summary(summary))
    settings = [st for st in settings if any((st.key, j) in results for j in range(len(protocols[st.protocol].starts)))]
    if not args.no_plot and settings:
        title = ("Toy problem (L1 x 0.1): top, trajectories over the contours of L1 + L2; bottom, the same runs "
                 "in loss space" if args.quick else
                 "Toy problem: trajectories over the contours of L1 + L2; [protocol] when not Nash-MTL's")
        cols = min(len(settings), 4 if args.quick else 6)
        _plot(results, settings, protocols, Path(args.out) / f"{name}.png", cols=cols, loss_row=args.quick,
              title=title)
        if not args.quick:
            paper = [st for st in settings if st.paper_fails is not None]
            if paper:
                _plot(results, paper, protocols, Path(args.out) / "toy-paper.png", cols=min(len(paper), 6),
                      loss_row=True, title="The papers' protocols: trajectories (top) and loss space (bottom)")
    return 0
