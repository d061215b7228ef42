"""Text prompts mean something: a tiny CLIP trained on coloured shapes (:mod:`tiny_clip`) gives,
through the service's TextMasker, a mask for one shape's caption that covers that shape and not
the others; the same check on the untrained model fails, so it cannot pass trivially."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.masks.ops import binarize
from pipeline.masks.text import TextMasker

from tiny_clip import iou, patch_tokens, pixels, scene

pytestmark = pytest.mark.slow
SCENES = (1000, 1001, 1002)  # held out: training draws its scenes from seed 0's generator


def caption_ious(masker: TextMasker, seed: int) -> np.ndarray:
    """IoU of each shape's caption mask (binarised at 0.5) with each shape's region: (caption, region)."""
    image, shapes, regions = scene(seed)
    masks = [binarize(masker(image, s.caption)) > 0 for s in shapes]
    return np.array([[iou(m, r) for r in regions] for m in masks])


def test_caption_masks_cover_their_shape_only(trained_clip):
    config, checkpoint = trained_clip
    masker = TextMasker("tiny", str(checkpoint), config=config)  # as the service builds it
    for seed in SCENES:
        ious = caption_ious(masker, seed)
        own, others = np.diag(ious), ious[~np.eye(len(ious), dtype=bool)]
        assert (own >= 0.5).all() and (others <= 0.1).all(), (seed, ious.round(3).tolist())


def test_untrained_model_fails_the_check(trained_clip):
    config, _ = trained_clip
    masker = TextMasker("tiny", None, config=config)  # same config, random init
    own = np.concatenate([np.diag(caption_ious(masker, seed)) for seed in SCENES])
    assert (own < 0.5).any(), own.round(3).tolist()


def test_training_reads_the_patch_embeddings_the_service_reads(trained_clip):
    config, checkpoint = trained_clip
    masker = TextMasker("tiny", str(checkpoint), config=config)
    image = scene(SCENES[0])[0]
    with torch.no_grad():
        ours = patch_tokens(masker.model.visual, pixels([image], masker.model.visual))
    torch.testing.assert_close(ours.reshape(masker.patch_embeddings([image]).shape),
                               masker.patch_embeddings([image]), atol=1e-5, rtol=0)
