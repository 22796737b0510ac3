"""MTAN on a small ResNet-style backbone: the attention equations by hand, masks in (0, 1), tasks
that differ only through their attention, mask = 1 is hard sharing, the partition, GradBalance."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradbalance.nn import MTAN, HardSharing
from tests.nn_checks import METHODS, check_balanced_steps


class Block(nn.Module):
    """A ResNet basic block: conv-BN-ReLU-conv-BN plus the (projected) input, ReLU."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                                  nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.skip = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def _stages():
    # stem + 2 blocks at 12x12, then 2 blocks downsampling to 6x6 (ResNet layout: stride in the first block)
    stem = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    return [nn.Sequential(stem, Block(4, 4), Block(4, 4)), nn.Sequential(Block(4, 8, 2), Block(8, 8))]


def _head(out):
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, out))


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return MTAN(_stages(), {"a": _head(1), "b": _head(3)}, example_input=torch.zeros(2, 3, 12, 12), **kw)


def _randomise_bn(model):
    """Non-trivial batch-norm affine parameters and statistics (eval mode then is not the identity)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)


def test_attention_equations_by_hand():
    model = _model()
    _randomise_bn(model)
    model.eval()
    x = torch.randn(3, 3, 12, 12)
    out = model(x)
    masks = model.attention_masks(x)
    s1, s2 = model.stages
    u1 = s1[:-1](x)
    p1 = s1[-1](u1)
    u2 = s2[:-1](p1)
    p2 = s2[-1](u2)
    for t in ("a", "b"):
        a1 = model.attention[t][0](u1)  # g^(1)(u^(1))
        hat1 = a1 * p1
        f = model.extractors[0](hat1)  # f^(2): 3x3 conv at 12x12, then 2x2 max pooling to 6x6
        f = nn.functional.max_pool2d(f, 2)
        a2 = model.attention[t][1](torch.cat([u2, f], 1))
        torch.testing.assert_close(masks[t][0], a1)
        torch.testing.assert_close(masks[t][1], a2)
        assert masks[t][0].shape == p1.shape and masks[t][1].shape == p2.shape
        torch.testing.assert_close(out[t], model.heads[t](a2 * p2), rtol=1e-5, atol=1e-6)


def test_masks_are_in_open_unit_interval():
    model = _model()
    for mode in (True, False):
        model.train(mode)
        for ms in model.attention_masks(torch.randn(4, 3, 12, 12) * 3).values():
            for m in ms:
                assert (m > 0).all() and (m < 1).all()


def test_tasks_differ_only_through_their_attention():
    model = _model()
    x = torch.randn(4, 3, 12, 12)
    # b with a's attention and a's head computes exactly a's output
    same = copy.deepcopy(model)
    same.attention["b"].load_state_dict(same.attention["a"].state_dict())
    same.heads["b"] = copy.deepcopy(same.heads["a"])
    out = same(x)
    assert torch.equal(out["a"], out["b"])
    # the same head but each task its own attention: the outputs differ
    own = copy.deepcopy(model)
    own.heads["b"] = copy.deepcopy(own.heads["a"])
    out = own(x)
    assert not torch.allclose(out["a"], out["b"])
    # with every mask = 1 (sigmoid of a large bias), each task reads the backbone: hard sharing
    ones = copy.deepcopy(model)
    with torch.no_grad():
        for t in ("a", "b"):
            for g in ones.attention[t]:
                g[-2].weight.zero_()
                g[-2].bias.fill_(100.0)  # BN before the sigmoid: output 100, sigmoid(100) == 1.0
    hard = HardSharing(copy.deepcopy(nn.Sequential(*ones.stages)), copy.deepcopy(dict(ones.heads.items())))
    assert all(bool((m == 1).all()) for ms in ones.attention_masks(x).values() for m in ms)
    out_m, out_h = ones(x), hard(x)
    for t in ("a", "b"):
        assert torch.equal(out_m[t], out_h[t])


def test_gradients_stay_in_their_task():
    model = _model()
    model(torch.randn(4, 3, 12, 12))["a"].pow(2).mean().backward()
    assert all(p.grad is None for p in model.task_parameters("b"))
    assert all(p.grad is not None for p in model.task_parameters("a"))
    assert all(p.grad is not None for p in model.shared_parameters())


def test_parameters_partition():
    model = _model()
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == {id(p) for m in (model.stages, model.extractors) for p in m.parameters()}
    assert {id(p) for p in model.backbone_parameters()} == {id(p) for p in model.stages.parameters()}
    tasks = {t: {id(p) for p in model.task_parameters(t)} for t in ("a", "b")}
    assert tasks["a"] == {id(p) for m in (model.attention["a"], model.heads["a"]) for p in m.parameters()}
    assert not shared & tasks["a"] and not shared & tasks["b"] and not tasks["a"] & tasks["b"]
    assert shared | tasks["a"] | tasks["b"] == {id(p) for p in model.parameters()}


def test_probe_leaves_batch_norm_and_modes_untouched():
    torch.manual_seed(0)
    stages = _stages()
    stages[1].eval()  # a mixed state must come back as it was
    before = {k: v.clone() for s in stages for k, v in s.state_dict().items()}
    modes = [m.training for s in stages for m in s.modules()]
    model = MTAN(stages, [_head(1), _head(1)], example_input=torch.randn(5, 3, 12, 12))
    after = {k: v for s in model.stages for k, v in s.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert modes == [m.training for s in model.stages for m in s.modules()]
    # channels inferred: g^(1): 4 -> 4 -> 4, f^(2): 4 -> 8, g^(2): 16 -> 8 -> 8; reduction halves the hidden size
    g1, g2 = model.attention["task0"]
    assert (g1[0].in_channels, g1[0].out_channels, g1[3].out_channels) == (4, 4, 4)
    assert (model.extractors[0][0].in_channels, model.extractors[0][0].out_channels) == (4, 8)
    assert (g2[0].in_channels, g2[0].out_channels, g2[3].out_channels) == (16, 8, 8)
    assert _model(reduction=2).attention["a"][1][0].out_channels == 4


def test_segnet_style_stage_downsampling_in_its_last_module():
    # u at 12x12, p (after a max pool) at 6x6: u and f(.) are pooled to p's size
    torch.manual_seed(0)
    conv = lambda a, b: nn.Sequential(nn.Conv2d(a, b, 3, 1, 1), nn.BatchNorm2d(b), nn.ReLU())  # noqa: E731
    stages = [nn.Sequential(conv(3, 4), nn.MaxPool2d(2)), nn.Sequential(conv(4, 8), conv(8, 8), nn.MaxPool2d(2))]
    model = MTAN(stages, {"a": _head(2)}, example_input=torch.zeros(1, 3, 12, 12))
    x = torch.randn(2, 3, 12, 12)
    ms = model.attention_masks(x)["a"]
    assert [tuple(m.shape) for m in ms] == [(2, 4, 6, 6), (2, 8, 3, 3)]
    model.eval()
    u1 = stages[0][:-1](x)
    a1 = model.attention["a"][0](nn.functional.max_pool2d(u1, 2))
    torch.testing.assert_close(model.attention_masks(x)["a"][0], a1)


@pytest.mark.parametrize("method", METHODS)
def test_end_to_end(method):
    model = _model()
    x, y, c = torch.randn(6, 3, 12, 12), torch.randn(6), torch.randint(0, 3, (6,))

    def losses():
        out = model(x)
        return {"a": (out["a"].squeeze(-1) - y).pow(2).mean(), "b": nn.functional.cross_entropy(out["b"], c)}

    check_balanced_steps(model, method, losses)


def test_bad_arguments():
    x = torch.zeros(1, 3, 12, 12)
    with pytest.raises(ValueError, match="empty"):
        MTAN([], [_head(1)], example_input=x)
    with pytest.raises(TypeError, match="nn.Sequential"):
        MTAN([nn.Conv2d(3, 8, 3)], [_head(1)], example_input=x)
    with pytest.raises(ValueError, match="at least 2"):
        MTAN([nn.Sequential(nn.Conv2d(3, 8, 3))], [_head(1)], example_input=x)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        MTAN([nn.Sequential(nn.Flatten(), nn.Linear(432, 8))], [_head(1)], example_input=x)
    with pytest.raises(TypeError, match="example_input"):
        MTAN(_stages(), [_head(1)], example_input=[1, 2])
    with pytest.raises(ValueError, match="reduction"):
        MTAN(_stages(), [_head(1)], example_input=x, reduction=0)
    stages = _stages()
    with pytest.raises(ValueError, match="tied"):
        MTAN(stages, {"a": stages[0]}, example_input=x)
