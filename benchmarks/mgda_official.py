"""MGDA: the official code's min-norm solver against the exact QP gradbalance solves.

    python -m benchmarks.mgda_official [--quick] [--seeds N]

A port (numpy, on the Gram matrix) of ``find_min_norm_element`` in isl-org/MultiObjectiveOptimization
``multi_task/min_norm_solvers.py``: the two-vector rule ``_min_norm_element_from2`` (lines 17-30:
``gamma = 0.999`` if ``v1.v2 >= v1.v1``, ``0.001`` if ``v1.v2 >= v2.v2``, otherwise the closed
form), the best-pair start (``_min_norm_2d``), then projected gradient steps with that rule as
line search (lines 120-137), stopping when the L1 change of the weights is below ``1e-5`` and
returning the PREVIOUS iterate (line 136). The official loop never increments its counter
(``MAX_ITER = 250`` is never reached); the port caps it at 100,000 and counts the caps.

For each k and problem family it prints the relative objective gap
``(f_official - f*) / f*``, ``f = a^T M a``, with ``f*`` from gradbalance's exact solver
(``gradbalance.solvers.min_norm``), the same gap relative to ``max_i M_ii`` (scale-free: it
stays small when ``f*`` itself is tiny), and for k = 2 how often the 0.999 / 0.001 cases fire.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from gradbalance.solvers import min_norm

CAP = 100_000


def official_pair(v11: float, v12: float, v22: float) -> tuple[float, float]:
    """``_min_norm_element_from2``: (gamma on the first vector, cost)."""
    if v12 >= v11:
        return 0.999, v11
    if v12 >= v22:
        return 0.001, v22
    gamma = -1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12))
    return gamma, v22 + gamma * (v12 - v22)


def _projection2simplex(y: np.ndarray) -> np.ndarray:
    m = len(y)
    sorted_y = np.flip(np.sort(y), axis=0)
    tmpsum, tmax_f = 0.0, (np.sum(y) - 1.0) / m
    for i in range(m - 1):
        tmpsum += sorted_y[i]
        tmax = (tmpsum - 1) / (i + 1.0)
        if tmax > sorted_y[i + 1]:
            tmax_f = tmax
            break
    return np.maximum(y - tmax_f, np.zeros(y.shape))


def _next_point(cur: np.ndarray, grad: np.ndarray, n: int) -> np.ndarray:
    proj = grad - np.sum(grad) / n
    tm1 = -1.0 * cur[proj < 0] / proj[proj < 0]
    tm2 = (1.0 - cur[proj > 0]) / proj[proj > 0]
    t = 1.0
    if len(tm1[tm1 > 1e-7]) > 0:
        t = np.min(tm1[tm1 > 1e-7])
    if len(tm2[tm2 > 1e-7]) > 0:
        t = min(t, np.min(tm2[tm2 > 1e-7]))
    return _projection2simplex(proj * t + cur)


def official_min_norm(M: np.ndarray) -> tuple[np.ndarray, int, bool]:
    """``find_min_norm_element`` on ``M``: (weights, iterations, hit the cap)."""
    n = M.shape[0]
    best = None
    for i in range(n):
        for j in range(i + 1, n):
            c, d = official_pair(M[i, i], M[i, j], M[j, j])
            if best is None or d < best[2]:
                best = (i, j, c, d)
    sol = np.zeros(n)
    sol[best[0]], sol[best[1]] = best[2], 1 - best[2]
    if n < 3:
        return sol, 0, False
    for it in range(1, CAP + 1):
        new = _next_point(sol, -M @ sol, n)
        v11, v12, v22 = sol @ M @ sol, sol @ M @ new, new @ M @ new
        nc, _ = official_pair(v11, v12, v22)
        new_sol = nc * sol + (1 - nc) * new
        if np.sum(np.abs(new_sol - sol)) < 1e-5:
            return sol, it, False
        sol = new_sol
    return sol, CAP, True


def family(name: str, k: int, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(k, 20, dtype=torch.float64, generator=gen)
    if name == "random":
        G = G * torch.randn(k, 1, dtype=torch.float64, generator=gen).exp()
    elif name == "near_parallel":
        G = torch.randn(1, 20, dtype=torch.float64, generator=gen) + 0.05 * G
    elif name == "scales_1e-4_1e4":
        G = G * torch.logspace(-4, 4, k, dtype=torch.float64)[:, None]
    return (G @ G.T).numpy()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=200)
    args = parser.parse_args(argv)
    seeds = 10 if args.quick else args.seeds
    print("| k | problems | median gap / f* | 95th pct | max | max gap / max M_ii | iterations (median/max) "
          "| capped | 0.999/0.001 cases |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in (2, 3, 5):
        for fam in ("random", "near_parallel", "scales_1e-4_1e4"):
            gaps, iters, capped, clipped, scaled = [], [], 0, 0, []
            for seed in range(seeds):
                M = family(fam, k, seed)
                a, it, cap = official_min_norm(M)
                opt = min_norm(torch.from_numpy(M)).weights.numpy()
                f, f_opt = float(a @ M @ a), float(opt @ M @ opt)
                gaps.append((f - f_opt) / f_opt)
                scaled.append((f - f_opt) / float(np.max(np.diag(M))))
                iters.append(it)
                capped += cap
                if k == 2:
                    clipped += M[0, 1] >= M[0, 0] or M[0, 1] >= M[1, 1]
            gaps.sort()
            p95 = gaps[int(0.95 * (len(gaps) - 1))]
            print(f"| {k} | {fam} | {statistics.median(gaps):.2e} | {p95:.2e} | {max(gaps):.2e} | {max(scaled):.2e} | "
                  f"{int(statistics.median(iters))}/{max(iters)} | {capped} | "
                  f"{clipped if k == 2 else '-'} |")


if __name__ == "__main__":
    main()
