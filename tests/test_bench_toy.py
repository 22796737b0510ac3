"""benchmarks/toy.py: the toy's mathematics, the Pareto set, the distance, and the quick run."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from benchmarks import toy


def grads_at(x1, x2, fn=toy.toy_losses):  # L1 scaled by 0.1 unless fn says otherwise
    x = torch.tensor([x1, x2], dtype=torch.float64, requires_grad=True)
    l1, l2 = fn(x)
    g1 = torch.autograd.grad(l1, x, retain_graph=True)[0]
    g2 = torch.autograd.grad(l2, x)[0]
    return float(l1.detach()), float(l2.detach()), g1, g2


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_fast_losses_match_the_papers_formula(scale):
    gen = torch.Generator().manual_seed(0)
    points = (torch.rand(300, 2, generator=gen, dtype=torch.float64) * 20 - 10).tolist()
    points += [list(s) for s in toy.STARTS + toy.CAGRAD_STARTS] + [[7.0, -8.43], [-7.0, -8.43]]
    for x1, x2 in points:
        a1, a2, ga1, ga2 = grads_at(x1, x2, lambda x: toy.toy_losses_reference(x, scale))
        b1, b2, gb1, gb2 = grads_at(x1, x2, lambda x: toy.toy_losses(x, scale))
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


def test_loss_gap_is_the_distance_of_the_loss_vector_to_the_front():
    # on the Pareto set the gap is 0; for any point it is the distance of (L1 / s, L2) to the image of
    # a dense sampling of the set (brute force, independent of the polyline code)
    front = toy.pareto_front(n=20001)
    image = np.array([toy.toy_values_and_jacobian(a, b, 1.0)[0] for a, b in front])
    assert np.abs(toy.loss_gap(front[::997])).max() < 1e-5  # the polyline of 1401 points: sagitta 3e-6
    points = [(5.0, 4.0), (-5.727, -6.682), (0.0, -6.0), (6.0, -8.0), (-8.0, -9.5), (3.0, 2.0)]
    for p in points:
        loss = np.array(toy.toy_values_and_jacobian(*p, 1.0)[0])
        brute = np.linalg.norm(image - loss, axis=1).min()
        assert toy.loss_gap(p) == pytest.approx(brute, abs=2e-3)
    # the scale never enters: L1 / s is the same function for every s
    l01 = toy.toy_values_and_jacobian(-5.727, -6.682, 0.1)[0]
    l1 = toy.toy_values_and_jacobian(-5.727, -6.682, 1.0)[0]
    assert l01[0] / 0.1 == pytest.approx(l1[0]) and l01[1] == pytest.approx(l1[1])
    # loss space is what the papers plot: 1.7 above the set in x, within 0.06 of the front in loss
    assert toy.distance_to_front((-5.727, -6.682)) > 1.7 and toy.loss_gap((-5.727, -6.682)) < 0.06
    # equal weighting's stall point from (9, 9) under Nash-MTL's protocol is far from the front
    assert toy.loss_gap((5.0, 4.0)) > 20


def test_settings_pass_their_arguments_to_the_method():
    by_key = {s.key: s for s in toy.SETTINGS}
    famo = toy.build_method(by_key["famo:famo"])
    assert famo.hyperparameters()["gamma"] == 0.0  # FAMO's toy run.sh: gamma = 0
    # the library's own clip is off: the harness clips after opt.backward, as the official scripts do
    assert famo.hyperparameters()["max_norm"] is None
    assert toy.build_method(by_key["nash:fairgrad"]).hyperparameters()["max_norm"] is None
    cagrad = toy.build_method(by_key["cagrad:cagrad"])
    assert (cagrad.c, cagrad.rescale) == (0.5, 2)  # CAGrad's toy.py: c = 0.5, g / (1 + c)
    nash_cagrad = toy.build_method(by_key["nash:cagrad"])
    assert (nash_cagrad.c, nash_cagrad.rescale) == (0.4, 1)  # Nash-MTL's CAGrad: c = 0.4, g / (1 + c^2)
    assert by_key["famo:famo"].clip == 1.0 and by_key["famo:famo (no clip)"].clip == 0.0
    assert toy.PROTOCOLS["cagrad"].steps == 100_000 and toy.PROTOCOLS["cagrad"].scale == 1.0
    assert toy.PROTOCOLS["famo"].steps == 50_000 and toy.PROTOCOLS["nash"].steps == 35_000
    # every method without a paper setting runs Nash-MTL's protocol with its registered defaults
    extra = toy.settings_for(["upgrad", "mean"])
    assert [(s.method, s.protocol) for s in extra] == [("mean", "nash"), ("mean", "cagrad"), ("upgrad", "nash")]


def test_the_harness_clips_the_shared_gradient():
    # (9, -1), CAGrad's unscaled problem: the mean gradient's norm is well above 1 at the start
    free = toy.run("mean", (9.0, -1.0), 5, scale=1.0, clip=0.0)
    clipped = toy.run("mean", (9.0, -1.0), 5, scale=1.0, clip=1.0)
    assert free["max_grad"] > 2.0
    assert clipped["max_grad"] == pytest.approx(1.0, abs=1e-5)  # torch divides by norm + 1e-6


def test_summary_and_verdict_follow_the_final_points():
    on_front = toy.pareto_front(n=5)[2]  # (0, -8.355)
    setting = toy.Setting("mean", "mean", "nash", figure="fig", paper_fails=((9.0, 9.0),))
    proto = replace(toy.PROTOCOLS["nash"], starts=((9.0, 9.0), (0.0, 0.0)))
    base = {"seconds": 1.0, "steps_done": 10, "error": None, "warning_counts": {}}
    results = {(setting.key, 0): dict(base, final=np.array([5.0, 4.0]), gap=float(toy.loss_gap((5.0, 4.0)))),
               (setting.key, 1): dict(base, final=on_front, gap=float(toy.loss_gap(on_front)))}
    row = toy.summarize(results, [setting], {"nash": proto})[0]
    assert (row["reached"], row["failed"], row["vs_paper"]) == (1, [(9.0, 9.0)], "match")
    assert "1/2 (not from (9, 9))" in toy.terminal_summary([row]) and "match" in toy.terminal_summary([row])
    results[setting.key, 0] = dict(results[setting.key, 1])  # now (9, 9) "reaches" too
    row = toy.summarize(results, [setting], {"nash": proto})[0]
    assert row["vs_paper"] == "differs: reaches here from (9, 9)"
    results[setting.key, 1] = dict(base, final=np.array([0.0, 0.0]), gap=1.0, error="RuntimeError at step 3")
    row = toy.summarize(results, [setting], {"nash": proto})[0]
    assert row["failed"] == [(0.0, 0.0)] and row["errors"] == ["RuntimeError at step 3"]


def test_demo_summary_comes_from_the_trajectories(tmp_path, monkeypatch, capsys):
    """The demo's protocol from (9, 9): equal weighting stalls off the front, MGDA reaches it (as in
    the Nash-MTL paper's figure); the printed summary and the table say so from the end points."""
    monkeypatch.setenv("GRADBALANCE_NO_PROGRESS", "1")
    assert toy.main(["--quick", "--methods", "mean,mgda", "--starts", "9,9", "--out", str(tmp_path),
                     "--no-plot"]) == 0
    assert not (tmp_path / "toy.md").exists()  # --quick never overwrites the full results
    text = (tmp_path / "toy-quick.md").read_text()
    num = r"(-?[\d.]+)"
    row = rf"^\| (\w+) \| quick \| \(9.000, 9.000\) \| \({num}, {num}\) \| ([\d.]+) \| ([\d.]+) \| (\S+) \|"
    rows = re.findall(row, text, flags=re.M)
    ends = {r[0]: (float(r[1]), float(r[2]), float(r[3]), float(r[4]), r[5]) for r in rows}
    assert set(ends) == {"mean", "mgda"}
    for x1, x2, gap, dist, status in ends.values():
        # the reported numbers are the end point's, and "reached" follows the tolerance
        assert gap == pytest.approx(float(toy.loss_gap((x1, x2))), abs=2e-3)
        assert dist == pytest.approx(float(toy.distance_to_front((x1, x2))), abs=2e-3)
        assert (status == "yes") == (gap < toy.TOL)
    assert ends["mean"][2] > 10 * toy.TOL and ends["mean"][4] == "no"  # stalled in the upper half plane
    assert ends["mgda"][2] < toy.TOL and ends["mgda"][4] == "yes"
    out = capsys.readouterr().out
    assert re.search(r"mean +reaches the front 0/1 \(not from \(9, 9\)\); paper: 0/1, fails from \(9, 9\)"
                     r" -> match", out)
    assert re.search(r"mgda +reaches the front 1/1 \(all starts\); paper: 1/1 -> match", out)
    assert "Environment:" in text and "Command:" in text
