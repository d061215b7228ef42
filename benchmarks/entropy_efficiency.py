"""Coding efficiency of the generalized Gaussian entropy model vs CompressAI's Gaussian.

For each shape beta, integers ``round(x)`` with ``x ~ gennorm(beta, scale=2)`` are coded
(a) with ``GeneralizedGaussianConditional`` given the true (scale, beta) per element and
(b) with ``GaussianConditional`` at the best scale of its own table, the one giving the
smallest *real* coded size. Sizes are real rANS bitstream lengths; the ideal size is the
information content ``-log2 pmf`` of the symbols under the true distribution.

Usage: ``python benchmarks/entropy_efficiency.py [--samples N] [--seed S]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import scipy.stats
import torch
from compressai.entropy_models import GaussianConditional
from compressai.models.base import get_scale_table

from pipeline.codec.entropy import GeneralizedGaussianConditional

BETAS = (0.7, 1.0, 1.5, 2.0)
SCALE = 2.0


def sample_symbols(beta: float, n: int, seed: int) -> np.ndarray:
    """``n`` rounded generalized Gaussian samples (mean 0, scale ``SCALE``)."""
    rng = np.random.default_rng((seed, round(beta * 1000)))
    return np.round(scipy.stats.gennorm.rvs(beta, scale=SCALE, size=n, random_state=rng))


def ideal_bits(symbols: np.ndarray, beta: float) -> float:
    """Information content of ``symbols`` under the true discretized distribution."""
    dist = scipy.stats.gennorm(beta, scale=SCALE)
    t = np.abs(symbols)  # symmetric; survival functions avoid cancellation in the tail
    pmf = np.where(t == 0, dist.cdf(0.5) - dist.cdf(-0.5), dist.sf(t - 0.5) - dist.sf(t + 0.5))
    return float(-np.log2(pmf).sum())


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def code_ggm(model: GeneralizedGaussianConditional, symbols: np.ndarray, beta: float
             ) -> Tuple[int, float, float]:
    """Real coded bits, encode and decode seconds; checks the decoded symbols."""
    y = torch.from_numpy(symbols).float()[None]
    indexes = model.build_indexes(torch.full_like(y, SCALE), torch.full_like(y, beta))
    strings, t_enc = _timed(model.compress, y, indexes)
    y_hat, t_dec = _timed(model.decompress, strings, indexes)
    if not torch.equal(y_hat, y):
        raise AssertionError("GGM round trip is not exact")
    return 8 * len(strings[0]), t_enc, t_dec


def code_gaussian(model: GaussianConditional, symbols: np.ndarray, table_index: int
                  ) -> Tuple[int, float, float]:
    """Real coded bits, encode and decode seconds with one table (scale) of the model."""
    y = torch.from_numpy(symbols).float()[None]
    indexes = torch.full(y.shape, table_index, dtype=torch.int32)
    strings, t_enc = _timed(model.compress, y, indexes)
    y_hat, t_dec = _timed(model.decompress, strings, indexes)
    if not torch.equal(y_hat, y):
        raise AssertionError("Gaussian round trip is not exact")
    return 8 * len(strings[0]), t_enc, t_dec


def best_gaussian(model: GaussianConditional, symbols: np.ndarray
                  ) -> Tuple[float, Tuple[int, float, float]]:
    """The table scale (within a factor 2 of the sample std) minimizing the real size."""
    std = float(symbols.std())
    candidates = [i for i, s in enumerate(model.scale_table.tolist()) if std / 2 <= s <= 2 * std]
    results = {i: code_gaussian(model, symbols, i) for i in candidates}
    best = min(results, key=lambda i: results[i][0])
    return float(model.scale_table[best]), results[best]


def make_models() -> Tuple[GeneralizedGaussianConditional, GaussianConditional, float]:
    """Both entropy models with their CDF tables built, and the GGM ``update()`` seconds."""
    ggm = GeneralizedGaussianConditional()
    _, update_seconds = _timed(ggm.update, force=True)
    gaussian = GaussianConditional(None)
    gaussian.update_scale_table(get_scale_table(), force=True)
    return ggm, gaussian, update_seconds


def efficiency(beta: float, n_samples: int, seed: int,
               models: Optional[Tuple[GeneralizedGaussianConditional, GaussianConditional]] = None
               ) -> Dict[str, float]:
    """Ideal, GGM and best-Gaussian sizes (bits) and coding throughputs for one beta."""
    ggm, gaussian = models if models is not None else make_models()[:2]
    symbols = sample_symbols(beta, n_samples, seed)
    ideal = ideal_bits(symbols, beta)
    ggm_bits, ggm_enc, ggm_dec = code_ggm(ggm, symbols, beta)
    g_scale, (g_bits, g_enc, g_dec) = best_gaussian(gaussian, symbols)
    return {
        "n_samples": n_samples,
        "ideal_bits": ideal,
        "ggm_real_bits": ggm_bits,
        "ggm_ratio_to_ideal": ggm_bits / ideal,
        "gaussian_best_scale": g_scale,
        "gaussian_real_bits": g_bits,
        "ggm_saving_vs_gaussian_percent": 100.0 * (1.0 - ggm_bits / g_bits),
        "ggm_encode_symbols_per_s": n_samples / ggm_enc,
        "ggm_decode_symbols_per_s": n_samples / ggm_dec,
        "gaussian_encode_symbols_per_s": n_samples / g_enc,
        "gaussian_decode_symbols_per_s": n_samples / g_dec,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    ggm, gaussian, update_seconds = make_models()
    report = {
        "samples": args.samples,
        "seed": args.seed,
        "scale": SCALE,
        "ggm_tables": int(ggm._quantized_cdf.size(0)),
        "ggm_update_seconds": update_seconds,
        "betas": {str(b): efficiency(b, args.samples, args.seed, (ggm, gaussian)) for b in BETAS},
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
