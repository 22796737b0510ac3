"""MultiDigits: every method on two overlapped handwritten digits (the MGDA paper's MultiMNIST setup).

Data: :func:`benchmarks.data.multidigits` (scikit-learn's bundled digits, no download; test images
use held-out source digits). Model: the MGDA paper's LeNet trunk and two heads
(:func:`benchmarks.models.lenet`). Each method trains with Adam wrapped in ``GradBalance`` for the
same epochs on the same data with the same seeds; the table gives the test accuracy of each task
(mean ± std over seeds) and the wall/CPU seconds of one training epoch.

    python -m benchmarks multidigits            # full mode (the committed results)
    python -m benchmarks multidigits --quick    # seconds: 1 seed, 1 epoch, 256 images
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, environment, markdown_table, mean_std, write_result
from benchmarks.data import digit_side, multidigits
from benchmarks.models import lenet
from benchmarks.training import bar_plot, predict, select_methods, standard_error_gaps, train_seeds

TASKS = ("left", "right")
#: MGDA paper (Sener & Koltun 2018), Table: MultiMNIST test accuracy (%) left / right
PAPER = {"single task": (97.23, 95.90), "uniform scaling": (96.46, 94.99), "Kendall et al. (UW)": (96.47, 95.29),
         "GradNorm": (96.27, 94.84), "MGDA-UB": (97.26, 95.90)}


def loss_fn(outs, ys):
    return [F.cross_entropy(o, y) for o, y in zip(outs, ys)]


def accuracy(model, test) -> dict[str, float]:
    x, *ys = test.tensors
    outs = predict(model, x)
    return {t: 100.0 * float((o.argmax(-1) == y).float().mean()) for t, o, y in zip(TASKS, outs, ys)}


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks multidigits", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, 256 train / 256 test images")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (full: 6)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (full: 3)")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="method names (default: every registered method that can run, aliases once)")
    ap.add_argument("--train", type=int, default=None, help="training images (full: 6000)")
    ap.add_argument("--test", type=int, default=None, help="test images (full: 2000)")
    ap.add_argument("--size", type=int, default=28, help="image side in pixels")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=None,
                    help="markdown result (default results/multidigits.md; --quick: results/multidigits-quick.md, "
                         "so a quick run never overwrites the full results); the PNG goes next to it")
    args = ap.parse_args(argv)
    args.out = args.out or RESULTS / ("multidigits-quick.md" if args.quick else "multidigits.md")
    q = args.quick
    args.epochs = args.epochs or (1 if q else 6)
    args.seeds = args.seeds or (1 if q else 3)
    args.train = args.train or (256 if q else 6000)
    args.test = args.test or (256 if q else 2000)
    return args


def reading(results, methods) -> list[str]:
    """A short reading of the numbers, computed from them (2 standard errors against mean)."""
    lines = []
    if "mean" not in results:
        return ["No `mean` row, so no comparison against equal weighting."]
    for t in TASKS:
        gaps = standard_error_gaps({m: results[m]["acc"][t] for m in methods}, "mean")
        better = [f"{m} (+{d:.2f})" for m, (d, se) in gaps.items() if d > se]
        worse = [f"{m} ({d:.2f})" for m, (d, se) in gaps.items() if -d > se]
        lines.append(f"- Task *{t}*: better than `mean` by more than 2 standard errors: "
                     f"{', '.join(better) or 'none'}; worse by more than 2 standard errors: "
                     f"{', '.join(worse) or 'none'} (differences in accuracy points).")
    accs = {m: statistics.fmean(results[m]["acc"]["left"] + results[m]["acc"]["right"]) for m in methods}
    best = max(accs, key=accs.get)
    worst = min(accs, key=accs.get)
    lines.append(f"- Average of the two tasks: best {best} ({accs[best]:.2f}), worst {worst} "
                 f"({accs[worst]:.2f}), mean {accs['mean']:.2f}.")
    if "mgda_ub" in results:
        d = [statistics.fmean(results["mgda_ub"]["acc"][t]) - statistics.fmean(results["mean"]["acc"][t])
             for t in TASKS]
        lines.append(f"- MGDA paper (MultiMNIST): MGDA-UB beats uniform scaling by +0.80 / +0.91 points "
                     f"(left/right); here `mgda_ub` - `mean` = {d[0]:+.2f} / {d[1]:+.2f}.")
    return lines


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    torch.set_num_threads(args.threads)
    train, test = multidigits(args.train, args.test, size=args.size, seed=0)

    def make_model():
        return lenet(args.size)

    methods, skipped = select_methods(args.methods, make_model, [t[:8] for t in train.tensors], loss_fn)
    results = train_seeds(methods, make_model, train, loss_fn, lambda model: accuracy(model, test),
                          seeds=args.seeds, epochs=args.epochs, batch=args.batch, lr=args.lr)
    for m in methods:  # {"left": [...], "right": [...], "wall", "cpu"} -> {"acc": {...}, ...}
        results[m] = {"acc": {t: results[m][t] for t in TASKS}, "wall": results[m]["wall"], "cpu": results[m]["cpu"]}

    rows = [(m, mean_std(results[m]["acc"]["left"]), mean_std(results[m]["acc"]["right"]),
             f"{results[m]['wall']:.2f}", f"{results[m]['cpu']:.2f}") for m in methods]
    png = args.out.with_suffix(".png")
    side = digit_side(args.size)
    text = [
        "# MultiDigits: two overlapped digits, LeNet trunk, every method",
        "",
        f"Command: `{' '.join(['python -m benchmarks multidigits', *argv])}`",
        "",
        f"Environment: {environment()}",
        "",
        f"Settings: {args.train} training / {args.test} test images of {args.size}x{args.size} px; each "
        f"holds two scikit-learn digits upsampled to {side}x{side} px, one in the top-left corner and one "
        f"shifted {args.size - side} px down and right, overlaid by pixel-wise max (MultiMNIST's "
        "proportions). Source digits: a fixed 70/30 split of the 1,797 digits; test images use only "
        "held-out ones. Model: MGDA paper LeNet (conv10-conv20-FC50 trunk, FC50-FC10 heads, no "
        f"dropout). Adam lr {args.lr:g}, batch {args.batch}, {args.epochs} epochs, seeds 0..{args.seeds - 1} "
        "(seed: initialisation and batch order; the data are the same for every seed). "
        "`opt.backward(losses, features=z)` with `shared_params=model.trunk` for every method. "
        "Accuracy: % on the test set, mean ± sample std over seeds. Time: mean wall-clock and CPU "
        "seconds of one training epoch (no evaluation), one torch thread; the machine was shared with "
        "other jobs, so wall time is noisy and CPU time is the steadier cost measure.",
        "",
        markdown_table(["method", "left acc. %", "right acc. %", "wall s/epoch", "CPU s/epoch"], rows),
    ]
    if skipped:
        text += ["Not run:", ""] + [f"- `{m}`: {why}" for m, why in skipped] + [""]
    text += ["## Reading", "", *reading(results, methods), "",
             "Published MultiMNIST numbers (MGDA paper, left / right accuracy %): "
             + "; ".join(f"{k} {a:.2f} / {b:.2f}" for k, (a, b) in PAPER.items())
             + ". They use 60k MNIST training images, 100 epochs and a grid-searched learning rate; "
             "this benchmark is far smaller (scikit-learn's 8x8 digits upsampled, a few epochs), so "
             "only the qualitative ordering is comparable, not the absolute accuracy.", "",
             f"![per-task accuracy]({png.name})", ""]
    text_s = "\n".join(text)
    if results:
        bar_plot(png, methods, TASKS, ["test accuracy %"] * 2,
                 {m: results[m]["acc"] for m in methods},
                 f"MultiDigits, {args.epochs} epochs, {args.seeds} seed(s): mean ± std")
    write_result(args.out, text_s)
    return text_s


if __name__ == "__main__":
    main()
