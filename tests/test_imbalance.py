"""Class-imbalance losses (engine/train/optim.py) against the formulas in their papers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hamengine.config import Balance, TrainConfig
from hamengine.engine.train.optim import EFFECTIVE_BETA, LogitAdjustedLoss, build_criterion, class_weights

LABELS = np.array([0] * 58 + [1] * 10 + [2] * 1 + [4] * 3)  # class 3 absent, 58:1 like nv:df


def test_inverse_frequency_weights():
    w = class_weights(LABELS, 5).numpy()
    counts = np.array([58, 10, 1, 0, 3.0])
    ref = np.where(counts > 0, 1 / np.maximum(counts, 1), 0)
    ref = ref / ref[counts > 0].mean()
    np.testing.assert_allclose(w, ref, rtol=1e-6)
    assert w[3] == 0 and w[2] / w[0] == pytest.approx(58)


def test_effective_number_weights():
    beta = 0.9
    w = class_weights(LABELS, 5, beta=beta).numpy()
    counts = np.array([58, 10, 1, 0, 3.0])
    eff = (1 - beta ** counts) / (1 - beta)  # Cui et al. eq. 3: effective number of samples
    ref = np.where(counts > 0, 1 / np.where(counts > 0, eff, 1), 0)
    np.testing.assert_allclose(w, ref / ref[counts > 0].mean(), rtol=1e-5)
    # flatter than inverse frequency: the big class is weighted up relative to the rare one
    assert w[2] / w[0] < 58


def test_logit_adjusted_loss_is_ce_of_shifted_logits():
    torch.manual_seed(0)
    z, y = torch.randn(16, 5), torch.randint(0, 5, (16,))
    loss = LogitAdjustedLoss(LABELS, 5, tau=1.0)(z, y)
    counts = np.bincount(LABELS, minlength=5) + 1.0
    ref = F.cross_entropy(z + torch.tensor(np.log(counts / counts.sum()), dtype=torch.float32), y)
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    # a frequent class's logit is pushed down relative to a rare one: at equal z the loss of a rare
    # target is larger than that of the frequent one
    zz = torch.zeros(2, 5)
    per = [float(LogitAdjustedLoss(LABELS, 5)(zz[:1], torch.tensor([c]))) for c in (0, 2)]
    assert per[1] > per[0]


@pytest.mark.parametrize("balance", list(Balance))
def test_build_criterion_every_balance(balance):
    crit = build_criterion(TrainConfig(balance=balance, label_smoothing=0.0), LABELS, 5)
    z, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    loss = crit(z, y)
    assert torch.isfinite(loss)
    if balance in (Balance.NONE, Balance.SAMPLER):
        assert float(loss) == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-6)
    if balance == Balance.EFFECTIVE:
        w = class_weights(LABELS, 5, beta=EFFECTIVE_BETA)
        assert float(loss) == pytest.approx(float(F.cross_entropy(z, y, weight=w)), rel=1e-6)
