"""How tasks share a network: hard/soft sharing, cross-stitch, MMoE, PLE, DSelect-k, MTAN.

Trains the ``gradbalance.nn`` architectures on a two-digit task built from scikit-learn's
8x8 digits (an image is two digits side by side; task "left" classifies the left digit, task
"right" the right one: a small stand-in for MultiDigits), each with equal weights ("mean") and,
when registered, MGDA ("mgda"), with the same seeds, and writes test accuracy per task and the
step time to ``benchmarks/results/sharing.md``.

    python -m benchmarks.sharing            # 3 seeds, 15 epochs (46 min on a busy 2-core machine;
                                            # the conv rows hard_conv and mtan take most of it)
    python -m benchmarks.sharing --quick    # 1 seed, 3 epochs, fewer samples (about a minute)
    python -m benchmarks.sharing --archs hard mtan   # a subset, still side by side in one run
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import gradbalance as gb
from gradbalance.nn import MTAN, PLE, CrossStitch, DSelectK, HardSharing, MMoE, SoftSharing

TASKS = ("left", "right")
# hard_conv: hard sharing on MTAN's convolutional backbone (the baseline MTAN adds attention to)
ARCHS = ("hard", "soft", "cross_stitch", "mmoe", "ple", "dselect_k", "hard_conv", "mtan")
SOFT_WEIGHT = 1e-3  # l2 soft-sharing penalty (pairwise form)
STITCH_LR_MULT = 10.0  # the paper's 10^3 is for SGD; Adam's steps do not scale with the gradient
DSELECT_K, DSELECT_ENTROPY = 2, 1e-2  # selectors per gate; weight of the entropy regulariser


def two_digit_data(n_train: int, n_test: int, seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: x (n, 128) in [0, 1], y (n, 2) digit labels.

    Test pairs are built from digits never used in training pairs (a 70/30 split of the 1797
    scikit-learn digits), so the test accuracy measures generalisation to unseen handwriting.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (1797, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    cut = int(0.7 * len(labels))
    pools = (perm[:cut], perm[cut:])

    def pairs(pool, n):
        i = pool[torch.randint(len(pool), (n,), generator=g)]
        j = pool[torch.randint(len(pool), (n,), generator=g)]
        x = torch.cat([images[i], images[j]], dim=2).reshape(n, -1)  # (n, 8 * 16)
        return x, torch.stack([labels[i], labels[j]], dim=1)

    return (*pairs(pools[0], n_train), *pairs(pools[1], n_test))


def _mlp(*sizes: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return layers[:-1]  # no activation after the last layer


def build(arch: str, width: int = 64) -> nn.Module:
    d = 128
    if arch == "hard":
        return HardSharing(nn.Sequential(*_mlp(d, width, width), nn.ReLU()),
                           {t: nn.Linear(width, 10) for t in TASKS})
    if arch == "soft":
        return SoftSharing({t: nn.Sequential(*_mlp(d, width, width, 10)) for t in TASKS})
    if arch == "cross_stitch":
        # stitch after each hidden ReLU (layer indices 1 and 3)
        return CrossStitch({t: nn.Sequential(*_mlp(d, width, width, 10)) for t in TASKS}, after=[1, 3])
    if arch == "mmoe":
        experts = [nn.Sequential(*_mlp(d, width // 2, width // 2), nn.ReLU()) for _ in range(4)]
        towers = {t: nn.Sequential(*_mlp(width // 2, width // 2, 10)) for t in TASKS}
        return MMoE(experts, towers, in_features=d)
    if arch == "ple":
        # 2 levels of one layer each (MMoE's experts have two): 2 shared + 1 own expert per task
        h = width // 2
        def level(d_in):
            return nn.Sequential(nn.Linear(d_in, h), nn.ReLU())
        return PLE([[level(d), level(d)], [level(h), level(h)]],
                   [{t: [level(d)] for t in TASKS}, {t: [level(h)] for t in TASKS}],
                   {t: nn.Sequential(*_mlp(h, h, 10)) for t in TASKS}, in_features=d)
    if arch == "dselect_k":
        experts = [nn.Sequential(*_mlp(d, width // 2, width // 2), nn.ReLU()) for _ in range(4)]
        towers = {t: nn.Sequential(*_mlp(width // 2, width // 2, 10)) for t in TASKS}
        return DSelectK(experts, towers, k=DSELECT_K, in_features=d)
    if arch in ("hard_conv", "mtan"):
        stages = _conv_stages()
        heads = {t: nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 8, 10)) for t in TASKS}
        if arch == "hard_conv":
            return HardSharing(nn.Sequential(*stages), heads)
        return MTAN(stages, heads, example_input=torch.zeros(1, d))
    raise ValueError(f"unknown architecture {arch!r}")


def _conv_stages() -> list[nn.Module]:
    """Two conv stages on the 8x16 image: 16 channels at 8x16, 32 at 4x8 (stride 2)."""
    def conv(a, b, stride=1):
        return nn.Sequential(nn.Conv2d(a, b, 3, stride, 1), nn.BatchNorm2d(b), nn.ReLU())
    return [nn.Sequential(nn.Unflatten(1, (1, 8, 16)), conv(1, 16), conv(16, 16)),
            nn.Sequential(conv(16, 32, 2), conv(32, 32))]


def _setup(arch: str, method: str, seed: int, lr: float = 1e-3):
    torch.manual_seed(seed)
    model = build(arch)
    params = model.param_groups(lr, STITCH_LR_MULT) if arch == "cross_stitch" else model.parameters()
    return model, gb.GradBalance(torch.optim.Adam(params, lr=lr), method, shared_params=model)


def _step(arch: str, model, opt, x, y) -> None:
    opt.zero_grad()
    out = model(x)
    opt.backward({t: nn.functional.cross_entropy(out[t], y[:, i]) for i, t in enumerate(TASKS)})
    if arch == "soft":
        model.penalty("l2", weight=SOFT_WEIGHT).backward()
    if arch == "dselect_k":
        model.regularization(x, entropy_weight=DSELECT_ENTROPY).backward()
    opt.step()


def run(arch: str, method: str, seed: int, data, epochs: int, batch: int = 64):
    """Train one (architecture, method, seed); returns test accuracy per task, parameter count."""
    x_tr, y_tr, x_te, y_te = data
    model, opt = _setup(arch, method, seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x_tr), generator=g)
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            _step(arch, model, opt, x_tr[idx], y_tr[idx])
    model.eval()  # batch norm (conv backbones): running statistics
    with torch.no_grad():
        out = model(x_te)
        acc = {t: float((out[t].argmax(-1) == y_te[:, i]).float().mean()) for i, t in enumerate(TASKS)}
    return acc, sum(p.numel() for p in model.parameters())


def step_times(configs, data, rounds: int, batch: int = 64) -> dict[tuple[str, str], float]:
    """Median CPU time (s) of one step per configuration, timed round-robin (one step of each
    per round). CPU time (``time.process_time``, one torch thread) rather than wall time: on a
    shared machine the wall time of a millisecond step mostly measures the other processes."""
    x, y = data[0][:batch], data[1][:batch]
    setups = {c: _setup(*c, seed=0) for c in configs}
    times: dict[tuple[str, str], list[float]] = {c: [] for c in configs}
    for r in range(rounds + 5):
        for c, (model, opt) in setups.items():
            t0 = time.process_time()
            _step(c[0], model, opt, x, y)
            if r >= 5:  # warm-up rounds
                times[c].append(time.process_time() - t0)
    return {c: statistics.median(ts) for c, ts in times.items()}


def _fmt(values):
    m = statistics.mean(values)
    return f"{100 * m:.1f}" if len(values) == 1 else f"{100 * m:.1f} ± {100 * statistics.stdev(values):.1f}"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 3 epochs, 1000 training pairs")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--train", type=int, default=None, help="training pairs")
    ap.add_argument("--methods", nargs="+", default=["mean", "mgda"])
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS, help="architectures (default all)")
    ap.add_argument("--rounds", type=int, default=None, help="timed steps per configuration")
    ap.add_argument("--out", type=Path, default=None,
                    help="markdown result (default results/sharing.md; --quick: results/sharing-quick.md)")
    args = ap.parse_args(argv)
    args.out = args.out or Path(__file__).parent / "results" / ("sharing-quick.md" if args.quick else "sharing.md")
    seeds = args.seeds or (1 if args.quick else 3)
    epochs = args.epochs or (3 if args.quick else 15)
    n_train = args.train or (1000 if args.quick else 4000)
    args.rounds = args.rounds or (30 if args.quick else 200)
    torch.set_num_threads(1)  # step times comparable across rows on a shared machine
    data = two_digit_data(n_train, 1000, seed=0)
    methods = [m for m in args.methods if m in gb.available_methods()]
    missing = [m for m in args.methods if m not in methods]

    results, refused = {}, []
    archs = [a for a in ARCHS if a in args.archs]
    for arch in archs:
        for method in methods:
            try:
                runs = [run(arch, method, seed, data, epochs) for seed in range(seeds)]
            except ValueError as err:
                if "shared_params is empty" not in str(err):
                    raise
                refused.append((arch, method))
                continue
            results[arch, method] = runs
            print(arch, method, [{t: round(100 * r[0][t], 1) for t in TASKS} for r in runs], flush=True)
    timing = step_times(list(results), data, rounds=args.rounds)
    rows = []
    for arch in archs:
        for method in methods:
            if (arch, method) in refused:
                rows.append(f"| {arch} | {method} | n/a | n/a | n/a | n/a: nothing is shared |")
                continue
            runs = results[arch, method]
            acc = {t: [r[0][t] for r in runs] for t in TASKS}
            rows.append(f"| {arch} | {method} | {_fmt(acc['left'])} | {_fmt(acc['right'])} "
                        f"| {1000 * timing[arch, method]:.2f} | {runs[0][1]:,} |")

    lines = [
        "# Sharing architectures on two-digit images",
        "",
        "Generated by `python -m benchmarks.sharing"
        + (" --quick" if args.quick else "") + "`. Data: pairs of scikit-learn 8x8 digits side by side "
        f"(128 inputs); task *left* / *right*: the class of each digit. {n_train} training pairs, "
        "1000 test pairs built from held-out digits. Adam lr 1e-3, batch 64, "
        f"{epochs} epochs, seeds 0..{seeds - 1} (mean ± std over seeds of test accuracy, %). "
        f"Step time: median CPU time (`time.process_time`) of {args.rounds} whole steps (forward, "
        "`opt.backward`, penalty, `opt.step`) on one 64-pair batch, configurations timed "
        f"round-robin, 1 torch thread, torch {torch.__version__}. Soft sharing: l2 penalty weight {SOFT_WEIGHT}. "
        f"Cross-stitch: stitch learning rate x{STITCH_LR_MULT:g}. MMoE: 4 experts. PLE: 2 levels of one "
        "layer, 2 shared + 1 own expert per task at each. DSelect-k: MMoE's 4 experts, per-example gates, "
        f"k = {DSELECT_K}, gamma 1, entropy weight {DSELECT_ENTROPY:g}. hard_conv / mtan: the same 2-stage conv "
        "backbone (16 channels at 8x16, 32 at 4x8, batch norm), one linear head per task on the flattened "
        "features; mtan adds a per-task attention module at each stage (test accuracy in eval mode).",
        "",
        "| architecture | method | left acc. | right acc. | step CPU ms | parameters |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    if missing:
        lines += ["", f"Not registered when this ran (skipped): {', '.join(missing)}."]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
