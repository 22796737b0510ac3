"""``python -m benchmarks gpu``: runs on the CPU with --quick, reports every column, survives a
failing configuration and a spent time budget, and reads pytest's summary."""

from __future__ import annotations

import math

import pytest

from benchmarks import gpu


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("GRADBALANCE_NO_PROGRESS", "1")


def test_quick_run_writes_table_and_plot(tmp_path, capsys):
    assert gpu.main(["--quick", "--no-tests", "--ks", "2", "--steps", "1", "--warmup", "0",
                     "--out", str(tmp_path)]) == 0
    text = (tmp_path / "gpu-quick.md").read_text()
    assert (tmp_path / "gpu-quick.png").stat().st_size > 0
    assert text in capsys.readouterr().out  # printed as well
    for model in ("resnet", "vit"):
        assert f"### {model} on cpu" in text
    rows = [line for line in text.splitlines() if line.startswith("| 2 | ")]
    ratios, engines = rows[0::2], rows[1::2]  # per model: the overhead row, then the engine row
    assert len(ratios) == 2 and len(engines) == 2
    for row in ratios:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1].endswith(" ms")
        for cell in cells[2:7]:  # loop, batched, auto, gram, representation
            ratio, mem = float(cell.split()[0]), float(cell.split("(")[1].rstrip(")"))
            assert math.isfinite(ratio) and ratio > 0 and math.isfinite(mem) and mem > 0
        assert cells[7] == "not installed" or float(cells[7].split()[0]) > 0  # torchjd
    for row in engines:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:] == ["loop", cells[2], "loop", "gram", "representation"]  # auto on CPU: the loop
        assert cells[2].startswith("batched")
    assert "batched (fallback: _scaled_dot_product" in engines[1]  # the ViT's CPU attention backward


def test_failing_configuration_and_time_budget_are_reported_in_cells():
    def boom():
        raise RuntimeError("CUDA out of nothing")

    cell = gpu.Cell("batched", boom)
    gpu.measure_cell(cell, "cpu", warmup=1, steps=3, cap=1.0)
    assert cell.status == "RuntimeError: CUDA out of nothing" and not cell.times
    rows = gpu.run_model("resnet", "cpu", (2,), quick=True, warmup=0, steps=1, cap=1.0, deadline=0.0)
    assert all(rows[0][c]["status"] == "not run (time budget)" for c in gpu.COLUMNS)
    assert "not run (time budget)" in gpu.report(rows, None, "x", 1.0)


def test_run_tests_reads_the_pytest_summary(tmp_path):
    test = tmp_path / "test_tiny.py"
    test.write_text("import pytest\n\ndef test_ok():\n    assert 1 + 1 == 2\n\n"
                    "def test_bad():\n    assert 1 + 1 == 3\n\n"
                    "@pytest.mark.skip(reason='needs a GPU')\ndef test_skip():\n    pass\n")
    result = gpu.run_tests([str(test)], timeout=120)
    assert result["rc"] == 1
    assert "1 failed" in result["summary"] and "1 passed" in result["summary"] and "1 skipped" in result["summary"]
    assert any(line.startswith("FAILED") and "test_bad" in line for line in result["problems"])
    assert any(line.startswith("SKIPPED") and "needs a GPU" in line for line in result["problems"])
