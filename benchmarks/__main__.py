"""``python -m benchmarks <name> [options]``: one entry point for every benchmark script.

``python -m benchmarks --help`` lists them; ``python -m benchmarks <name> --help`` shows a
script's own options. Every script has ``--quick`` (seconds; what the test suite runs).
"""

from __future__ import annotations

import importlib
import sys

#: name -> (module, one-line description)
BENCHMARKS = {
    "toy": ("benchmarks.toy", "the 2-D two-task problem of CAGrad/Nash-MTL/FAMO: trajectories of every method"),
    "multidigits": ("benchmarks.multidigits", "two overlapped digits, LeNet trunk, every method, 3 seeds"),
    "mixed": ("benchmarks.mixed", "regression + binary + multi-class heads on one trunk (UTKFace layout too)"),
    "hydranet": ("benchmarks.hydranet", "ResNet trunk, age/gender/race heads on UTKFace (or a synthetic stand-in)"),
    "overhead": ("benchmarks.overhead", "per-step time and memory of each method/engine against a plain step"),
    "gram": ("benchmarks.gram", "engine='gram' (no k x P matrix) vs loop, batched and torchjd autogram"),
    "solvers": ("benchmarks.solvers", "min-norm solvers: time per solve and distance to the cvxpy optimum"),
    "mgda_official": ("benchmarks.mgda_official", "MGDA: the official min-norm solver's objective gap to the exact QP"),
    "sharing": ("benchmarks.sharing", "hard/soft, cross-stitch, MMoE, PLE, DSelect-k, MTAN on two-digit images"),
    "gpu": ("benchmarks.gpu", "the GPU check in one call: CUDA tests, engine overhead on ResNet-18 and a ViT"),
    "ddp": ("benchmarks.ddp_multidigits", "MultiDigits under DDP (launches 2 CPU processes with torchrun)"),
}


def usage() -> str:
    width = max(map(len, BENCHMARKS))
    lines = ["usage: python -m benchmarks <name> [--quick] [options]", "", "benchmarks:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in BENCHMARKS.items()]
    lines += ["", "python -m benchmarks <name> --help shows a benchmark's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if name == "ddp":
        return run_ddp(rest)
    module = importlib.import_module(BENCHMARKS[name][0])
    result = module.main(rest)
    return result if isinstance(result, int) else 0


def run_ddp(rest: list[str]) -> int:
    """Launch ``benchmarks/ddp_multidigits.py`` on 2 local processes (``--nproc-per-node N`` overrides)."""
    from pathlib import Path

    from torch.distributed import run as torchrun

    nproc = "2"
    if "--nproc-per-node" in rest:
        i = rest.index("--nproc-per-node")
        nproc, rest = rest[i + 1], rest[:i] + rest[i + 2:]
    script = str(Path(__file__).with_name("ddp_multidigits.py"))
    torchrun.main(["--standalone", "--nproc-per-node", nproc, script, *rest])
    return 0


if __name__ == "__main__":
    sys.exit(main())
