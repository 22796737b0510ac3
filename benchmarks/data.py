"""Data sets of the real-data benchmarks; nothing is downloaded at run time.

* :func:`multidigits`: the MultiMNIST analogue of the MGDA paper built from the 1,797 8x8
  handwritten digits bundled with scikit-learn. Two digits are upsampled and overlaid in one
  image, the left one in the top-left corner, the right one shifted down-right (MultiMNIST puts a
  28x28 digit in each corner of a 36x36 canvas, i.e. a digit covers 7/9 of the side and the two
  are offset by 2/9 of it; we keep those proportions). Task *left* / *right*: the class of each
  digit. Test images are built only from held-out source digits (a fixed 70/30 split).
* :func:`diabetes_mixed`: regression + binary + multi-class targets from the real columns of the
  diabetes data bundled with scikit-learn (see its docstring for the choice).
* :func:`utkface`: a loader for the UTKFace layout (``age_gender_race_date.jpg`` files in one
  folder) feeding the mixed and the HydraNet benchmarks when the user has the images;
  :func:`synthetic_faces`: a generated stand-in with the same contract, for the HydraNet
  example without the data.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

#: fraction of the 1,797 scikit-learn digits whose images may appear in training pairs; the rest
#: only ever appear in test pairs.
TRAIN_FRACTION = 0.7
#: the train/test split of the source digits is fixed (independent of ``seed``)
SPLIT_SEED = 0


def digit_side(size: int) -> int:
    """Side (pixels) of one upsampled digit in a ``size x size`` MultiDigits image (7/9 of it)."""
    return round(size * 7 / 9)


def digit_images(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 scikit-learn digits, bilinearly upsampled to ``side x side`` in [0, 1], and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    img = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    img = F.interpolate(img, size=(side, side), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)
    return img, torch.tensor(d.target, dtype=torch.long)


def digit_split(n_digits: int = 1797) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (into ``load_digits()``) of the source digits of the training and the test images."""
    perm = torch.randperm(n_digits, generator=torch.Generator().manual_seed(SPLIT_SEED))
    cut = int(TRAIN_FRACTION * n_digits)
    return perm[:cut].sort().values, perm[cut:].sort().values


def compose(left: torch.Tensor, right: torch.Tensor, size: int) -> torch.Tensor:
    """Overlay digits ``left`` (n, s, s) at the top-left and ``right`` at the bottom-right of a
    ``size x size`` canvas: the pixel-wise maximum of the two placed digits, shape (n, size, size)."""
    n, s = left.shape[0], left.shape[-1]
    x = torch.zeros(n, size, size)
    x[:, :s, :s] = left
    x[:, size - s:, size - s:] = torch.maximum(x[:, size - s:, size - s:], right)
    return x


def multidigits(n_train: int, n_test: int, size: int = 28, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Train and test MultiDigits sets: ``TensorDataset(x, y_left, y_right)``.

    ``x`` is (n, 1, size, size) float in [0, 1], ``y_left``/``y_right`` long in 0..9. The pairs
    are drawn uniformly (with replacement) by ``seed``; training pairs use only the training
    source digits and test pairs only the held-out ones (:func:`digit_split`, fixed). Each data
    set also carries ``.sources``: the (n, 2) indices into ``load_digits()`` of its two digits.
    """
    if size < 12:
        raise ValueError(f"size must be >= 12, got {size}")
    img, labels = digit_images(digit_side(size))
    pools = digit_split(len(labels))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for pool, n in zip(pools, (n_train, n_test)):
        src = pool[torch.randint(len(pool), (n, 2), generator=gen)]
        x = compose(img[src[:, 0]], img[src[:, 1]], size)[:, None]
        ds = TensorDataset(x, labels[src[:, 0]], labels[src[:, 1]])
        ds.sources = src  # type: ignore[attr-defined]
        out.append(ds)
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------
# mixed task types

#: age-group boundaries (years): the terciles of the 442 diabetes patients' ages
AGE_BINS = (43.0, 55.0)
DIABETES_INPUTS = ("bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")


def diabetes_mixed(test_fraction: float = 0.25, split_seed: int = 0):
    """Three tasks of different kinds on the diabetes data bundled with scikit-learn (Efron et al.
    2004; 442 patients, no download).

    Inputs: the 8 clinical measurements ``bmi, bp, s1..s6`` (standardised with the training
    set's mean and std). Targets, all from real columns:

    * ``progression`` (float): the data set's own regression target, a quantitative measure of
      disease progression one year after baseline (25..346), fitted with an L1 loss on its raw
      scale, so its loss is ~50x the classification losses;
    * ``sex`` (0/1): the recorded sex (raw values 1/2), a binary target (BCE);
    * ``age_group`` (0/1/2): the recorded age cut at its terciles :data:`AGE_BINS`
      (< 43, 43..54, >= 55 years), a 3-class target (cross-entropy), as UTKFace's age is
      often binned.

    This is the only data set bundled with scikit-learn whose real columns give a continuous
    regression target, a binary one and a categorical one at once (wine and iris have a
    multi-class label but no binary column, breast cancer only a binary label); age and sex are
    removed from the inputs since they are targets.

    Returns ``(train, test, info)``: two ``TensorDataset(x, progression, sex, age_group)`` and a
    dict with the column names and the normalisation.
    """
    from sklearn.datasets import load_diabetes

    d = load_diabetes(scaled=False)
    cols = list(d.feature_names)
    data = np.asarray(d.data, dtype=np.float64)
    x = data[:, [cols.index(c) for c in DIABETES_INPUTS]]
    progression = np.asarray(d.target, dtype=np.float64)
    sex = (data[:, cols.index("sex")] == 2).astype(np.int64)
    age = data[:, cols.index("age")]
    age_group = np.digitize(age, AGE_BINS).astype(np.int64)  # < 43 -> 0, [43, 55) -> 1, >= 55 -> 2
    perm = np.random.default_rng(split_seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    mu, sd = x[train_idx].mean(0), x[train_idx].std(0)

    def make(idx):
        return TensorDataset(torch.tensor((x[idx] - mu) / sd, dtype=torch.float32),
                             torch.tensor(progression[idx], dtype=torch.float32),
                             torch.tensor(sex[idx], dtype=torch.float32),
                             torch.tensor(age_group[idx]))

    info = {"inputs": DIABETES_INPUTS, "mean": mu, "std": sd, "train_idx": train_idx, "test_idx": test_idx}
    return make(train_idx), make(test_idx), info


# ----------------------------------------------------------------------------------------------
# UTKFace

#: ``age_gender_race_date.jpg``, optionally followed by ``.chip.jpg`` (the aligned-and-cropped release)
UTK_NAME = re.compile(r"^(\d{1,3})_([01])_([0-4])_(\d+)\.jpg(\.chip\.jpg)?$", re.IGNORECASE)
UTK_RACES = ("white", "black", "asian", "indian", "others")


def parse_utkface_name(name: str) -> tuple[int, int, int]:
    """``(age, gender, race)`` from a UTKFace file name ``age_gender_race_date.jpg[.chip.jpg]``.

    gender: 0 male, 1 female; race: 0 white, 1 black, 2 asian, 3 indian, 4 others.

    Raises:
        ValueError: the name does not follow that layout (e.g. a missing field, a gender
            outside 0/1, a race outside 0..4, not a .jpg).
    """
    m = UTK_NAME.match(name)
    if m is None:
        raise ValueError(f"not a UTKFace file name (age_gender_race_date.jpg with gender 0/1 and "
                         f"race 0..4): {name!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def utkface(folder: str | Path, size: int = 64, strict: bool = True, limit: int | None = None) -> TensorDataset:
    """UTKFace images from ``folder``: ``TensorDataset(x, age, gender, race)``.

    ``x`` is (n, 3, size, size) float in [0, 1] (RGB, resized), ``age`` float (years), ``gender``
    float 0/1 (BCE target), ``race`` long 0..4. Files are read in sorted name order; only
    ``*.jpg`` files are considered (other files are ignored). ``limit`` keeps the first ``limit``.

    ``strict=True`` raises on the first malformed name; ``strict=False`` skips malformed names
    and unreadable images with one warning naming how many were skipped; the skipped names are
    in the returned data set's ``.skipped`` list.

    Raises:
        ValueError: ``folder`` is not a directory, holds no ``.jpg`` file, holds a malformed name
            (``strict=True``) or no usable image at all.
    """
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"UTKFace folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(".jpg"))
    if not files:
        raise ValueError(f"no .jpg files in {folder} (expected UTKFace names age_gender_race_date.jpg)")
    xs, ages, genders, races, skipped = [], [], [], [], []
    for p in files:
        try:
            age, gender, race = parse_utkface_name(p.name)
        except ValueError:
            if strict:
                raise
            skipped.append(p.name)
            continue
        try:
            with Image.open(p) as im:
                im = im.convert("RGB").resize((size, size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except OSError as err:
            if strict:
                raise ValueError(f"cannot read image {p.name}: {err}") from err
            skipped.append(p.name)
            continue
        xs.append(torch.from_numpy(arr).permute(2, 0, 1))
        ages.append(float(age))
        genders.append(float(gender))
        races.append(race)
        if limit is not None and len(xs) >= limit:
            break
    if skipped:
        warnings.warn(f"utkface: skipped {len(skipped)} file(s) with a malformed name or unreadable "
                      f"image, e.g. {skipped[:3]}", stacklevel=2)
    if not xs:
        raise ValueError(f"no usable UTKFace image in {folder}")
    ds = TensorDataset(torch.stack(xs), torch.tensor(ages), torch.tensor(genders), torch.tensor(races))
    ds.skipped = skipped  # type: ignore[attr-defined]
    return ds


#: class proportions of the synthetic stand-in's races (white, black, asian, indian, others):
#: imbalanced like UTKFace, where white is the largest class and "others" the smallest
SYNTH_RACE_P = (0.42, 0.19, 0.15, 0.17, 0.07)
#: one mean RGB colour per synthetic race class (the cue the race head has to read)
SYNTH_COLOURS = ((0.95, 0.80, 0.70), (0.50, 0.33, 0.25), (0.90, 0.75, 0.40), (0.72, 0.50, 0.32),
                 (0.70, 0.62, 0.85))


def synthetic_faces(n: int, size: int = 32, seed: int = 0, noise: float = 0.08) -> TensorDataset:
    """A synthetic stand-in for UTKFace with the same contract as :func:`utkface`:
    ``TensorDataset(x, age, gender, race)``, ``x`` (n, 3, size, size) in [0, 1].

    Each image is a disc ("face") on a dark background; each label sets one visible property,
    so the three tasks are learnable from the pixels and conflict only through the shared trunk:

    * ``race`` (0..4, drawn with :data:`SYNTH_RACE_P`): the disc's colour (:data:`SYNTH_COLOURS`);
    * ``gender`` (0/1, balanced): a texture on the disc, horizontal (0) or vertical (1) stripes;
    * ``age`` (1..90 years; a normal around 33 with sd 17, clipped, so most are young adults):
      the disc's radius, from 0.18 to 0.45 of the side, growing with age.

    The disc centre moves by up to 1/10 of the side, and Gaussian pixel noise (``noise``) is
    added. Deterministic by ``seed``.
    """
    if n < 1 or size < 8:
        raise ValueError(f"need n >= 1 and size >= 8, got n={n}, size={size}")
    g = torch.Generator().manual_seed(seed)
    race = torch.multinomial(torch.tensor(SYNTH_RACE_P), n, replacement=True, generator=g)
    gender = torch.randint(0, 2, (n,), generator=g)
    age = (33.0 + 17.0 * torch.randn(n, generator=g)).round().clamp(1, 90)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # pixel centres in (0, 1)
    yy, xx = coords[:, None], coords[None, :]
    shift = (torch.rand(n, 2, generator=g) - 0.5) * 0.2
    radius = 0.18 + 0.27 * (age - 1) / 89
    dist = ((yy[None] - 0.5 - shift[:, 0, None, None]) ** 2 + (xx[None] - 0.5 - shift[:, 1, None, None]) ** 2).sqrt()
    disc = (dist <= radius[:, None, None]).float()  # (n, size, size)
    period = max(2.0, size / 6)
    stripes_h = torch.cos(2 * math.pi * yy * size / period).expand(size, size)
    stripes_v = torch.cos(2 * math.pi * xx * size / period).expand(size, size)
    texture = torch.where(gender[:, None, None] == 1, stripes_v, stripes_h)
    colour = torch.tensor(SYNTH_COLOURS)[race]  # (n, 3)
    face = colour[:, :, None, None] * (1 + 0.1 * texture[:, None])
    x = 0.1 * (1 - disc[:, None]) + face * disc[:, None]
    x = (x + noise * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return TensorDataset(x, age, gender.float(), race)
