"""DWA: hand-computed weights from loss histories, epoch/step windows, purity, resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import gradbalance as gb
from gradbalance.methods import DWA, TaskInputs
from tests.classics_helpers import assert_resume_bit_identical

D = torch.float64


def run(m: DWA, losses) -> torch.Tensor:
    agg = m.aggregate(TaskInputs(losses=torch.tensor(losses, dtype=D)))
    m.commit(agg.pending)
    return agg.weights


def softmax_k(r, T):
    e = [math.exp(x / T) for x in r]
    return [len(r) * x / sum(e) for x in e]


def test_hand_computed_epoch_weights():
    m = DWA()
    # epoch 1: two steps, mean (2, 3); epoch 2: one step, mean (1, 3); no weighting yet
    assert run(m, [1.0, 2.0]).tolist() == [1.0, 1.0]
    assert run(m, [3.0, 4.0]).tolist() == [1.0, 1.0]
    m.epoch_end()
    assert run(m, [1.0, 3.0]).tolist() == [1.0, 1.0]
    m.epoch_end()
    # epoch 3: r = (1/2, 3/3), lambda = 2 softmax(r / 2)
    expected = softmax_k([0.5, 1.0], 2.0)
    torch.testing.assert_close(run(m, [9.0, 9.0]), torch.tensor(expected, dtype=D), atol=1e-14, rtol=0)
    run(m, [1.0, 1.0])  # the weights stay fixed within an epoch
    m.epoch_end()  # epoch 3 mean (5, 5): r = (5/1, 5/3)
    expected = softmax_k([5.0, 5.0 / 3.0], 2.0)
    torch.testing.assert_close(run(m, [1.0, 1.0]), torch.tensor(expected, dtype=D), atol=1e-14, rtol=0)


def test_hand_computed_step_window_and_temperature():
    m = DWA(temperature=0.5, window="step")
    history = [[4.0, 1.0, 2.0], [2.0, 1.0, 3.0], [1.0, 2.0, 3.0]]
    assert run(m, history[0]).tolist() == [1.0] * 3
    assert run(m, history[1]).tolist() == [1.0] * 3
    expected = softmax_k([2 / 4, 1 / 1, 3 / 2], 0.5)
    torch.testing.assert_close(run(m, history[2]), torch.tensor(expected, dtype=D), atol=1e-14, rtol=0)
    expected = softmax_k([1 / 2, 2 / 1, 3 / 3], 0.5)
    torch.testing.assert_close(run(m, [1.0, 1.0, 1.0]), torch.tensor(expected, dtype=D), atol=1e-14, rtol=0)


def test_weights_sum_to_k_and_favour_the_slow_task():
    gen = torch.Generator().manual_seed(0)
    m = DWA(window="step")
    for _ in range(30):
        w = run(m, (torch.rand(5, generator=gen, dtype=D) + 0.1).tolist())
        assert float(w.sum()) == pytest.approx(5.0, abs=1e-12)
    m = DWA(window="step")
    for t in range(3):
        w = run(m, [0.5**t, 0.9**t])  # task 1 falls more slowly
    assert w[1] > 1 > w[0]


def test_only_committed_steps_count():
    m = DWA(window="step")
    run(m, [1.0, 1.0])
    run(m, [1.0, 2.0])
    before = m.state_dict()
    m.aggregate(TaskInputs(losses=torch.tensor([100.0, 0.01], dtype=D)))  # never committed
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) if torch.is_tensor(before[k]) else before[k] == after[k]
               for k in before)
    torch.testing.assert_close(run(m, [5.0, 5.0]), torch.tensor(softmax_k([1.0, 2.0], 2.0), dtype=D))


def test_epoch_end_without_steps_warns():
    m = DWA()
    with pytest.warns(RuntimeWarning, match="no step"):
        m.epoch_end()
    assert m.state_dict()["averages"].numel() == 0
    run(m, [1.0, 2.0])
    m.epoch_end()
    with pytest.warns(RuntimeWarning, match="no step"):
        m.epoch_end()
    assert m.state_dict()["averages"].tolist() == [1, 1]


def test_errors():
    with pytest.raises(ValueError, match="temperature"):
        DWA(temperature=0)
    for wrong in (True, "1"):  # booleans and strings are not numbers
        with pytest.raises(TypeError, match="temperature must be a number"):
            DWA(temperature=wrong)
    with pytest.raises(ValueError, match="window"):
        DWA(window="batch")
    m = DWA(window="step")
    run(m, [1.0, 1.0])
    with pytest.raises(ValueError, match="2 tasks but this step has 3"):
        run(m, [1.0, 1.0, 1.0])
    run(m, [0.0, 1.0])  # a zero average: fine as a numerator ...
    run(m, [1.0, 1.0])
    with pytest.raises(ValueError, match="positive"):  # ... not as a denominator
        run(m, [1.0, 1.0])
    with pytest.raises(ValueError, match="keys"):
        m.load_state_dict({"sum": torch.zeros(2)})
    assert isinstance(gb.methods.make_method("dwa"), DWA)


def test_resume_is_bit_identical_epoch_window():
    def hook(opt, s):
        if s % 2 == 1:
            opt.method.epoch_end()

    infos = assert_resume_bit_identical(lambda: DWA(), k=3, before=5, after=5, hook=hook)
    assert any((info.weights != 1).any() for info in infos)


def test_resume_is_bit_identical_step_window():
    assert_resume_bit_identical(lambda: DWA(window="step"), k=3)


def run_named(m: DWA, losses: dict) -> torch.Tensor:
    agg = m.aggregate(TaskInputs(losses=torch.tensor(list(losses.values()), dtype=D), task_names=tuple(losses)))
    m.commit(agg.pending)
    return agg.weights


def test_missing_tasks_keep_their_state():
    """Per-task history keyed by name: an absent task's averages wait for it; a new task weighs 1."""
    m = DWA(window="step")
    run_named(m, {"depth": 4.0, "seg": 1.0})
    run_named(m, {"depth": 2.0, "seg": 2.0})
    frozen = m.state_dict()
    # seg has no labels: depth alone is weighted (one task: softmax gives 1)
    assert run_named(m, {"depth": 1.0}).tolist() == [1.0]
    state = m.state_dict()
    assert state["averages"].tolist() == [3, 2]
    assert torch.equal(state["history"][:, 1], frozen["history"][:, 1])
    # seg returns with its own last two averages (1 -> 2), depth with (2 -> 1); a new task gets 1
    w = run_named(m, {"seg": 3.0, "normal": 5.0, "depth": 3.0})
    expected = softmax_k([2.0 / 1.0, 1.0 / 2.0], 2.0)
    torch.testing.assert_close(w, torch.tensor([expected[0], 1.0, expected[1]], dtype=D), atol=1e-14, rtol=0)
    assert float(w.sum()) == pytest.approx(3.0)
    assert m.tasks == ("depth", "seg", "normal")


def test_missing_tasks_through_the_optimizer_epoch_window():
    """End to end: a dict with None skips a task; epoch averages are over the steps a task was present."""
    torch.manual_seed(0)
    trunk, heads = torch.nn.Linear(3, 4), torch.nn.ModuleList(torch.nn.Linear(4, 1) for _ in range(2))
    opt = gb.GradBalance(torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.01),
                         method=DWA(), shared_params=trunk)
    x = torch.randn(8, 3)
    for _epoch in range(3):
        for step in range(2):
            opt.zero_grad()
            z = trunk(x)
            losses = {"a": heads[0](z).pow(2).mean() + 1, "b": heads[1](z).pow(2).mean() + 1}
            if step == 1:
                losses["b"] = None
            opt.backward(losses)
            opt.step()
        opt.method.epoch_end()
    state = opt.method.state_dict()
    assert state["averages"].tolist() == [3, 3]
    assert state["count"].tolist() == [0, 0]


def test_warns_once_when_epoch_end_is_never_called():
    """window='epoch' without epoch_end(): the weights stay 1 forever; say so once."""
    import warnings

    m = DWA()
    m.epoch_warning_steps = 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):
            assert run(m, [1.0, 2.0]).tolist() == [1.0, 1.0]
    with pytest.warns(RuntimeWarning, match="epoch_end\\(\\) was never called") as record:
        for _ in range(20):
            assert run(m, [1.0, 2.0]).tolist() == [1.0, 1.0]
    assert len(record) == 1  # once
    # calling epoch_end as documented: no warning, even over many more steps
    m = DWA()
    m.epoch_warning_steps = 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            for _ in range(4):
                run(m, [1.0, 2.0])
            m.epoch_end()
        for _ in range(10):  # a long epoch after epochs did end: not the mistake warned about
            run(m, [1.0, 2.0])
        # window="step" needs no hook, and None silences it
        s = DWA(window="step")
        s.epoch_warning_steps = 2
        for _ in range(5):
            run(s, [1.0, 2.0])
        quiet = DWA()
        quiet.epoch_warning_steps = None
        for _ in range(2000):
            run(quiet, [1.0, 2.0])
    assert DWA.epoch_warning_steps == 1000


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_state_dicts_are_snapshots_not_views():
    # like torch.optim: a saved state must not change when the method keeps training, and a
    # loaded state must not be changed by the method that loaded it
    m = DWA()
    run(m, [1.0, 2.0])
    m.epoch_end()
    run(m, [3.0, 1.0])
    saved = m.state_dict()
    frozen = copy.deepcopy(saved)
    run(m, [2.0, 2.0])
    m.epoch_end()
    assert _same_state(saved, frozen)
    twin = DWA()
    twin.load_state_dict(saved)
    run(twin, [5.0, 4.0])
    twin.epoch_end()
    run(twin, [5.0, 4.0])
    assert _same_state(saved, frozen)


def test_warning_comes_at_exactly_epoch_warning_steps_commits():
    import warnings

    m = DWA()
    m.epoch_warning_steps = 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(m, [1.0, 2.0])
        run(m, [1.0, 2.0])
    with pytest.warns(RuntimeWarning, match="has committed 3 steps"):
        run(m, [1.0, 2.0])


def test_repr_names_every_argument():
    # repr is built from hyperparameters(), which checkpoints record to warn on a changed method
    assert repr(DWA(temperature=0.5, window="step")) == "DWA(temperature=0.5, window='step')"
    assert repr(DWA()) == "DWA(temperature=2.0, window='epoch')"


def test_bad_state_is_refused_and_changes_nothing():
    m = DWA(window="step")
    run(m, [1.0, 2.0])
    before = m.state_dict()
    bad = dict(before, sum=torch.zeros(3, dtype=D))  # one entry too many
    with pytest.raises(ValueError, match="one entry per task"):
        m.load_state_dict(bad)
    assert _same_state(m.state_dict(), before)


def test_reported_averages_is_the_fewest_any_task_has():
    m = DWA()
    assert m.aggregate(TaskInputs(losses=torch.ones(2, dtype=D))).extras["averages"] == 0
    for _ in range(2):
        run(m, [1.0, 2.0])
        m.epoch_end()
    agg = m.aggregate(TaskInputs(losses=torch.ones(2, dtype=D)))
    assert agg.extras["averages"] == 2
    named = DWA(window="step")
    run_named(named, {"a": 1.0, "b": 1.0})
    run_named(named, {"a": 1.0})
    assert named.aggregate(TaskInputs(losses=torch.ones(1, dtype=D), task_names=("a",))).extras["averages"] == 1
