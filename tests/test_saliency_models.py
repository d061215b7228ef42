"""The object-level saliency models: ``mbd`` (MB+, minimum barrier distance) and the ``centre_prior`` baseline."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.samples import objects_mask, photo_like_image
from pipeline.masks import MaskError, get_saliency_model, saliency_models
from pipeline.masks.saliency import mbd_transform

NEW_MODELS = ("mbd", "centre_prior")


def auc(saliency: np.ndarray, truth: np.ndarray) -> float:
    """ROC AUC by the rank (Mann-Whitney) formula, ties counting half."""
    scores, labels = saliency.ravel().astype(np.float64), truth.ravel().astype(bool)
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average the ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def one_object(seed: int, height: int = 96, width: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A textured photo-like background with one compact object away from the border, and its mask."""
    img, objects = photo_like_image(height, width, seed, n_objects=1)
    return img, objects_mask(objects, height, width) > 0


def check_finds_object(model, img: np.ndarray, truth: np.ndarray) -> float:
    """The checks a model that finds the object passes; returns its AUC."""
    sal = model(img)
    assert sal[truth].mean() > sal[~truth].mean() + 0.3
    score = auc(sal, truth)
    assert score > 0.95
    return score


def test_registered_and_contract():
    assert set(NEW_MODELS) <= set(saliency_models())
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(33, 47, 3), dtype=np.uint8)
    for name in NEW_MODELS:
        model = get_saliency_model(name)
        sal = model(img)
        assert sal.shape == (33, 47) and sal.dtype == np.float32
        assert sal.min() >= 0 and sal.max() == pytest.approx(1.0)
        np.testing.assert_array_equal(model(img), sal)  # deterministic
        np.testing.assert_array_equal(model(np.full((20, 30, 3), 90, np.uint8)), np.zeros((20, 30), np.float32))
        with pytest.raises(MaskError, match="uint8 HxWx3"):
            model(img[..., 0])


@pytest.mark.parametrize("shape", [(5, 7), (7, 5), (1, 1), (1, 9), (9, 1), (2, 3), (3, 3), (61, 97), (600, 17)])
def test_odd_and_tiny_sizes(shape):
    img = np.random.default_rng(1).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    for name in NEW_MODELS:
        sal = get_saliency_model(name)(img)
        assert sal.shape == shape and sal.dtype == np.float32
        assert np.isfinite(sal).all() and sal.min() >= 0 and sal.max() <= 1


@pytest.mark.parametrize("seed", [4, 5])  # objects that differ from the background in luminance, not only in hue
def test_grayscale_as_rgb(seed):
    img, truth = one_object(seed)
    gray = np.repeat(img.mean(axis=2).round().astype(np.uint8)[:, :, None], 3, axis=2)
    sal = get_saliency_model("mbd")(gray)
    assert sal.shape == truth.shape and sal.dtype == np.float32
    assert auc(sal, truth) > max(0.9, auc(get_saliency_model("centre_prior")(gray), truth) + 0.1)


def test_centre_prior_is_a_centred_gaussian():
    sal = get_saliency_model("centre_prior")(np.random.default_rng(2).integers(0, 256, (91, 121, 3), np.uint8))
    assert np.unravel_index(sal.argmax(), sal.shape) == (45, 60)
    y, x = np.mgrid[:91, :121]
    gauss = np.exp(-0.5 * (((y - 45) / (91 / 3)) ** 2 + ((x - 60) / (121 / 3)) ** 2))  # sigma: a third of each side
    np.testing.assert_allclose(sal, (gauss - gauss.min()) / (gauss.max() - gauss.min()), atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_mbd_finds_the_whole_object_and_beats_centre_prior(seed):
    img, truth = one_object(seed)
    score = check_finds_object(get_saliency_model("mbd"), img, truth)
    assert score > auc(get_saliency_model("centre_prior")(img), truth) + 0.1


def test_the_checks_can_fail():
    img, truth = one_object(0)
    mbd = get_saliency_model("mbd")
    inverted = lambda image: 1.0 - mbd(image)  # noqa: E731
    assert auc(inverted(img), truth) < 0.5
    with pytest.raises(AssertionError):
        check_finds_object(inverted, img, truth)
    with pytest.raises(AssertionError):  # the image-blind baseline does not pass either
        check_finds_object(get_saliency_model("centre_prior"), img, truth)


def reference_mbd(channel: np.ndarray, passes: int = 3) -> np.ndarray:
    """The paper's FastMBD, pixel by pixel: forward and backward raster scans from the border."""
    h, w = channel.shape
    dist = np.zeros((h, w))
    dist[1:-1, 1:-1] = np.inf
    upper, lower = channel.copy(), channel.copy()

    def scan(img, dist, upper, lower):
        for r in range(1, h - 1):
            for c in range(1, w - 1):
                x = img[r, c]
                for nr, nc in ((r, c - 1), (r - 1, c)):  # left first, then up (strictly better only)
                    barrier = max(upper[nr, nc], x) - min(lower[nr, nc], x)
                    if barrier < dist[r, c]:
                        dist[r, c] = barrier
                        upper[r, c], lower[r, c] = max(upper[nr, nc], x), min(lower[nr, nc], x)

    for k in range(passes):
        flip = (slice(None), slice(None)) if k % 2 == 0 else (slice(None, None, -1), slice(None, None, -1))
        scan(channel[flip], dist[flip], upper[flip], lower[flip])
    return dist


@pytest.mark.parametrize("shape", [(3, 3), (6, 9), (13, 5), (17, 23)])
def test_vectorised_mbd_equals_the_raster_scan(shape):
    planes = np.random.default_rng(3).integers(0, 256, size=(2, *shape)).astype(np.float64)
    out = mbd_transform(planes)
    for channel in range(2):
        np.testing.assert_array_equal(out[channel], reference_mbd(planes[channel]))


def test_mbd_transform_of_a_ring():
    planes = np.zeros((1, 9, 9))
    planes[0, 2:7, 2:7] = 50.0  # a ring of 50 around a hole of 0: the hole is enclosed by a barrier of 50
    planes[0, 3:6, 3:6] = 0.0
    dist = mbd_transform(planes)[0]
    assert dist[4, 4] == 50 and dist[2, 2] == 50 and dist[1, 1] == 0 and dist[0].max() == 0
