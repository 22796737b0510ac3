"""MGDA and MGDA-UB (Sener & Koltun, NeurIPS 2018). Implemented from the paper; the
normalisations follow the official code (isl-org/MultiObjectiveOptimization)."""

from __future__ import annotations

import torch

from gradbalance.methods.base import Aggregation, Method, TaskInputs, register, register_factory, require_gram
from gradbalance.solvers import MIN_NORM_SOLVERS, min_norm

__all__ = ["MGDA"]

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


@register("mgda", "MGDA (Sener & Koltun 2018): min-norm point of the convex hull of the task gradients")
class MGDA(Method):
    """Multiple-Gradient Descent Algorithm (MGDA), and its upper-bound variant MGDA-UB.

    Finds the point of minimum norm in the convex hull of the task gradients (on the shared
    parameters) and steps along it; when that point is 0 the parameters are Pareto-stationary.
    With ``s_i`` the normalisation scale of task ``i``, the weights solve, on the Gram matrix
    ``M = G G^T`` only::

        alpha = argmin_{a >= 0, sum a = 1} sum_ij a_i a_j M_ij / (s_i s_j)
        shared update: d = sum_i alpha_i g_i        (raw g_i; alpha on the simplex)

    i.e. the normalisation is used only inside the solver and ``alpha`` is applied to the raw
    losses, as the official code does (``loss = sum_t sol[t] * loss_t``). Task-specific (head)
    parameters get their own task's unweighted gradient (``head_weights`` = 1), the paper's
    Algorithm 2 (the official code scales the heads by ``alpha`` too, its issue #12).

    Args:
        solver: ``"auto"`` (default: closed form for 2 tasks, Frank-Wolfe otherwise),
            ``"frank_wolfe"``, ``"cvxpy"`` (Clarabel; a failure raises
            :class:`gradbalance.solvers.SolverError` and the step changes nothing) or
            ``"closed_form"`` (2 tasks only). See :mod:`gradbalance.solvers`.
        normalization: ``s_i`` = 1 (``"none"``, default, the paper's algorithm), ``||g_i||``
            (``"l2"``), ``L_i`` (``"loss"``) or ``L_i ||g_i||`` (``"loss+"``, the official sample
            configuration). A zero gradient stays zero; ``"loss"``/``"loss+"`` need
            ``L_i > 0`` wherever ``g_i != 0`` and raise ValueError otherwise.
        mode: ``"exact"`` (default; gradients on the shared parameters, one backward per task)
            or ``"representation"`` (MGDA-UB: gradients w.r.t. the shared representation
            passed as ``opt.backward(losses, features=z)``, then one backward of
            ``sum_i alpha_i L_i``; registered as ``"mgda_ub"``).
        max_iter: Frank-Wolfe iteration cap, >= 0 (default 250).
        tol: Frank-Wolfe relative duality-gap tolerance, > 0 (default 1e-5).

    Stateless. ``StepInfo.extras``: ``solver``, ``status``, ``iterations``, ``gap`` (of the
    normalised problem) and ``update_norm`` (``||d||`` on the raw gradients, or on the features).
    Cost: one backward per task (exact) or one through the heads per task plus one full
    backward (representation), and a k x k solve (copied to the CPU once; see
    :mod:`gradbalance.solvers`).

    Example:
        >>> import torch, gradbalance as gb
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> inputs = gb.methods.TaskInputs(losses=torch.ones(2, dtype=torch.float64), gram=g @ g.T)
        >>> gb.methods.MGDA().aggregate(inputs).weights
        tensor([0.8000, 0.2000], dtype=torch.float64)
        >>> gb.methods.MGDA(normalization="l2").aggregate(inputs).weights
        tensor([0.5000, 0.5000], dtype=torch.float64)

    References:
        O. Sener and V. Koltun, "Multi-Task Learning as Multi-Objective Optimization",
        NeurIPS 2018 (Algorithm 2; MGDA-UB in Section 3.3). J.-A. Desideri, "Multiple-gradient
        descent algorithm (MGDA) for multiobjective optimization", C. R. Math. 350, 2012.
        Deviations: heads are not scaled by ``alpha`` (see above); the Frank-Wolfe solver adds
        a fully corrective step and a gap stopping rule (:func:`gradbalance.solvers.min_norm_frank_wolfe`);
        zero gradients and zero losses are handled instead of dividing by zero.

    The official solver, and why gradbalance solves the paper's QP exactly instead:
    ``MinNormSolver._min_norm_element_from2`` (isl-org/MultiObjectiveOptimization
    ``multi_task/min_norm_solvers.py`` lines 17-30) returns ``gamma = 0.999`` when
    ``v1.v2 >= v1.v1`` and ``0.001`` when ``v1.v2 >= v2.v2`` (where the exact two-vector
    minimiser is 1 or 0), so a task whose gradient is dominated still gets 0.1% of the weight;
    ``find_min_norm_element`` (the projected-gradient variant the training script calls) uses
    that rule as its line search, stops when the L1 change of the weights is below ``1e-5``
    (``STOP_CRIT``; its ``MAX_ITER = 250`` counter is never incremented) and returns the
    previous iterate. Measured against the exact optimum on 200 problems per row
    (``python -m benchmarks.mgda_official``, ``benchmarks/results/mgda_official.md``): the
    official objective ``a^T M a`` is a median 1.5e-8 and at most 15x above the optimum at
    ``k = 5`` on random gradients (95th percentile 1.4x; up to 7% of ``max_i M_ii``), up to
    8% above on nearly parallel gradients, and up to 3.6e10 times above at ``k = 2`` when the
    norms span 1e-4..1e4 (the 0.001 floor on the large gradient). The exact optimum is the
    paper's definition; there is no argument restoring the official rule.
    """

    requires = "gram"

    def __init__(self, solver: str = "auto", normalization: str = "none", mode: str = "exact",
                 max_iter: int = 250, tol: float = 1e-5) -> None:
        if solver not in MIN_NORM_SOLVERS:
            raise ValueError(f"solver must be one of {MIN_NORM_SOLVERS}, got {solver!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if mode not in ("exact", "representation"):
            raise ValueError(f"mode must be 'exact' or 'representation', got {mode!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
            raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
            raise ValueError(f"tol must be a number > 0, got {tol!r}")
        self.solver, self.normalization, self.mode = solver, normalization, mode
        self.max_iter, self.tol = max_iter, float(tol)

    def hyperparameters(self) -> dict:
        return {"solver": self.solver, "normalization": self.normalization, "mode": self.mode,
                "max_iter": self.max_iter, "tol": self.tol}

    def scales(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """The normalisation scales ``s_i`` (``(k,)``, float64) for this step's inputs."""
        norms = gram.diagonal().clamp_min(0.0).sqrt()
        if self.normalization == "none":
            return torch.ones_like(norms)
        if self.normalization == "l2":
            return norms
        losses = losses.to(norms)
        bad = (losses < 0) | ((losses == 0) & (norms > 0))
        if bool(bad.any()):
            raise ValueError(
                f"normalization={self.normalization!r} divides each gradient by its loss, which "
                f"must be > 0 (or the gradient 0); got losses {losses.tolist()}"
            )
        return losses if self.normalization == "loss" else losses * norms

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        gram = require_gram(inputs, "MGDA")
        s = self.scales(gram, inputs.losses)
        inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, 1.0), 0.0)  # zero gradient: stays 0
        result = min_norm(gram * inv[:, None] * inv[None, :], self.solver,
                          max_iter=self.max_iter, tol=self.tol)
        alpha = result.weights.to(gram)
        solver = self.solver
        if solver == "auto":
            solver = "closed_form" if gram.shape[0] <= 2 else "frank_wolfe"
        extras = {"solver": solver, "status": result.status, "iterations": result.iterations,
                  "gap": result.gap, "update_norm": (alpha @ gram @ alpha).clamp_min(0.0).sqrt()}
        return Aggregation(weights=alpha, head_weights=torch.ones_like(alpha), extras=extras)


register_factory(
    "mgda_ub",
    "MGDA-UB (Sener & Koltun 2018): MGDA on gradients w.r.t. the shared representation",
    lambda: MGDA(mode="representation"),
)
