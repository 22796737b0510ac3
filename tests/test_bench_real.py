"""The real-data benchmarks: MultiDigits, mixed task types (diabetes), the UTKFace loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradbalance as gb
from benchmarks import mixed, multidigits
from benchmarks.data import (
    AGE_BINS,
    compose,
    diabetes_mixed,
    digit_images,
    digit_side,
    digit_split,
    parse_utkface_name,
    utkface,
)
from benchmarks.data import (
    multidigits as make_multidigits,
)
from benchmarks.training import default_methods


@pytest.fixture(autouse=True)
def _no_progress(monkeypatch):
    monkeypatch.setenv("GRADBALANCE_NO_PROGRESS", "1")


def _table_rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]


# ---------------------------------------------------------------- MultiDigits data


@pytest.mark.parametrize("size", [28, 32])
def test_multidigits_image_is_the_overlay_of_its_two_labelled_source_digits(size):
    train, test = make_multidigits(40, 30, size=size, seed=3)
    side = digit_side(size)
    img, labels = digit_images(side)
    off = size - side
    assert 0 < off < side  # the two digits overlap, as in MultiMNIST
    for ds, n in ((train, 40), (test, 30)):
        x, yl, yr = ds.tensors
        assert x.shape == (n, 1, size, size) and x.dtype == torch.float32
        assert yl.dtype == torch.long and yr.dtype == torch.long
        src = ds.sources
        assert torch.equal(yl, labels[src[:, 0]]) and torch.equal(yr, labels[src[:, 1]])
        # by hand: left digit at (0, 0), right digit at (off, off), pixel-wise maximum
        for i in range(n):
            canvas = torch.zeros(size, size)
            canvas[:side, :side] = img[src[i, 0]]
            canvas[off:, off:] = torch.maximum(canvas[off:, off:], img[src[i, 1]])
            assert torch.equal(x[i, 0], canvas)
        # the corners only one digit covers are exactly that digit
        assert torch.equal(x[:, 0, :off, :side], img[src[:, 0]][:, :off, :])
        assert torch.equal(x[:, 0, side:, off:], img[src[:, 1]][:, side - off:, :])
        assert 0 <= float(x.min()) and float(x.max()) <= 1


def test_multidigits_labels_are_those_of_the_scikit_learn_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    train, _ = make_multidigits(25, 5, seed=0)
    src = train.sources.numpy()
    assert (train.tensors[1].numpy() == d.target[src[:, 0]]).all()
    assert (train.tensors[2].numpy() == d.target[src[:, 1]]).all()
    # the upsampled digit keeps the 8x8 picture: downsample back by block means and compare
    img, _ = digit_images(32)
    back = img.reshape(-1, 8, 4, 8, 4).mean(dim=(2, 4)).numpy()
    assert np.corrcoef(back[src[:, 0]].ravel(), d.images[src[:, 0]].ravel())[0, 1] > 0.97


def test_multidigits_train_and_test_use_disjoint_source_digits():
    tr_pool, te_pool = digit_split()
    assert len(set(tr_pool.tolist()) & set(te_pool.tolist())) == 0
    assert len(tr_pool) + len(te_pool) == 1797
    train, test = make_multidigits(3000, 1000, seed=1)
    used_tr, used_te = set(train.sources.flatten().tolist()), set(test.sources.flatten().tolist())
    assert used_tr <= set(tr_pool.tolist()) and used_te <= set(te_pool.tolist())
    assert not used_tr & used_te
    # no test image equals a training image pixel for pixel
    tr = {bytes(r.numpy().tobytes()) for r in train.tensors[0]}
    assert not any(bytes(r.numpy().tobytes()) in tr for r in test.tensors[0])


def test_multidigits_is_deterministic_by_seed_and_the_split_does_not_depend_on_it():
    a = make_multidigits(50, 20, seed=5)
    b = make_multidigits(50, 20, seed=5)
    c = make_multidigits(50, 20, seed=6)
    for da, db in zip(a, b):
        assert all(torch.equal(s, t) for s, t in zip(da.tensors, db.tensors))
    assert not torch.equal(a[0].tensors[0], c[0].tensors[0])
    pool = set(digit_split()[1].tolist())
    assert set(c[1].sources.flatten().tolist()) <= pool


def test_compose_overlays_by_maximum():
    left, right = torch.zeros(1, 3, 3), torch.zeros(1, 3, 3)
    left[0, 2, 2], right[0, 0, 0] = 0.4, 0.9
    x = compose(left, right, 4)
    assert x.shape == (1, 4, 4)
    assert float(x[0, 1, 1]) == pytest.approx(0.9)  # right's (0,0) lands on (1,1)
    right[0, 1, 1] = 0.1
    assert float(compose(left, right, 4)[0, 2, 2]) == pytest.approx(0.4)  # max(0.4, 0.1)


def test_ddp_example_reads_the_same_contract():
    from benchmarks.ddp_multidigits import digits_data

    (x, yl, yr), (xt, _, _) = digits_data(16, 8, size=32)
    assert x.shape == (16, 1, 32, 32) and xt.shape == (8, 1, 32, 32)
    assert yl.dtype == torch.long and yr.shape == (16,)


# ---------------------------------------------------------------- mixed data


def test_diabetes_targets_are_the_real_columns():
    from sklearn.datasets import load_diabetes

    d = load_diabetes(scaled=False)
    train, test, info = diabetes_mixed()
    assert len(train) + len(test) == 442
    assert not set(info["train_idx"]) & set(info["test_idx"])
    for ds, idx in ((train, info["train_idx"]), (test, info["test_idx"])):
        x, prog, sex, age_group = ds.tensors
        assert x.shape == (len(idx), 8)
        np.testing.assert_allclose(prog.numpy(), d.target[idx], rtol=1e-6)  # the regression target
        assert prog.dtype == torch.float32 and sex.dtype == torch.float32 and age_group.dtype == torch.long
        np.testing.assert_array_equal(sex.numpy(), (d.data[idx, 1] == 2).astype(np.float32))
        age = d.data[idx, 0]
        expected = (age >= AGE_BINS[0]).astype(int) + (age >= AGE_BINS[1]).astype(int)
        np.testing.assert_array_equal(age_group.numpy(), expected)
        # inputs are bmi, bp, s1..s6 (not age or sex), standardised with the training statistics
        raw = d.data[idx][:, 2:]
        np.testing.assert_allclose(x.numpy(), (raw - info["mean"]) / info["std"], rtol=1e-4, atol=1e-5)
    # binary really has two values, multi-class three roughly balanced groups
    _, _, sex, age_group = train.tensors
    assert set(sex.tolist()) == {0.0, 1.0}
    counts = torch.bincount(age_group, minlength=3)
    assert len(counts) == 3 and int(counts.min()) > 0.2 * len(train)
    assert abs(float(train.tensors[0].mean())) < 1e-5


# ---------------------------------------------------------------- UTKFace


def _write_jpegs(folder, names, size=12):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        arr = rng.integers(0, 255, (size, size + 3, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / name, format="JPEG")


UTK_NAMES = ["25_0_2_20170116174525125.jpg.chip.jpg", "1_1_0_20161219140623097.jpg",
             "80_0_4_20170117174455520.jpg", "33_1_3_20170104201716125.jpg", "40_0_1_20170113150530556.jpg",
             "7_1_2_20161219201408497.jpg", "61_1_0_20170109142408075.jpg", "19_0_3_20170116212544221.jpg",
             "52_1_4_20170117153031239.jpg", "29_0_0_20170117140025003.jpg"]


def test_utkface_name_parsing():
    assert parse_utkface_name("25_0_2_20170116174525125.jpg.chip.jpg") == (25, 0, 2)
    assert parse_utkface_name("100_1_4_20170112213303693.jpg") == (100, 1, 4)
    for bad in ["39_1_20170116174525125.jpg", "25_2_0_20170116174525125.jpg", "25_0_5_2017.jpg",
                "a_0_1_2017.jpg", "25_0_1_2017.png", "25_0_1.jpg", ""]:
        with pytest.raises(ValueError, match="UTKFace"):
            parse_utkface_name(bad)


def test_utkface_loader_reads_images_and_labels(tmp_path):
    _write_jpegs(tmp_path / "utk", UTK_NAMES)
    (tmp_path / "utk" / "README.txt").write_text("not an image, ignored")
    ds = utkface(tmp_path / "utk", size=16)
    x, age, gender, race = ds.tensors
    assert x.shape == (len(UTK_NAMES), 3, 16, 16) and 0 <= float(x.min()) and float(x.max()) <= 1
    expected = sorted(UTK_NAMES)
    assert age.tolist() == [float(n.split("_")[0]) for n in expected]
    assert gender.tolist() == [float(n.split("_")[1]) for n in expected]
    assert race.tolist() == [int(n.split("_")[2]) for n in expected] and race.dtype == torch.long
    assert ds.skipped == []


def test_utkface_loader_rejects_malformed_names_or_skips_them(tmp_path):
    folder = tmp_path / "utk"
    _write_jpegs(folder, UTK_NAMES[:3] + ["39_1_20170116174525125.jpg.chip.jpg"])
    with pytest.raises(ValueError, match="39_1_2017"):
        utkface(folder, size=8)
    (folder / "30_1_1_2017.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="skipped 2"):
        ds = utkface(folder, size=8, strict=False)
    assert len(ds) == 3 and sorted(ds.skipped) == ["30_1_1_2017.jpg", "39_1_20170116174525125.jpg.chip.jpg"]


def test_utkface_loader_empty_or_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .jpg"):
        utkface(tmp_path / "empty")
    with pytest.raises(ValueError, match="not found"):
        utkface(tmp_path / "missing")


# ---------------------------------------------------------------- the scripts


def test_default_methods_cover_the_registry_once():
    methods, skipped = default_methods()
    assert set(methods) | {m for m, _ in skipped} == set(gb.available_methods())
    assert "uw" in methods and ("uncertainty" in {m for m, _ in skipped}) == ("uncertainty" in gb.available_methods())


def test_multidigits_quick_run_writes_one_row_per_method(tmp_path):
    out = tmp_path / "md.md"
    methods = ["mean", "mgda_ub", "pcgrad", "no_such_method"]
    text = multidigits.main(["--quick", "--train", "64", "--test", "32", "--methods", *methods, "--out", str(out)])
    assert out.read_text() == text and out.with_suffix(".png").stat().st_size > 1000
    rows = _table_rows(text)
    assert [r[0] for r in rows] == methods[:3]
    for r in rows:
        for cell in r[1:3]:
            m, s = cell.split(" ± ")
            assert 0 <= float(m) <= 100
        assert float(r[3]) > 0
    assert "`no_such_method`: not registered" in text
    assert "Environment:" in text and "Command: `python -m benchmarks multidigits --quick" in text


def test_mixed_quick_run_writes_one_row_per_method(tmp_path):
    out = tmp_path / "mixed.md"
    methods = ["mean", "uw", "mgda"]
    text = mixed.main(["--quick", "--methods", *methods, "--out", str(out)])
    assert out.read_text() == text and out.with_suffix(".png").exists()
    rows = _table_rows(text)
    assert [r[0] for r in rows] == [*methods, "*constant predictor*"]
    for r in rows[:-1]:
        mae = float(r[1].split(" ± ")[0])
        assert 0 < mae < 200
        assert all(0 <= float(c.split(" ± ")[0]) <= 100 for c in r[2:4])


def test_mixed_quick_run_on_utkface_layout(tmp_path):
    folder = tmp_path / "UTKFace"
    _write_jpegs(folder, UTK_NAMES + ["bad_name.jpg"], size=20)
    out = tmp_path / "utk.md"
    with pytest.warns(UserWarning, match="skipped 1"):
        text = mixed.main(["--quick", "--utkface", str(folder), "--size", "16", "--methods", "mean", "mgda",
                           "--out", str(out)])
    rows = _table_rows(text)
    assert [r[0] for r in rows] == ["mean", "mgda", "*constant predictor*"]
    assert "10 usable, 1 skipped" in text and "age MAE" in text
