"""Evaluation that tells the truth: precise BatchNorm statistics, confusion matrix, chance level."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgetrain.methods.base import prepare
from edgetrain.models import create_model
from edgetrain.train.evaluate import Evaluation, evaluate, recalibrate_bn_


def test_recalibration_gives_the_statistics_of_the_current_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
    x = torch.randn(96, 3, 8, 8)
    model[1].num_batches_tracked.fill_(17)
    model.eval()
    torch.manual_seed(3)
    assert recalibrate_bn_(model, x, 32) == 3
    after = torch.rand(4)  # the RNG stream is the one training left, whatever dropout drew
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(4))
    with torch.no_grad():
        h = model[0](x).view(3, 32, 4, -1).transpose(1, 2).reshape(3, 4, -1)  # (batches, C, N*H*W)
    bn = model[1]
    assert torch.allclose(bn.running_mean, h.mean(2).mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, h.var(2, unbiased=True).mean(0), atol=1e-5)
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 17 and not model.training


@pytest.mark.parametrize("methods", [["checkpoint"], ["compress:bits=2"], ["reversible"]])
def test_every_plan_gets_the_plain_statistics(methods):
    """Methods do nothing under no_grad: a planned model's statistics equal the plain one's."""
    torch.manual_seed(0)
    plain = create_model("cifar_resnet20").train()
    planned = prepare(copy.deepcopy(plain), methods)[0]
    if methods == ["reversible"]:  # new blocks, new weights: compare with its own stored-activation twin
        plain = copy.deepcopy(planned)
        for m in plain.modules():
            if hasattr(m, "enabled"):
                m.enabled = False
    x = torch.randn(64, 3, 32, 32)
    recalibrate_bn_(plain, x, 32)
    recalibrate_bn_(planned, x, 32)
    for (name, a), b in zip(plain.named_buffers(), planned.buffers(), strict=True):
        assert torch.equal(a, b), name


def test_evaluate_counts_a_confusion_matrix():
    class Fixed(nn.Module):
        def forward(self, x):  # predicts class x[:, 0]
            return nn.functional.one_hot(x[:, 0].long(), 3).float()

    x = torch.tensor([[0.0], [1.0], [1.0], [2.0], [0.0], [0.0]])
    y = torch.tensor([0, 1, 2, 2, 0, 1])
    ev = evaluate(Fixed(), [(x, y)], 3)
    assert ev.confusion == [[2, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert ev.accuracy == pytest.approx(4 / 6) and ev.per_class_accuracy == [1.0, 0.5, 0.5]
    assert ev.chance == pytest.approx(2 / 6)


@pytest.mark.parametrize("acc,learned", [(0.52, False), (0.56, True), (0.12, False), (0.25, True)])
def test_learned_means_clearly_above_chance(acc, learned):
    k = 2 if acc > 0.5 else 10
    conf = [[10 if i == j else 0 for j in range(k)] for i in range(k)]
    ev = Evaluation(acc, 1.0, conf)
    assert ev.learned() is learned
