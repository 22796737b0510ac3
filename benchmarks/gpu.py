"""The GPU check in one call: the CUDA tests, then the engines' overhead on a ResNet-18 and a ViT.

    python -m benchmarks gpu [--quick] [--device auto|cpu|cuda] [--models resnet,vit] [--ks 2,10,40]
                             [--steps 10] [--warmup 3] [--cap S] [--total S] [--no-tests] [--out DIR]

On a CUDA machine, within about 8 minutes in all (about 5 on an H100/H200):

1. ``python -m pytest tests/test_cuda.py`` (CUDA against CPU for every method and engine, the
   batched engine against the loop on conv/BN, GELU/LayerNorm, embedding and attention trunks
   with and without ``features=``, shared parameters used after the features, the
   ``chunk_size="auto"`` probe, ``engine="auto"`` and a compiled trunk), with a time limit;
   its summary goes into the report.
2. The overhead of exact MGDA per engine: a ResNet-18 trunk (batch 64, 3 x 128 x 128) and a
   ViT-style trunk (patch 16, width 384, depth 6, 6 heads, batch 64, 128 px), ``k`` cross-entropy
   heads, at k = 2 / 10 / 40, fp32 with TF32 off. Columns: a plain ``sum(losses).backward()``
   step, GradBalance MGDA with ``engine="loop"``, ``"batched"`` (all tasks in one call) and
   ``"auto"`` (on CUDA: batched with ``chunk_size="auto"``), ``"gram"`` (the Gram matrix without
   the k x P matrix, :mod:`gradbalance.gram`), MGDA-UB (representation mode: the
   gradients w.r.t. the trunk output, then one backward) and torchjd's ``mtl_backward`` + MGDA
   when torchjd is importable. Each cell: median step time over the timed steps divided by the
   plain step's (CUDA-synchronised; a step is forward + backward/balancing + ``SGD.step()``),
   and in brackets ``torch.cuda.max_memory_allocated`` during one extra step, above what was
   allocated before it, divided by the plain step's. The allocator's peak counter is reset
   before every step, so each step (and the ``chunk_size="auto"`` probe) starts from what is
   allocated.

Every configuration is bounded: ``--warmup`` steps, then at most ``--steps`` timed steps or
``--cap`` seconds, then one memory step; a configuration that raises (out of memory, say) is
reported in its cell and the run goes on; none is started once ``--total`` seconds (tests
included) are spent, and those cells say so. ``--quick`` runs tiny models on the CPU in seconds
(what the test suite runs; the memory figure is then the profiler's, as in ``overhead``).

Writes ``<out>/gpu.md`` and ``<out>/gpu.png`` (``gpu-quick.*`` with ``--quick``; default
``benchmarks/results/``) and prints the table.

Packages: the GPU machine needs torch (2.11 was used), numpy, matplotlib and tqdm (its image has
them) and cvxpy for ``nash_mtl`` in the tests, which it lacks: carry cvxpy and what it needs
as wheels for Python 3.12 / manylinux x86_64 (cvxpy, clarabel, osqp, scs, ecos is not needed;
their own dependencies that the image lacks too). Without cvxpy the tests skip ``nash_mtl`` only
and say so. torchjd (``pip install gradbalance[compare]``) is optional: its column reads "not
installed" without it.
"""

from __future__ import annotations

import argparse
import gc
import math
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from benchmarks import common, overhead
from benchmarks.common import RESULTS, environment, markdown_table, write_result

ROOT = Path(__file__).resolve().parents[1]
FULL_KS = (2, 10, 40)
QUICK_KS = (2, 3)
COLUMNS = ("plain", "loop", "batched", "auto", "gram", "representation", "torchjd")
ENGINE_COLUMNS = ("loop", "batched", "auto", "gram", "representation")  # GradBalance columns
TITLES = {
    "plain": "plain step",
    "loop": "MGDA, loop",
    "batched": "MGDA, batched",
    "auto": "MGDA, auto",
    "gram": "MGDA, gram",
    "representation": "MGDA-UB (representation)",
    "torchjd": "torchjd MGDA",
}


# ---------------------------------------------------------------------------- models
class ViT(nn.Module):
    """ViT-style trunk: patch embedding (conv, stride = patch), learned positions, ``depth``
    pre-norm ``nn.TransformerEncoderLayer`` (GELU, no dropout), LayerNorm, mean over tokens."""

    def __init__(self, image: int, patch: int, width: int, depth: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, width, patch, patch)
        self.pos = nn.Parameter(0.02 * torch.randn((image // patch) ** 2, width))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.norm(h).mean(dim=1)


def vit(k: int, device: str, quick: bool) -> overhead.Setup:
    """ViT-style trunk (patch 16, width 384, depth 6, 6 heads), batch 64 of 3 x 128 x 128 (quick: tiny)."""
    image, patch, width, depth, heads, batch = (16, 8, 16, 1, 2, 4) if quick else (128, 16, 384, 6, 6, 64)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    trunk = ViT(image, patch, width, depth, heads).to(device)
    task_heads = nn.ModuleList(nn.Linear(width, 10) for _ in range(k)).to(device)
    x = torch.randn(batch, 3, image, image, generator=gen).to(device)
    ys = [torch.randint(0, 10, (batch,), generator=gen).to(device) for _ in range(k)]
    return overhead.Setup(trunk, task_heads, x, ys,
                          f"ViT-style trunk (patch {patch}, width {width}, depth {depth}, {heads} heads), "
                          f"k Linear({width}, 10) CE heads, batch {batch} of 3x{image}x{image}")


MODELS: dict[str, Callable[[int, str, bool], overhead.Setup]] = {"resnet": overhead.resnet, "vit": vit}


# ---------------------------------------------------------------------------- configurations
@dataclass
class Cell:
    """One configuration of one model and k: its step, and what was measured."""

    column: str
    step: Callable[[], None] | None
    times: list[float] = field(default_factory=list)
    mem: float | None = None
    status: str = "ok"
    ran: str = ""


def make_cells(setup: overhead.Setup) -> list[Cell]:
    """The plain step and one cell per column (module docstring), all on the same model."""
    params, shared = setup.params, setup.shared
    cells: list[Cell] = []
    cells.append(Cell("plain", overhead.plain_step(setup)))
    for column, method, engine in (("loop", "mgda", "loop"), ("batched", "mgda", "batched"),
                                   ("auto", "mgda", "auto"), ("gram", "mgda", "gram"),
                                   ("representation", "mgda_ub", "auto")):
        cell = Cell(column, None)
        cell.step = overhead.balanced_step(setup, method, cell, engine=engine)
        cells.append(cell)
    if overhead.torchjd is None:
        cells.append(Cell("torchjd", None, status="not installed"))
    else:
        opt = torch.optim.SGD(params, lr=1e-4)
        aggregator = overhead.TorchjdMGDA()

        def tjd() -> None:
            opt.zero_grad()
            losses, z = setup.losses()
            overhead.mtl_backward(losses, features=z, shared_params=shared,
                                  tasks_params=[list(h.parameters()) for h in setup.heads])
            overhead.jac_to_grad(shared, aggregator)
            opt.step()

        cells.append(Cell("torchjd", tjd))
    return cells


# ---------------------------------------------------------------------------- measuring
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _reason(err: BaseException) -> str:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "out of memory"
    return f"{type(err).__name__}: {str(err).splitlines()[0][:90] if str(err) else ''}"


def measure_cell(cell: Cell, device: str, warmup: int, steps: int, cap: float) -> None:
    """Warm up, time up to ``steps`` steps or ``cap`` seconds, then one memory step; an
    exception is recorded in ``cell.status`` (module docstring)."""
    if cell.step is None or cell.status != "ok":
        return
    try:
        for _ in range(warmup):
            cell.step()
        _sync(device)
        spent = 0.0
        while len(cell.times) < steps and (spent < cap or len(cell.times) < 1):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            t0 = time.perf_counter()
            cell.step()
            _sync(device)
            dt = time.perf_counter() - t0
            cell.times.append(dt)
            spent += dt
        cell.mem = overhead.peak_bytes(cell.step, device)
    except Exception as err:  # noqa: BLE001 - reported in the cell, the run goes on
        cell.status = _reason(err)
    finally:
        _release(device)


def run_model(model: str, device: str, ks, quick: bool, warmup: int, steps: int, cap: float,
              deadline: float) -> list[dict]:
    """One row per k: every column's time and memory ratio to the plain step."""
    rows = []
    for k in ks:
        row: dict = {"model": model, "k": k, "device": device}
        if time.perf_counter() > deadline:
            row.update({c: {"status": "not run (time budget)"} for c in COLUMNS})
            rows.append(row)
            continue
        try:
            setup = MODELS[model](k, device, quick)
        except Exception as err:  # noqa: BLE001
            row.update({c: {"status": _reason(err)} for c in COLUMNS})
            rows.append(row)
            continue
        row["description"] = setup.description
        cells = make_cells(setup)
        for cell in cells:
            if time.perf_counter() > deadline:
                cell.status = "not run (time budget)"
            measure_cell(cell, device, warmup, steps, cap)
        plain = cells[0]
        base_t = statistics.median(plain.times) if plain.times else math.nan
        for cell in cells:
            entry: dict = {"status": cell.status, "ran": cell.ran, "steps": len(cell.times)}
            if cell.status == "ok" and cell.times:
                t = statistics.median(cell.times)
                entry.update(ms=1e3 * t, ratio=t / base_t)
                if cell.mem is not None and plain.mem:
                    entry.update(mem_mb=cell.mem / 2**20, mem_ratio=cell.mem / plain.mem)
            row[cell.column] = entry
        rows.append(row)
        del cells, setup
        _release(device)
    return rows


def run_tests(paths=("tests/test_cuda.py",), timeout: float = 240.0) -> dict:
    """``python -m pytest <paths> -q`` in the repository root, with a time limit."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", *paths, "-p", "no:cacheprovider", "-rfEs"]  # -q: pyproject
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        rc = None
    lines = [line for line in out.splitlines() if line.strip()]
    pattern = re.compile(r"\d+ (passed|failed|skipped|errors?|deselected)|no tests ran")
    summary = next((line.strip("= ") for line in reversed(lines) if pattern.search(line) and
                    not line.startswith(("FAILED", "ERROR", "SKIPPED"))), lines[-1] if lines else "(no output)")
    problems = [line for line in lines if line.startswith(("FAILED", "ERROR", "SKIPPED"))]
    return {"rc": rc, "summary": summary if rc is not None else f"timed out after {timeout:.0f} s",
            "problems": problems, "seconds": time.perf_counter() - t0, "command": " ".join(cmd[1:])}


# ---------------------------------------------------------------------------- report
def _cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    if entry.get("status") != "ok":
        return entry.get("status", "-")
    if "ratio" not in entry:
        return "-"
    text = f"{entry['ratio']:.2f}"
    if "mem_ratio" in entry:
        text += f" ({entry['mem_ratio']:.2f})"
    return text


def report(rows: list[dict], tests: dict | None, command: str, seconds: float) -> str:
    out = ["# GPU check: CUDA tests and the engines' overhead", "",
           f"`{command}` on {environment()}; {overhead._torchjd_version()}; TF32 off; "
           f"{seconds:.0f} s in all.", ""]
    if tests is not None:
        out += [f"## Tests: `{tests['command']}`", "",
                f"{tests['summary']} ({tests['seconds']:.0f} s).", ""]
        out += [f"- {line}" for line in tests["problems"][:40]]
        out += [""] if tests["problems"] else []
    out += ["## Overhead: x plain step (x plain peak memory)", "",
            "Median step time over the timed steps divided by the plain step's, CUDA-synchronised; in "
            "brackets the step's `torch.cuda.max_memory_allocated` above what was allocated before it, "
            "divided by the plain step's (on CPU, the profiler's peak). MGDA is exact MGDA (Frank-Wolfe "
            "on the Gram matrix of the task gradients on every trunk parameter); MGDA-UB runs on the "
            "gradients w.r.t. the trunk output. Targets (issue 21): exact MGDA <= 3x at k = 10 and "
            "<= 6x at k = 40 on the ResNet-18; `auto`'s peak memory within 1.1x the loop's.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        desc = next((r["description"] for r in mrows if "description" in r), model)
        out += [f"### {model} on {mrows[0]['device']}: {desc}", ""]
        table = []
        for r in mrows:
            plain = r.get("plain", {})
            ms = f"{plain['ms']:.1f} ms" if "ms" in plain else _cell(plain)
            table.append([r["k"], ms, *[_cell(r.get(c)) for c in COLUMNS[1:]]])
        out += [markdown_table(["k", "plain step", *[TITLES[c] for c in COLUMNS[1:]]], table)]
        ran = []
        for r in mrows:
            ran.append([r["k"], *[(r.get(c) or {}).get("ran", "") or "-" for c in ENGINE_COLUMNS]])
        out += ["`StepInfo.engine` of the last step:", "", markdown_table(["k", *ENGINE_COLUMNS], ran)]
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    panels: dict[str, tuple[str, list[common.Curve]]] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        curves: list[common.Curve] = []
        for column in COLUMNS[1:]:
            cells = [(r["k"], r[column]) for r in mrows if "ratio" in (r.get(column) or {})]
            if cells:
                curves.append((TITLES[column], "-", [(k, c["ratio"], c.get("mem_ratio")) for k, c in cells]))
        panels[model] = (mrows[0]["device"], curves)
    common.plot_against_k(panels, path)

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny models on the CPU, k in (2, 3), seconds")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--models", default="resnet,vit", help="comma-separated, from: " + ", ".join(MODELS))
    p.add_argument("--ks", default=None, help=f"comma-separated k (default {','.join(map(str, FULL_KS))})")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per configuration (default 3)")
    p.add_argument("--cap", type=float, default=None, help="seconds of timed steps per configuration (default 8)")
    p.add_argument("--total", type=float, default=None,
                   help="no configuration starts after this many seconds, tests included (default 420)")
    p.add_argument("--test-timeout", type=float, default=240.0, help="time limit of the CUDA tests (s)")
    p.add_argument("--no-tests", action="store_true", help="skip tests/test_cuda.py")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    start = time.perf_counter()
    device = args.device
    if device == "auto":
        device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if args.quick:
        torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    ks = tuple(int(x) for x in args.ks.split(",")) if args.ks else (QUICK_KS if args.quick else FULL_KS)
    steps = args.steps or (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    cap = args.cap if args.cap is not None else (1.0 if args.quick else 8.0)
    total = args.total if args.total is not None else (60.0 if args.quick else 420.0)
    tests = None
    if not args.no_tests:
        tests = run_tests(timeout=args.test_timeout)
        print(f"tests: {tests['summary']} ({tests['seconds']:.0f} s)", file=sys.stderr, flush=True)
    deadline = start + total
    rows: list[dict] = []
    for model in models:
        rows += run_model(model, device, ks, args.quick, warmup, steps, cap, deadline)
    command = "python -m benchmarks gpu " + " ".join(argv if argv is not None else sys.argv[1:])
    name = "gpu-quick" if args.quick else "gpu"
    text = report(rows, tests, command.strip(), time.perf_counter() - start)
    text += f"\n![step time and peak memory against k]({name}.png)\n"
    print(text, flush=True)
    write_result(args.out / f"{name}.md", text)
    plot(rows, args.out / f"{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
