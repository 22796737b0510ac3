"""The overhead benchmark: its reference loop is exact, its memory probe is sound, the quick run
writes a row per configuration with positive finite ratios."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import overhead
from gradbalance import jacobian


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("GRADBALANCE_NO_PROGRESS", "1")


def test_loop_reference_matches_engines():
    setup = overhead.mlp(3, "cpu", quick=True, dtype=torch.float64)
    losses, z = setup.losses()
    ref = overhead.loop_reference_gradients(losses, setup.shared)
    assert ref.shape == (3, sum(p.numel() for p in setup.shared))
    for engine, features in (("loop", None), ("batched", None), ("batched", z)):
        losses, z = setup.losses()
        tg = jacobian.task_gradients(losses, setup.shared, setup.head_params, engine=engine,
                                     features=z if features is not None else None)
        torch.testing.assert_close(tg.shared, ref, rtol=1e-10, atol=1e-12)
    # and each row is the task's own gradient (not a sum over tasks)
    losses, _ = setup.losses()
    own = torch.autograd.grad(losses[1], setup.shared)
    torch.testing.assert_close(ref[1], torch.cat([g.reshape(-1) for g in own]), rtol=1e-12, atol=0)


def test_peak_bytes_counts_live_tensors():
    def fn():
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(500, 1000)  # 2 MB, live together with a
        del a
        c = torch.empty(250, 1000)  # 1 MB, after a was freed
        del b, c

    peak = overhead.peak_bytes(fn, "cpu")
    assert peak == pytest.approx(6e6, rel=0.01)


def _rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ")]


def test_quick_run_writes_a_row_per_configuration(tmp_path, capsys):
    methods = ["mgda", "mean", "upgrad", "pcgrad", "mgda_ub"]
    assert overhead.main(["--quick", "--ks", "2,3", "--methods", ",".join(methods), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "overhead-quick.md").read_text()
    assert (tmp_path / "overhead-quick.png").stat().st_size > 0
    rows = _rows(text)
    for method in methods:  # every method table row, with one cell per k
        (row,) = [r for r in rows if r.startswith(f"| {method} | ") and r.count("|") == 5]
        cells = [c.strip() for c in row.split("|")[2:4]]
        for cell in cells:
            ratio = float(cell.split(" ")[0])
            mem = float(cell.split("(")[1].rstrip(")"))
            assert math.isfinite(ratio) and ratio > 0 and math.isfinite(mem) and mem > 0
    for method in overhead.SWEEP:
        for engine in ("auto", *overhead.SWEEP_ENGINES):
            if method == "mean" and engine.startswith("recompute_every"):
                continue  # a loss weighting has nothing to reuse
            assert any(r.startswith(f"| {method} | {engine} | ") for r in rows), (method, engine)
    assert "LibMTL-style loop + mgda" in text and "ours / loop (mgda)" in text
    if overhead.torchjd is not None:
        assert "torchjd mtl_backward + upgrad" in text


def test_run_rows_have_positive_finite_ratios():
    rows, _ = overhead.run("mlp", "cpu", (2,), ["mgda", "mean"], steps=3, warmup=1, budget=0.1, quick=True)
    labels = [r["label"] for r in rows]
    expected = ["plain step", "mgda (auto)", "mean (auto)"]
    expected += [f"{m} ({e})" for m in overhead.SWEEP for e in overhead.SWEEP_ENGINES
                 if not (m == "mean" and e.startswith("recompute_every"))]
    expected += ["mgda (LibMTL-style loop)", "upgrad (LibMTL-style loop)"]
    if overhead.torchjd is not None:
        expected += ["mgda (torchjd mtl_backward)", "upgrad (torchjd mtl_backward)"]
    assert labels == expected
    for r in rows:
        assert r["status"] == "ok", r
        assert r["steps"] >= 3
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0
        assert math.isfinite(r["mem_ratio"]) and r["mem_ratio"] > 0
    by = {r["label"]: r for r in rows}
    assert by["plain step"]["ratio"] == 1.0
    assert by["mgda (loop)"]["ran"] == "loop" and by["mgda (batched)"]["ran"] == "batched"
    assert by["mgda (representation)"]["ran"] == "representation"
    assert by["mean (auto)"]["ran"] == "losses"
    assert by["mgda (recompute_every=10)"]["ran"] == "reused"  # the timed steps reuse the weights


def test_resnet_path_runs_on_cpu(tmp_path):
    assert overhead.main(["--quick", "--device", "cpu", "--model", "resnet", "--ks", "2",
                          "--methods", "mgda", "--no-sweep", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "overhead-quick.md").read_text()
    assert "## resnet on cpu" in text
    (row,) = [r for r in _rows(text) if r.startswith("| mgda | ") and r.count("|") == 4]
    assert float(row.split("|")[2].split()[0]) > 0


def test_failing_configuration_is_skipped_with_reason():
    def boom():
        raise RuntimeError("cannot run this combination")

    configs = [overhead.Config("plain step", "plain", "sum", "-", lambda: None),
               overhead.Config("x (auto)", "ours", "x", "auto", boom)]
    overhead.measure(configs, "cpu", steps=3, warmup=1, budget=1.0, memory=False)
    assert configs[1].status.startswith("skipped: RuntimeError: cannot run")
    assert len(configs[0].times) == 3 and not configs[1].times


@pytest.mark.parametrize("model", overhead.ENGINE_ONLY)
def test_engine_only_models_run_the_mgda_sweep(model):
    rows, description = overhead.run(model, "cpu", (2,), ["mgda"], steps=1, warmup=0, budget=0.1, quick=True,
                                     memory=False)
    by = {r["label"]: r for r in rows}
    assert list(by) == ["plain step", "mgda (auto)", "mgda (loop)", "mgda (batched)", "mgda (representation)"]
    assert all(r["status"] == "ok" and r["ratio"] > 0 for r in rows)
    assert by["mgda (auto)"]["ran"] == "loop" and by["mgda (representation)"]["ran"] == "representation"
    assert by["mgda (batched)"]["ran"] == ("batched" if model == "conv" else
                                           "batched (fallback: _scaled_dot_product_flash_attention_for_cpu_backward)")
    text = overhead.report(rows, {model: description}, "x", {})
    assert "Engine sweep" in text and "Headline" not in text and "Every method" not in text
