"""HardSharing: the shared/task partition, equality with a hand-built trunk + heads, GradBalance."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradbalance as gb
from gradbalance.nn import HardSharing
from tests.nn_checks import METHODS, REPRESENTATION_METHODS, check_balanced_steps


def _parts(seed=0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.ReLU())
    heads = {"reg": nn.Linear(6, 1), "cls": nn.Linear(6, 3)}
    return trunk, heads


def _losses(model, x, y, c, out=None):
    out = model(x) if out is None else out
    return {"reg": (out["reg"].squeeze(-1) - y).pow(2).mean(),
            "cls": nn.functional.cross_entropy(out["cls"], c)}


def _batch(n=16):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 5, generator=g), torch.randn(n, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_parameters_partition():
    trunk, heads = _parts()
    model = HardSharing(trunk, heads)
    shared = {id(p) for p in model.shared_parameters()}
    task = [{id(p) for p in model.task_parameters(t)} for t in model.task_names]
    assert shared == {id(p) for p in trunk.parameters()}
    assert task == [{id(p) for p in heads[t].parameters()} for t in ("reg", "cls")]
    assert not shared & task[0] and not shared & task[1] and not task[0] & task[1]
    assert shared | task[0] | task[1] == {id(p) for p in model.parameters()}


def test_outputs_and_features_match_hand_built():
    trunk, heads = _parts()
    ref_trunk, ref_heads = copy.deepcopy(trunk), copy.deepcopy(heads)
    model = HardSharing(trunk, heads)
    x = torch.randn(7, 5)
    out, z = model(x, return_features=True)
    z_ref = ref_trunk(x)
    assert torch.equal(z, z_ref)
    assert list(out) == ["reg", "cls"]
    for t in out:
        assert torch.equal(out[t], ref_heads[t](z_ref))
    assert model(x).keys() == out.keys()


def test_list_heads_are_named_like_list_losses():
    trunk, heads = _parts()
    model = HardSharing(trunk, [heads["reg"], heads["cls"]])
    assert model.task_names == ["task0", "task1"]


def test_module_is_accepted_as_shared_params_and_equals_explicit_trunk():
    x, y, c = _batch()
    results = []
    for shared in ("model", "trunk"):
        model = HardSharing(*_parts())
        sp = model if shared == "model" else model.trunk
        opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "mean", shared_params=sp)
        opt.backward(_losses(model, x, y, c))
        opt.step()
        assert [id(p) for p in opt.shared_params] == [id(p) for p in model.trunk.parameters()]
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_mean_equals_plain_backward_of_mean_loss():
    x, y, c = _batch()
    model = HardSharing(*_parts())
    ref = copy.deepcopy(model)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "mean", shared_params=model)
    out, z = model(x, return_features=True)
    opt.backward(_losses(model, x, y, c, out), features=z)
    losses = _losses(ref, x, y, c)
    ((losses["reg"] + losses["cls"]) / 2).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_end_to_end(method):
    x, y, c = _batch()
    model = HardSharing(*_parts())
    check_balanced_steps(model, method, lambda: _losses(model, x, y, c))


@pytest.mark.parametrize("method", REPRESENTATION_METHODS)
def test_end_to_end_representation_mode(method):
    x, y, c = _batch()
    model = HardSharing(*_parts())

    def losses():
        out, z = model(x, return_features=True)
        return _losses(model, x, y, c, out), z

    check_balanced_steps(model, method, losses)


def test_bad_arguments():
    trunk, heads = _parts()
    with pytest.raises(TypeError, match="trunk"):
        HardSharing(lambda x: x, heads)
    with pytest.raises(ValueError, match="empty"):
        HardSharing(trunk, {})
    with pytest.raises(TypeError, match="not an nn.Module"):
        HardSharing(trunk, {"a": 3})
    with pytest.raises(ValueError, match="tied"):
        HardSharing(trunk, {"a": trunk[2]})
    with pytest.raises(KeyError, match="unknown task"):
        HardSharing(trunk, heads).task_parameters("nope")
