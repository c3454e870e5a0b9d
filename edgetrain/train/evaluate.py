"""Evaluation that tells the truth: BatchNorm statistics that match the weights, per-class figures.

BatchNorm's running statistics trail the weights by roughly 1/momentum steps. A short run (a
few dozen steps on a small dataset) ends with statistics of weights long gone, and evaluation in
eval mode then reports near-chance accuracy for a model that has learned. `recalibrate_bn_`
("precise BN", Wu & Johnson 2021) re-estimates them with the current weights over a bounded,
fixed sample of training images, before every evaluation and before weights are saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

PRECISE_BN_SAMPLES = 512  # training images a re-estimate reads (whole batches, at most)


@torch.no_grad()
def recalibrate_bn_(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device | str = "cpu") -> int:
    """Re-estimate every tracked BatchNorm's running mean and variance as the equal-weight average
    over whole batches of `x` (N, C, H, W) run through `model` in training mode, with the current
    weights. Momentum, the batch counters, the train/eval mode and torch's RNG are left as they
    were (a plan's methods do nothing under no_grad, so every plan gets the plain statistics).
    Returns the number of batches read (0 when the model has no BatchNorm)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    n = x.shape[0] // batch_size * batch_size or x.shape[0]  # whole batches: each weighs the same
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in bns]
    training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    batches = 0
    try:
        with torch.random.fork_rng(devices=[]):  # dropout draws here leave training's RNG alone
            for xb in x[:n].split(batch_size):
                model(xb.to(device, non_blocking=True))
                batches += 1
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
        model.train(training)
    return batches


def precise_bn_sample(train: torch.utils.data.TensorDataset, seed: int, samples: int = PRECISE_BN_SAMPLES):
    """A fixed random sample of training inputs (N, C, H, W): the same images at every evaluation,
    drawn from a generator of its own (the training data order is untouched)."""
    x = train.tensors[0]
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed + 7))[:samples]
    return x[idx]


@dataclass
class Evaluation:
    """Accuracy, mean loss and the confusion matrix (rows: true class, columns: predicted)."""

    accuracy: float
    loss: float
    confusion: list[list[int]]

    @property
    def per_class_accuracy(self) -> list[float | None]:
        return [row[i] / sum(row) if sum(row) else None for i, row in enumerate(self.confusion)]

    @property
    def chance(self) -> float:
        """The accuracy of always predicting the most frequent test class."""
        counts = [sum(row) for row in self.confusion]
        return max(counts) / max(1, sum(counts))

    def learned(self) -> bool:
        """Clearly above chance: at least a tenth of the way from chance to perfect, and 5 points."""
        return self.accuracy >= self.chance + max(0.05, 0.1 * (1 - self.chance))


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, device: torch.device | str = "cpu") -> Evaluation:
    """Accuracy, loss and confusion matrix of `model` (in eval mode) over `loader`."""
    training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss, n = 0.0, 0
    for x, y in loader:
        out = model(x.to(device))
        loss += nn.functional.cross_entropy(out, y.to(device), reduction="sum").item()
        confusion += torch.bincount(y * num_classes + out.argmax(1).cpu(), minlength=num_classes**2).view_as(confusion)
        n += len(y)
    model.train(training)
    correct = confusion.diagonal().sum().item()
    return Evaluation(correct / max(1, n), loss / max(1, n), confusion.tolist())
