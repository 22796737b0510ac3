"""``python -m benchmarks``: the one entry point lists every benchmark and dispatches to it."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

from benchmarks.__main__ import BENCHMARKS, main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_benchmark(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, desc) in BENCHMARKS.items():
        assert f"  {name}" in out and desc in out


def test_every_benchmark_module_exists_with_a_main_and_a_docstring():
    for name, (module, _) in BENCHMARKS.items():
        mod = importlib.import_module(module)
        assert callable(mod.main), name
        assert mod.__doc__ and mod.__doc__.strip(), name
    # and every script in benchmarks/ with a main() is reachable from the entry point
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")
               if "def main(" in p.read_text() and p.stem != "__main__"}
    assert scripts == {m.rsplit(".", 1)[1] for m, _ in BENCHMARKS.values()}


def test_unknown_benchmark_is_refused(capsys):
    assert main(["nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_a_benchmark_runs_through_the_entry_point(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADBALANCE_NO_PROGRESS", "1")
    assert main(["solvers", "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "solvers-quick.md").read_text().count("| ") > 3


def test_module_invocation():
    run = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and "multidigits" in run.stdout
    run = subprocess.run([sys.executable, "-m", "benchmarks", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2


def test_quick_runs_never_overwrite_the_committed_results(tmp_path, monkeypatch):
    """Every script's --quick writes *-quick files (what the README demo runs), not the full results."""
    from benchmarks import mixed, multidigits, sharing

    monkeypatch.setattr(multidigits, "RESULTS", tmp_path)
    args = ["--quick"]
    assert multidigits.main([*args, "--train", "32", "--test", "16", "--methods", "mean"])
    assert (tmp_path / "multidigits-quick.md").exists() and not (tmp_path / "multidigits.md").exists()
    monkeypatch.setattr(mixed, "RESULTS", tmp_path)
    assert mixed.main([*args, "--methods", "mean"])
    assert (tmp_path / "mixed-quick.md").exists() and not (tmp_path / "mixed.md").exists()
    monkeypatch.setattr(sharing, "__file__", str(tmp_path / "benchmarks" / "sharing.py"))
    sharing.main([*args, "--epochs", "1", "--train", "32", "--rounds", "1", "--methods", "mean"])
    assert (tmp_path / "benchmarks" / "results" / "sharing-quick.md").exists()


def test_ddp_example_trains_and_benchmarks_on_two_processes():
    """`python -m benchmarks ddp` launches 2 gloo ranks: they stay identical, and the bench counts bytes."""
    run = subprocess.run([sys.executable, "-m", "benchmarks", "ddp", "--quick"],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ranks identical: True" in run.stdout
    assert run.stdout.count("epoch ") == 1  # --quick: one epoch
    run = subprocess.run([sys.executable, "-m", "benchmarks", "ddp", "--bench", "--quick", "--steps", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1] for line in run.stdout.splitlines()
            if line.startswith("| ") and "---" not in line}
    # plain DDP's ring all-reduce of P = 30,330 float32 gradients, and the exact path sends more
    assert int(rows["plain DDP"].replace(",", "")) == 145_800
    assert int(rows["allreduce"].replace(",", "")) > int(rows["plain DDP"].replace(",", ""))
