"""The method contract's shared helpers: argument checks, the registry, clipping, seeded state."""

from __future__ import annotations

import math

import pytest
import torch

from gradbalance.methods import Mean, PCGrad, TaskInputs
from gradbalance.methods.base import (
    Method,
    SeededMethod,
    check_max_norm,
    check_number,
    clip_factor,
    generator_from_state,
    make_method,
    register,
    require_grads,
    require_gram,
    state_keys,
)

D = torch.float64


def test_check_number_ranges_types_and_conversion():
    assert check_number("lr", 0.5, positive=True) == 0.5
    assert check_number("lr", 1e-300, positive=True) == 1e-300
    for bad in (0, 0.0, -1.0):
        with pytest.raises(ValueError, match=f"lr must be positive, got {bad!r}"):
            check_number("lr", bad, positive=True)
    assert check_number("reg", 0.0, minimum=0.0) == 0.0
    with pytest.raises(ValueError, match=r"reg must be >= 0.0, got -1e-12"):
        check_number("reg", -1e-12, minimum=0.0)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        check_number("n", 0, minimum=1, integer=True)
    for bad in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match="must be finite"):
            check_number("x", bad)
    with pytest.raises(TypeError, match="lr must be a number, got bool True"):
        check_number("lr", True)
    with pytest.raises(TypeError, match="n must be an int, got float 2.0"):
        check_number("n", 2.0, integer=True)
    with pytest.raises(TypeError, match="must be a number"):
        check_number("x", "1")
    out = check_number("n", 3, integer=True)
    assert out == 3 and type(out) is int
    out = check_number("x", 3)
    assert out == 3.0 and type(out) is float


def test_check_max_norm():
    assert check_max_norm(None) is None
    assert check_max_norm(2) == 2.0 and type(check_max_norm(2)) is float
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="max_norm must be a finite number > 0"):
            check_max_norm(bad)
    with pytest.raises(TypeError, match="max_norm"):
        check_max_norm(True)


def test_clip_factor_is_clip_grad_norm_s_factor():
    """norm = sqrt(w^T M w) = ||sum_i w_i g_i||; factor = min(1, max_norm / (norm + 1e-6)), the
    factor torch.nn.utils.clip_grad_norm_ applies."""
    g = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=D)
    w = torch.tensor([1.0, 1.0], dtype=D)
    assert clip_factor(w, g @ g.T, None) == (5.0, 1.0)
    norm, factor = clip_factor(w, g @ g.T, 2.0)
    assert norm == 5.0 and factor == 2.0 / (5.0 + 1e-6)
    p = torch.nn.Parameter(torch.zeros(2, dtype=D))
    p.grad = w @ g
    torch.nn.utils.clip_grad_norm_([p], 2.0)
    torch.testing.assert_close(p.grad, factor * (w @ g), rtol=1e-15, atol=0)
    assert clip_factor(w, g @ g.T, 10.0) == (5.0, 1.0)  # never scaled up


def test_make_method_names_instances_and_classes():
    assert isinstance(make_method("MeAn"), Mean) and isinstance(make_method("PCGRAD"), PCGrad)
    m = Mean()
    assert make_method(m) is m
    with pytest.raises(TypeError, match=r"pass an instance, e.g. Mean\(\)"):
        make_method(Mean)
    with pytest.raises(ValueError, match="unknown method 'meen'; valid names: .*mean"):
        make_method("meen")
    with pytest.raises(TypeError, match="method must be a name"):
        make_method(3)


def test_a_name_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="'mean' registered twice"):
        register("mean", "again")(type("Other", (Method,), {}))
    assert type(make_method("mean")) is Mean


def test_seeded_state_round_trip_and_validation():
    a = PCGrad(seed=3)
    gen = a.draw()
    torch.randperm(5, generator=gen)
    a.commit(gen.get_state())
    b = PCGrad(seed=3)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.draw().get_state(), a.draw().get_state())
    assert not torch.equal(b.draw().get_state(), PCGrad(seed=3).draw().get_state())
    with pytest.raises(ValueError, match="'generator'"):
        b.load_state_dict({})
    with pytest.raises(ValueError, match="'generator'"):
        b.load_state_dict({"generator": a.state_dict()["generator"], "extra": 1})
    with pytest.raises(ValueError, match="seed"):
        SeededMethod(seed=-1)


def test_a_draw_never_advances_the_committed_generator():
    m = PCGrad(seed=1)
    before = m.state_dict()["generator"]
    torch.randn(10, generator=m.draw())
    torch.randn(10, generator=generator_from_state(before))
    assert torch.equal(m.state_dict()["generator"], before)


def test_stateless_method_refuses_state():
    Mean().load_state_dict({})
    with pytest.raises(ValueError, match="Mean is stateless but got state \\['x'\\]"):
        Mean().load_state_dict({"x": 1})


def test_state_keys_and_required_inputs():
    named = TaskInputs(losses=torch.ones(2, dtype=D), task_names=("a", "b"))
    assert state_keys(named, ["a", "b", "c"], "M") == ["a", "b"]  # named tasks may be missing
    unnamed = TaskInputs(losses=torch.ones(2, dtype=D))
    assert state_keys(unnamed, [], "M") == ["task0", "task1"]
    with pytest.raises(ValueError, match="M keeps per-task state for 3 tasks but this step has 2"):
        state_keys(unnamed, ["task0", "task1", "task2"], "M")
    with pytest.raises(ValueError, match="M needs the Gram matrix"):
        require_gram(unnamed, "M")
    with pytest.raises(ValueError, match=r"M needs the \(k, P\) task gradients"):
        require_grads(unnamed, "M")


@pytest.mark.parametrize("seed", [0, 7])
def test_the_first_draw_is_the_seed_s_stream(seed):
    m = PCGrad(seed=seed)
    for _ in range(2):  # uncommitted: the same numbers again
        torch.testing.assert_close(torch.randn(5, generator=m.draw(), dtype=D),
                                   torch.randn(5, generator=torch.Generator().manual_seed(seed), dtype=D),
                                   rtol=0, atol=0)
