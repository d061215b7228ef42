"""Generalized Gaussian entropy model: likelihood accuracy, gradients, exact coding, efficiency."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import mpmath
import numpy as np
import pytest
import scipy.stats
import torch
from compressai.entropy_models import GaussianConditional
from compressai.models import CompressionModel

from pipeline.codec.entropy import GeneralizedGaussianConditional, gg_bin_probability, std_factor

BETAS = [0.5, 0.7, 1.0, 1.5, 2.0, 2.5, 3.0]
F64 = torch.float64


def _benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "entropy_efficiency.py"
    spec = importlib.util.spec_from_file_location("entropy_efficiency", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def coder() -> GeneralizedGaussianConditional:
    """A model with its CDF tables built (eval mode)."""
    model = GeneralizedGaussianConditional().eval()
    model.update(force=True)
    return model


def _scipy_bins(values: np.ndarray, mean: float, scale: float, beta: float) -> np.ndarray:
    dist = scipy.stats.gennorm(beta, loc=mean, scale=scale)
    return dist.cdf(values + 0.5) - dist.cdf(values - 0.5)


# -- likelihood ------------------------------------------------------------------------
@pytest.mark.parametrize("beta", BETAS)
def test_likelihood_matches_scipy_gennorm(beta):
    # Compared in float64 (the model computes in the input dtype).
    model = GeneralizedGaussianConditional(likelihood_bound=0.0).eval()
    for scale in (0.2, 1.0, 3.7, 20.0):
        for mean in (0.0, 0.3, -1.7):
            values = torch.linspace(-40, 40, 321, dtype=F64) + mean
            y_hat, lik = model(values, torch.tensor(scale, dtype=F64),
                               torch.tensor(beta, dtype=F64), means=torch.tensor(mean, dtype=F64))
            ref = _scipy_bins(y_hat.numpy(), mean, scale, beta)
            np.testing.assert_allclose(lik.numpy(), ref, rtol=0, atol=1e-5)
            # unrounded offsets (the noisy training path uses the same bin probability)
            lik = gg_bin_probability(values - mean, torch.tensor(scale, dtype=F64),
                                     torch.tensor(beta, dtype=F64))
            np.testing.assert_allclose(lik.numpy(), _scipy_bins(values.numpy(), mean, scale, beta),
                                       rtol=0, atol=1e-5)


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0, 3.0])
def test_far_tail_probabilities_are_relatively_accurate(beta):
    # float64; scipy's survival function avoids the 1 - 1 cancellation of the CDF difference.
    values = np.array([15.0, 30.0, 60.0, 120.0])
    dist = scipy.stats.gennorm(beta, scale=3.0)
    ref = dist.sf(values - 0.5) - dist.sf(values + 0.5)
    got = gg_bin_probability(torch.tensor(values), torch.tensor(3.0, dtype=F64),
                             torch.tensor(beta, dtype=F64)).numpy()
    keep = ref > 1e-300
    np.testing.assert_allclose(got[keep], ref[keep], rtol=1e-9)


@pytest.mark.parametrize("beta", BETAS)
def test_likelihoods_sum_to_one(beta):
    support = torch.arange(-20000, 20001, dtype=F64)
    for scale in (0.05, 0.2, 1.0, 5.0):
        total = gg_bin_probability(support, torch.tensor(scale, dtype=F64),
                                   torch.tensor(beta, dtype=F64)).sum()
        assert abs(total.item() - 1.0) < 1e-6


def test_beta_two_matches_gaussian_conditional():
    torch.manual_seed(0)
    gaussian = GaussianConditional(None).eval()
    model = GeneralizedGaussianConditional().eval()
    for sigma in (0.03, 0.11, 0.5, 2.0, 10.0, 100.0):  # 0.03 is below both floors
        means = torch.randn(1, 400) * 3
        y = means + torch.randn(1, 400) * sigma * 4
        y_g, lik_g = gaussian(y, torch.full_like(y, sigma), means=means)
        y_m, lik_m = model(y, torch.full_like(y, sigma * math.sqrt(2)), torch.full_like(y, 2.0),
                           means=means)
        assert torch.equal(y_g, y_m)
        torch.testing.assert_close(lik_m, lik_g, rtol=0, atol=1e-6)


# -- bounds ----------------------------------------------------------------------------
def test_scale_floor_is_a_std_floor_and_shared_by_forward_and_indexes(coder):
    betas = torch.tensor(BETAS, dtype=F64)
    assert std_factor(torch.tensor(2.0, dtype=F64)).item() == pytest.approx(math.sqrt(2))
    floor = coder.lower_bound_scales(torch.zeros_like(betas), betas)
    torch.testing.assert_close(floor / std_factor(betas), torch.full_like(betas, coder.scale_bound))
    # below the floor the likelihood and the coding table are those of the floor (std 0.11)
    values = torch.arange(-5.0, 6.0, dtype=F64)[:, None]
    tiny = torch.full_like(betas, 1e-4)
    _, lik_tiny = coder(values, tiny, betas)
    _, lik_floor = coder(values, floor, betas)
    torch.testing.assert_close(lik_tiny, lik_floor, rtol=0, atol=0)
    index = coder.build_indexes(tiny.float(), betas.float())
    assert torch.equal(index % len(coder.scale_table), torch.zeros_like(index))
    assert coder.scale_table[0] == pytest.approx(coder.scale_bound)


def test_beta_range(coder):
    raw = torch.linspace(-20, 20, 41)
    bounded = coder.bound_beta(raw)
    assert bounded.min() >= 0.5 and bounded.max() <= 3.0
    values = torch.arange(-6.0, 7.0)
    _, lik_out = coder(values, torch.tensor(1.5), torch.tensor(7.0))
    _, lik_in = coder(values, torch.tensor(1.5), torch.tensor(3.0))
    assert torch.equal(lik_out, lik_in)
    assert torch.equal(coder.build_indexes(torch.tensor([[1.5]]), torch.tensor([[0.1]])),
                       coder.build_indexes(torch.tensor([[1.5]]), torch.tensor([[0.5]])))
    # a clamped beta still gets the gradient that pulls it back into the range
    beta = torch.tensor(7.0, requires_grad=True)
    coder.clamp_betas(beta).backward(torch.tensor(1.0))  # decreasing the output is "inwards"
    assert beta.grad == 1.0


# -- gradients -------------------------------------------------------------------------
def test_gradcheck_values_scales_betas_means():
    # float64; the beta gradient is the model's own h = 1e-3 central difference.
    torch.manual_seed(0)
    model = GeneralizedGaussianConditional()
    n = 24
    values = (torch.randn(n, dtype=F64) * 4).requires_grad_()
    means = torch.randn(n, dtype=F64).requires_grad_()
    scales = (torch.rand(n, dtype=F64) * 5 + 0.3).requires_grad_()
    betas = (torch.rand(n, dtype=F64) * 2.4 + 0.55).requires_grad_()
    assert torch.autograd.gradcheck(model._likelihood, (values, scales, betas, means))


def _mp_log_bin(v: float, scale: float, beta: float) -> mpmath.mpf:
    """log P(|x - v| <= 1/2) of gennorm(beta, scale) in 50-digit arithmetic (v >= 0)."""
    s, a, half, v = 1 / beta, mpmath.mpf(scale), mpmath.mpf(1) / 2, mpmath.mpf(v)

    def lower(u):
        return mpmath.gammainc(s, 0, (u / a) ** beta, regularized=True)

    def upper(u):
        return mpmath.gammainc(s, (u / a) ** beta, mpmath.inf, regularized=True)

    if v < half:
        return mpmath.log((lower(v + half) + lower(half - v)) / 2)
    return mpmath.log((upper(v - half) - upper(v + half)) / 2)


def test_beta_gradient_matches_high_precision_derivative():
    # float64 model (finite difference, h = 1e-3) vs mpmath's derivative of the exact log P
    mpmath.mp.dps = 50
    cases = [(v, a, b) for v in (0.0, 0.3, 1.0, 3.0, 12.0) for a in (0.4, 2.0)
             for b in (0.5, 0.6, 1.3, 2.0, 2.9, 3.0) if (v / a) ** b < 500]  # P > 1e-200
    values, scales, betas = (torch.tensor(c, dtype=F64) for c in zip(*cases))
    betas.requires_grad_()
    model = GeneralizedGaussianConditional(likelihood_bound=0.0)
    model._likelihood(values, scales, betas).log().sum().backward()
    ref = [float(mpmath.diff(lambda b, v=v, a=a: _mp_log_bin(v, a, b), mpmath.mpf(b)))
           for v, a, b in cases]
    np.testing.assert_allclose(betas.grad.numpy(), ref, rtol=1e-4, atol=1e-9)


def test_float32_gradients_match_float64():
    # the beta finite difference runs in float64 internally, so float32 training gets it right
    torch.manual_seed(0)
    n = 20_000
    base = (torch.randn(n, dtype=F64) * 20, torch.exp(torch.empty(n, dtype=F64).uniform_(-3, 5)),
            torch.empty(n, dtype=F64).uniform_(0.5, 3.0))
    model = GeneralizedGaussianConditional(likelihood_bound=0.0)
    results = {}
    for dtype in (torch.float32, F64):
        inputs = [x.to(dtype).requires_grad_() for x in base]
        lik = model._likelihood(*inputs)
        (-lik.log2()).sum().backward()
        results[dtype] = lik.detach().double(), [x.grad.double() for x in inputs]
    lik64, grads64 = results[F64]
    keep = lik64 > 1e-6
    for g32, g64 in zip(results[torch.float32][1], grads64):
        error = ((g32 - g64).abs() / (g64.abs() + 1e-3))[keep]
        assert error.max() < 1e-2


def test_training_forward_gradients_are_finite():
    torch.manual_seed(0)
    model = GeneralizedGaussianConditional().train()
    y = (torch.randn(2, 8, 6, 6) * torch.tensor([0.01, 1.0, 100.0, 1e4]).repeat(2)[:, None, None]
         ).requires_grad_()
    scales = torch.logspace(-4, 3, 8)[:, None, None].clone().requires_grad_()  # per channel
    raw = torch.linspace(-6, 6, 8)[:, None, None].clone().requires_grad_()
    means = torch.zeros(2, 8, 6, 6, requires_grad=True)
    _, lik = model(y, scales, model.bound_beta(raw), means=means)
    assert lik.shape == y.shape
    (-lik.log2().sum()).backward()
    for t in (y, scales, raw, means):
        assert torch.isfinite(t.grad).all()
    torch.testing.assert_close(means.grad, -y.grad)


# -- coding ----------------------------------------------------------------------------
def _coding_inputs(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.empty(shape).uniform_(math.log(1e-3), math.log(1e3), generator=gen))
    betas = torch.empty(shape).uniform_(0.3, 4.0, generator=gen)  # partly outside the range
    means = torch.randn(shape, generator=gen) * 5
    y = means + scales * torch.randn(shape, generator=gen) ** 3
    outliers = y.view(-1)[::17]  # far in the tails: escape (bypass) coded
    far = torch.tensor([1e5, -3e4, 777.0, -12345.0]).repeat(outliers.numel())
    outliers.copy_(far[:outliers.numel()])
    return y, scales, betas, means


@pytest.mark.parametrize("shape", [(3, 500), (2, 4, 50), (2, 3, 8, 8)])
def test_symbols_round_trip_exactly(coder, shape):
    y, scales, betas, means = _coding_inputs(shape, seed=len(shape))
    indexes = coder.build_indexes(scales, betas)
    assert indexes.shape == y.shape and indexes.dtype == torch.int32
    assert 0 <= int(indexes.min()) and int(indexes.max()) < coder._quantized_cdf.size(0)
    offsets = coder.quantize(y, "symbols", means) - coder._offset[indexes.long()]
    escaped = (offsets < 0) | (offsets >= coder._cdf_length[indexes.long()] - 2)
    assert escaped.any() and not escaped.all()
    strings = coder.compress(y, indexes, means=means)
    y_hat = coder.decompress(strings, coder.build_indexes(scales, betas), means=means)
    expected, _ = coder(y, scales, betas, means=means, training=False)
    assert torch.equal(y_hat, expected)


class _TinyModel(CompressionModel):
    """A CompressionModel holding the GGM (the pattern for codec models)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.gc = GeneralizedGaussianConditional(**kwargs)

    def update(self, scale_table=None, force=False, update_quantiles=False):
        updated = super().update(scale_table, force=force, update_quantiles=update_quantiles)
        return self.gc.update(force=force) or updated


def test_state_dict_round_trip_into_fresh_instances():
    model = _TinyModel(beta_table=[0.6, 1.0, 1.7, 2.8], scale_table=[0.11, 0.5, 2.0, 8.0, 32.0])
    assert model.update(force=True) and not model.update()
    y, scales, betas, means = _coding_inputs((2, 3, 8, 8), seed=7)
    indexes = model.gc.build_indexes(scales, betas)
    strings = model.gc.compress(y, indexes, means=means)

    fresh = _TinyModel()  # default (different, empty) tables: buffers are resized on load
    fresh.load_state_dict(model.state_dict())
    for name in ("_quantized_cdf", "_offset", "_cdf_length", "scale_table", "beta_table"):
        assert torch.equal(getattr(fresh.gc, name), getattr(model.gc, name))
    assert not fresh.update()  # tables came with the state dict
    fresh_indexes = fresh.gc.build_indexes(scales, betas)
    assert torch.equal(fresh_indexes, indexes)
    assert torch.equal(fresh.gc.decompress(strings, fresh_indexes, means=means),
                       model.gc.decompress(strings, indexes, means=means))

    standalone = GeneralizedGaussianConditional()
    standalone.load_state_dict(model.gc.state_dict())
    assert torch.equal(standalone.decompress(strings, indexes, means=means),
                       model.gc.decompress(strings, indexes, means=means))


def test_update_is_lazy():
    model = GeneralizedGaussianConditional()
    with pytest.raises(ValueError, match="update"):
        model.build_indexes(torch.ones(1, 1), torch.ones(1, 1))
    assert model.update()  # (how long it takes: benchmarks/fail_fast.py)
    assert not model.update()
    assert model.update(force=True, beta_table=[1.0, 2.0])
    assert model._quantized_cdf.size(0) == 2 * len(model.scale_table)


# -- efficiency (reduced version of benchmarks/entropy_efficiency.py) -----------------
@pytest.mark.parametrize("beta, min_saving", [(0.7, 4.0), (1.0, 2.0), (1.5, None), (2.0, -1.0)])
def test_coding_efficiency(coder, beta, min_saving):
    bench = _benchmark()
    gaussian = GaussianConditional(None)
    gaussian.update_scale_table(bench.get_scale_table(), force=True)
    result = bench.efficiency(beta, 50_000, seed=0, models=(coder, gaussian))
    assert result["ggm_ratio_to_ideal"] <= 1.02
    if min_saving is not None:
        assert result["ggm_saving_vs_gaussian_percent"] >= min_saving
