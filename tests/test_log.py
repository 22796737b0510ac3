"""Logging StepInfo to TensorBoard (read back from the event file) and to a callable."""

from __future__ import annotations

import pytest
import torch

import gradbalance as gb
from gradbalance.log import log_info
from tests.helpers import FixedWeights, MultiTaskNet, make_batch, task_losses


def _info():
    model = MultiTaskNet(3)
    x, y = make_batch(3)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([0.2, 0.3, 0.5]),
                         shared_params=model.trunk)
    _, losses = task_losses(model, x, y)
    return opt.backward({"depth": losses[0], "seg": losses[1], "normal": losses[2]})


def test_tensorboard_round_trip(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    info = _info()
    with SummaryWriter(log_dir=str(tmp_path)) as writer:
        written = log_info(info, writer, step=7)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == set(written)
    (event,) = events.Scalars("gradbalance/weight/seg")
    assert event.step == 7 and event.value == pytest.approx(0.3)
    (event,) = events.Scalars("gradbalance/grad_norm/depth")
    assert event.value == pytest.approx(float(info.grad_norms[0]), rel=1e-6)
    assert "gradbalance/cosine/min" in tags and "gradbalance/conflicts" in tags


def test_callable_sink_and_bad_sink():
    info = _info()
    calls = []
    metrics = log_info(info, lambda m, s: calls.append((m, s)), step=3, prefix="")
    assert calls == [(metrics, 3)]
    assert metrics["loss/normal"] == pytest.approx(float(info.losses[2]))
    with pytest.raises(TypeError, match="add_scalar"):
        log_info(info, object(), step=0)
