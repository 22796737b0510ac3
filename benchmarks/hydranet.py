"""HydraNet: a ResNet trunk with three heads on UTKFace: age (L1), gender (BCE), race (CE, 5 classes).

The worked example of the tutorial (docs/tutorials/hydranet.md) as a script. Data: the UTKFace
folder given by ``--data`` (files ``[age]_[gender]_[race]_[date&time].jpg``, read by
:func:`benchmarks.data.utkface`; malformed names are skipped and counted), or, without
``--data``, the synthetic stand-in :func:`benchmarks.data.synthetic_faces`. Model:
:func:`benchmarks.models.hydranet` (torchvision's ResNet-18 when it imports, else the same
layout written in :mod:`benchmarks.models`; ``--arch small`` for a narrow one). Each method in
``--method`` trains from the same initialisation and batch order; every step's ``StepInfo`` is
recorded by :class:`gradbalance.log.History`, saved as JSON and plotted next to the report.

    python -m benchmarks hydranet --data ~/UTKFace --method mean nash_mtl
    python -m benchmarks hydranet                   # synthetic stand-in
    python -m benchmarks hydranet --quick           # seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import gradbalance as gb
from benchmarks.common import RESULTS, environment, markdown_table, progress, seed_everything, write_result
from benchmarks.data import synthetic_faces, utkface
from benchmarks.mixed import constant_baseline, loss_fn, metrics
from benchmarks.models import HYDRA_TASKS, hydranet
from benchmarks.training import predict


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks hydranet", description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, metavar="DIR",
                    help="UTKFace folder ([age]_[gender]_[race]_[date&time].jpg); default: synthetic stand-in")
    ap.add_argument("--method", nargs="+", default=["mean", "nash_mtl"], metavar="NAME",
                    help="balancing method(s), each trained from the same start (default: mean nash_mtl)")
    ap.add_argument("--quick", action="store_true", help="a tiny run (seconds): small net, 160 images, 2 epochs")
    ap.add_argument("--arch", choices=("resnet18", "small"), default=None,
                    help="trunk (default: resnet18 with --data, small otherwise and with --quick)")
    ap.add_argument("--size", type=int, default=None, help="image side (default 64 with --data, 32 synthetic, "
                                                           "16 quick)")
    ap.add_argument("--limit", type=int, default=None, help="--data: use at most this many images")
    ap.add_argument("--n", type=int, default=None, help="synthetic images (default 3000, quick 160)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs (default 10, quick 2)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 64, quick 32)")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    ap.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=None,
                    help="markdown report (default results/hydranet.md; --quick: hydranet-quick.md); plots and "
                         "histories go next to it")
    args = ap.parse_args(argv)
    q, real = args.quick, args.data is not None
    args.arch = args.arch or ("resnet18" if real and not q else "small")
    args.size = args.size or (16 if q else (64 if real else 32))
    args.n = args.n or (160 if q else 3000)
    args.epochs = args.epochs or (2 if q else 10)
    args.batch = args.batch or (32 if q else 64)
    args.out = args.out or RESULTS / ("hydranet-quick.md" if q else "hydranet.md")
    return args


def load(args):
    """``(train, test, description)``: a fixed 80/20 split of the data."""
    if args.data is not None:
        full = utkface(args.data, size=args.size, strict=False, limit=args.limit)
        desc = (f"UTKFace images from `{args.data}`: {len(full)} usable, {len(full.skipped)} skipped for a "
                f"malformed name or an unreadable image; resized to {args.size}x{args.size} RGB")
    else:
        full = synthetic_faces(args.n, size=args.size, seed=1234)
        desc = (f"{args.n} synthetic {args.size}x{args.size} stand-in images (benchmarks.data.synthetic_faces: "
                "disc colour = race, stripe direction = gender, disc radius = age), not UTKFace")
    n = len(full)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    n_test = max(1, n // 5)
    pick = [perm[n_test:], perm[:n_test]]
    train, test = (torch.utils.data.TensorDataset(*[t[i] for t in full.tensors]) for i in pick)
    return train, test, f"{desc}; fixed random split {len(train)} train / {len(test)} test"


def step(model, opt: gb.GradBalance, batch) -> gb.StepInfo:
    """One training step; the losses are named, so StepInfo and History say age/gender/race."""
    x, *ys = batch
    opt.zero_grad()
    z, outs = model(x)
    info = opt.backward(dict(zip(HYDRA_TASKS, loss_fn(outs, ys))), features=z)
    opt.step()
    return info


def make_model(args, train):
    torch.manual_seed(args.seed)
    model = hydranet(args.arch)
    with torch.no_grad():  # the age head starts at the training median (as benchmarks.mixed)
        model.heads[0].bias.fill_(float(train.tensors[1].median()))
    return model


def train_one(method: str, args, train, test) -> dict:
    """Train one method; the test metrics after each epoch, its History and the timings."""
    model = make_model(args, train)
    opt = gb.GradBalance(torch.optim.Adam(model.parameters(), lr=args.lr), method=method, shared_params=model.trunk)
    gen = seed_everything(args.seed)
    history = gb.log.History()
    curve = []
    x_test, *y_test = test.tensors
    n = len(train)
    wall = 0.0
    for _ in progress(range(args.epochs), desc=method):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, args.batch):
            idx = order[s : s + args.batch]
            info = step(model, opt, [t[idx] for t in train.tensors])
            history.record(info)
        if hasattr(opt.method, "epoch_end"):  # DWA: close the epoch
            opt.method.epoch_end()
        wall += time.perf_counter() - t0
        model.eval()
        curve.append(metrics(predict(model, x_test), y_test, HYDRA_TASKS))
    return {"curve": curve, "history": history, "wall": wall / args.epochs, "model": model}


def plot_curves(path: Path, runs: dict, title: str) -> Path:
    """One panel per task: the test metric after each epoch, one line per method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.4))
    axes = fig.subplots(1, 3)
    labels = ("age MAE (years, lower better)", "gender accuracy %", "race accuracy %")
    for ax, task, label in zip(axes, HYDRA_TASKS, labels):
        for m, run in runs.items():
            ax.plot(range(1, len(run["curve"]) + 1), [c[task] for c in run["curve"]], marker="o", label=m)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def balance_summary(history: gb.log.History) -> tuple[str, ...]:
    """Means over the last quarter of the steps: weights, heads' weights, gradient-norm ratios,
    and the mean pairwise cosines (age-gender, age-race, gender-race)."""
    import numpy as np

    last = max(1, len(history) // 4)

    def fmt(a):
        a = np.nanmean(a[-last:], axis=0) if not np.isnan(a[-last:]).all() else None
        return "n/a" if a is None else " / ".join(f"{v:.3g}" for v in a)

    cos = history.mean_cosine(last=last)
    pairs = "n/a" if np.isnan(cos).all() else " / ".join(f"{cos[i, j]:+.2f}" for i, j in ((0, 1), (0, 2), (1, 2)))
    return (fmt(history.values("weights")), fmt(history.head_weights()), fmt(history.grad_norm_ratios()), pairs)


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    torch.set_num_threads(args.threads)
    unknown = [m for m in args.method if m not in gb.available_methods()]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; available: {', '.join(gb.available_methods())}")
    train, test, desc = load(args)
    model = make_model(args, train)
    with torch.no_grad():  # the loss scales at initialisation, on (up to 512 of) the training images
        x0, *y0 = (t[:512] for t in train.tensors)
        init = [float(v) for v in loss_fn(model.eval()(x0)[1], y0)]
    runs = {}
    for m in args.method:
        runs[m] = train_one(m, args, train, test)
        final = runs[m]["curve"][-1]
        print(f"{m:12s} age MAE {final['age']:.2f}  gender acc {final['gender']:.1f}%  race acc {final['race']:.1f}%  "
              f"({runs[m]['wall']:.2f} s/epoch)", file=sys.stderr, flush=True)
    base = constant_baseline(train, test, HYDRA_TASKS)
    out = Path(args.out)
    stem = out.stem[: -len("-quick")] if out.stem.endswith("-quick") else out.stem
    suffix = "-quick" if out.stem.endswith("-quick") else ""
    curves_png = out.with_suffix(".png")
    rows = [(m, f"{r['curve'][-1]['age']:.2f}", f"{r['curve'][-1]['gender']:.1f}", f"{r['curve'][-1]['race']:.1f}",
             f"{r['wall']:.2f}") for m, r in runs.items()]
    rows.append(("*constant predictor*", f"{base['age']:.2f}", f"{base['gender']:.1f}", f"{base['race']:.1f}", ""))
    text = [
        "# HydraNet: ResNet trunk, heads for age (L1), gender (BCE) and race (CE, 5 classes)",
        "",
        f"Command: `{' '.join(['python -m benchmarks hydranet', *argv])}`",
        "",
        f"Environment: {environment()}",
        "",
        f"Data: {desc}.",
        "",
        f"Model: {model.trunk_source} trunk, linear heads; the age head's bias starts at the training median. "
        f"Adam lr {args.lr:g}, batch {args.batch}, {args.epochs} epochs, seed {args.seed} (same initialisation "
        "and batch order for every method); `opt.backward({'age': l1, 'gender': bce, 'race': ce}, "
        "features=z)` with `shared_params=model.trunk`. The losses are not rescaled: at initialisation they are "
        f"{init[0]:.2f} (age L1, years), {init[1]:.3f} (gender BCE), {init[2]:.3f} (race CE).",
        "",
        "Test metrics after the last epoch (one seed: read differences of a point or two as noise):",
        "",
        markdown_table(["method", "age MAE ↓", "gender acc. % ↑", "race acc. % ↑", "wall s/epoch"], rows),
        "What the balancing did (means over the last quarter of the steps, tasks in the order age / gender / "
        "race; `History` recorded every step):",
        "",
        markdown_table(["method", "weights", "heads' weights", "grad norm / mean", "cosines a-g / a-r / g-r"],
                       [(m, *balance_summary(r["history"])) for m, r in runs.items()]),
        f"![test metrics per epoch]({curves_png.name})",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(curves_png, runs, f"HydraNet, {args.epochs} epochs, seed {args.seed}")
    for m, r in runs.items():
        base_name = out.parent / f"{stem}-{m}{suffix}"
        r["history"].save(base_name.with_suffix(".json"))
        r["history"].plot(base_name.with_suffix(".png"), title=f"HydraNet, {m}")
        text += [f"![{m}: weights, losses, gradient norms, cosines]({base_name.name}.png)", ""]
    text_s = "\n".join(text)
    print(text_s)
    write_result(out, text_s)
    return text_s


if __name__ == "__main__":
    main()
