"""benchmarks/sharing.py runs end to end and reports every architecture."""

from __future__ import annotations

import gradbalance as gb
from benchmarks.sharing import ARCHS, main, two_digit_data


def test_two_digit_data_labels_match_the_halves():
    x, y, xt, _ = two_digit_data(50, 20, seed=0)
    assert x.shape == (50, 128) and y.shape == (50, 2) and xt.shape == (20, 128)
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    # the same left half always carries the same left label
    seen = {}
    for img, lab in zip(x.reshape(50, 8, 16), y):
        key = img[:, :8].numpy().tobytes()
        assert seen.setdefault(key, int(lab[0])) == int(lab[0])


def test_quick_run_writes_one_row_per_architecture_and_method(tmp_path):
    methods = ["mean"] + [m for m in ("mgda",) if m in gb.available_methods()]
    out = tmp_path / "sharing.md"
    text = main(["--quick", "--epochs", "1", "--train", "64", "--rounds", "1", "--out", str(out),
                 "--methods", *methods])
    assert out.read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[:2] for r in rows] == [[f"| {a}", m] for a in ARCHS for m in methods]
    for r in rows:
        if r.startswith("| soft") and "mean" not in r:
            assert "nothing is shared" in r
