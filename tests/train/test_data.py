from __future__ import annotations

import torch

from edgetrain.train.data import augment, digits


def test_digits_split_is_fixed_stratified_and_shaped():
    a, b = digits(16, seed=0), digits(16, seed=0)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert a.input_shape == (3, 16, 16) and len(a.train) + len(a.test) == 1797
    counts = torch.bincount(a.test.tensors[1], minlength=10)
    assert counts.min() >= 30 and counts.max() <= 40  # ~20% of each class
    assert not torch.equal(digits(16, seed=1).test.tensors[1], a.test.tensors[1])


def test_augment_translates_and_flips_reproducibly():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = augment(x, g1, flip=True), augment(x, g2, flip=True)
    assert a.shape == x.shape and torch.equal(a, b)
    flips = [
        not torch.equal(augment(x[:1], torch.Generator().manual_seed(s), pad=0, flip=True), x[:1]) for s in range(20)
    ]
    assert 3 < sum(flips) < 17  # about half the images mirrored
    assert torch.equal(augment(x, torch.Generator().manual_seed(0), pad=0, flip=False), x)
