"""The HydraNet example: its trunk (ResNet-18 layout, torchvision when it imports), the synthetic
stand-in's labels, and quick runs of the script on synthetic data and on a UTKFace-layout folder."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch

import gradbalance as gb
from benchmarks import hydranet as script
from benchmarks.data import SYNTH_COLOURS, synthetic_faces
from benchmarks.models import BasicBlock, ResNet, hydranet, torchvision_resnet18
from tests.test_bench_real import UTK_NAMES, _table_rows, _write_jpegs


@pytest.fixture(autouse=True)
def _no_progress(monkeypatch):
    monkeypatch.setenv("GRADBALANCE_NO_PROGRESS", "1")


# ---------------------------------------------------------------- the model


def test_resnet_default_is_the_resnet18_layout():
    net = ResNet()
    # torchvision's resnet18 has 11,689,512 parameters, of which fc holds 512 * 1000 + 1000
    assert sum(p.numel() for p in net.parameters()) == 11_689_512 - 513_000
    blocks = [m for m in net.stages if isinstance(m, BasicBlock)]
    assert len(blocks) == 8
    assert [b.conv1.stride[0] for b in blocks] == [1, 1, 2, 1, 2, 1, 2, 1]
    net.eval()
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 512)


def test_basic_block_is_relu_of_residual_plus_shortcut():
    torch.manual_seed(0)
    block = BasicBlock(4, 8, stride=2).eval()
    x = torch.randn(3, 4, 8, 8)
    residual = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
    torch.testing.assert_close(block(x), torch.relu(residual + block.shortcut(x)))
    same = BasicBlock(4, 4).eval()
    assert isinstance(same.shortcut, torch.nn.Identity)
    torch.testing.assert_close(same(x), torch.relu(same.bn2(same.conv2(torch.relu(same.bn1(same.conv1(x))))) + x))


def test_torchvision_is_used_when_it_imports_and_skipped_when_it_breaks(monkeypatch):
    class Broken(types.ModuleType):  # what the CPU torch build here gives: import "works", use fails
        def __getattr__(self, name):
            raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setitem(sys.modules, "torchvision", Broken("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.models", Broken("torchvision.models"))
    assert torchvision_resnet18() is None
    model = hydranet("resnet18")
    assert isinstance(model.trunk, ResNet) and "torchvision not importable" in model.trunk_source

    made = []

    def resnet18(weights=None):
        assert weights is None  # nothing is downloaded
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(512))
        net.fc = torch.nn.Linear(512, 1000)
        made.append(net)
        return net

    fake = types.ModuleType("torchvision.models")
    fake.resnet18 = resnet18
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.models", fake)
    model = hydranet("resnet18")
    assert model.trunk is made[0] and isinstance(model.trunk.fc, torch.nn.Identity)
    assert model.trunk_source == "torchvision resnet18"
    assert [h.out_features for h in model.heads] == [1, 1, 5]
    with pytest.raises(ValueError, match="arch"):
        hydranet("resnet50")


# ---------------------------------------------------------------- the synthetic stand-in


def test_synthetic_faces_encode_each_label_in_the_pixels():
    ds = synthetic_faces(400, size=32, seed=3)
    x, age, gender, race = ds.tensors
    assert x.shape == (400, 3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert age.dtype == torch.float32 and gender.dtype == torch.float32 and race.dtype == torch.long
    assert 1 <= float(age.min()) and float(age.max()) <= 90 and set(gender.tolist()) == {0.0, 1.0}
    assert torch.bincount(race, minlength=5).argmax() == 0  # imbalanced, white the largest class
    face = x.mean(1) > 0.25  # the disc: pixels brighter than the dark background
    # age: the disc's area grows with age
    area = face.float().mean((1, 2))
    assert np.corrcoef(area.numpy(), age.numpy())[0, 1] > 0.95
    # race: the mean colour of the disc is nearest to its class colour
    colour = (x * face[:, None]).sum((2, 3)) / face.sum((1, 2))[:, None]
    nearest = torch.cdist(colour, torch.tensor(SYNTH_COLOURS)).argmin(1)
    assert float((nearest == race).float().mean()) > 0.95
    # gender: stripes along rows (0) or columns (1): the mean squared difference between
    # neighbours inside the disc is larger across the stripes
    gray = x.mean(1)
    in_y, in_x = face[:, 1:] & face[:, :-1], face[:, :, 1:] & face[:, :, :-1]
    dy = ((gray[:, 1:] - gray[:, :-1]).pow(2) * in_y).sum((1, 2)) / in_y.sum((1, 2))
    dx = ((gray[:, :, 1:] - gray[:, :, :-1]).pow(2) * in_x).sum((1, 2)) / in_x.sum((1, 2))
    assert float(((dx > dy).float() == gender).float().mean()) > 0.95
    # deterministic by seed
    assert torch.equal(synthetic_faces(5, seed=1).tensors[0], synthetic_faces(5, seed=1).tensors[0])
    with pytest.raises(ValueError, match="size"):
        synthetic_faces(4, size=4)


# ---------------------------------------------------------------- the script


def test_quick_run_trains_records_and_plots(tmp_path):
    out = tmp_path / "hydranet-quick.md"
    text = script.main(["--quick", "--n", "80", "--epochs", "1", "--method", "mean", "nash_mtl", "--out", str(out)])
    assert out.read_text() == text
    rows = _table_rows(text.split("What the balancing did")[0])
    assert [r[0] for r in rows] == ["mean", "nash_mtl", "*constant predictor*"]
    for r in rows:
        assert 0 < float(r[1]) < 90 and 0 <= float(r[2]) <= 100 and 0 <= float(r[3]) <= 100
    assert "Data: 80 synthetic" in text and "age L1" in text
    assert (tmp_path / "hydranet-quick.png").stat().st_size > 5000
    steps = math.ceil(64 / 32)  # 80 images, 16 held out, batch 32, one epoch
    for m in ("mean", "nash_mtl"):
        assert (tmp_path / f"hydranet-{m}-quick.png").stat().st_size > 5000
        history = gb.log.History.load(tmp_path / f"hydranet-{m}-quick.json")
        assert history.task_names == ("age", "gender", "race") and len(history) == steps
    nash = gb.log.History.load(tmp_path / "hydranet-nash_mtl-quick.json")
    # Nash-MTL's heads get a, the trunk the clipped a: the recorded head weights are the larger
    assert (nash.values("head_weights") >= nash.values("weights") - 1e-12).all()
    assert not np.isnan(nash.cosines()).any()
    mean = gb.log.History.load(tmp_path / "hydranet-mean-quick.json")
    np.testing.assert_allclose(mean.values("weights"), 1 / 3)


def test_run_on_a_utkface_folder_reports_skipped_names(tmp_path):
    folder = tmp_path / "UTKFace"
    _write_jpegs(folder, UTK_NAMES + ["bad_name.jpg", "30_2_1_2017.jpg"], size=20)
    (folder / "30_1_1_20170101.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "h.md"
    with pytest.warns(UserWarning, match="skipped 3"):
        text = script.main(["--quick", "--data", str(folder), "--method", "upgrad", "--out", str(out)])
    assert "10 usable, 3 skipped" in text and "split 8 train / 2 test" in text
    assert [r[0] for r in _table_rows(text.split("What the balancing did")[0])] == ["upgrad", "*constant predictor*"]
    assert len(gb.log.History.load(tmp_path / "h-upgrad.json")) == 2  # 2 epochs of one batch


def test_unknown_method_and_missing_folder(tmp_path):
    with pytest.raises(SystemExit, match="unknown method"):
        script.main(["--quick", "--method", "nope", "--out", str(tmp_path / "x.md")])
    with pytest.raises(ValueError, match="not found"):
        script.main(["--quick", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x.md")])


def test_quick_run_never_overwrites_the_committed_results(tmp_path, monkeypatch):
    monkeypatch.setattr(script, "RESULTS", tmp_path)
    script.main(["--quick", "--n", "40", "--epochs", "1", "--method", "mean"])
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["hydranet-mean-quick.json", "hydranet-mean-quick.png", "hydranet-quick.md",
                       "hydranet-quick.png"]
