"""Numeric environments a decoder on another machine may run in, to check portability here.

Each entry of :data:`PERTURBATIONS` is a context manager that changes how this process
computes floating point (thread count, oneDNN, convolution algorithm, the model's dtype)
without changing what it computes. A portable ``.roic`` file decodes to the same symbols
under every one of them; the float hyper-decoder does not (see the tests and
``benchmarks/portable_coding.py``). A CUDA device (TF32 convolutions) is the other case,
checked on a GPU machine.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

import pipeline.codec.integer as integer
from pipeline.codec.bitstream import unpack
from pipeline.codec.coding import hyper_latent_shape
from pipeline.codec.models import ROICodec


def coded_state(model: ROICodec, data: bytes) -> tuple[Tensor, Tensor]:
    """The table indexes and decoded y symbols of a ``.roic`` file: what the entropy coder sees."""
    header, groups = unpack(data)
    with torch.no_grad():
        shape = hyper_latent_shape(model, header)
        state = model.decode_state(groups, shape, header.roi_quality, cell_maps=header.version == 3)
    return state["indexes"], state["symbols"]


def conv2d_unfold(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                  dilation=1, groups: int = 1) -> Tensor:
    """``F.conv2d`` as unfold + matmul (another summation order than oneDNN's kernels)."""
    if groups != 1 or isinstance(padding, str):
        raise NotImplementedError("conv2d_unfold: groups=1 and numeric padding only")
    b, _, h, w = input.shape
    out_ch, _, kh, kw = weight.shape
    cols = F.unfold(input, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = (weight.reshape(out_ch, -1) @ cols).reshape(b, out_ch, ho, wo)
    return out if bias is None else out + bias[None, :, None, None]


def conv_transpose2d_fold(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                          output_padding=0, groups: int = 1, dilation=1) -> Tensor:
    """``F.conv_transpose2d`` as matmul + fold (col2im)."""
    if groups != 1 or dilation not in (1, (1, 1)):
        raise NotImplementedError("conv_transpose2d_fold: groups=1, dilation=1 only")
    b, in_ch, h, w = input.shape
    _, out_ch, kh, kw = weight.shape
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    (sh, sw), (ph, pw), (oh, ow) = pair(stride), pair(padding), pair(output_padding)
    ho, wo = (h - 1) * sh - 2 * ph + kh + oh, (w - 1) * sw - 2 * pw + kw + ow
    cols = weight.reshape(in_ch, -1).t() @ input.reshape(b, in_ch, h * w)
    out = F.fold(cols, (ho, wo), (kh, kw), padding=(ph, pw), stride=(sh, sw))
    return out if bias is None else out + bias[None, :, None, None]


def _split_matmul(weight: Tensor, x: Tensor) -> Tensor:
    """``weight @ x`` summed in another order: the second half of the inputs first."""
    half = weight.shape[1] // 2
    if half == 0:
        return torch.matmul(weight, x)
    return torch.matmul(weight[:, half:], x[..., half:, :]) + torch.matmul(weight[:, :half], x[..., :half, :])


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def onednn_disabled() -> Iterator[None]:
    """Run with oneDNN (mkldnn) switched off: PyTorch's own conv kernels."""
    with torch.backends.mkldnn.flags(enabled=False):
        yield


@contextlib.contextmanager
def other_conv_algorithm() -> Iterator[None]:
    """Convolutions as unfold/fold + matmul, and the integer path's products summed in another order."""
    saved = F.conv2d, F.conv_transpose2d, integer.exact_matmul
    F.conv2d, F.conv_transpose2d, integer.exact_matmul = conv2d_unfold, conv_transpose2d_fold, _split_matmul
    try:
        yield
    finally:
        F.conv2d, F.conv_transpose2d, integer.exact_matmul = saved


@contextlib.contextmanager
def unchanged() -> Iterator[None]:
    yield


# name -> (context manager, whether the decoder's copy of the model is cast to float64)
PERTURBATIONS: dict[str, tuple[Callable[[], contextlib.AbstractContextManager], bool]] = {
    "1 thread": (lambda: threads(1), False),
    "2 threads": (lambda: threads(2), False),
    "oneDNN disabled": (onednn_disabled, False),
    "float64 model": (unchanged, True),
    "unfold+matmul convs": (other_conv_algorithm, False),
}
