"""The integer-exact path that selects the latent's coding tables (portable ``.roic`` files).

A coder falls out of step, and a file decodes to garbage, when the encoder and the
decoder pick different CDF tables for one element. With a floating-point hyper-decoder
that happens across machines (thread counts, oneDNN, CUDA's TF32, float64): a scale that
lands near a table boundary rounds to a neighbour on one side only. So, as in Ballé,
Johnston and Minnen, "Integer networks for data compression with latent-variable models"
(ICLR 2019), everything that selects a table is computed here with integer arithmetic
from integers (the hyper-latent's decoded symbols):

- :class:`IntegerHyperSynthesis` is a post-training integerisation of the float
  hyper-decoder ``h_s``: per-output-channel power-of-two weight scales (|w| < 2^15),
  integer biases, and after every layer a rounding right-shift to a per-layer fixed-point
  format and a clamp to |a| < 2^20; LeakyReLU's slope is 41/4096. The formats come from a
  data-free calibration (hyper-latents drawn from the entropy bottleneck's own CDF tables,
  8x headroom), so ``update()`` needs no images.
- Sums are exact: integers held in float64, every accumulator bounded below 2^52
  (checked when the layer is built: ``fan_in * 2^20 * 2^15 + |bias|``), so no order of
  summation (threads, BLAS kernels, GPU atomics) can change a result; each conv is a sum of
  per-tap matrix products written out here, never a library conv algorithm (Winograd/FFT
  are inexact). Rounding, shifts and clamps are elementwise IEEE operations on exact
  values, identical everywhere.
- :class:`GaussianTableIndex` and :class:`GeneralizedGaussianTableIndex` turn the last
  layer's integer scale (and shape) outputs into table indexes by comparing with integer
  thresholds computed once from the tables.

Means come out of the same integer network (so they are exact too); the synthesis
transform stays floating point: it only moves the reconstruction by rounding noise.
Everything here is stored in buffers: built by ``update()`` when a checkpoint is written,
loaded with it, never recomputed at load time.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACT_BITS = 20          # activations are clamped to |a| <= 2^20 - 1
WEIGHT_BITS = 15       # |integer weight| <= 2^15 - 1
ACC_LIMIT = 2 ** 52    # float64 holds every integer below 2^53 exactly
HEADROOM_BITS = 3      # calibrated maxima get 8x headroom before the clamp
LEAKY_NUM, LEAKY_SHIFT = 41, 12  # LeakyReLU(0.01) as x * 41 / 4096 for x < 0
MAX_FRAC = 40          # fraction bits are capped (all-zero layers of an untrained model)
ACT_MAX = 2 ** ACT_BITS - 1
WEIGHT_MAX = 2 ** WEIGHT_BITS - 1


def exact_matmul(weight: Tensor, x: Tensor) -> Tensor:
    """``weight @ x`` on float64 integers whose every partial sum stays below 2^53 (exact)."""
    return torch.matmul(weight, x)


def _shift_scales(shift: Tensor) -> Tensor:
    """``2^-shift`` per channel as a (1,C,1,1) float64 tensor, made by Python's ``ldexp``
    (exact), not a device ``pow``."""
    return torch.tensor([math.ldexp(1.0, -s) for s in shift.tolist()], dtype=torch.float64,
                        device=shift.device)[None, :, None, None]


class IntegerConv(nn.Module):
    """A conv or transposed conv of the hyper-decoder with integer weights and bias.

    ``forward`` maps an integer activation tensor (fixed point, the previous layer's
    fraction bits) to this layer's integer output: exact accumulation, rounding shift,
    optional integer activation ("leaky": LeakyReLU(0.01), "relu"), clamp. A masked conv
    (CompressAI's ``MaskedConv2d``, the checkerboard context) is integerised with its mask applied.
    """

    def __init__(self, layer: nn.Conv2d | nn.ConvTranspose2d, activation: str | None = None) -> None:
        super().__init__()
        self.transposed = isinstance(layer, nn.ConvTranspose2d)
        if layer.groups != 1 or layer.dilation != (1, 1) or layer.kernel_size[0] != layer.kernel_size[1]:
            raise ValueError("only square, ungrouped, undilated convolutions can be integerised")
        self.kernel = layer.kernel_size[0]
        self.stride = layer.stride[0]
        self.padding = layer.padding[0]
        self.output_padding = layer.output_padding[0] if self.transposed else 0
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS, key=str)}")
        self.activation = activation
        out_ch = layer.out_channels
        in_ch = layer.in_channels
        self.register_buffer("weight", torch.zeros(out_ch, in_ch, self.kernel, self.kernel, dtype=torch.int64))
        self.register_buffer("bias", torch.zeros(out_ch, dtype=torch.int64))
        self.register_buffer("shift", torch.zeros(out_ch, dtype=torch.int64))

    def fan_in(self) -> int:
        """The most products one accumulator can sum (a bound, not exact for strided layers)."""
        return self.weight.shape[1] * self.kernel * self.kernel

    @torch.no_grad()
    def quantize(self, layer: nn.Conv2d | nn.ConvTranspose2d, in_frac: int, out_frac: int) -> None:
        """Integer weights/bias/shift of ``layer`` for inputs with ``in_frac`` fraction bits and
        outputs with ``out_frac``; raises if an accumulator could leave the exact range."""
        w = _effective_weight(layer).to("cpu", torch.float64)
        if self.transposed:
            w = w.permute(1, 0, 2, 3)  # ConvTranspose2d stores (in, out, k, k)
        peak = w.abs().amax(dim=(1, 2, 3))
        w_frac = torch.where(peak > 0, torch.floor(torch.log2(WEIGHT_MAX / peak.clamp_min(1e-300))),
                             torch.full_like(peak, MAX_FRAC)).clamp(max=MAX_FRAC)
        b = layer.bias.detach().to("cpu", torch.float64) if layer.bias is not None else torch.zeros_like(peak)
        for _ in range(MAX_FRAC + 64):
            w_int = torch.round(w * torch.pow(2.0, w_frac)[:, None, None, None]).clamp(-WEIGHT_MAX, WEIGHT_MAX)
            acc_frac = w_frac + in_frac
            b_int = torch.round(b * torch.pow(2.0, acc_frac))
            bound = self.fan_in() * ACT_MAX * w_int.abs().amax(dim=(1, 2, 3)) + b_int.abs()
            over = bound >= ACC_LIMIT
            if not bool(over.any()):
                break
            # a large bias next to small (or zero: a constant output) weights: coarser fixed point
            w_frac = w_frac - over.to(w_frac.dtype)
        if bool((bound >= ACC_LIMIT).any()):
            raise ValueError(f"integer layer accumulator bound {float(bound.max()):.3g} exceeds 2^52 "
                             "(fan-in too large for exact float64 sums)")
        device = self.weight.device
        self.weight.copy_(w_int.to(device, torch.int64))
        self.bias.copy_(b_int.to(device, torch.int64))
        self.shift.copy_((acc_frac - out_frac).to(device, torch.int64))

    def _prepared(self) -> tuple[list[tuple[int, int, Tensor]], Tensor, Tensor]:
        """The float64 forms of the buffers, cached until a buffer changes: the taps with a
        non-zero weight (a masked conv's others are skipped) as contiguous matrices, the
        bias and the per-channel ``2^-shift``."""
        key = tuple((t.data_ptr(), t._version, t.device) for t in (self.weight, self.bias, self.shift))
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] != key:
            w = self.weight.to(torch.float64)
            taps = [(dy, dx, w[:, :, dy, dx].contiguous()) for dy in range(self.kernel) for dx in range(self.kernel)
                    if bool(w[:, :, dy, dx].any())]
            cache = (key, taps, self.bias.to(torch.float64)[None, :, None, None], _shift_scales(self.shift))
            self._cache = cache
        return cache[1], cache[2], cache[3]

    def accumulate(self, x: Tensor) -> Tensor:
        """The exact integer sums ``conv(x, weight) + bias`` (float64 holding integers)."""
        taps, bias, _ = self._prepared()
        b, c_in, h, wd = x.shape
        k, s, p = self.kernel, self.stride, self.padding
        out_ch = self.weight.shape[0]
        if not self.transposed:
            xp = F.pad(x, (p, p, p, p))
            ho, wo = (h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1
            out = x.new_zeros(b, out_ch, ho * wo)
            for dy, dx, w in taps:
                patch = xp[:, :, dy:dy + s * (ho - 1) + 1:s, dx:dx + s * (wo - 1) + 1:s]
                out += exact_matmul(w, patch.reshape(b, c_in, ho * wo))
            out = out.reshape(b, out_ch, ho, wo)
        else:
            ho = (h - 1) * s - 2 * p + k + self.output_padding
            wo = (wd - 1) * s - 2 * p + k + self.output_padding
            canvas = x.new_zeros(b, out_ch, (h - 1) * s + k + self.output_padding,
                                 (wd - 1) * s + k + self.output_padding)
            cols = x.reshape(b, c_in, h * wd)
            for dy, dx, w in taps:
                contrib = exact_matmul(w, cols).reshape(b, out_ch, h, wd)
                canvas[:, :, dy:dy + s * (h - 1) + 1:s, dx:dx + s * (wd - 1) + 1:s] += contrib
            out = canvas[:, :, p:p + ho, p:p + wo]
        return out + bias

    def forward(self, x: Tensor) -> Tensor:
        out = torch.floor(self.accumulate(x) * self._prepared()[2] + 0.5)  # round(acc / 2^shift), half up
        if self.activation == "leaky":
            out = torch.where(out < 0, torch.floor(out * LEAKY_NUM * math.ldexp(1.0, -LEAKY_SHIFT)), out)
        elif self.activation == "relu":
            out = out.clamp_min(0.0)
        return out.clamp(-ACT_MAX, ACT_MAX)


ACTIVATIONS = {None: lambda x: x, "leaky": lambda x: F.leaky_relu(x, 0.01), "relu": F.relu}


def _effective_weight(layer: nn.Module) -> Tensor:
    """A conv's weight as it computes: times its mask for CompressAI's masked convs."""
    w = layer.weight.detach()
    mask = getattr(layer, "mask", None)
    return w * mask.to(w.dtype) if isinstance(mask, Tensor) else w


def _conv_layers(net: nn.Sequential) -> list[tuple[nn.Module, str | None]]:
    """(conv, activation after it) pairs of a conv/activation stack like CompressAI's h_s."""
    modules = list(net) if isinstance(net, nn.Sequential) else [net]
    layers = []
    for i, m in enumerate(modules):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            follows = modules[i + 1] if i + 1 < len(modules) else None
            if follows is not None and not isinstance(follows, (nn.LeakyReLU, nn.ReLU, nn.Conv2d,
                                                                nn.ConvTranspose2d)):
                raise ValueError(f"cannot integerise a {type(follows).__name__}")
            if isinstance(follows, nn.LeakyReLU) and abs(follows.negative_slope - 0.01) > 1e-9:
                raise ValueError("only LeakyReLU(0.01) has an integer form here")
            act = "leaky" if isinstance(follows, nn.LeakyReLU) else "relu" if isinstance(follows, nn.ReLU) else None
            layers.append((m, act))
        elif not isinstance(m, (nn.LeakyReLU, nn.ReLU)):
            raise ValueError(f"cannot integerise a {type(m).__name__}")
    return layers


def float_conv(layer: nn.Module, x: Tensor) -> Tensor:
    """What ``layer`` computes, in float64 on the CPU (calibration only)."""
    w = _effective_weight(layer).to("cpu", torch.float64)
    b = None if layer.bias is None else layer.bias.detach().to("cpu", torch.float64)
    if isinstance(layer, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, w, b, layer.stride, layer.padding, layer.output_padding)
    return F.conv2d(x, w, b, layer.stride, layer.padding)


class IntegerNetwork(nn.Module):
    """A conv/activation stack in integer arithmetic: fixed point in (``fractions[0]`` fraction
    bits), fixed point out (``output_frac``). Build it with :meth:`quantize_from`."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(IntegerConv(m, act) for m, act in _conv_layers(net))
        self.register_buffer("fractions", torch.zeros(len(self.layers) + 1, dtype=torch.int64))

    @property
    def input_frac(self) -> int:
        return int(self.fractions[0])

    @property
    def output_frac(self) -> int:
        return int(self.fractions[-1])

    @torch.no_grad()
    def quantize_from(self, net: nn.Module, calibration: Tensor, in_frac: int) -> Tensor:
        """Integerise ``net`` for inputs with ``in_frac`` fraction bits: each layer's output
        format fits the largest magnitude it reaches on ``calibration`` (typical float inputs)
        times 2^HEADROOM_BITS. Returns ``net``'s float64 output on ``calibration``."""
        layers = _conv_layers(net)
        x = calibration.detach().to("cpu", torch.float64)
        fractions = [int(in_frac)]
        for layer, act in layers:
            x = float_conv(layer, x)
            headroom = max(float(x.abs().max()) if x.numel() else 0.0, 1e-9) * 2 ** HEADROOM_BITS
            fractions.append(min(MAX_FRAC, math.floor(math.log2(ACT_MAX / headroom))))
            x = ACTIVATIONS[act](x)
        for (layer, _), int_layer, f_in, f_out in zip(layers, self.layers, fractions[:-1], fractions[1:]):
            int_layer.quantize(layer, f_in, f_out)
        self.fractions.copy_(torch.tensor(fractions, dtype=torch.int64))
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Integer outputs (float64 holding integers) from integer inputs at ``input_frac``."""
        for layer in self.layers:
            x = layer(x)
        return x


def change_frac(x: Tensor, from_frac: int, to_frac: int) -> Tensor:
    """Fixed-point integers ``x`` with ``from_frac`` fraction bits re-expressed with ``to_frac``
    (exact left shift, or rounding right shift), clamped to the activation range."""
    if to_frac >= from_frac:
        out = x * math.ldexp(1.0, to_frac - from_frac)
    else:
        out = torch.floor(x * math.ldexp(1.0, to_frac - from_frac) + 0.5)
    return out.clamp(-ACT_MAX, ACT_MAX)


class IntegerHyperSynthesis(IntegerNetwork):
    """The hyper-decoder ``h_s`` in integer arithmetic: z symbols in, integer entropy parameters out.

    Build it with :meth:`build` from the trained float ``h_s``; the output has
    ``output_frac`` fraction bits (value = integer / 2^output_frac).
    """

    def __init__(self, h_s: nn.Sequential, latent_channels: int) -> None:
        super().__init__(h_s)
        self.register_buffer("z_median", torch.zeros(latent_channels, dtype=torch.int64))
        self.register_buffer("z_bound", torch.zeros((), dtype=torch.int64))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def build(self, h_s: nn.Sequential, medians: Tensor, calibration_z: Tensor, z_bound: int) -> Tensor:
        """Integerise ``h_s`` for hyper-latents ``z_hat = symbol + median``; returns ``h_s``'s
        float64 output on ``calibration_z``.

        ``calibration_z`` (B,N,h,w) are typical z_hat values: each layer's output format is
        chosen so their largest magnitude, times 2^HEADROOM_BITS, fits the activation range.
        Symbols are clamped to ``|s| <= z_bound``.
        """
        medians = medians.detach().to("cpu", torch.float64).reshape(-1)
        z_peak = z_bound + float(medians.abs().max())
        in_frac = min(MAX_FRAC, math.floor(math.log2(ACT_MAX / max(z_peak, 1e-9))))
        side = self.quantize_from(h_s, calibration_z, in_frac)
        self.z_median.copy_(torch.round(medians * 2.0 ** in_frac).to(torch.int64))
        self.z_bound.fill_(int(z_bound))
        self.ready.fill_(True)
        return side

    def forward(self, z_symbols: Tensor) -> Tensor:
        """Integer entropy parameters (float64 holding integers) from integer z symbols (B,N,h,w)."""
        if not bool(self.ready):
            raise RuntimeError("the integer hyper-decoder is not built: run update() first")
        bound = float(self.z_bound)
        sym = z_symbols.to(torch.float64).clamp(-bound, bound)
        x = sym * math.ldexp(1.0, self.input_frac) + self.z_median.to(torch.float64)[None, :, None, None]
        return super().forward(x)


def hyper_latent_samples(eb: nn.Module, batch: int = 16, size: int = 8,
                         seed: int = 0) -> tuple[torch.Tensor, int]:
    """Hyper-latent symbols drawn from the bottleneck's own CDF tables, (batch,N,size,size)
    float64, and a clamp bound twice the tables' widest support (data-free calibration)."""
    cdf, lengths, offsets = (t.detach().cpu() for t in (eb._quantized_cdf, eb._cdf_length, eb._offset))
    gen = torch.Generator().manual_seed(seed)
    channels = []
    for c in range(cdf.shape[0]):
        n = int(lengths[c]) - 2  # regular symbols; the last slot is the escape code
        pmf = (cdf[c, 1:n + 1] - cdf[c, :n]).double().clamp_min(0) + 1e-12
        draws = torch.multinomial(pmf, batch * size * size, replacement=True, generator=gen)
        channels.append((draws + int(offsets[c])).reshape(batch, size, size))
    bound = int(max(abs(int(offsets.min())), abs(int((offsets + lengths - 3).max()))))
    return torch.stack(channels, 1).double(), 2 * bound + 8


def _thresholds(values: Tensor, frac: int) -> Tensor:
    """``floor(v * 2^frac)`` as int64: an integer x exceeds v * 2^frac iff it exceeds this."""
    return torch.floor(values.to(torch.float64) * 2.0 ** frac).to(torch.int64)


def count_below(thresholds: Tensor, values: Tensor) -> Tensor:
    """For each integer value, how many (sorted) thresholds are strictly below it (int64, exact)."""
    return torch.searchsorted(thresholds.contiguous(), values.to(torch.int64).contiguous(), right=False)


class GaussianTableIndex(nn.Module):
    """Gaussian scale -> table index: the smallest table scale >= the element's scale.

    The same rule as CompressAI's ``GaussianConditional.build_indexes`` (scales below the
    first table entry take table 0), on the integer scale output.
    """

    def __init__(self, levels: int) -> None:
        super().__init__()
        self.register_buffer("thresholds", torch.zeros(max(levels - 1, 0), dtype=torch.int64))

    @torch.no_grad()
    def build(self, scale_table: Tensor, frac: int) -> None:
        self.thresholds.copy_(_thresholds(scale_table.reshape(-1)[:-1].cpu(), frac).to(self.thresholds.device))

    def forward(self, scales_int: Tensor) -> Tensor:
        return count_below(self.thresholds, scales_int).int()


class GeneralizedGaussianTableIndex(nn.Module):
    """(scale, shape) -> table index of :class:`~pipeline.codec.entropy.GeneralizedGaussianConditional`.

    The shape index is the table beta nearest in log beta (thresholds on the raw,
    pre-sigmoid output); the scale index then uses that table beta's std factor, so the
    whole index is a comparison of integers with integer thresholds. ``per_channel``
    shapes (a learned parameter, not an output) are indexed once, when built.
    """

    def __init__(self, scale_levels: int, beta_levels: int, channels: int) -> None:
        super().__init__()
        self.scale_levels = scale_levels
        self.register_buffer("beta_thresholds", torch.zeros(max(beta_levels - 1, 0), dtype=torch.int64))
        self.register_buffer("scale_thresholds", torch.zeros(beta_levels, max(scale_levels - 1, 0),
                                                             dtype=torch.int64))
        self.register_buffer("channel_beta_index", torch.zeros(channels, dtype=torch.int64))

    @torch.no_grad()
    def build(self, scale_table: Tensor, beta_table: Tensor, beta_range: tuple[float, float], frac: int,
              std_factor: Callable[[Tensor], Tensor], channel_betas: Tensor | None = None) -> None:
        beta_min, beta_max = beta_range
        log_b = beta_table.to("cpu", torch.float64).log()
        mids = torch.exp((log_b[1:] + log_b[:-1]) / 2)
        raw = torch.logit(((mids - beta_min) / (beta_max - beta_min)).clamp(1e-12, 1 - 1e-12))
        self.beta_thresholds.copy_(_thresholds(raw, frac))
        factors = std_factor(beta_table.to("cpu", torch.float64))
        table = scale_table.to("cpu", torch.float64).reshape(-1)[:-1]
        self.scale_thresholds.copy_(_thresholds(factors[:, None] * table[None, :], frac))
        if channel_betas is not None:
            log_c = channel_betas.detach().to("cpu", torch.float64).reshape(-1).log()
            self.channel_beta_index.copy_(torch.bucketize(log_c, (log_b[1:] + log_b[:-1]) / 2))

    def forward(self, scales_int: Tensor, raw_int: Tensor | None) -> Tensor:
        """Indexes ``beta_index * scale_levels + scale_index``; ``raw_int`` None = per-channel shapes."""
        if raw_int is None:
            beta_index = self.channel_beta_index[None, :, None, None].expand(scales_int.shape)
        else:
            beta_index = count_below(self.beta_thresholds, raw_int)
        scale_index = torch.zeros_like(beta_index)
        for j in range(self.scale_thresholds.shape[0]):
            here = beta_index == j
            if bool(here.any()):
                scale_index[here] = count_below(self.scale_thresholds[j], scales_int[here])
        return (beta_index * self.scale_levels + scale_index).int()
