"""The level map: each latent cell's quantisation step, coded from its neighbours (``.roic`` version 4).

A string is ``u8 L``, the ``L`` steps in use (u8 quarters in [4, 64], ascending), then every
cell's index into them in raster order, rANS-coded (CompressAI's coder) under an adaptive model
of the cell's left and upper neighbours' indexes: per context (left, up) a count per index,
starting at 1 with 8 added for the neighbours' own indexes, each coded index adding 16, the
counts halved when they pass 1024 (set on the training photos' saliency maps). Soft maps are
smooth, so a cell is mostly its neighbour's level: on the held-out photos' saliency maps at
512 px this took 38-48% fewer bytes than deflating the indexes (which beat deflating left, upper
or median-predicted residuals), and a binary map 54% fewer than version 3's packed bits.

The model is integers only (counts, a 16-bit CDF per cell), so every machine decodes the same
map. An empty string means step 1 everywhere. :func:`unpack_levels` raises ``ValueError`` for
anything that is not a map of the grid: a bad step list, an index beyond it; its work is one
symbol per cell of the declared grid, the string padded so the decoder stays inside it.
"""

from __future__ import annotations

import numpy as np
import torch
from compressai.ans import BufferedRansEncoder, RansDecoder
from torch import Tensor

from pipeline.codec.entropy.compact import pad_for_decoding
from pipeline.codec.steps import MAX_QUARTERS, STEP_ONE

MAX_PALETTE = 16  # steps one level map may list (ours list at most 5)
PRECISION = 16
PRIOR, INCREMENT, LIMIT = 8, 16, 1024
MIN_SYMBOLS = 8


class _AdaptiveModel:
    """Counts per (left, up) context; the integer CDF a cell is coded with, and its update."""

    def __init__(self, levels: int) -> None:
        self.levels = levels
        self.counts = [[[1 + PRIOR * (s == a) + PRIOR * (s == b) for s in range(levels)] for b in range(levels)]
                       for a in range(levels)]

    def cdf(self, a: int, b: int) -> list[int]:
        """A CDF over the ``levels`` indexes and CompressAI's escape symbol (every frequency >= 1)."""
        counts = self.counts[a][b]
        total, room = sum(counts), (1 << PRECISION) - self.levels - 1
        cdf, acc = [0], 0
        for c in counts:
            acc += 1 + c * room // total
            cdf.append(acc)
        cdf.append(1 << PRECISION)
        return cdf

    def update(self, a: int, b: int, s: int) -> None:
        counts = self.counts[a][b]
        counts[s] += INCREMENT
        if sum(counts) > LIMIT:
            self.counts[a][b] = [(c + 1) // 2 for c in counts]


def _context(index: list[int], i: int, j: int, w: int, last: int) -> tuple[int, int]:
    """(left, up) of cell (i, j) of a raster ``index``: a missing neighbour is the other one, the first
    cell's both the coarsest level."""
    left = index[i * w + j - 1] if j else (index[(i - 1) * w] if i else last)
    up = index[(i - 1) * w + j] if i else left
    return left, up


def pack_levels(quarters: Tensor) -> bytes:
    """One image's step map (1,h,w or h,w whole quarters) as a level map; empty when every step is 1."""
    q = quarters.reshape(quarters.shape[-2:]).round().long().cpu()
    if bool((q == STEP_ONE).all()):
        return b""
    palette, indexes = torch.unique(q, sorted=True, return_inverse=True)
    if len(palette) > MAX_PALETTE or int(palette[0]) < STEP_ONE or int(palette[-1]) > MAX_QUARTERS:
        raise ValueError(f"a step map uses {len(palette)} steps within {palette.tolist()} quarters; "
                         f"at most {MAX_PALETTE} within [{STEP_ONE}, {MAX_QUARTERS}]")
    levels, (h, w) = len(palette), q.shape
    index = indexes.reshape(-1).tolist()
    model, cdfs = _AdaptiveModel(levels), []
    for i in range(h):
        for j in range(w):
            a, b = _context(index, i, j, w, levels - 1)
            cdfs.append(model.cdf(a, b))
            model.update(a, b, index[i * w + j])
    # CompressAI's encoder flushes into one 32-bit word per symbol, two of them the final state: a map
    # of a few cells gets symbols after it (a bit each, never decoded) so that it never writes past
    pad = max(0, MIN_SYMBOLS - len(index))
    symbols, cdfs = index + [0] * pad, cdfs + [[0, 1 << (PRECISION - 1), (1 << PRECISION) - 1, 1 << PRECISION]] * pad
    n = len(symbols)
    encoder = BufferedRansEncoder()
    encoder.encode_with_indexes(symbols, list(range(n)), cdfs, [len(c) for c in cdfs], [0] * n)
    return bytes([levels, *palette.tolist()]) + encoder.flush()


def unpack_levels(data: bytes, grid: tuple[int, int]) -> Tensor | None:
    """The (1,1,h,w) whole-quarter step map of :func:`pack_levels` on ``grid`` (None for empty bytes:
    step 1 everywhere); ``ValueError`` for data that is not one."""
    if not data:
        return None
    levels = data[0]
    palette = list(data[1:1 + levels])
    if not 1 <= levels <= MAX_PALETTE or len(palette) != levels or palette != sorted(set(palette)) \
            or palette[0] < STEP_ONE or palette[-1] > MAX_QUARTERS:
        raise ValueError(f"level map with a bad list of steps ({levels} declared: {palette[:MAX_PALETTE]})")
    h, w = grid
    decoder = RansDecoder()
    decoder.set_stream(pad_for_decoding(data[1 + levels:], h * w))
    model, index = _AdaptiveModel(levels), []
    for i in range(h):
        for j in range(w):
            a, b = _context(index, i, j, w, levels - 1)
            (s,) = decoder.decode_stream([0], [model.cdf(a, b)], [levels + 2], [0])
            if not 0 <= s < levels:
                raise ValueError(f"level map with a level index {s} beyond its {levels} steps")
            index.append(s)
            model.update(a, b, s)
    table = np.asarray(palette, dtype=np.float32)[np.asarray(index, dtype=np.int64)]
    return torch.from_numpy(table).reshape(1, 1, h, w)
