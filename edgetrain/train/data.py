"""Training data: the embedded digits (scikit-learn's bundled 8x8 images), an ImageFolder
directory, or CIFAR-10 from a local copy of its python batches. Nothing is downloaded."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from edgetrain.errors import ConfigError
from edgetrain.runtime.data import MEAN, STD, image_folder_arrays, split_indices


@dataclass
class Data:
    """Train and test tensors, already at the model's input shape and normalized."""

    train: TensorDataset
    test: TensorDataset
    classes: list[str]
    input_shape: tuple[int, int, int]
    skipped: list[Path] = field(default_factory=list)  # image files that could not be read

    def loaders(self, batch_size: int, seed: int, device_kind: str = "cpu") -> tuple[DataLoader, DataLoader]:
        g = torch.Generator().manual_seed(seed)
        pin = device_kind != "cpu" and torch.cuda.is_available()
        # a last batch of one would break BatchNorm; any other remainder trains (20 % of a small set)
        drop = len(self.train) % batch_size == 1
        train = DataLoader(self.train, batch_size, shuffle=True, generator=g, drop_last=drop, pin_memory=pin)
        return train, DataLoader(self.test, 256, pin_memory=pin)


def load_data(source: str, size: int, seed: int = 0) -> Data:
    """'digits', a CIFAR-10 python-batches directory, or an ImageFolder directory."""
    if source == "digits":
        return digits(size, seed)
    path = Path(source)
    if not path.is_dir():
        raise ConfigError(f"data {source}: no such directory (use 'digits', an ImageFolder dir or CIFAR-10 batches)")
    if (path / "data_batch_1").is_file():
        return cifar10(path, size)
    return image_folder(path, size, seed)


def digits(size: int, seed: int = 0, test_fraction: float = 0.2) -> Data:
    """scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels), upscaled to size x size, 3 channels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    train_idx, test_idx = _split(y.numpy(), test_fraction, seed)
    x = _to_input(x, size)
    return Data(TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx]),
                [str(i) for i in range(10)], (3, size, size))  # fmt: skip


def _to_input(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, h, w) in [0, 1] -> (N, 3, size, size), normalized."""
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def _split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The runtime's fixed stratified split (one place for it), as index tensors."""
    train, test = split_indices(y, test_fraction, seed)
    return torch.from_numpy(train), torch.from_numpy(test)


def cifar10(path: Path, size: int) -> Data:
    """CIFAR-10 from its python batches (data_batch_1..5, test_batch) in `path`."""

    def load(names):
        xs, ys = [], []
        for n in names:
            try:
                with open(path / n, "rb") as f:
                    b = pickle.load(f, encoding="latin1")
            except (OSError, pickle.UnpicklingError, EOFError) as e:
                raise ConfigError(
                    f"CIFAR-10 batch {path / n} cannot be read ({type(e).__name__}): re-copy it"
                ) from None
            xs.append(np.asarray(b["data"], np.uint8).reshape(-1, 3, 32, 32))
            ys += list(b["labels"])
        return torch.from_numpy(np.concatenate(xs)).float() / 255, torch.tensor(ys)

    xtr, ytr = load([f"data_batch_{i}" for i in range(1, 6) if (path / f"data_batch_{i}").is_file()])
    xte, yte = load(["test_batch"])
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return Data(
        TensorDataset(_to_input(xtr, size), ytr), TensorDataset(_to_input(xte, size), yte), classes, (3, size, size)
    )


def image_folder(path: Path, size: int, seed: int, max_bad_fraction: float = 0.1) -> Data:
    """root/class_x/*.png|jpg...: decoded once (the runtime's decoder), resized; unreadable files are
    skipped, and listed in `data.skipped`."""
    x, y, classes, bad = image_folder_arrays(path, size)
    total = len(y) + len(bad)
    if len(bad) > max_bad_fraction * total:
        raise ConfigError(
            f"data {path}: {len(bad)} of {total} images are unreadable (over {max_bad_fraction:.0%}), e.g. "
            f"{', '.join(str(b) for b in bad[:3])}: fix or remove them"
        )
    x, y = _to_input(torch.from_numpy(x), size), torch.from_numpy(y)
    tr, te = _split(y.numpy(), 0.2, seed)
    return Data(TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te]), classes, (3, size, size), bad)


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2, flip: bool = False) -> torch.Tensor:
    """Random translation by up to `pad` pixels (pad-and-crop) per batch, and, for natural
    images (not digits: a mirrored 2 is no 2), a random horizontal flip per image. (N, C, H, W)"""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    x = padded[:, :, dy : dy + h, dx : dx + w]
    if flip:
        mirror = torch.rand(n, generator=generator) < 0.5  # (N,)
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


def write_sample_photos(out: Path, patch: int = 64, stride: int = 40) -> Path:
    """A small real-photo ImageFolder from scikit-learn's two bundled sample photos (nothing is
    downloaded): out/china/*.jpg and out/flower/*.jpg, patch x patch crops on a `stride` grid
    (150 a class at the defaults). Real colour statistics, for trying a recipe beyond digits."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    for name, img in zip(("china", "flower"), photos.images, strict=True):  # (427, 640, 3) uint8
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(0, img.shape[0] - patch + 1, stride):
            for j in range(0, img.shape[1] - patch + 1, stride):
                Image.fromarray(img[i : i + patch, j : j + patch]).save(out / name / f"{i:03d}_{j:03d}.jpg", quality=90)
    return out
