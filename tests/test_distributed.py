"""Multi-process training: 2 CPU processes (gloo), each with half of every batch.

One process group is spawned for the whole module (``dist_runs``); it trains every configuration
and saves what each rank saw. The tests compare that with the same training in this process on the
concatenated batch (must agree to 1e-5) and between the ranks (must be bit-identical).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradbalance as gb
from gradbalance.methods.base import (
    Aggregation,
    Method,
    TaskInputs,
    generator_from_state,
    make_method,
)
from tests.dist_helpers import WORLD, init_group, run_ranks, save_result
from tests.helpers import FixedWeights, MultiTaskNet, make_batch, task_losses

K, N, STEPS = 3, 16, 20
COMPARE_AT = 3  # steps after which the distributed run is compared with one process


# ----------------------------------------------------------------------------- test-only methods
class RandomWeights(Method):
    """Random simplex weights drawn from the method's own generator (like RLW): lock-step test."""

    requires = "losses"

    def __init__(self, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed).get_state()

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        gen = generator_from_state(self.gen)
        w = torch.rand(inputs.num_tasks, generator=gen, dtype=torch.float64)
        return Aggregation(weights=w / w.sum(), pending=gen.get_state())

    def commit(self, pending):
        self.gen = pending

    def state_dict(self):
        return {"gen": self.gen.clone()}


class SignAgreement(Method):
    """A coordinate-wise method (needs the full task gradients): keep the coordinates where every
    task's gradient has the same sign."""

    requires = "grads"

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        g = inputs.grads
        agree = (torch.sign(g) == torch.sign(g[0])).all(0)
        return Aggregation(weights=None, direction=g.sum(0) * agree, head_weights=torch.ones(len(g)))


class GramRecorder(Method):
    """Weights ``1 / (1 + |g_i|)`` from the Gram matrix (not scale-invariant, so a wrongly scaled
    Gram changes the update), and the Gram it saw as an extra."""

    requires = "gram"

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        w = 1.0 / (1.0 + inputs.gram.diagonal().sqrt())
        return Aggregation(weights=w, extras={"gram": inputs.gram.clone()})


class GramRecorderUB(GramRecorder):
    """The same weights from the Gram matrix of the feature gradients (representation mode)."""

    mode = "representation"


class GramRecorderLast(GramRecorder):
    """The same weights from the Gram matrix on the last shared layer only (like GradNorm)."""

    def shared_subset(self, shared):
        return shared[-2:]


def make(name: str) -> Method:
    if name == "fixed":
        return FixedWeights([0.2, 0.3, 0.5], head_weights=[1.0, 0.5, 2.0])
    if name == "random":
        return RandomWeights()
    if name == "sign":
        return SignAgreement()
    if name == "gram":
        return GramRecorder()
    if name == "gram_ub":
        return GramRecorderUB()
    if name == "gram_last":
        return GramRecorderLast()
    return make_method(name)


EXTRA = ["fixed", "random", "sign", "gram", "gram_ub", "gram_last"]
REGISTERED = sorted(gb.available_methods())
ALL = REGISTERED + EXTRA


def supported(method: Method, fsdp: bool) -> bool:
    if method.mode == "representation" and method.requires == "grads":
        return False
    return not (fsdp and (method.requires == "grads" or method.mode == "representation"))


# ----------------------------------------------------------------------------- one training run
def batch(step: int, rank: int | None):
    x, y = make_batch(K, n=N, seed=100 + step)
    if rank is None:
        return x, y
    half = N // WORLD
    return x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]


def train(name, rank=None, wrap=None, distributed="auto", steps=STEPS, micro=1):
    """Train ``MultiTaskNet`` with method ``name``; return params at COMPARE_AT and at the end,
    and the StepInfo extras / gram diagnostics of the first step."""
    model = MultiTaskNet(K, seed=0)
    shared = model.trunk
    net = model
    if wrap == "ddp":
        net = nn.parallel.DistributedDataParallel(model)
    elif wrap in ("fsdp", "fsdp-keep"):
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.trunk)
        fully_shard(model)
        if wrap == "fsdp-keep":  # no re-gather per task pass
            model.set_reshard_after_backward(False)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5), make(name),
                         shared_params=shared, distributed=distributed)
    out = {}
    for step in range(steps):
        x, y = batch(step, rank)
        for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
            z, outs = net(xm)
            losses = [((o - ym[:, i]) ** 2).mean() * (i + 1) for i, o in enumerate(outs)]
            info = opt.backward(losses, features=z)
            if step == 0:
                out["info"] = (info.weights, info.grad_norms, info.cosine, dict(info.extras))
        opt.step()
        opt.zero_grad()
        if wrap == "fsdp-keep":  # the unsharded copies are stale after the step: drop them
            for m in model.modules():
                if hasattr(m, "reshard"):
                    m.reshard()
        if step + 1 in (COMPARE_AT, steps):
            out[step + 1] = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                             for n, p in model.named_parameters()}
    return out


def train_functional(name, rank, steps=COMPARE_AT):
    """The same training with ``gb.backward`` and a plain optimizer (DDP-wrapped model)."""
    model = MultiTaskNet(K, seed=0)
    net = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    method = make(name)
    for step in range(steps):
        x, y = batch(step, rank)
        _, outs = net(x)
        losses = [((o - y[:, i]) ** 2).mean() * (i + 1) for i, o in enumerate(outs)]
        gb.backward(losses, model.trunk, method, params=list(model.parameters()))
        opt.step()
        opt.zero_grad()
    return {steps: {n: p.detach().clone() for n, p in model.named_parameters()}}


def attempt(*args, **kwargs):
    try:
        return train(*args, **kwargs)
    except ValueError as err:
        return {"error": str(err)}
    except Exception as err:  # noqa: BLE001 - reported by that method's test, not a crash of the group
        return {"error": f"{type(err).__name__}: {err}", "crash": True}


# ----------------------------------------------------------------------------- the process group
def _worker(rank: int, port: int, path: str) -> None:
    # a rank that fails alone leaves the other one waiting in a collective: fail fast instead
    init_group(rank, port, timeout_s=120)
    res = {}
    for name in ALL:  # every method, 20 steps, DDP, default strategy
        res[("ddp", name)] = attempt(name, rank, "ddp")
    for name in ALL:  # the NCCL default for Gram-based methods, with every one of them
        if make(name).requires == "gram":
            res[("reduce_scatter", name)] = attempt(name, rank, "ddp", "reduce_scatter", steps=COMPARE_AT)
    for name in ("fixed", "gram"):
        for strategy in ("allreduce", "local_gram"):
            res[(strategy, name)] = attempt(name, rank, "ddp", strategy, steps=COMPARE_AT)
        res[("accumulate", name)] = attempt(name, rank, "ddp", "reduce_scatter", steps=COMPARE_AT, micro=2)
    res[("accumulate", "sign")] = attempt("sign", rank, "ddp", steps=COMPARE_AT, micro=2)
    for name in ("mean", "gram"):  # without a DDP wrapper: gradbalance alone keeps ranks in sync
        res[("plain", name)] = attempt(name, rank, None, steps=COMPARE_AT)
    res[("functional", "fixed")] = train_functional("fixed", rank)
    res[("off", "mean")] = attempt("mean", rank, "ddp", "off", steps=1)
    # every rank must start from the same method state: a different seed is caught at once
    try:
        opt = gb.GradBalance(torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1), RandomWeights(rank))
        w = opt.param_groups[0]["params"][0]
        opt.backward([w.sum(), w.pow(2).sum()])
        res["seed_check"] = "no error"
    except ValueError as err:
        res["seed_check"] = str(err)
    try:  # buffered accumulation is single-process only for now: a clear error, nothing written
        model = MultiTaskNet(K, seed=0)
        opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "mean",
                             shared_params=model.trunk, accumulation="buffered")
        z, losses = task_losses(model, *batch(0, rank))
        opt.backward(losses, features=z)
        res["buffered"] = "no error"
    except ValueError as err:
        res["buffered"] = str(err) + ("" if all(p.grad is None for p in model.parameters()) else " (grad written)")
    for name in ("mean", "gram", "sign"):  # a NaN loss on rank 0 only: every rank raises
        model = MultiTaskNet(K, seed=0)
        opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), make(name),
                             shared_params=model.trunk)
        z, losses = task_losses(model, *batch(0, rank))
        if rank == 0:
            losses[1] = losses[1] * float("nan")
        try:
            opt.backward(losses, features=z)
            res[("nan", name)] = "no error"
        except ValueError as err:
            res[("nan", name)] = str(err)
        res[("nan-grads", name)] = [p.grad for p in model.parameters()]
    for name in ALL:
        if supported(make(name), fsdp=True) or name in ("sign", "mean"):
            res[("fsdp", name)] = attempt(name, rank, "fsdp", steps=COMPARE_AT)
    res[("fsdp-accumulate", "gram")] = attempt("gram", rank, "fsdp", steps=COMPARE_AT, micro=2)
    res[("fsdp-keep", "gram")] = attempt("gram", rank, "fsdp-keep", steps=COMPARE_AT)
    with warnings.catch_warnings(record=True) as caught:  # a loss-dependent weighting under FSDP
        warnings.simplefilter("always")
        attempt("gls", rank, "fsdp", steps=2, micro=2)
    res["fsdp-accumulate-warnings"] = [str(w.message) for w in caught if "accumulation window" in str(w.message)]
    save_result(path, rank, res)


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_worker, hard_timeout=400)


_REFERENCE: dict = {}


def reference(name, steps=COMPARE_AT, micro=1):
    key = (name, steps, micro)
    if key not in _REFERENCE:
        if micro == 1:
            _REFERENCE[key] = train(name, None, steps=steps)
        else:  # micro-batch m of the global batch = every rank's m-th micro-batch
            _REFERENCE[key] = _train_interleaved(name, steps, micro)
    return _REFERENCE[key]


def _train_interleaved(name, steps, micro):
    model = MultiTaskNet(K, seed=0)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5), make(name),
                         shared_params=model.trunk)
    out = {}
    for step in range(steps):
        parts = [batch(step, r) for r in range(WORLD)]
        for m in range(micro):
            x = torch.cat([p[0].chunk(micro)[m] for p in parts])
            y = torch.cat([p[1].chunk(micro)[m] for p in parts])
            z, losses = task_losses(model, x, y)
            opt.backward(losses, features=z)
        opt.step()
        opt.zero_grad()
        if step + 1 == steps:
            out[steps] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def assert_params_close(a, b, atol=1e-5):
    for n in b:
        torch.testing.assert_close(a[n], b[n], atol=atol, rtol=0, msg=lambda m, n=n: f"{n}: {m}")


def assert_same_first_gram(r0, name):
    """The Gram matrix a recording method saw at the first step equals the one-process one."""
    seen = r0["info"][3].get("gram")
    if seen is not None:
        torch.testing.assert_close(seen, reference(name)["info"][3]["gram"], rtol=1e-5, atol=1e-9)


def assert_identical(a, b):
    for n in b:
        assert torch.equal(a[n], b[n]), n


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("name", ALL)
def test_ddp_equals_one_process_and_ranks_stay_bit_identical(runs, name):
    r0, r1 = runs[0][("ddp", name)], runs[1][("ddp", name)]
    if not supported(make(name), fsdp=False):
        assert "error" in r0 and "features themselves" in r0["error"]
        return
    assert "error" not in r0 and "error" not in r1, (r0.get("error"), r1.get("error"))
    assert_identical(r0[STEPS], r1[STEPS])
    assert_params_close(r0[COMPARE_AT], reference(name)[COMPARE_AT])
    assert_same_first_gram(r0, name)


@pytest.mark.parametrize("strategy", ["allreduce", "reduce_scatter", "local_gram"])
@pytest.mark.parametrize("name", ["fixed", "gram"])
def test_strategies(runs, name, strategy):
    r0, r1 = runs[0][(strategy, name)], runs[1][(strategy, name)]
    assert_identical(r0[COMPARE_AT], r1[COMPARE_AT])
    assert r0["info"][3]["distributed"] == strategy
    ref = reference(name)
    if strategy != "local_gram" or name == "fixed":  # fixed weights do not depend on the Gram
        assert_params_close(r0[COMPARE_AT], ref[COMPARE_AT])
    if name == "gram":  # the Gram the method saw at the first step
        seen = r0["info"][3]["gram"]
        model = MultiTaskNet(K, seed=0)

        def gram_of(x, y):
            _, losses = task_losses(model, x, y)
            g = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(
                loss, list(model.trunk.parameters()), retain_graph=True)]) for loss in losses])
            return (g @ g.T).double()

        if strategy == "local_gram":  # the documented approximation: the mean of local Grams
            expected = sum(gram_of(*batch(0, r)) for r in range(WORLD)) / WORLD
            assert not torch.allclose(seen, gram_of(*batch(0, None)), rtol=1e-3)
        else:
            expected = gram_of(*batch(0, None))
        torch.testing.assert_close(seen, expected, rtol=1e-5, atol=1e-8)


def test_communication_volume(runs):
    trunk, heads = list(MultiTaskNet(K).trunk.parameters()), list(MultiTaskNet(K).heads.parameters())
    p, h = sum(t.numel() for t in trunk), sum(t.numel() for t in heads)
    sent = {s: runs[0][(s, "gram")]["info"][3]["comm_bytes"] for s in ("allreduce", "reduce_scatter", "local_gram")}
    ring = (WORLD - 1) / WORLD
    chunk = -(-p // WORLD) * WORLD
    assert sent["allreduce"] == int(2 * ring * 4 * (K * p + K)) + int(2 * ring * 4 * (h + len(heads)))
    assert sent["reduce_scatter"] == (int(ring * 4 * K * chunk) + int(2 * ring * 8 * (K * K + K))
                                      + int(ring * 4 * chunk) + int(2 * ring * 4 * (h + len(heads))))
    assert sent["local_gram"] == int(2 * ring * 8 * (K * K + K)) + int(2 * ring * 4 * (p + h + len(trunk) + len(heads)))
    assert sent["reduce_scatter"] < sent["allreduce"]


@pytest.mark.parametrize("name", ["fixed", "gram", "sign"])
def test_gradient_accumulation_under_ddp(runs, name):
    r0, r1 = runs[0][("accumulate", name)], runs[1][("accumulate", name)]
    assert_identical(r0[COMPARE_AT], r1[COMPARE_AT])
    assert_params_close(r0[COMPARE_AT], reference(name, micro=2)[COMPARE_AT])


@pytest.mark.parametrize("name", ["mean", "gram"])
def test_without_ddp_wrapper(runs, name):
    r0, r1 = runs[0][("plain", name)], runs[1][("plain", name)]
    assert_identical(r0[COMPARE_AT], r1[COMPARE_AT])
    assert_params_close(r0[COMPARE_AT], reference(name)[COMPARE_AT])
    assert_same_first_gram(r0, name)


def test_functional_backward_under_ddp(runs):
    r0, r1 = runs[0][("functional", "fixed")], runs[1][("functional", "fixed")]
    assert_identical(r0[COMPARE_AT], r1[COMPARE_AT])
    assert_params_close(r0[COMPARE_AT], reference("fixed")[COMPARE_AT])


def test_off_balances_each_rank_alone(runs):
    r0, r1 = runs[0][("off", "mean")], runs[1][("off", "mean")]
    assert "distributed" not in r0["info"][3]
    assert not torch.equal(r0[1]["trunk.0.weight"], r1[1]["trunk.0.weight"])


@pytest.mark.parametrize("name", ["mean", "gram", "sign"])
def test_nan_loss_on_one_rank_raises_on_every_rank(runs, name):
    for r in range(WORLD):
        assert "task1" in runs[r][("nan", name)] and "NaN or inf" in runs[r][("nan", name)]
        assert all(g is None for g in runs[r][("nan-grads", name)])


def test_inexact_accumulation_warns_under_fsdp_too(runs):
    for r in range(WORLD):
        assert len(runs[r]["fsdp-accumulate-warnings"]) == 1


def test_buffered_accumulation_is_refused_under_distributed(runs):
    for r in range(WORLD):
        assert runs[r]["buffered"].startswith("accumulation='buffered' is not supported with distributed")


def test_different_method_state_is_caught_on_every_rank(runs):
    for r in range(WORLD):
        assert "ranks disagree on ['method']" in runs[r]["seed_check"]


@pytest.mark.parametrize("name", ALL)
def test_fsdp_equals_one_process(runs, name):
    method = make(name)
    r0, r1 = runs[0].get(("fsdp", name)), runs[1].get(("fsdp", name))
    if r0 is None:
        assert not supported(method, fsdp=True)
        return
    if not supported(method, fsdp=True):
        assert "FSDP" in r0["error"] and "FSDP" in r1["error"]
        return
    assert "error" not in r0 and "error" not in r1, (r0.get("error"), r1.get("error"))
    assert_identical(r0[COMPARE_AT], r1[COMPARE_AT])
    assert_params_close(r0[COMPARE_AT], reference(name)[COMPARE_AT])
    assert_same_first_gram(r0, name)


@pytest.mark.parametrize("name", [n for n in ALL if make(n).requires == "gram"])
def test_reduce_scatter_for_every_gram_method(runs, name):
    r0, r1 = runs[0][("reduce_scatter", name)], runs[1][("reduce_scatter", name)]
    assert "error" not in r0 and "error" not in r1, (r0.get("error"), r1.get("error"))
    assert_identical(r0[COMPARE_AT], r1[COMPARE_AT])
    assert_params_close(r0[COMPARE_AT], reference(name)[COMPARE_AT])
    assert_same_first_gram(r0, name)


def test_fsdp_gradient_accumulation(runs):
    r0, r1 = runs[0][("fsdp-accumulate", "gram")], runs[1][("fsdp-accumulate", "gram")]
    assert "error" not in r0, r0.get("error")
    assert_identical(r0[COMPARE_AT], r1[COMPARE_AT])
    assert_params_close(r0[COMPARE_AT], reference("gram", micro=2)[COMPARE_AT])


def test_fsdp_without_resharding_after_backward(runs):
    r0, r1 = runs[0][("fsdp-keep", "gram")], runs[1][("fsdp-keep", "gram")]
    assert "error" not in r0, r0.get("error")
    assert r0["info"][3]["distributed"] == "allreduce (fsdp)"
    assert_identical(r0[COMPARE_AT], r1[COMPARE_AT])
    assert_params_close(r0[COMPARE_AT], reference("gram")[COMPARE_AT])


def test_bad_distributed_arguments():
    w = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="distributed must be one of"):
        gb.GradBalance(torch.optim.SGD([w], lr=0.1), "mean", distributed="nccl")
    with pytest.raises(ValueError, match="needs the task gradients themselves"):
        gb.GradBalance(torch.optim.SGD([w], lr=0.1), SignAgreement(), distributed="reduce_scatter")
    opt = gb.GradBalance(torch.optim.SGD([w], lr=0.1), "mean", distributed="allreduce")
    with pytest.raises(ValueError, match="init_process_group"):
        opt.backward([w.sum(), w.pow(2).sum()])
    assert w.grad is None


class LossHeadWeights(Method):
    """A losses-only method with separate head weights (exercises the second weighted pass)."""

    requires = "losses"

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        return Aggregation(weights=torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64),
                           head_weights=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


def test_losses_method_with_head_weights_in_one_process():
    """Found by the sweep above: the first weighted pass freed the graph the head pass needs."""
    model = MultiTaskNet(K, seed=0)
    x, y = make_batch(K)
    _, losses = task_losses(model, x, y)
    expected = {}
    for name, w in (("trunk", [0.2, 0.3, 0.5]), ("heads", [1.0, 2.0, 3.0])):
        total = sum(wi * li for wi, li in zip(w, losses))
        module = getattr(model, name)
        expected.update({f"{name}.{n}": g for (n, _), g in zip(module.named_parameters(), torch.autograd.grad(
            total, list(module.parameters()), retain_graph=True))})
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), LossHeadWeights(),
                         shared_params=model.trunk)
    opt.backward(losses)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], atol=1e-6, rtol=0)
