"""The Gram engine: time and peak memory of ``engine="gram"`` against the loop, the batched engine
and torchjd's autogram, as ratios to a plain step.

    python -m benchmarks gram [--quick] [--device auto|cpu|cuda] [--model mlp|conv|all]
                              [--ks 2,10,40] [--method mgda] [--steps N] [--budget S] [--out DIR]

For one trunk and one k, every configuration is built on the SAME model and timed round-robin with
the overhead benchmark's machinery (:func:`benchmarks.overhead.measure`: one full step of each in
turn, forward + balancing + ``SGD.step()``, median after warm-up; CUDA-synchronised on a GPU) and
its peak memory is measured the same way (:func:`benchmarks.overhead.peak_bytes`: on CUDA
``torch.cuda.max_memory_allocated`` above the start of the step, on CPU the replayed allocations
of the PyTorch profiler). Configurations:

* plain step: ``sum(losses).backward()``;
* ``GradBalance(method, engine=...)`` with ``"loop"``, ``"batched"`` and ``"gram"`` (``features=z``
  passed to each);
* torchjd autogram (when torchjd is installed, ``pip install gradbalance[compare]``):
  ``Engine(trunk, batch_dim=None).compute_gramian(stack(losses))``, torchjd's weighting of the
  same method on it, then ``stack(losses).backward(weights)`` (the pattern of torchjd's docs).

Trunks: ``mlp``: the overhead benchmark's MLP (3 x Linear(512) + ReLU, batch 256); ``conv``:
its ResNet-18-style trunk with batch norm (on CPU width 16, batch 32 of 32x32 so that k = 40 runs
in minutes; on CUDA the overhead benchmark's width 64, batch 64 of 128x128). Writes
``<out>/gram.md`` and ``<out>/gram.png`` (``--quick``: ``gram-quick.*``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

import gradbalance as gb
from benchmarks import common, overhead
from benchmarks.common import RESULTS, environment, markdown_table, write_result
from benchmarks.overhead import Config, Setup
from gradbalance.methods.base import make_method

_DESCRIPTION = (
    "Configurations: a plain `sum(losses).backward()` step; `GradBalance(method, engine=...)` with "
    "`loop`, `batched` and `gram` (`features=z` passed to each); torchjd's autogram "
    "(`Engine(trunk, batch_dim=None).compute_gramian(stack(losses))`, torchjd's weighting of the same "
    "method, then `stack(losses).backward(weights)`), on a copy of the model with the same weights. "
    "Peak memory: `torch.cuda.max_memory_allocated` above the start of the step on CUDA, the "
    "replayed allocations of the PyTorch profiler on CPU (`benchmarks.overhead.peak_bytes`)."
)
FULL_KS = (2, 10, 40)
QUICK_KS = (2, 4)
ENGINES = ("loop", "batched", "gram")

try:  # the optional comparison (pip install gradbalance[compare])
    from torchjd import aggregation as tjd_aggregation
    from torchjd.autogram import Engine as AutogramEngine
except ImportError:  # pragma: no cover - depends on the environment
    AutogramEngine = None


def conv(k: int, device: str, quick: bool) -> Setup:
    """ResNet-18-style trunk with batch norm and k Linear(8 x width, 10) CE heads (module doc)."""
    if device == "cuda" or quick:
        return overhead.resnet(k, device, quick)
    base, batch, px = 16, 32, 32
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    trunk = overhead.resnet18_trunk(base).to(device)
    heads = nn.ModuleList(nn.Linear(8 * base, 10) for _ in range(k)).to(device)
    x = torch.randn(batch, 3, px, px, generator=gen).to(device)
    ys = [torch.randint(0, 10, (batch,), generator=gen).to(device) for _ in range(k)]
    return Setup(trunk, heads, x, ys, f"ResNet-18-style trunk with batch norm (width {base}), k Linear({8 * base}, 10) "
                 f"CE heads, batch {batch} of 3x{px}x{px}")


MODELS = {"mlp": overhead.mlp, "conv": conv}
TORCHJD_WEIGHTINGS = {"mgda": "MGDAWeighting", "upgrad": "UPGradWeighting", "dualproj": "DualProjWeighting",
                      "imtl_g": "IMTLGWeighting", "cagrad": "CAGradWeighting", "pcgrad": "PCGradWeighting"}


def make_configs(setup: Setup, method: str) -> list[Config]:
    configs: list[Config] = []
    configs.append(Config("plain step", "plain", "sum", "-", overhead.plain_step(setup)))
    for engine in ENGINES:
        config = Config(f"{method} ({engine})", "ours", method, engine, lambda: None)
        config.step = overhead.balanced_step(setup, method, config, engine=engine)
        configs.append(config)
    label = f"{method} (torchjd autogram)"
    if AutogramEngine is None:
        configs.append(Config(label, "torchjd", method, "autogram", lambda: None,
                              status="skipped: torchjd not installed"))
    elif method not in TORCHJD_WEIGHTINGS:
        configs.append(Config(label, "torchjd", method, "autogram", lambda: None,
                              status=f"skipped: no torchjd weighting mapped for {method}"))
    else:
        try:
            weighting = getattr(tjd_aggregation, TORCHJD_WEIGHTINGS[method])()
            # batch_dim=None: the k objectives are task losses, not per-sample ones (and batch
            # norm is incompatible with a batch dimension in autogram)
            # on a copy (same weights): autogram's forward hooks stay on the modules it is given
            # and would otherwise run in every other configuration's forward too
            twin = Setup(copy.deepcopy(setup.trunk), copy.deepcopy(setup.heads), setup.x, setup.ys,
                         setup.description)
            engine = AutogramEngine(twin.trunk, batch_dim=None)
        except ImportError as err:
            configs.append(Config(label, "torchjd", method, "autogram", lambda: None,
                                  status=f"skipped: ImportError: {str(err)[:100]}"))
            return configs
        opt = torch.optim.SGD(twin.params, lr=1e-4)

        def tjd(engine=engine, weighting=weighting, opt=opt, twin=twin) -> None:
            opt.zero_grad()
            losses, _ = twin.losses()
            vector = torch.stack(losses)
            weights = weighting(engine.compute_gramian(vector))
            vector.backward(weights)
            opt.step()

        configs.append(Config(label, "torchjd", method, "autogram", tjd))
    return configs


def check_agreement(setup: Setup, method: str) -> float:
    """Relative max difference between the gram and the loop engine's ``.grad`` after one step."""
    grads = {}
    for engine in ("loop", "gram"):
        opt = gb.GradBalance(torch.optim.SGD(setup.params, lr=0.0), method=method, shared_params=setup.trunk,
                             engine=engine)
        opt.zero_grad()
        losses, z = setup.losses()
        opt.backward(losses, features=z)
        grads[engine] = torch.cat([p.grad.reshape(-1) for p in setup.params if p.grad is not None])
        opt.zero_grad()
    return float((grads["gram"] - grads["loop"]).abs().max() / grads["loop"].abs().max())


def run(model: str, device: str, ks, method: str, steps: int, warmup: int, budget: float,
        quick: bool) -> tuple[list[dict], str]:
    rows: list[dict] = []
    description = ""
    for k in ks:
        setup = MODELS[model](k, device, quick)
        description = setup.description
        agreement = check_agreement(setup, method)
        configs = make_configs(setup, method)
        overhead.measure(configs, device, steps, warmup, budget, memory=True, desc=f"{model} k={k}")
        plain = configs[0]
        base_t = statistics.median(plain.times)
        for c in configs:
            row = {"model": model, "device": device, "k": k, "label": c.label, "engine": c.engine,
                   "ran": c.ran, "status": c.status, "steps": len(c.times), "agreement": agreement}
            if c.status == "ok":
                t = statistics.median(c.times)
                row.update(ms=1e3 * t, ratio=t / base_t)
                if c.mem is not None and plain.mem:
                    row.update(mem_mb=c.mem / 2**20, mem_ratio=c.mem / plain.mem)
            rows.append(row)
        del configs, setup
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows, description


def _find(rows, model, k, label):
    return next((r for r in rows if r["model"] == model and r["k"] == k and r["label"] == label), None)


def _ratio(a: dict | None, b: dict | None, key: str) -> str:
    if a is None or b is None or a["status"] != "ok" or b["status"] != "ok" or key not in a or key not in b:
        return "-"
    return f"{a[key] / b[key]:.2f}"


def report(rows: list[dict], descriptions: dict[str, str], command: str, method: str) -> str:
    out = ["# Gram engine: time and peak memory against the loop, batched and torchjd autogram", "",
           f"`{command}` on {environment()}; {overhead._torchjd_version()}.", "",
           "Cells: median step time / the plain step's, and in brackets peak memory / the plain step's "
           "(same model, same run, timed round-robin). A step is forward + balancing + `SGD.step()`. "
           + _DESCRIPTION, ""]
    labels = ["plain step", *[f"{method} ({e})" for e in ENGINES], f"{method} (torchjd autogram)"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        ks = sorted({r["k"] for r in mrows})
        device = mrows[0]["device"]
        out += [f"## {model} on {device}: {descriptions[model]}", ""]
        plain = {k: _find(rows, model, k, "plain step") for k in ks}
        out += ["Plain step: " + ", ".join(
            f"k={k}: {plain[k]['ms']:.2f} ms" + (f", {plain[k]['mem_mb']:.1f} MiB" if "mem_mb" in plain[k] else "")
            for k in ks) + ".", ""]
        table = []
        for label in labels:
            cells = []
            for k in ks:
                r = _find(rows, model, k, label)
                if r is None or r["status"] != "ok":
                    cells.append("-" if r is None else "skipped")
                    continue
                cells.append(f"{r['ratio']:.2f}" + (f" ({r['mem_ratio']:.1f})" if "mem_ratio" in r else ""))
            found = [_find(rows, model, k, label) for k in ks]
            ran = sorted({r["ran"].split(" (")[0] + (" after a fallback" if "fallback" in r["ran"] else "")
                          for r in found if r and r["ran"]})
            table.append([label, *cells, ", ".join(ran) or "-"])
        gram_label = f"{method} (gram)"
        for other in ("loop", "batched", "torchjd autogram"):
            cells = []
            for k in ks:
                a, b = _find(rows, model, k, gram_label), _find(rows, model, k, f"{method} ({other})")
                cells.append(f"**{_ratio(a, b, 'ms')}** ({_ratio(a, b, 'mem_mb')})")
            table.append([f"gram / {other}", *cells, ""])
        agreement = [f"{_find(rows, model, k, 'plain step')['agreement']:.1e}" for k in ks]
        table.append(["gram vs loop: rel. max diff of .grad", *agreement, ""])
        out += ["Time x plain (memory x plain); ratios of the gram engine to the others in bold "
                "(time) and brackets (memory): < 1 means gram is faster / smaller. 'ran' is "
                "`StepInfo.engine` (the batched engine falls back to the loop where PyTorch's legacy "
                "vmap has no batching rule, e.g. for convolution and batch norm).", "",
                markdown_table(["", *[f"k={k}" for k in ks], "ran"], table)]
        skipped = [r for r in mrows if r["status"] != "ok"]
        if skipped:
            out += ["Skipped:", ""] + [f"- {r['label']}, k={r['k']}: {r['status']}" for r in skipped] + [""]
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    panels: dict[str, tuple[str, list[common.Curve]]] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model and r["status"] == "ok" and r["label"] != "plain step"]
        curves = [(label, "--" if "torchjd" in label else "-",
                   [(r["k"], r["ratio"], r.get("mem_ratio")) for r in mrows if r["label"] == label])
                  for label in dict.fromkeys(r["label"] for r in mrows)]
        panels[model] = (mrows[0]["device"] if mrows else "", curves)
    common.plot_against_k(panels, path)

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks gram", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"tiny models, k in {QUICK_KS}, few steps (seconds)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--model", default="all", choices=("mlp", "conv", "all"))
    p.add_argument("--ks", default=None, help=f"comma-separated k (default {','.join(map(str, FULL_KS))})")
    p.add_argument("--method", default="mgda", help="a requires='gram' method (default mgda)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (median)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--budget", type=float, default=None, help="seconds of timed steps per configuration")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own; --quick: 1)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if make_method(args.method).requires != "gram":
        p.error(f"--method {args.method!r} does not have requires='gram'")
    models = ["mlp", "conv"] if args.model == "all" else [args.model]
    ks = tuple(int(x) for x in args.ks.split(",")) if args.ks else (QUICK_KS if args.quick else FULL_KS)
    steps = args.steps or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    budget = args.budget if args.budget is not None else (0.2 if args.quick else 4.0)
    rows, descriptions = [], {}
    for model in models:
        r, descriptions[model] = run(model, device, ks, args.method, steps, warmup, budget, args.quick)
        rows += r
    command = "python -m benchmarks gram " + " ".join(argv if argv is not None else sys.argv[1:])
    name = "gram-quick" if args.quick else "gram"  # --quick never overwrites the full results
    text = report(rows, descriptions, command.strip(), args.method) + f"\n![time and memory against k]({name}.png)\n"
    print(text)
    write_result(args.out / f"{name}.md", text)
    plot(rows, args.out / f"{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
