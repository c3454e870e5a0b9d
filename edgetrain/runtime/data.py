"""Input pipeline in numpy alone (no torch): the board's copy of edgetrain's preprocessing.

The torch pipeline (`edgetrain.train.data`) uses the same constants and split, and a test checks
that both give the same arrays for the same images: resize (bilinear, half-pixel centres, as
torch's `interpolate(align_corners=False)`), grey to 3 channels, then (x - mean) / std.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgetrain.errors import ConfigError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".gif", ".webp")


def split_indices(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed stratified split: the same images are test images for every run with this seed."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test += idx[: max(1, int(round(len(idx) * test_fraction)))].tolist()
    mask = np.zeros(len(y), bool)
    mask[test] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _axis_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation matrix with half-pixel centres, edges clamped."""
    src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, None)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).astype(np.float32)
    w = np.zeros((n_out, n_in), np.float32)
    w[np.arange(n_out), lo] += 1 - frac
    w[np.arange(n_out), hi] += frac
    return w


def resize_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """(N, C, h, w) -> (N, C, size, size), as torch's bilinear interpolate without antialiasing."""
    wh, ww = _axis_weights(x.shape[2], size), _axis_weights(x.shape[3], size)
    return np.einsum("oh,nchw,pw->ncop", wh, x.astype(np.float32), ww, optimize=True).astype(np.float32)


def to_input(x: np.ndarray, size: int, mean=MEAN, std=STD) -> np.ndarray:
    """(N, C, h, w) in [0, 1] -> (N, 3, size, size) float32, normalized."""
    x = resize_bilinear(x, size) if x.shape[2:] != (size, size) else x.astype(np.float32)
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    m, s = np.asarray(mean, np.float32).reshape(1, 3, 1, 1), np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - m) / s, dtype=np.float32)


def digits_arrays(shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (N, 1, 8, 8) in [0, 1] and labels; `shift` moves every image right
    and down by that many pixels (a held-out distribution the base model has not seen)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    if shift:
        x = np.roll(np.roll(x, shift, axis=2), shift, axis=3)
        x[:, :, :shift, :] = 0
        x[:, :, :, :shift] = 0
    return x, d.target.astype(np.int64)


def digits_shift(spec: str) -> int:
    """The shift of a digits spec: 'digits' -> 0, 'digits:shift=K' -> K (0 <= K < 8); anything
    else after 'digits:' is refused, not ignored."""
    _, _, opt = spec.partition(":")
    if not opt:
        return 0
    key, eq, value = opt.partition("=")
    if key != "shift" or not eq:
        raise ConfigError(f"data {spec}: digits takes one option, shift=K (pixels, 0-7), e.g. digits:shift=2")
    try:
        shift = int(value)
    except ValueError:
        raise ConfigError(f"data {spec}: shift must be a whole number of pixels (0-7), got {value!r}") from None
    if not 0 <= shift < 8:
        raise ConfigError(f"data {spec}: shift must be 0-7 pixels (the digits are 8x8), got {shift}")
    return shift


def image_folder_arrays(path: Path, size: int) -> tuple[np.ndarray, np.ndarray, list[str], list[Path]]:
    """root/<class>/*.png|jpg... decoded with PIL, resized to size x size: (N, 3, size, size) in [0, 1],
    labels, class names, and the files that could not be read."""
    from PIL import Image

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"data {path}: no class sub-directories (expected {path}/<class>/<image files>)")
    xs, ys, bad, total = [], [], [], 0
    for label, c in enumerate(classes):
        for f in sorted((path / c).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            total += 1
            try:
                with Image.open(f) as im:
                    arr = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), np.float32) / 255
            except (OSError, ValueError):
                bad.append(f)
                continue
            xs.append(arr.transpose(2, 0, 1))
            ys.append(label)
    if total == 0:
        raise ConfigError(f"data {path}: the class directories hold no image files")
    if not xs:
        raise ConfigError(f"data {path}: all {total} images are unreadable: fix or remove them")
    return np.stack(xs), np.asarray(ys, np.int64), classes, bad
