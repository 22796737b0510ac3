"""Min-norm (MGDA) solvers: time per solve and distance to the cvxpy optimum, k = 2..256.

    python -m benchmarks.solvers [--quick] [--out DIR] [--repeats N] [--seeds N]

For each k and seed, a random ``(k, 10k)`` gradient matrix with task scales ``exp(N(0, 1))``
gives ``M = G G^T``; every solver solves it ``--repeats`` times (``time.perf_counter``, median
reported). Distance to the optimum is ``(f - f_cvxpy) / max_i M_ii`` with ``f = a^T M a`` (the
worst over seeds; negative means more accurate than cvxpy) and the largest weight difference.
Writes a markdown table to ``<out>/solvers.md`` (default ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from gradbalance.solvers import min_norm_closed_form, min_norm_cvxpy, min_norm_frank_wolfe

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
FULL_KS = (2, 3, 5, 10, 20, 50, 100, 256)
QUICK_KS = (2, 3, 5, 10, 16)


def problem(k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(k, 10 * k, dtype=torch.float64, generator=gen)
    G = G * torch.randn(k, 1, dtype=torch.float64, generator=gen).exp()
    return G @ G.T


def timed(fn, repeats: int):
    """(median seconds, last result) of ``repeats`` calls after one warm-up call."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def run(ks, repeats: int, cvx_repeats: int, seeds: int) -> list[dict]:
    rows = []
    for k in ks:
        acc: dict[str, list] = {}
        for seed in range(seeds):
            M = problem(k, seed)
            scale = float(M.diagonal().max())
            t_cvx, ref = timed(lambda M=M: min_norm_cvxpy(M), cvx_repeats)
            solvers = {
                "fw": lambda M=M: min_norm_frank_wolfe(M),
                "paper_fw": lambda M=M: min_norm_frank_wolfe(M, corrective=False),
            }
            if k == 2:
                solvers["closed"] = lambda M=M: min_norm_closed_form(M)
            acc.setdefault("cvxpy_t", []).append(t_cvx)
            for name, fn in solvers.items():
                t, r = timed(fn, repeats)
                acc.setdefault(f"{name}_t", []).append(t)
                acc.setdefault(f"{name}_df", []).append(float(r.objective - ref.objective) / scale)
                acc.setdefault(f"{name}_da", []).append(float((r.weights - ref.weights).abs().max()))
                acc.setdefault(f"{name}_it", []).append(r.iterations)
                acc.setdefault(f"{name}_st", []).append(r.status)
        rows.append({"k": k, **acc})
        print(f"k={k} done", file=sys.stderr, flush=True)
    return rows


def _ms(values) -> str:
    return f"{1e3 * statistics.median(values):.3f}"


def _worst(values) -> str:
    return f"{max(values, key=abs):.1e}"


def table(rows: list[dict]) -> str:
    head = ("| k | closed form ms | Frank-Wolfe ms | FW iters (status) | paper FW ms | paper FW iters (status) "
            "| cvxpy ms | cvxpy / FW | FW df | FW max da | paper FW df | closed form df |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        closed = "closed_t" in r
        statuses = sorted(set(r["paper_fw_st"]))
        lines.append(" | ".join([
            f"| {r['k']}",
            _ms(r["closed_t"]) if closed else "-",
            _ms(r["fw_t"]),
            f"{max(r['fw_it'])} ({', '.join(sorted(set(r['fw_st'])))})",
            _ms(r["paper_fw_t"]),
            f"{max(r['paper_fw_it'])} ({', '.join(statuses)})",
            _ms(r["cvxpy_t"]),
            f"{statistics.median(r['cvxpy_t']) / statistics.median(r['fw_t']):.0f}x",
            _worst(r["fw_df"]),
            _worst(r["fw_da"]),
            _worst(r["paper_fw_df"]),
            (_worst(r["closed_df"]) if closed else "-") + " |",
        ]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks solvers", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"k in {QUICK_KS} instead of {FULL_KS}")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per torch solver (median)")
    p.add_argument("--seeds", type=int, default=None, help="random problems per k")
    args = p.parse_args(argv)
    ks = QUICK_KS if args.quick else FULL_KS
    repeats = args.repeats or (20 if args.quick else 50)
    seeds = args.seeds or (2 if args.quick else 3)
    cvx_repeats = max(1, repeats // 10)
    rows = run(ks, repeats, cvx_repeats, seeds)
    env = (f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
           f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    text = "\n".join([
        "# Min-norm solvers: time per solve and distance to the cvxpy optimum",
        "",
        (f"`python -m benchmarks.solvers{' --quick' if args.quick else ''}`: {seeds} random "
         f"problems per k (G of shape (k, 10k), task scales exp(N(0,1))); median of {repeats} "
         f"timed calls ({cvx_repeats} for cvxpy) after a warm-up. {env}."),
        "",
        ("df = (a^T M a - f_cvxpy) / max_i M_ii, the worst over the problems (negative: below "
         "the cvxpy objective); da = largest weight difference to cvxpy. 'Frank-Wolfe' is the "
         "default corrective variant; 'paper FW' is the plain Frank-Wolfe of the paper "
         "(corrective=False); both at the defaults max_iter=250, tol=1e-5; cvxpy is Clarabel "
         "at tolerance 1e-12."),
        "",
        table(rows),
        "",
    ])
    print(text)
    name = "solvers-quick.md" if args.quick else "solvers.md"  # --quick never overwrites the full results
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / name).write_text(text)
    print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
