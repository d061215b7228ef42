"""rANS coding that hands CompressAI's coder only the CDF tables a tensor uses, and the
zero padding that keeps its decoder inside a crafted string."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from compressai.entropy_models import GaussianConditional
from torch import Tensor

__all__ = ["CompactGaussianConditional", "CompactTablesMixin", "pad_for_decoding"]


def pad_for_decoding(string: bytes, symbols: int) -> bytes:
    """``string`` followed by enough zero bytes that CompressAI's rANS decoder, which reads
    on without checking the end, stays inside the buffer even for a crafted string.

    Per symbol it reads at most one 32-bit word, except in bypass (escape) mode, whose
    nibble counts come from the string's own bytes; zeros end every bypass run. So
    16 bytes per string byte plus 4 per symbol bounds what it can read.
    """
    return string + bytes(16 * len(string) + 4 * symbols + 64)


class CompactTablesMixin:
    """rANS coding that hands the coder only the CDF tables a tensor uses.

    CompressAI's ``compress``/``decompress`` pass every table (256 scale levels here, 768
    (scale, beta) pairs for the generalized Gaussian) to the C++ coder, which copies them
    on each call; that copy, not the coding, dominated encode time. Encoder and decoder
    see the same indexes, so they build the same compact set. Mixed into an
    ``EntropyModel`` with ``_quantized_cdf``, ``_cdf_length`` and ``_offset`` tables.
    """

    def _used_tables(self, indexes: Tensor) -> Tuple[Tensor, list, list, list]:
        """Only the tables ``indexes`` use, trimmed to their longest CDF, and the remapped indexes."""
        used, remapped = torch.unique(indexes.reshape(-1).long(), return_inverse=True)
        used = used.to(self._quantized_cdf.device)
        lengths = self._cdf_length[used]
        cdf = self._quantized_cdf[used, :int(lengths.max())]
        return (remapped.reshape(indexes.shape).int(), cdf.tolist(),
                lengths.reshape(-1).int().tolist(), self._offset[used].reshape(-1).int().tolist())

    def compress(self, inputs: Tensor, indexes: Tensor, means: Optional[Tensor] = None) -> list:
        """Entropy-code ``inputs`` (one string per batch item) with CompressAI's rANS coder."""
        if inputs.dim() < 2 or inputs.size() != indexes.size():
            raise ValueError("`inputs` and `indexes` must have the same size (at least 2-D)")
        symbols = self.quantize(inputs, "symbols", means)
        strings = []
        for i in range(symbols.size(0)):
            idx, cdf, lengths, offsets = self._used_tables(indexes[i])
            strings.append(self.entropy_coder.encode_with_indexes(
                symbols[i].reshape(-1).int().tolist(), idx.reshape(-1).tolist(), cdf, lengths, offsets))
        return strings

    def encode_into(self, encoder: Any, symbols: Tensor, indexes: Tensor) -> None:
        """Add one item's integer ``symbols`` to a CompressAI ``BufferedRansEncoder`` (several
        calls share one string; the decoder reads them back in the same order)."""
        idx, cdf, lengths, offsets = self._used_tables(indexes)
        encoder.encode_with_indexes(symbols.reshape(-1).int().tolist(), idx.reshape(-1).tolist(), cdf, lengths,
                                    offsets)

    def decode_from(self, decoder: Any, indexes: Tensor) -> Tensor:
        """The next symbols of a ``RansDecoder`` stream for one item's ``indexes`` (int32)."""
        idx, cdf, lengths, offsets = self._used_tables(indexes)
        values = decoder.decode_stream(idx.reshape(-1).tolist(), cdf, lengths, offsets)
        return torch.tensor(values, dtype=torch.int32, device=indexes.device).reshape(indexes.shape)

    def decompress(self, strings: list, indexes: Tensor, dtype: torch.dtype = torch.float,
                   means: Optional[Tensor] = None) -> Tensor:
        """Decode ``strings`` back to (dequantized) values; ``indexes`` as in compress."""
        if len(strings) != indexes.size(0) or indexes.dim() < 2:
            raise ValueError("one string per batch item of `indexes` is required")
        outputs = torch.empty(indexes.size(), dtype=torch.int32, device=self._quantized_cdf.device)
        for i, string in enumerate(strings):
            idx, cdf, lengths, offsets = self._used_tables(indexes[i])
            values = self.entropy_coder.decode_with_indexes(
                string, idx.reshape(-1).tolist(), cdf, lengths, offsets)
            outputs[i] = torch.tensor(values, device=outputs.device).reshape(outputs[i].size())
        return self.dequantize(outputs, means, dtype)


class CompactGaussianConditional(CompactTablesMixin, GaussianConditional):
    """CompressAI's ``GaussianConditional`` with compact-table coding (same tables, same model)."""
