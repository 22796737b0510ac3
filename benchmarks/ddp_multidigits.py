"""MultiDigits under DistributedDataParallel with GradBalance: an example and a benchmark.

Two overlapped handwritten digits per image (the MultiMNIST analogue built from scikit-learn's
bundled 8x8 digits; :func:`benchmarks.data.multidigits` when present, else a small local copy of
the construction), a LeNet trunk and one head per digit. Every rank trains on its own slice of each
global batch; GradBalance averages the per-task gradients across ranks before the method sees them,
so every rank takes the step one process would take on the global batch.

Train (CPU gloo; NCCL when every rank has a GPU)::

    torchrun --nproc-per-node 2 benchmarks/ddp_multidigits.py --method mgda --epochs 3

Benchmark (communication per step and step time against plain DDP of the summed loss)::

    torchrun --nproc-per-node 2 benchmarks/ddp_multidigits.py --bench
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gradbalance as gb
from gradbalance.methods.base import Aggregation, Method, TaskInputs


class EqualGram(Method):
    """Weights 1/k computed on the Gram path: measures the engine and its collectives alone."""

    requires = "gram"

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        k = inputs.num_tasks
        return Aggregation(weights=torch.full((k,), 1.0 / k, dtype=torch.float64))


def method_for(name: str) -> Method | str:
    if name == "equal-gram":
        return EqualGram()
    if name not in gb.available_methods():
        raise SystemExit(f"unknown method {name!r}; registered: {', '.join(gb.available_methods())}")
    return name


def digits_data(n_train: int, n_test: int, size: int = 32):
    """``(x, y_left, y_right)`` train and test tensors."""
    try:
        from benchmarks.data import multidigits
    except ImportError:
        multidigits = None
    if multidigits is not None:
        return [ds.tensors for ds in multidigits(n_train, n_test, size=size, seed=0)]
    from sklearn.datasets import load_digits

    d = load_digits()
    side = (size * 5) // 8
    img = F.interpolate(torch.tensor(d.images, dtype=torch.float32)[:, None] / 16, size=(side, side),
                        mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)
    labels = torch.tensor(d.target)
    gen = torch.Generator().manual_seed(0)
    out = []
    for n in (n_train, n_test):
        idx = torch.randint(len(labels), (n, 2), generator=gen)
        x = torch.zeros(n, size, size)
        x[:, :side, :side] = img[idx[:, 0]]
        x[:, -side:, -side:] = torch.maximum(x[:, -side:, -side:], img[idx[:, 1]])
        out.append((x[:, None], labels[idx[:, 0]], labels[idx[:, 1]]))
    return out


class Net(nn.Module):
    """LeNet trunk (Sener & Koltun 2018) and two heads; ``forward -> (z, [logits_left, logits_right])``."""

    def __init__(self, size: int = 32, features: int = 50) -> None:
        super().__init__()
        flat = 20 * (((size - 4) // 2 - 4) // 2) ** 2
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 10, 5), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(10, 20, 5), nn.MaxPool2d(2),
            nn.ReLU(), nn.Flatten(), nn.Linear(flat, features), nn.ReLU(),
        )
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(features, 50), nn.ReLU(), nn.Linear(50, 10))
                                   for _ in range(2))

    def forward(self, x):
        z = self.trunk(x)
        return z, [h(z) for h in self.heads]


def local_batches(data, batch: int, epoch: int, rank: int, world: int):
    """This rank's slices of the global batches (the same permutation on every rank)."""
    x, yl, yr = data
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
    per_rank = batch // world
    for start in range(0, len(x) - batch + 1, batch):
        idx = perm[start + rank * per_rank : start + (rank + 1) * per_rank]
        yield x[idx], yl[idx], yr[idx]


def build(args, device, distributed: str = "auto"):
    torch.manual_seed(0)
    model = Net(features=args.features).to(device)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = gb.GradBalance(torch.optim.Adam(model.parameters(), lr=args.lr), method_for(args.method),
                         shared_params=model.trunk, distributed=distributed)
    return model, ddp, opt


def train(args, rank: int, world: int, device) -> None:
    (train_set, test_set) = digits_data(args.n_train, args.n_test)
    model, ddp, opt = build(args, device)
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        for x, yl, yr in local_batches(train_set, args.batch_size, epoch, rank, world):
            x, yl, yr = x.to(device), yl.to(device), yr.to(device)
            z, (ol, orr) = ddp(x)
            info = opt.backward({"left": F.cross_entropy(ol, yl), "right": F.cross_entropy(orr, yr)},
                                features=z)
            opt.step()
            opt.zero_grad()
        # every rank holds the same parameters: check it (one all-reduce of a checksum)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
        check = torch.stack([flat.sum(), -flat.sum()])
        dist.all_reduce(check, op=dist.ReduceOp.MAX)
        same = bool(check[0] == -check[1])
        if rank == 0:
            with torch.no_grad():
                x, yl, yr = (t.to(device) for t in test_set)
                _, (ol, orr) = model(x)
                acc = [(ol.argmax(1) == yl).float().mean().item(), (orr.argmax(1) == yr).float().mean().item()]
            w = ", ".join(f"{n}={v:.3f}" for n, v in info.to_dict().items() if n.startswith("weight/"))
            print(f"epoch {epoch + 1}: test accuracy left {acc[0]:.4f} right {acc[1]:.4f}; "
                  f"weights {w}; {time.perf_counter() - t0:.1f} s; ranks identical: {same}", flush=True)


def bench(args, rank: int, world: int, device) -> None:
    """Median step time of plain DDP (summed loss) vs GradBalance per strategy; bytes per step.

    The paths run interleaved (one step of each in turn), so that a change in the machine's load
    affects them all alike."""
    (train_set, _) = digits_data(args.batch_size * (args.steps + 5), 16)
    batches = list(local_batches(train_set, args.batch_size, 0, rank, world))
    requires = gb.methods.make_method(method_for(args.method)).requires
    # "off": the same k backward passes with no collective at all (not a valid training: the
    # ranks drift apart); it separates the cost of the per-task passes from that of communication
    labels = ["plain DDP", "off", "allreduce"] + (["reduce_scatter", "local_gram"] if requires == "gram" else [])
    runs = {label: build(args, device, distributed="off" if label == "plain DDP" else label) for label in labels}
    times: dict[str, list[float]] = {label: [] for label in labels}
    sent: dict[str, int] = {}
    for i, (x, yl, yr) in enumerate(batches):
        x, yl, yr = x.to(device), yl.to(device), yr.to(device)
        for label in labels:
            _, ddp, opt = runs[label]
            dist.barrier()
            t0 = time.perf_counter()
            z, (ol, orr) = ddp(x)
            losses = [F.cross_entropy(ol, yl), F.cross_entropy(orr, yr)]
            if label == "plain DDP":
                sum(losses).backward()  # DDP's reducer all-reduces every gradient once
            else:
                sent[label] = opt.backward(losses, features=z).extras.get("comm_bytes", 0)
            opt.step()
            opt.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 5:
                times[label].append(time.perf_counter() - t0)
    # plain DDP: a ring all-reduce of every parameter's gradient (float32)
    sent["plain DDP"] = int(2 * (world - 1) / world * 4 * sum(p.numel() for p in runs["plain DDP"][0].parameters()))
    if rank == 0:
        base = statistics.median(times["plain DDP"])
        shared = sum(p.numel() for p in Net(features=args.features).trunk.parameters())
        print(f"MultiDigits LeNet, P_shared={shared}, k=2, global batch {args.batch_size}, {world} ranks, "
              f"{dist.get_backend()}, method {args.method}, median of {len(batches) - 5} interleaved steps")
        print("| path | bytes sent per rank per step | step time (ms) | x plain DDP |")
        print("|---|---|---|---|")
        for label in labels:
            t = statistics.median(times[label])
            print(f"| {label} | {sent[label]:,} | {1000 * t:.1f} | {t / base:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="mgda" if "mgda" in gb.available_methods() else "equal-gram")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n-train", type=int, default=4096)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128, help="global batch (split across ranks)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--features", type=int, default=50, help="width of the trunk's last layer (50: LeNet)")
    p.add_argument("--bench", action="store_true", help="time plain DDP vs gradbalance's strategies")
    p.add_argument("--steps", type=int, default=30, help="timed steps per path (--bench)")
    p.add_argument("--quick", action="store_true",
                   help="seconds, not minutes: 1 epoch of 256 images (train) or 3 timed steps (--bench); "
                        "explicit options still win")
    args = p.parse_args()
    if args.quick:
        given = [a.split("=")[0] for a in sys.argv[1:]]
        for option, value in (("--epochs", 1), ("--n-train", 256), ("--n-test", 64), ("--steps", 3)):
            if option not in given:
                setattr(args, option[2:].replace("-", "_"), value)
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {world} ranks")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    (bench if args.bench else train)(args, rank, world, device)
    dist.barrier()  # every rank is done with its collectives before any tears the group down
    dist.destroy_process_group()
    # Skip the interpreter's teardown: about 1 launch in 8 here, a rank aborted in a C++ static
    # destructor after all of the above had finished ("terminate called without an active
    # exception"), which torchrun reports as a failed run. Nothing is left to flush but stdout.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
