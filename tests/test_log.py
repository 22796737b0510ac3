"""Logging StepInfo to TensorBoard (read back from the event file) and to a callable; the History
recorder: what it records, save/load round trips, the numbers its plots show."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import gradbalance as gb
from gradbalance import StepInfo
from gradbalance.log import History, log_info
from tests.helpers import FixedWeights, MultiTaskNet, make_batch, task_losses


def _info():
    model = MultiTaskNet(3)
    x, y = make_batch(3)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([0.2, 0.3, 0.5]),
                         shared_params=model.trunk)
    _, losses = task_losses(model, x, y)
    return opt.backward({"depth": losses[0], "seg": losses[1], "normal": losses[2]})


def _events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def test_tensorboard_round_trip(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    info = _info()
    with SummaryWriter(log_dir=str(tmp_path)) as writer:
        written = log_info(info, writer, step=7)
    events = _events(tmp_path)
    tags = set(events.Tags()["scalars"])
    assert tags == set(written)
    (event,) = events.Scalars("gradbalance/weight/seg")
    assert event.step == 7 and event.value == pytest.approx(0.3)
    (event,) = events.Scalars("gradbalance/grad_norm/depth")
    assert event.value == pytest.approx(float(info.grad_norms[0]), rel=1e-6)
    assert "gradbalance/cosine/min" in tags and "gradbalance/conflicts" in tags
    assert "gradbalance/cosine/depth/seg" not in tags  # the summary is the default


def test_tensorboard_cosine_matrix_and_heatmap_image(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    from torch.utils.tensorboard import SummaryWriter

    info = _info()
    with SummaryWriter(log_dir=str(tmp_path)) as writer:
        log_info(info, writer, step=3, cosines="matrix", heatmap=True)
    events = _events(tmp_path)
    for (i, a), (j, b) in [((0, "depth"), (1, "seg")), ((0, "depth"), (2, "normal")), ((1, "seg"), (2, "normal"))]:
        (event,) = events.Scalars(f"gradbalance/cosine/{a}/{b}")
        assert event.step == 3 and event.value == pytest.approx(float(info.cosine[i, j]), abs=1e-6)
    (image,) = events.Images("gradbalance/cosine")
    assert image.step == 3 and image.width > 100 and image.height > 100
    # the PNG decodes to a picture with red and blue cells (the colour map of -1..1)
    from io import BytesIO

    from PIL import Image

    rgb = np.asarray(Image.open(BytesIO(image.encoded_image_string)).convert("RGB")).astype(int)
    assert rgb.shape == (image.height, image.width, 3)
    assert ((rgb[..., 2] - rgb[..., 0]) > 60).any()  # blue: the diagonal (cosine 1)


def test_heatmap_needs_an_image_sink_and_writes_nothing_otherwise():
    info = _info()
    calls = []
    with pytest.raises(TypeError, match="add_image"):
        log_info(info, lambda m, s: calls.append(m), step=0, heatmap=True)
    assert calls == []


def test_callable_sink_and_bad_sink():
    info = _info()
    calls = []
    metrics = log_info(info, lambda m, s: calls.append((m, s)), step=3, prefix="")
    assert calls == [(metrics, 3)]
    assert metrics["loss/normal"] == pytest.approx(float(info.losses[2]))
    with pytest.raises(TypeError, match="add_scalar"):
        log_info(info, object(), step=0)
    matrix = log_info(info, lambda m, s: None, step=3, prefix="", cosines="matrix")
    assert matrix["cosine/seg/normal"] == pytest.approx(float(info.cosine[1, 2]))


# ---------------------------------------------------------------- History


class _EqualGram(gb.methods.Method):
    """Equal weights from the Gram path (so every step has cosines), for any number of tasks."""

    requires = "gram"

    def __init__(self, head=None):
        self.head = head

    def aggregate(self, inputs):
        k = inputs.num_tasks
        hw = None if self.head is None else torch.full((k,), self.head, dtype=torch.float64)
        return gb.methods.Aggregation(weights=torch.full((k,), 1.0 / k, dtype=torch.float64), head_weights=hw)


def _train(method, steps, drop=None):
    """A few steps of a real model; ``drop``: step -> task to leave out (None in the dict)."""
    model = MultiTaskNet(3)
    x, y = make_batch(3)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.05), method, shared_params=model.trunk)
    history, infos = History(), []
    for s in range(steps):
        opt.zero_grad()
        _, losses = task_losses(model, x, y)
        named = dict(zip(["depth", "seg", "normal"], losses))
        if drop and s in drop:
            named[drop[s]] = None
        info = opt.backward(named)
        opt.step()
        history.record(info, step=10 * s)
        infos.append(info)
    return history, infos


def test_history_keeps_what_each_step_reported():
    history, infos = _train("nash_mtl", 4)
    assert history.task_names == ("depth", "seg", "normal") and history.steps == [0, 10, 20, 30]
    for f in ("weights", "head_weights", "losses", "grad_norms"):
        expected = np.stack([getattr(i, f).double().numpy() for i in infos])
        np.testing.assert_allclose(history.values(f), expected, rtol=0, atol=0)
    np.testing.assert_allclose(history.cosines(), np.stack([i.cosine.numpy() for i in infos]), rtol=0, atol=0)
    # Nash-MTL: the heads got a, the trunk clip * a
    np.testing.assert_array_equal(history.head_weights(), history.values("head_weights"))
    # the mean cosine and the norm ratios, by hand
    np.testing.assert_allclose(history.mean_cosine(), np.mean([i.cosine.numpy() for i in infos], axis=0))
    np.testing.assert_allclose(history.mean_cosine(last=2), np.mean([i.cosine.numpy() for i in infos[2:]], axis=0))
    g = infos[1].grad_norms.numpy()
    np.testing.assert_allclose(history.grad_norm_ratios()[1], g / g.mean())
    assert history.engines == ["loop"] * 4


def test_history_tasks_that_come_and_go_and_loss_only_methods():
    history, infos = _train(_EqualGram(), 3, drop={1: "seg"})
    w = history.values("weights")
    assert np.isnan(w[1, 1]) and not np.isnan(w[[0, 2]]).any()
    cos = history.cosines()
    assert np.isnan(cos[1, 1]).all() and np.isnan(cos[1, :, 1]).all()
    assert cos[1, 0, 2] == pytest.approx(float(infos[1].cosine[0, 1]))
    # the mean over the steps that had the pair
    assert history.mean_cosine()[0, 1] == pytest.approx(float((infos[0].cosine[0, 1] + infos[2].cosine[0, 1]) / 2))
    # heads got `weights`: head_weights() falls back to them
    assert np.isnan(history.values("head_weights")).all()
    np.testing.assert_array_equal(history.head_weights(), w)
    loss_only, _ = _train("dwa", 2)
    assert np.isnan(loss_only.values("grad_norms")).all() and np.isnan(loss_only.cosines()).all()


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_history_save_load_round_trip(tmp_path, suffix):
    history, _ = _train(_EqualGram(head=2.0), 3, drop={2: "normal"})
    path = history.save(tmp_path / f"h{suffix}")
    back = History.load(path)
    assert back.task_names == history.task_names and back.steps == history.steps
    assert back.engines == history.engines
    for f in ("weights", "head_weights", "losses", "grad_norms"):
        np.testing.assert_array_equal(back.values(f), history.values(f))
    np.testing.assert_array_equal(back.cosines(), history.cosines())
    if suffix == ".json":  # plain JSON: no NaN literal, missing values are null
        text = path.read_text()
        assert "NaN" not in text and "null" in text
    # a loaded history goes on recording
    back.record(StepInfo(weights=None, losses=torch.ones(3), grad_norms=None, cosine=None, engine="skipped",
                         task_names=("depth", "seg", "normal")))
    assert back.steps[-1] == history.steps[-1] + 1


def test_history_rejects_bad_input_without_changing():
    history, infos = _train("mean", 2)
    before = history.state_dict()
    with pytest.raises(TypeError, match="StepInfo"):
        history.record({"weights": 1})
    with pytest.raises(ValueError, match="not after"):
        history.record(infos[0], step=5)
    with pytest.raises(ValueError, match="field"):
        history.values("weight")
    with pytest.raises(ValueError, match=".json or .npz"):
        history.save("h.csv")
    after = history.state_dict()
    assert before["steps"] == after["steps"] and len(history) == 2
    with pytest.raises(ValueError, match="nothing recorded"):
        History().plot()


def test_history_plot_shows_the_recorded_numbers(tmp_path):
    pytest.importorskip("matplotlib")
    history, _ = _train("nash_mtl", 5)
    fig = history.plot(tmp_path / "h.png", title="nash")
    assert (tmp_path / "h.png").stat().st_size > 5000
    weights_ax, losses_ax, ratios_ax, cos_ax = fig.axes[:4]
    # solid weights and dashed head weights, one pair per task, exactly the recorded values
    lines = weights_ax.get_lines()
    assert len(lines) == 6
    np.testing.assert_array_equal(lines[0].get_ydata(), history.values("weights")[:, 0])
    np.testing.assert_array_equal(lines[1].get_ydata(), history.values("head_weights")[:, 0])
    np.testing.assert_allclose(ratios_ax.get_lines()[2].get_ydata(), history.grad_norm_ratios()[:, 2])
    # the heatmap is the mean cosine matrix, and its cells carry the values
    np.testing.assert_allclose(cos_ax.images[0].get_array(), history.mean_cosine())
    texts = {t.get_text() for t in cos_ax.texts}
    assert f"{history.mean_cosine()[0, 1]:.2f}" in texts


def test_plot_without_matplotlib_says_what_is_missing(monkeypatch, tmp_path):
    history, _ = _train("mean", 1)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="needs matplotlib"):
        history.plot()
    assert len(History.load(history.save(tmp_path / "h.npz"))) == 1  # saving does not need it


def test_heatmap_without_matplotlib_says_what_is_missing(monkeypatch):
    info = _info()

    class Writer:
        def __init__(self):
            self.scalars, self.images = [], []

        def add_scalar(self, *args):
            self.scalars.append(args)

        def add_image(self, *args, **kwargs):
            self.images.append(args)

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="needs matplotlib"):
        log_info(info, Writer(), step=0, heatmap=True)
    writer = Writer()
    log_info(info, writer, step=0)  # scalars alone need nothing
    assert writer.scalars and not writer.images


def test_heatmap_image_through_a_plain_writer_shows_the_matrix():
    """The image handed to add_image is an (H, W, 3) uint8 array; a conflicting pair is red."""
    pytest.importorskip("matplotlib")
    info = StepInfo(weights=torch.ones(2), losses=torch.ones(2), grad_norms=torch.ones(2),
                    cosine=torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), engine="loop", task_names=("a", "b"))
    images = []

    class Writer:
        def add_scalar(self, *args):
            pass

        def add_image(self, tag, image, step, dataformats):
            images.append((tag, image, step, dataformats))

    log_info(info, Writer(), step=4, heatmap=True, prefix="gb/")
    ((tag, image, step, fmt),) = images
    assert tag == "gb/cosine" and step == 4 and fmt == "HWC"
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    red = (image[..., 0].astype(int) - image[..., 2].astype(int)) > 80
    blue = (image[..., 2].astype(int) - image[..., 0].astype(int)) > 80
    assert red.sum() > 100 and blue.sum() > 100  # the -1 cells and the +1 diagonal
    # no cosines (a loss-weighting step): nothing drawn
    info.cosine = None
    log_info(info, Writer(), step=5, heatmap=True)
    assert len(images) == 1
