"""How the ROI reaches the codec and the loss: latent ROI maps, the attention prior,
the lambda map's normalisations, ROI-centred crops and the learning-rate schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.codec.layers import LatentMaskAttention, pool_mask
from pipeline.data.dataset import random_crops
from pipeline.train.loss import lambda_map
from pipeline.train.steps import learning_rate
from pipeline.train.trainer import TrainConfig, TrainError


def test_pool_mask_keeps_small_objects_and_only_raises_neighbours():
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 20:23, 36:39] = 1.0  # a 3x3-pixel object inside latent cell (1, 2) of a 4x4 grid
    roi = pool_mask(mask, (4, 4))
    assert roi[0, 0, 1, 2] == 1.0 and roi.sum() == 1.0  # full weight, not 9/256
    smooth = pool_mask(mask, (4, 4), smooth_kernel=3)
    assert smooth[0, 0, 1, 2] == 1.0  # the ROI cell stays ROI
    assert 0 < smooth[0, 0, 0, 1] < 1 and smooth[0, 0, 3, 0] == 0  # a soft ring, nothing far away


def test_untrained_attention_is_the_tlic_scaling():
    attention = LatentMaskAttention(channels=8, prior_alpha=0.1)
    y = torch.randn(1, 8, 4, 4)
    mask = torch.full((1, 1, 64, 64), 0.3)  # non-ROI value 0.3 everywhere ...
    mask[..., :16, :16] = 1.0  # ... except one ROI cell
    expected = (pool_mask(mask, (4, 4), 3) + 0.1) / 1.1
    assert torch.allclose(attention(y, mask), y * expected, atol=1e-6)
    assert torch.allclose(LatentMaskAttention(8, prior_alpha=None)(y, mask), y)


def test_lambda_map_normalisations():
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, 0, 0] = 1.0
    mask[1, :, 1:] = 0.5  # the second image: background at Q = 0.5
    alpha = torch.tensor([0.01, 0.04])
    roi = lambda_map(mask, alpha, omega=3.0, normalize="roi")
    assert torch.allclose(roi[:, 0, 0, 0], alpha)  # ROI pixels get the rate point's lambda
    assert math.isclose(roi[0, 0, 3, 3].item(), 0.01 * math.exp(-3.0), rel_tol=1e-6)
    assert math.isclose(roi[1, 0, 3, 3].item(), 0.04 * math.exp(-1.5), rel_tol=1e-6)
    mean = lambda_map(mask, alpha, omega=3.0, normalize="mean")
    assert torch.allclose(mean.mean(dim=(1, 2, 3)), alpha)
    assert torch.allclose(mean / mean[:, :, :1, :1], roi / roi[:, :, :1, :1])  # same ROI/background ratios
    with pytest.raises(ValueError, match="normalisation"):
        lambda_map(mask, 0.01, 3.0, normalize="max")


def test_roi_crops_are_centred_on_the_roi():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    mask = np.zeros((256, 256), np.float32)
    mask[200:210, 10:20] = 1.0  # a small object near a corner
    centred = random_crops(image, mask, 64, 20, rng, flip=False, roi_fraction=1.0)
    assert all(m.max() > 0 for _, m in centred)
    uniform = random_crops(image, mask, 64, 200, rng, flip=False)
    assert sum(m.max() > 0 for _, m in uniform) < 60  # uniform windows mostly miss it
    no_roi = random_crops(image, np.zeros_like(mask), 64, 3, rng, roi_fraction=1.0)
    assert len(no_roi) == 3  # no ROI: uniform windows


def test_learning_rate_drops_for_the_last_share_of_the_steps():
    schedule = [learning_rate(step, 10, 1e-3, 0.2) for step in range(10)]
    assert schedule == [1e-3] * 8 + [1e-4] * 2
    assert learning_rate(9, 10, 1e-3, 0.0) == 1e-3


@pytest.mark.parametrize("bad, message", [({"lambda_norm": "max"}, "normalisation"),
                                          ({"lr_drop": 1.5}, "lr_drop"),
                                          ({"roi_crop_fraction": -0.1}, "roi_crop_fraction")])
def test_bad_loss_and_schedule_settings_are_one_line_errors(tmp_path, bad, message):
    with pytest.raises(TrainError, match=message):
        TrainConfig(shards=str(tmp_path), **bad).resolved()
