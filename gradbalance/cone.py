"""Projection onto the dual cone of the task gradients, in Gram form (UPGrad, DualProj).

The dual cone of the rows of ``G`` is ``{d : G d >= 0}``: the directions that conflict with no
task. The projection of ``G^T u`` onto it is ``G^T v*`` with

    v* = argmin_{v >= u} v^T M v,        M = G G^T

(Quinton & Rey 2024, Prop. 1: the dual of the projection problem). Everything here runs on the
``k x k`` matrix ``M`` on the CPU in float64 (one host round trip per step).

The box-constrained QP is solved exactly by non-negative least squares: with ``M = R^T R`` (``R``
from the eigendecomposition, so rank-deficient ``M`` is fine) and ``v = u + x``,
``v^T M v = ||R x + R u||^2`` and ``x >= 0`` is Lawson-Hanson's NNLS problem, whose active-set
algorithm ends on a point that satisfies the KKT conditions of the projection:
``v >= u``, ``M v >= 0`` and ``(v - u)_j (M v)_j = 0``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import nnls
from torch import Tensor

__all__ = ["project_weights"]


def project_weights(gram: Tensor, u: Tensor, reg: float = 0.0) -> Tensor:
    """Solve ``min_{v >= u_j} v^T M v`` for every column ``u_j`` of ``u``.

    Args:
        gram: ``(k, k)`` symmetric positive semi-definite Gram matrix ``M``.
        u: ``(k,)`` or ``(k, m)`` lower bounds (one problem per column).
        reg: ``M`` is first divided by its trace (the solution does not change) and then
            ``reg * I`` is added (torchjd's ``reg_eps``); ``0`` solves the exact problem.

    Returns:
        ``v*`` with the shape of ``u``, float64, on ``u``'s device. When every gradient is zero
        (``trace M = 0``) the projection is trivial and ``u`` is returned.
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square matrix, got shape {tuple(gram.shape)}")
    vector = u.ndim == 1
    cols = u.reshape(u.shape[0], -1).double()
    if cols.shape[0] != gram.shape[0]:
        raise ValueError(f"u has {cols.shape[0]} rows but the Gram matrix is {gram.shape[0]} x {gram.shape[0]}")
    m = gram.detach().double().cpu().numpy()
    m = 0.5 * (m + m.T)
    trace = float(np.trace(m))
    if not trace > 0.0:
        return u.double().clone()
    m = m / trace + reg * np.eye(m.shape[0])
    lam, q = np.linalg.eigh(m)
    r = np.sqrt(np.clip(lam, 0.0, None))[:, None] * q.T  # R^T R = M
    lower = cols.cpu().numpy()
    out = np.empty_like(lower)
    for j in range(lower.shape[1]):
        x, _ = nnls(r, -r @ lower[:, j], maxiter=50 * r.shape[1])
        out[:, j] = lower[:, j] + x
    v = torch.from_numpy(out).to(u.device)
    return v.reshape(u.shape[0]) if vector else v
