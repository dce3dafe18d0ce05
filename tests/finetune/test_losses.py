"""Multi-label losses: the asymmetric loss against its definition and its limits; the agreement of two views."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from core.errors import UserError
from core.recipe import load_recipe
from finetune.losses import LossConfig, MultiLabelLoss, view_agreement
from finetune.train import FinetuneRecipe


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


def test_view_agreement_is_soft_bce_or_fixmatch_hard_targets_on_the_sure_instruments() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]], requires_grad=True)
    other = torch.tensor([[0.97, 0.02, 0.6, 0.3]])  # the other view: sure present, sure absent, unsure, unsure
    torch.testing.assert_close(view_agreement(logits, other), F.binary_cross_entropy_with_logits(logits, other))
    hard = view_agreement(logits, other, confidence=0.95)
    expected = (F.binary_cross_entropy_with_logits(logits[0, :2], torch.tensor([1.0, 0.0]), reduction="sum") / 4)
    torch.testing.assert_close(hard, expected)  # averaged over all entries, the unsure ones counting zero
    hard.backward()
    assert logits.grad[0, 2:].eq(0).all() and logits.grad[0, :2].ne(0).all()
    assert view_agreement(logits, other, confidence=0.99).item() == 0  # nothing sure enough: no term at all


def test_consistency_confidence_outside_half_to_one_is_a_recipe_error(tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("consistency: {weight: 1.0, confidence: 0.3}\n")
    with pytest.raises(UserError, match="confidence is 0 \\(soft targets\\) or a probability in \\(0.5, 1\\)"):
        load_recipe(recipe, [], FinetuneRecipe)
    assert load_recipe(recipe, ["consistency.confidence=0.9"], FinetuneRecipe).consistency.confidence == 0.9
