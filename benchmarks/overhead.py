"""Overhead: what gradient balancing costs per step, as a ratio to a plain summed-loss step.

    python -m benchmarks overhead [--quick] [--device auto|cpu|cuda] [--model mlp,conv,transformer,resnet|all]
                                  [--ks 2,4,10,40] [--methods all|name,...] [--steps N]
                                  [--budget S] [--out DIR]

Models: ``mlp`` (every method, the engine sweep, the LibMTL-style and torchjd references),
``conv`` (a small ResNet on 32 x 32, batch 64) and ``transformer`` (a 2-layer text transformer)
with the engine sweep of exact MGDA only (loop, batched, auto, representation = MGDA-UB), and
``resnet`` (ResNet-18 at 128 px, for a GPU; ``python -m benchmarks gpu`` is the GPU check).

For one model and one k, every configuration (a plain ``sum(L).backward()`` step, GradBalance
for each method with the default engine, the engine sweep for mgda/mean/upgrad, a LibMTL-style
loop of k backward passes and torchjd's ``mtl_backward`` + MGDA/UPGrad when torchjd is
installed: ``pip install gradbalance[compare]``) is built on the SAME model and timed
round-robin, one full step (forward, backward/balancing, optimizer step) of each in turn, so
that the noise of a shared machine hits all of them alike; the table gives medians after
warm-up. A configuration stops being timed after ``--budget`` seconds (at least 3 steps).

Peak memory: one extra step per configuration, measured apart from the timed ones. On CUDA,
``torch.cuda.max_memory_allocated`` above what was allocated before the step. On CPU, the
tensor allocations the PyTorch profiler records (``profile_memory=True``: every allocation and
free of the CPU allocator, in order) are replayed and the highest running total is taken: the
peak of tensor bytes allocated during the step and live at the same time, forward activations,
saved tensors, gradients and the method's buffers included (not Python objects, not RSS).
Frees of tensors allocated before the step (the previous step's ``.grad``) are not subtracted
(a free is matched to a live block of the same size allocated in the step, else ignored), so the
figure is the peak of the step's own allocations, an upper bound on its increase over the start.

Writes ``<out>/overhead.md`` and ``<out>/overhead.png`` (default ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradbalance as gb
from benchmarks import common
from benchmarks.common import RESULTS, environment, markdown_table, progress, write_result
from benchmarks.models import ResNet
from gradbalance.methods.base import TaskInputs, make_method
from gradbalance.solvers import min_norm_frank_wolfe

FULL_KS = (2, 4, 10, 40)
QUICK_KS = (2, 4)
SWEEP = ("mgda", "mean", "upgrad")
SWEEP_ENGINES = ("loop", "batched", "representation", "recompute_every=10")

try:  # the optional comparison (pip install gradbalance[compare])
    import torchjd
    from torchjd.aggregation import MGDA as TorchjdMGDA
    from torchjd.aggregation import UPGrad as TorchjdUPGrad
    from torchjd.autojac import jac_to_grad, mtl_backward
except ImportError:  # pragma: no cover - depends on the environment
    torchjd = None


# ---------------------------------------------------------------------------- models
@dataclass
class Setup:
    """A trunk, k heads and one fixed batch: ``losses()`` runs the forward."""

    trunk: nn.Module
    heads: nn.ModuleList
    x: Tensor
    ys: list[Tensor]
    description: str

    @property
    def shared(self) -> list[Tensor]:
        return list(self.trunk.parameters())

    @property
    def head_params(self) -> list[Tensor]:
        return list(self.heads.parameters())

    @property
    def params(self) -> list[Tensor]:
        return self.shared + self.head_params

    def losses(self) -> tuple[list[Tensor], Tensor]:
        z = self.trunk(self.x)
        return [F.cross_entropy(h(z), y) for h, y in zip(self.heads, self.ys)], z


def mlp(k: int, device: str, quick: bool, dtype=torch.float32) -> Setup:
    """Trunk 3 x (Linear(W) + ReLU), k Linear(W, 10) cross-entropy heads (W=512, batch 256)."""
    width, batch = (64, 32) if quick else (512, 256)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    trunk = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(width, width), nn.ReLU())])
    heads = nn.ModuleList(nn.Linear(width, 10) for _ in range(k))
    x = torch.randn(batch, width, generator=gen)
    ys = [torch.randint(0, 10, (batch,), generator=gen) for _ in range(k)]
    trunk, heads = trunk.to(device, dtype), heads.to(device, dtype)
    return Setup(trunk, heads, x.to(device, dtype), [y.to(device) for y in ys],
                 f"MLP trunk 3 x Linear({width})+ReLU, k Linear({width}, 10) CE heads, batch {batch}")


def resnet18_trunk(base: int = 64) -> nn.Module:
    """ResNet-18 layout (4 stages of 2 basic blocks, global pooling) of width ``base`` with the
    CIFAR stem (one 3x3/1 conv, no pooling): for 32 x 32 images."""
    return ResNet(widths=(base, 2 * base, 4 * base, 8 * base), stem="small")


def _resnet_setup(k: int, device: str, trunk: nn.Module, width: int, batch: int, px: int, name: str) -> Setup:
    """``trunk`` (``width`` output features), k Linear(width, 10) CE heads, a batch of ``batch``
    random 3 x ``px`` x ``px`` images (seeded)."""
    gen = torch.Generator().manual_seed(0)
    trunk = trunk.to(device)
    heads = nn.ModuleList(nn.Linear(width, 10) for _ in range(k)).to(device)
    x = torch.randn(batch, 3, px, px, generator=gen).to(device)
    ys = [torch.randint(0, 10, (batch,), generator=gen).to(device) for _ in range(k)]
    return Setup(trunk, heads, x, ys, f"{name}, k Linear({width}, 10) CE heads, batch {batch} of 3x{px}x{px}")


def resnet(k: int, device: str, quick: bool) -> Setup:
    """ResNet-18 (torchvision's layout: 7x7/2 stem conv and 3x3/2 max pool, 11,176,512 trunk
    parameters), k Linear(512, 10) heads, batch 64 of 3 x 128 x 128 (quick: width 8, batch 4 of
    32 x 32).

    The ImageNet stem matters: before 2026-11-30 this setup used the CIFAR stem of
    :func:`resnet18_trunk` (3x3/1 conv, no pooling) at 128 px, which runs every stage at 4x the
    resolution, 16x the FLOPs of ResNet-18; the H200 figures measured with it are labelled so.
    """
    torch.manual_seed(0)
    base, batch, px = (8, 4, 32) if quick else (64, 64, 128)
    trunk = ResNet(widths=(base, 2 * base, 4 * base, 8 * base), stem="imagenet")
    name = "ResNet-18 (ImageNet stem)" if base == 64 else f"ResNet-18 layout (ImageNet stem, width {base})"
    return _resnet_setup(k, device, trunk, 8 * base, batch, px, name)


def conv(k: int, device: str, quick: bool) -> Setup:
    """Small ResNet (ResNet-18 layout with the CIFAR stem, width 16) on 3 x 32 x 32, batch 64, k
    Linear(128, 10) heads."""
    torch.manual_seed(0)
    base, batch, px = (4, 4, 8) if quick else (16, 64, 32)
    return _resnet_setup(k, device, resnet18_trunk(base), 8 * base, batch, px,
                         f"small ResNet (ResNet-18 layout, width {base}: conv, BN, residual adds, global pooling)")


class _Text(nn.Module):
    def __init__(self, vocab: int, width: int, length: int, depth: int, heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.02 * torch.randn(length, width))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, activation="gelu", batch_first=True)
            for _ in range(depth))

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.tok(tokens) + self.pos
        for layer in self.layers:
            h = layer(h)
        return h.mean(dim=1)


def transformer(k: int, device: str, quick: bool) -> Setup:
    """Text transformer: embeddings + 2 TransformerEncoderLayer (width 128, 4 heads), 32 tokens,
    batch 64, mean over tokens, k Linear(128, 10) CE heads."""
    vocab, width, length, depth, heads_n, batch = (50, 16, 8, 1, 2, 4) if quick else (1000, 128, 32, 2, 4, 64)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    trunk = _Text(vocab, width, length, depth, heads_n).to(device)
    heads = nn.ModuleList(nn.Linear(width, 10) for _ in range(k)).to(device)
    x = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
    ys = [torch.randint(0, 10, (batch,), generator=gen).to(device) for _ in range(k)]
    return Setup(trunk, heads, x, ys,
                 f"text transformer (embeddings, {depth} x TransformerEncoderLayer width {width}, {heads_n} "
                 f"heads, GELU), {length} tokens, k Linear({width}, 10) CE heads, batch {batch}")


MODELS = {"mlp": mlp, "resnet": resnet, "conv": conv, "transformer": transformer}
#: models measured with the engine sweep of exact MGDA only (loop, batched, auto, representation)
ENGINE_ONLY = ("conv", "transformer")
ENGINE_ONLY_ENGINES = ("loop", "batched", "representation")


# ---------------------------------------------------------------------------- reference paths
def loop_reference_gradients(losses: list[Tensor], shared: list[Tensor]) -> Tensor:
    """LibMTL's ``_compute_grad`` (``rep_grad=False``): k ``backward(retain_graph=True)`` passes,
    each copying the shared parameters' ``.grad`` into a row of a ``(k, P)`` matrix
    (``_grad2vec``) and zeroing them. Task-specific ``.grad`` accumulate the plain sum."""
    k = len(losses)
    matrix = torch.zeros(k, sum(p.numel() for p in shared), dtype=shared[0].dtype, device=shared[0].device)
    for p in shared:
        p.grad = None
    for i, loss in enumerate(losses):
        loss.backward(retain_graph=i < k - 1)
        offset = 0
        for p in shared:
            n = p.numel()
            if p.grad is not None:
                matrix[i, offset:offset + n] = p.grad.reshape(-1)
                p.grad = None
            offset += n
    return matrix


@dataclass
class Config:
    """One way of doing a training step, timed round-robin with the others."""

    label: str
    kind: str  # plain | ours | loop_ref | torchjd
    method: str
    engine: str
    step: Callable[[], None]
    times: list[float] = field(default_factory=list)
    spent: float = 0.0
    status: str = "ok"
    ran: str = ""
    mem: float | None = None


def plain_step(setup: Setup) -> Callable[[], None]:
    """One plain step of ``setup``: the summed losses, one backward, ``SGD.step()``."""
    opt = torch.optim.SGD(setup.params, lr=1e-4)

    def step() -> None:
        opt.zero_grad()
        losses, _ = setup.losses()
        torch.stack(losses).sum().backward()
        opt.step()

    return step


def balanced_step(setup: Setup, method: Any, record: Any, **options: Any) -> Callable[[], None]:
    """One GradBalance step of ``setup`` (``features=z`` given; ``options`` go to GradBalance) that
    stores the engine that ran in ``record.ran``."""
    opt = gb.GradBalance(torch.optim.SGD(setup.params, lr=1e-4), method=method, shared_params=setup.trunk,
                         **options)

    def step() -> None:
        opt.zero_grad()
        losses, z = setup.losses()
        info = opt.backward(losses, features=z)
        opt.step()
        record.ran = info.engine

    return step


def make_configs(setup: Setup, methods: list[str], sweep: bool, refs: bool,
                 sweep_methods=SWEEP, sweep_engines=SWEEP_ENGINES) -> list[Config]:
    params, shared = setup.params, setup.shared
    configs: list[Config] = []
    configs.append(Config("plain step", "plain", "sum", "-", plain_step(setup)))

    def ours(method: str, engine: str) -> Config:
        m = make_method(method)
        if engine == "representation":
            # Gram-based methods run on the gradients w.r.t. the trunk output z (MGDA-UB for
            # mgda); an exact-only Gram method is switched to that mode for this measurement
            m = gb.methods.MGDA(mode="representation") if method == "mgda" else m
            if m.requires == "gram":
                m.mode = "representation"
        every = int(engine.split("=")[1]) if engine.startswith("recompute_every=") else 1
        config = Config(f"{method} ({engine})", "ours", method, engine, lambda: None)
        config.step = balanced_step(setup, m, config, engine=engine if engine in ("loop", "batched") else "auto",
                                    recompute_every=every)
        return config

    for method in methods:
        configs.append(ours(method, "auto"))
    if sweep:
        for method in sweep_methods:
            for engine in sweep_engines:
                if engine.startswith("recompute_every=") and make_method(method).requires == "losses":
                    continue  # nothing to reuse: a loss weighting is one backward anyway
                configs.append(ours(method, engine))
    if not refs:
        return configs
    for method in ("mgda", "upgrad"):
        m = make_method(method)
        opt = torch.optim.SGD(params, lr=1e-4)

        def libmtl(m=m, opt=opt) -> None:
            opt.zero_grad()
            losses, _ = setup.losses()
            G = loop_reference_gradients(losses, shared)
            k = len(losses)
            agg = m.aggregate(TaskInputs(
                losses=torch.stack([v.detach() for v in losses]).double(), gram=(G @ G.T).double(),
                grads=G, task_names=tuple(f"task{i}" for i in range(k)), step=0))
            d = agg.direction if agg.direction is not None else agg.weights.to(G.dtype) @ G
            offset = 0
            for p in shared:  # LibMTL's _reset_grad
                n = p.numel()
                p.grad = d[offset:offset + n].view_as(p).clone()
                offset += n
            opt.step()

        configs.append(Config(f"{method} (LibMTL-style loop)", "loop_ref", method, "loop", libmtl))
    if torchjd is not None:
        for method, make in (("mgda", TorchjdMGDA), ("upgrad", TorchjdUPGrad)):
            opt = torch.optim.SGD(params, lr=1e-4)
            label = f"{method} (torchjd mtl_backward)"
            try:
                aggregator = make()
            except ImportError as err:  # UPGrad needs torchjd[quadprog-projector]
                configs.append(Config(label, "torchjd", method, "torchjd", lambda: None,
                                      status=f"skipped: ImportError: {str(err)[:100]}"))
                continue

            def tjd(aggregator=aggregator, opt=opt) -> None:
                opt.zero_grad()
                losses, z = setup.losses()
                mtl_backward(losses, features=z, shared_params=shared,
                             tasks_params=[list(h.parameters()) for h in setup.heads])
                jac_to_grad(shared, aggregator)
                opt.step()

            configs.append(Config(label, "torchjd", method, "torchjd", tjd))
    return configs


# ---------------------------------------------------------------------------- measuring
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_bytes(fn: Callable[[], None], device: str) -> float:
    """Peak tensor bytes allocated while ``fn`` runs, above the start (module docstring)."""
    if device == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        _sync(device)
        return float(torch.cuda.max_memory_allocated() - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    # A free counts only against a live block of the same size allocated in this step: the
    # profiler may report the size of blocks allocated before it (an address reused from an
    # earlier session), and those frees must not lower this step's running total.
    live: Counter[int] = Counter()
    current = peak = 0
    for e in events:
        n = e.nbytes()
        if n > 0:
            live[n] += 1
        elif live[-n] > 0:
            live[-n] -= 1
        else:
            continue
        current += n
        peak = max(peak, current)
    return float(peak)


def measure(configs: list[Config], device: str, steps: int, warmup: int, budget: float,
            memory: bool = True, desc: str = "") -> None:
    """Warm up every configuration, then time them round-robin (module docstring)."""
    for c in configs:
        if c.status != "ok":
            continue
        try:
            for _ in range(warmup):
                c.step()
        except Exception as err:  # noqa: BLE001 - recorded as the reason the combination is skipped
            c.status = f"skipped: {type(err).__name__}: {str(err).splitlines()[0][:100]}"
    active = [c for c in configs if c.status == "ok"]
    for _ in progress(range(steps), desc=desc):
        for c in active:
            if len(c.times) >= 3 and c.spent > budget:
                continue
            _sync(device)
            t0 = time.perf_counter()
            c.step()
            _sync(device)
            dt = time.perf_counter() - t0
            c.times.append(dt)
            c.spent += dt
    if memory:
        for c in active:
            # one unprofiled step first: the .grad it leaves (freed by the next step's
            # zero_grad) must not have been allocated under an earlier profiling session, or
            # their frees would count against this configuration's peak
            c.step()
            c.mem = peak_bytes(c.step, device)


def frank_wolfe_ms(ks, repeats: int = 50) -> dict[int, float]:
    """Median time of one Frank-Wolfe min-norm solve on a random ``k x k`` Gram matrix."""
    out = {}
    for k in ks:
        gen = torch.Generator().manual_seed(k)
        G = torch.randn(k, 10 * k, dtype=torch.float64, generator=gen)
        M = G @ G.T
        min_norm_frank_wolfe(M)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            min_norm_frank_wolfe(M)
            times.append(time.perf_counter() - t0)
        out[k] = 1e3 * statistics.median(times)
    return out


def run(model: str, device: str, ks, methods: list[str], steps: int, warmup: int, budget: float,
        quick: bool, sweep: bool = True, refs: bool = True, memory: bool = True) -> tuple[list[dict], str]:
    """Rows (one per model, k and configuration) and the model's description."""
    rows: list[dict] = []
    description = ""
    for k in ks:
        setup = MODELS[model](k, device, quick)
        description = setup.description
        if model in ENGINE_ONLY:  # the engine sweep of exact MGDA only: these trunks are slow on CPU
            configs = make_configs(setup, ["mgda"], sweep, False, ("mgda",), ENGINE_ONLY_ENGINES)
        else:
            configs = make_configs(setup, methods, sweep, refs)
        measure(configs, device, steps, warmup, budget, memory, desc=f"{model} k={k}")
        plain = configs[0]
        base_t = statistics.median(plain.times)
        for c in configs:
            row = {"model": model, "device": device, "k": k, "label": c.label, "kind": c.kind,
                   "method": c.method, "engine": c.engine, "ran": c.ran, "status": c.status,
                   "steps": len(c.times)}
            if c.status == "ok":
                t = statistics.median(c.times)
                row.update(ms=1e3 * t, ratio=t / base_t)
                if c.mem is not None and plain.mem:
                    row.update(mem_mb=c.mem / 2**20, mem_ratio=c.mem / plain.mem)
            rows.append(row)
        del configs, setup
    return rows, description


# ---------------------------------------------------------------------------- report
def _cell(row: dict | None, memory: bool = True) -> str:
    if row is None:
        return "-"
    if row["status"] != "ok":
        return "skipped"
    text = f"{row['ratio']:.2f}"
    if memory and "mem_ratio" in row:
        text += f" ({row['mem_ratio']:.1f})"
    return text


def _find(rows, model, k, label):
    for r in rows:
        if r["model"] == model and r["k"] == k and r["label"] == label:
            return r
    return None


def _torchjd_version() -> str:
    if torchjd is None:
        return "torchjd not installed (pip install gradbalance[compare])"
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"torchjd {version('torchjd')}"
    except PackageNotFoundError:  # pragma: no cover
        return "torchjd (version unknown)"


def report(rows: list[dict], descriptions: dict[str, str], command: str, fw: dict[int, float]) -> str:
    out = ["# Overhead: what gradient balancing costs per step", "",
           f"`{command}` on {environment()}; {_torchjd_version()}.", "",
           "Every cell is the median step time of a configuration divided by the median time of a plain "
           "`sum(losses).backward()` step of the same model in the same run, and in brackets its peak "
           "memory divided by the plain step's; a step is forward + backward/balancing + `SGD.step()`. "
           "Configurations are timed round-robin (one step of each in turn) after warm-up. " + " ".join(
               __doc__.split("\n\n")[2].split()), ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        ks = sorted({r["k"] for r in mrows})
        device = mrows[0]["device"]
        out += [f"## {model} on {device}: {descriptions[model]}", ""]
        plain = {k: _find(rows, model, k, "plain step") for k in ks}
        out += ["Plain step: " + ", ".join(
            f"k={k}: {plain[k]['ms']:.2f} ms" + (f", {plain[k]['mem_mb']:.1f} MiB" if "mem_mb" in plain[k] else "")
            for k in ks) + ".", ""]
        engine_only = model in ENGINE_ONLY
        # headline
        head_rows = []
        for method in ("mgda", "upgrad"):
            ours_r = [_find(rows, model, k, f"{method} (auto)") for k in ks]
            ref = [_find(rows, model, k, f"{method} (LibMTL-style loop)") for k in ks]
            tjd = [_find(rows, model, k, f"{method} (torchjd mtl_backward)") for k in ks]
            head_rows.append([f"ours {method} (auto engine)", *[_cell(r) for r in ours_r]])
            head_rows.append([f"LibMTL-style loop + {method}", *[_cell(r) for r in ref]])
            head_rows.append([f"torchjd mtl_backward + {method}", *[_cell(r) for r in tjd]])
            for name, other in (("loop", ref), ("torchjd", tjd)):
                cells = []
                for a, b in zip(ours_r, other):
                    ok = a is not None and b is not None and a["status"] == b["status"] == "ok"
                    cells.append(f"**{a['ms'] / b['ms']:.2f}**" + (
                        f" ({a['mem_mb'] / b['mem_mb']:.2f})" if ok and "mem_mb" in a and "mem_mb" in b else "")
                        if ok else "-")
                head_rows.append([f"ours / {name} ({method})", *cells])
        ub = [_find(rows, model, k, "mgda (representation)") for k in ks]
        head_rows.append(["ours mgda_ub (representation)", *[_cell(r) for r in ub]])
        if not engine_only:
            out += ["### Headline: x plain step (x plain memory); ours / theirs in bold (< 1: ours faster)", "",
                    markdown_table(["", *[f"k={k}" for k in ks]], head_rows)]
        # engine sweep
        sweep_rows = []
        for method in SWEEP:
            for engine in ("auto", *SWEEP_ENGINES):
                found = [_find(rows, model, k, f"{method} ({engine})") for k in ks]
                if all(r is None for r in found):
                    continue
                ran = sorted({r["ran"] for r in found if r and r["ran"]})
                sweep_rows.append([method, engine, *[_cell(r) for r in found], ", ".join(ran)])
        if sweep_rows:
            out += ["### Engine sweep: x plain step (x plain memory)", "",
                    "`representation` runs the method on the Gram matrix of the gradients w.r.t. the trunk "
                    "output (mgda: MGDA-UB; upgrad: UPGrad with `mode='representation'`), then one "
                    "backward; `mean` is a loss weighting, one backward whatever the engine. "
                    "`recompute_every=10`: the weights are recomputed every 10th step and reused in "
                    "between at the cost of one ordinary backward; the median is that of a reused "
                    "step, so the amortised cost is about (9 x this + 1 x auto) / 10. "
                    "'ran' is `StepInfo.engine`.", "",
                    markdown_table(["method", "engine", *[f"k={k}" for k in ks], "ran"], sweep_rows)]
        # every method
        labels = [r["label"] for r in mrows if r["kind"] == "ours" and r["engine"] == "auto"]
        method_rows = []
        for label in dict.fromkeys(labels):
            found = [_find(rows, model, k, label) for k in ks]
            ran = sorted({r["ran"] for r in found if r and r["ran"]})
            method_rows.append([label.split(" ")[0], *[_cell(r) for r in found], ", ".join(ran)])
        if not engine_only:
            out += ["### Every method, default engine (`engine='auto'`, `features=z` passed)", "",
                    markdown_table(["method", *[f"k={k}" for k in ks], "ran"], method_rows)]
        skipped = [r for r in mrows if r["status"] != "ok"]
        if skipped:
            out += ["Skipped (failed at warm-up):", ""]
            out += [f"- {r['label']}, k={r['k']}: {r['status'][len('skipped: '):]}" for r in skipped] + [""]
    if fw:
        out += ["## Frank-Wolfe MGDA solve (`min_norm_frank_wolfe`, random k x k Gram, median of 50)", "",
                markdown_table(["k", *fw], [["ms", *[f"{v:.3f}" for v in fw.values()]]])]
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    panels: dict[str, tuple[str, list[common.Curve]]] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model and r["status"] == "ok"]
        labels = [lab for lab in dict.fromkeys(r["label"] for r in mrows)
                  if "(auto)" not in lab or lab.split(" ")[0] in SWEEP]
        curves = [(label, "--" if "LibMTL" in label or "torchjd" in label else "-",
                   [(r["k"], r["ratio"], r.get("mem_ratio")) for r in mrows if r["label"] == label])
                  for label in labels]
        panels[model] = (mrows[0]["device"] if mrows else "", curves)
    common.plot_against_k(panels, path)

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks overhead", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"tiny models, k in {QUICK_KS}, few steps (seconds)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--model", default=None,
                   help="comma-separated from mlp, conv, transformer, resnet, or 'all'; default: mlp, conv "
                        "and transformer on CPU (--quick: mlp), mlp and resnet on CUDA. conv and "
                        "transformer run the engine sweep of exact MGDA only")
    p.add_argument("--ks", default=None, help=f"comma-separated k (default {','.join(map(str, FULL_KS))})")
    p.add_argument("--methods", default="all", help="'all' registered methods or a comma-separated list")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (median)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--budget", type=float, default=None, help="seconds of timed steps per configuration")
    p.add_argument("--no-sweep", action="store_true", help="skip the engine sweep")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own; --quick: 1). On a shared or "
                        "oversubscribed machine 1 thread gives far steadier CPU timings")
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
    if args.model is None:
        models = ["mlp", "resnet"] if device == "cuda" else (["mlp"] if args.quick else ["mlp", "conv", "transformer"])
    elif args.model == "all":
        models = list(MODELS)
    else:
        models = args.model.split(",")
        unknown = [m for m in models if m not in MODELS]
        if unknown:
            p.error(f"unknown model(s) {unknown}; choose from {list(MODELS)} or 'all'")
    ks = tuple(int(x) for x in args.ks.split(",")) if args.ks else (QUICK_KS if args.quick else FULL_KS)
    methods = list(gb.available_methods()) if args.methods == "all" else args.methods.split(",")
    steps = args.steps or (3 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    budget = args.budget if args.budget is not None else (0.2 if args.quick else 4.0)
    rows, descriptions = [], {}
    for model in models:
        r, descriptions[model] = run(model, device, ks, methods, steps, warmup, budget, args.quick,
                                     sweep=not args.no_sweep, memory=not args.no_memory)
        rows += r
    fw = frank_wolfe_ms((2, 10, 40), repeats=10 if args.quick else 50)
    command = "python -m benchmarks overhead " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(rows, descriptions, command.strip(), fw) + "\n![step time against k](overhead.png)\n"
    print(text)
    name = "overhead-quick" if args.quick else "overhead"  # --quick never overwrites the full results
    write_result(args.out / f"{name}.md", text.replace("](overhead.png)", f"]({name}.png)"))
    plot(rows, args.out / f"{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
