"""Mixed task types (the HydraNet case): an L1 regression, a binary and a multi-class head on one trunk.

Default data: :func:`benchmarks.data.diabetes_mixed` (scikit-learn's bundled diabetes data: disease
progression by L1 regression, sex by binary cross-entropy, age group by 3-class cross-entropy,
from the 8 clinical measurements; no download). With ``--utkface DIR`` the same script trains a
small CNN on UTKFace images (age by L1, gender by BCE, race by 5-class CE) read by
:func:`benchmarks.data.utkface` from a folder of ``age_gender_race_date.jpg`` files.

    python -m benchmarks mixed                      # full mode (the committed results)
    python -m benchmarks mixed --quick              # seconds
    python -m benchmarks mixed --utkface ~/UTKFace  # your copy of UTKFace
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, environment, markdown_table, mean_std, write_result
from benchmarks.data import AGE_BINS, diabetes_mixed, utkface
from benchmarks.models import cnn_mixed, mlp_mixed
from benchmarks.training import bar_plot, predict, select_methods, standard_error_gaps, train_seeds


def loss_fn(outs, ys):
    """L1 on the regression output, BCE-with-logits on the binary logit, CE on the class logits."""
    return [F.l1_loss(outs[0].squeeze(-1), ys[0]),
            F.binary_cross_entropy_with_logits(outs[1].squeeze(-1), ys[1]),
            F.cross_entropy(outs[2], ys[2])]


def metrics(outs, ys, names) -> dict[str, float]:
    """MAE of the regression, accuracy (%) of the binary and of the multi-class task."""
    return {names[0]: float((outs[0].squeeze(-1) - ys[0]).abs().mean()),
            names[1]: 100.0 * float(((outs[1].squeeze(-1) > 0).float() == ys[1]).float().mean()),
            names[2]: 100.0 * float((outs[2].argmax(-1) == ys[2]).float().mean())}


def constant_baseline(train, test, names) -> dict[str, float]:
    """Metrics of the input-blind predictor: training median, training majority classes."""
    _, r, b, c = train.tensors
    _, tr, tb, tc = test.tensors
    maj_b = float(b.mean() >= 0.5)
    maj_c = int(torch.bincount(c).argmax())
    return {names[0]: float((tr - r.median()).abs().mean()),
            names[1]: 100.0 * float((tb == maj_b).float().mean()),
            names[2]: 100.0 * float((tc == maj_c).float().mean())}


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks mixed", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 epochs (seconds)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (full: 100 diabetes, 10 UTKFace)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (full: 5 diabetes, 3 UTKFace)")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="method names (default: every registered method that can run, aliases once)")
    ap.add_argument("--utkface", type=Path, default=None, metavar="DIR",
                    help="train on UTKFace images in DIR (age_gender_race_date.jpg) instead of diabetes")
    ap.add_argument("--size", type=int, default=48, help="UTKFace image side after resizing")
    ap.add_argument("--limit", type=int, default=None, help="UTKFace: use at most this many images")
    ap.add_argument("--batch", type=int, default=None, help="batch size (32 diabetes, 128 UTKFace)")
    ap.add_argument("--lr", type=float, default=None, help="Adam learning rate (3e-3 diabetes, 1e-3 UTKFace)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=None,
                    help="markdown result (default results/mixed.md, results/mixed_utkface.md; with --quick "
                         "*-quick.md, so a quick run never overwrites the full results); PNG next to it")
    args = ap.parse_args(argv)
    utk = args.utkface is not None
    args.epochs = args.epochs or (2 if args.quick else (10 if utk else 100))
    args.seeds = args.seeds or (1 if args.quick else (3 if utk else 5))
    args.batch = args.batch or (128 if utk else 32)
    args.lr = args.lr or (1e-3 if utk else 3e-3)
    args.out = args.out or RESULTS / (("mixed_utkface" if utk else "mixed") + ("-quick" if args.quick else "") + ".md")
    return args


def load(args):
    """``(train, test, task names, make_model, data description)``."""
    if args.utkface is None:
        train, test, _ = diabetes_mixed()
        names = ("progression", "sex", "age_group")

        def make_model():
            model = mlp_mixed(train.tensors[0].shape[1], classes=3)
            with torch.no_grad():  # start the regression output at the training median
                model.heads[0].bias.fill_(float(train.tensors[1].median()))
            return model

        desc = (f"scikit-learn's bundled diabetes data (442 patients; fixed split {len(train)} train / "
                f"{len(test)} test). Inputs: bmi, bp, s1..s6, standardised. Tasks: *progression* (disease "
                "progression after one year, 25..346, L1 loss on the raw scale; metric MAE, lower is "
                "better), *sex* (binary, BCE; accuracy %), *age_group* (age < "
                f"{AGE_BINS[0]:g} / {AGE_BINS[0]:g} <= age < {AGE_BINS[1]:g} / age >= {AGE_BINS[1]:g} years, the age "
                "terciles; 3-class CE; accuracy %). Why this data set: it is the only one shipped inside "
                "a PyPI package we depend on (scikit-learn) whose real columns give a continuous "
                "regression target, a binary one and a categorical one at once; wine/iris have no binary "
                "column and breast cancer only a binary label. The age groups are the recorded age cut at "
                "its terciles (the usual binning of age, as UTKFace age groups). Model: MLP trunk "
                "8-64-64 (ReLU), linear heads; the regression bias starts at the training median.")
        return train, test, names, make_model, desc
    full = utkface(args.utkface, size=args.size, strict=False, limit=args.limit)
    n = len(full)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    n_test = max(1, n // 5)
    te, tr = perm[:n_test], perm[n_test:]
    train = torch.utils.data.TensorDataset(*[t[tr] for t in full.tensors])
    test = torch.utils.data.TensorDataset(*[t[te] for t in full.tensors])
    names = ("age", "gender", "race")

    def make_model():
        model = cnn_mixed(3, classes=5)
        with torch.no_grad():
            model.heads[0].bias.fill_(float(train.tensors[1].median()))
        return model

    desc = (f"UTKFace images from `{args.utkface}` ({n} usable, {len(full.skipped)} skipped for a malformed "
            f"name or unreadable image; fixed random split {len(train)} train / {len(test)} test), resized "
            f"to {args.size}x{args.size} RGB. Tasks: *age* (L1, MAE in years), *gender* (BCE, accuracy %), "
            "*race* (5 classes, CE, accuracy %). Model: 3 conv blocks (16-32-64) + global pool + FC 64 "
            "trunk, linear heads; the age bias starts at the training median.")
    return train, test, names, make_model, desc


def reading(results, methods, names, base) -> list[str]:
    lines = []
    if "mean" not in results:
        return ["No `mean` row, so no comparison against equal weighting."]
    for i, t in enumerate(names):
        hib = i > 0
        gaps = standard_error_gaps({m: results[m][t] for m in methods}, "mean", higher_is_better=hib)
        better = [f"{m} ({'+' if hib else '-'}{d:.2f})" for m, (d, se) in gaps.items() if d > se]
        worse = [f"{m}" for m, (d, se) in gaps.items() if -d > se]
        beats_const = sum(1 for m in methods if (statistics.fmean(results[m][t]) < base[t]) != hib)
        lines.append(f"- *{t}*: better than `mean` by more than 2 standard errors: {', '.join(better) or 'none'}; "
                     f"worse by more than 2 standard errors: {', '.join(worse) or 'none'}. "
                     f"{beats_const} of {len(methods)} methods beat the input-blind constant predictor "
                     f"({base[t]:.2f}).")
    return lines


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    torch.set_num_threads(args.threads)
    train, test, names, make_model, desc = load(args)
    methods, skipped = select_methods(args.methods, make_model, [t[:8] for t in train.tensors], loss_fn)
    x_test, *y_test = test.tensors
    results = train_seeds(methods, make_model, train, loss_fn,
                          lambda model: metrics(predict(model, x_test), y_test, names),
                          seeds=args.seeds, epochs=args.epochs, batch=args.batch, lr=args.lr)

    base = constant_baseline(train, test, names)
    torch.manual_seed(0)
    with torch.no_grad():  # loss scales at initialisation (seed 0), on the whole training set
        init = [float(v) for v in loss_fn(make_model()(train.tensors[0])[1], train.tensors[1:])]
    headers = ["method", f"{names[0]} MAE ↓", f"{names[1]} acc. % ↑", f"{names[2]} acc. % ↑",
               "wall s/epoch", "CPU s/epoch"]
    rows = [(m, *(mean_std(results[m][t]) for t in names), f"{results[m]['wall']:.3f}", f"{results[m]['cpu']:.3f}")
            for m in methods]
    rows.append(("*constant predictor*", *(f"{base[t]:.2f}" for t in names), "", ""))
    png = args.out.with_suffix(".png")
    text = [
        "# Mixed task types: L1 regression + binary + multi-class on one trunk",
        "",
        f"Command: `{' '.join(['python -m benchmarks mixed', *argv])}`",
        "",
        f"Environment: {environment()}",
        "",
        f"Data: {desc}",
        "",
        f"Settings: Adam lr {args.lr:g}, batch {args.batch}, {args.epochs} epochs, seeds 0..{args.seeds - 1} "
        "(initialisation and batch order; same split for every seed), `opt.backward([l1, bce, ce], "
        "features=z)` with `shared_params=model.trunk`; the losses are not rescaled: at initialisation "
        f"they are {init[0]:.1f} (L1), {init[1]:.2f} (BCE), {init[2]:.2f} (CE). "
        "Metrics on the test set, mean ± sample std "
        "over seeds; time: mean wall-clock and CPU seconds of one training epoch, one torch thread, on "
        "a machine shared with other jobs. *constant predictor*: training median / majority classes.",
        "",
        markdown_table(headers, rows),
    ]
    if skipped:
        text += ["Not run:", ""] + [f"- `{m}`: {why}" for m, why in skipped] + [""]
    text += ["## Reading", "", *reading(results, methods, names, base),
             f"- Resolution: the test set has {len(test)} samples, so one sample is {100 / len(test):.2f} accuracy "
             "points; with these seed-to-seed spreads only large differences are distinguishable.",
             "", f"![per-task metrics]({png.name})", ""]
    text_s = "\n".join(text)
    if results:
        bar_plot(png, methods, names, [f"{names[0]} MAE (lower better)", "accuracy %", "accuracy %"],
                 results, f"mixed tasks, {args.epochs} epochs, {args.seeds} seed(s): mean ± std")
    write_result(args.out, text_s)
    return text_s


if __name__ == "__main__":
    main()
