"""Multi-label losses: the asymmetric loss against its definition and its limits."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from finetune.losses import LossConfig, MultiLabelLoss


def test_asymmetric_loss_is_bce_without_focusing_or_clip_and_ignores_easy_negatives() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 11, requires_grad=True)
    targets = (torch.rand(8, 11) < 0.3).float()
    plain = MultiLabelLoss(config=LossConfig(kind="asl", asl_gamma_positive=0, asl_gamma_negative=0, asl_clip=0))
    torch.testing.assert_close(plain(logits, targets), F.binary_cross_entropy_with_logits(logits, targets))

    asl = MultiLabelLoss(config=LossConfig(kind="asl"))  # gamma+ 0, gamma- 4, clip 0.05
    easy = torch.full((1, 11), -4.0, requires_grad=True)  # p = 0.018 < clip: no loss, no gradient
    assert asl(easy, torch.zeros(1, 11)).item() == 0.0
    asl(easy, torch.zeros(1, 11)).backward()
    assert torch.count_nonzero(easy.grad) == 0
    hard = torch.tensor([[2.0]])  # a confident false positive: q = p - 0.05, loss q^4 * -log(1 - q)
    q = torch.sigmoid(hard) - 0.05
    torch.testing.assert_close(asl(hard, torch.zeros(1, 1)), (q**4 * -torch.log(1 - q)).mean())
    positive = torch.tensor([[-1.0]])  # positives keep the full log-likelihood (gamma+ 0)
    torch.testing.assert_close(asl(positive, torch.ones(1, 1)), -F.logsigmoid(positive).mean())


def test_unknown_loss_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="bce, focal, asl"):
        MultiLabelLoss(config=LossConfig(kind="hinge"))
