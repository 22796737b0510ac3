"""benchmarks/toy.py: the toy's mathematics, the Pareto set, the distance, and the quick run."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from benchmarks import toy


def grads_at(x1, x2, fn=toy.toy_losses):
    x = torch.tensor([x1, x2], dtype=torch.float64, requires_grad=True)
    l1, l2 = fn(x)
    g1 = torch.autograd.grad(l1, x, retain_graph=True)[0]
    g2 = torch.autograd.grad(l2, x)[0]
    return float(l1.detach()), float(l2.detach()), g1, g2


def test_fast_losses_match_the_papers_formula():
    gen = torch.Generator().manual_seed(0)
    points = (torch.rand(300, 2, generator=gen, dtype=torch.float64) * 20 - 10).tolist()
    points += [list(s) for s in toy.STARTS] + [[7.0, -8.43], [-7.0, -8.43]]
    for x1, x2 in points:
        a1, a2, ga1, ga2 = grads_at(x1, x2, toy.toy_losses_reference)
        b1, b2, gb1, gb2 = grads_at(x1, x2)
        assert b1 == pytest.approx(a1, abs=1e-12) and b2 == pytest.approx(a2, abs=1e-12)
        torch.testing.assert_close(gb1, ga1, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gb2, ga2, rtol=1e-9, atol=1e-12)


def test_known_values():
    # lower half plane at x2 -> -inf-ish: L = 0.1 g1, g2 with c2 ~ 1; at (7, -8): g1 = -20, g2 = 19.6 - 20
    l1, l2, _, _ = grads_at(7.0, -8.0)
    c2 = math.tanh(4.0)
    assert l1 == pytest.approx(0.1 * c2 * -20.0) and l2 == pytest.approx(c2 * (19.6 - 20.0))
    # the origin: c1 = c2 = 0, both losses 0
    l1, l2, _, _ = grads_at(0.0, 0.0)
    assert l1 == 0.0 and l2 == 0.0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_individual_minima_have_zero_gradient_of_their_task(sign):
    # task 1's minimum is at x1 = +7, task 2's at x1 = -7, both at the ends of the front
    front = toy.pareto_front()
    end = front[-1] if sign > 0 else front[0]
    assert end[0] == pytest.approx(7.0 * sign) and end[1] == pytest.approx(-8.4345, abs=1e-4)
    _, _, g1, g2 = grads_at(*end)
    own, other = (g1, g2) if sign > 0 else (g2, g1)
    assert float(own.norm()) < 1e-9
    assert float(other.norm()) > 0.1  # the other task is far from its minimum
    # and it is a minimum of that task: nearby points are worse
    for dx in ((0.1, 0.0), (-0.1, 0.0), (0.0, 0.1), (0.0, -0.1)):
        here = grads_at(*end)[0 if sign > 0 else 1]
        there = grads_at(end[0] + dx[0], end[1] + dx[1])[0 if sign > 0 else 1]
        assert there > here


def test_on_the_front_the_gradients_are_anti_parallel_and_off_it_they_are_not():
    front = toy.pareto_front(n=15)
    for x1, x2 in front[1:-1]:
        _, _, g1, g2 = grads_at(x1, x2)
        cos = float(g1 @ g2 / (g1.norm() * g2.norm()))
        assert cos == pytest.approx(-1.0, abs=1e-12)
        # 0.05 above or below the front: a common descent direction exists
        for dy in (0.05, -0.05):
            _, _, h1, h2 = grads_at(x1, x2 + dy)
            assert float(h1 @ h2 / (h1.norm() * h2.norm())) > -1.0 + 1e-7
    # the usual line x2 = -8.3552 is the front's value at x1 = 0 only
    assert toy.pareto_front(n=3)[1, 1] == pytest.approx(-8.3552, abs=2e-4)


def test_distance_to_front():
    d = toy.distance_to_front(np.array([[0.0, -8.3551], [0.0, -7.3551], [9.0, -8.4345], [-10.0, -8.43446],
                                        [3.5, toy.pareto_front(n=5)[3, 1]]]))
    np.testing.assert_allclose(d, [0.0, 1.0, 2.0, 3.0, 0.0], atol=2e-4)
    # a point of the curve between samples, from the root-finder directly
    x2 = float(toy._front_x2(np.array([1.2345]))[0])
    assert toy.distance_to_front([1.2345, x2]) < 1e-6


def test_quick_run_table_and_mgda_reaches_the_front(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADBALANCE_NO_PROGRESS", "1")
    methods = ["mean", "mgda", "nash_mtl", "famo", "mgda_ub"]
    assert toy.main(["--quick", "--methods", ",".join(methods), "--out", str(tmp_path), "--no-plot"]) == 0
    assert not (tmp_path / "toy.md").exists()  # --quick never overwrites the full results
    text = (tmp_path / "toy-quick.md").read_text()
    num = r"(-?[\d.]+)"
    rows = re.findall(rf"^\| (\w+) \| \({num}, {num}\) \| \({num}, {num}\) \| ([\d.]+) \| (\S+) \| [\d.]+ \|$",
                      text, flags=re.M)
    starts = toy.QUICK["starts"]
    assert sorted((r[0], (float(r[1]), float(r[2]))) for r in rows) == sorted(
        (m, s) for m in methods for s in starts)
    for _name, _, _, f1, f2, dist, reached in rows:
        # the reported distance is the final point's, and "reached" follows the tolerance
        assert float(dist) == pytest.approx(float(toy.distance_to_front([float(f1), float(f2)])), abs=2e-3)
        assert (reached == "yes") == (float(dist) < toy.TOL) or reached == "**error**"
    mgda = {(float(r[1]), float(r[2])): r for r in rows if r[0] == "mgda"}
    assert mgda[(-7.5, -0.5)][6] == "yes"  # 250 decaying Adam steps suffice from this start
    assert "Environment:" in text and "Command:" in text
