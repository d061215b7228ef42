"""Generalized Gaussian conditional entropy model (a drop-in sibling of CompressAI's
``GaussianConditional`` with a per-element shape parameter).

Model
    A latent ``y`` with mean ``mu``, scale ``alpha`` and shape ``beta > 0`` has density

        p(u) = beta / (2 alpha Gamma(1/beta)) * exp(-|u / alpha|^beta),   u = y - mu,

    and CDF ``F(u) = 1/2 + sign(u)/2 * P(1/beta, |u/alpha|^beta)`` where ``P`` is the
    regularized lower incomplete gamma function (``torch.special.gammainc``).
    beta = 1 is a Laplacian, beta = 2 a Gaussian of standard deviation alpha / sqrt(2).
    The likelihood of the rounded symbol ``v`` is ``F(v + 1/2) - F(v - 1/2)``; it is
    evaluated with the lower incomplete gamma near the mean and with the upper one
    (``gammaincc``) in the tails, so it never subtracts two numbers close to 1.

Scale floor
    As in CompressAI the scale is bounded from below, but the floor is placed on the
    *standard deviation*: ``std = alpha / c(beta)`` with
    ``c(beta) = sqrt(Gamma(1/beta) / Gamma(3/beta))``, so

        alpha_min(beta) = scale_bound * c(beta)        (scale_bound = 0.11 by default).

    At beta = 2 this is exactly ``GaussianConditional``'s floor (sigma >= 0.11). Relative to
    the zero-symbol probability the floor is stricter for small beta: the most confident
    prediction allowed is P(0) = 0.993 at beta = 0.5 and 0.999995 at beta = 2, i.e. heavy-tailed
    shapes cannot claim a near-certain zero. Because the coding tables are indexed by the same
    standard deviation (the first table std is the floor), ``forward`` and ``build_indexes``
    apply the same floor: an element below it is modelled, and coded, at std = scale_bound,
    the first table std.

Gradients
    ``torch.special.gammainc`` has no derivative with respect to its first argument, so the
    likelihood is a custom ``torch.autograd.Function``: the value and scale gradients use the
    analytic density, ``dP/dv = p(v + 1/2) - p(v - 1/2)`` and
    ``dP/dalpha = -((v + 1/2) p(v + 1/2) - (v - 1/2) p(v - 1/2)) / alpha``, and the shape
    gradient is a central finite difference of the log-likelihood,
    ``dP/dbeta = P * (log P(beta + h) - log P(beta - h)) / 2h`` with ``h = 1e-3``
    (``beta_grad_step``), evaluated in float64 whatever the input dtype (in float32 the
    rounding of P, ~1e-6 relative, divided by 2h would swamp the derivative). log P is nearly
    linear in beta in the tails, where P is not, so the truncation error stays below ~1e-4
    relative (the gradient is 0 where P underflows). The mean's gradient flows through
    ``v = y - mu``.

Coding
    ``update()`` builds one quantized CDF per (std, beta) pair of a scale table (standard
    deviations, CompressAI's log-spaced ``get_scale_table()`` by default) times a beta table
    (``beta_levels`` log-spaced shapes over ``beta_range``). Each table covers the
    ``1 - tail_mass`` central interval of its own distribution (heavy tails get a wider
    support), capped at the width of the widest Gaussian table; symbols outside it are
    escaped by the rANS coder's bypass mode. ``build_indexes`` picks, for each element, the
    nearest beta of the table (in log beta) and the smallest table std >= the element's
    bounded std (as ``GaussianConditional`` does).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple, Union

import scipy.special
import scipy.stats
import torch
from compressai.entropy_models import EntropyModel
from compressai.models.base import get_scale_table
from compressai.ops.bound_ops import LowerBoundFunction
from torch import Tensor

from pipeline.codec.entropy.compact import CompactTablesMixin

__all__ = ["GeneralizedGaussianConditional", "gg_bin_probability", "std_factor"]

TableLike = Union[Sequence[float], Tensor]

_TABLE_BUFFERS = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table", "beta_table")


def std_factor(betas: Tensor) -> Tensor:
    """``c(beta) = alpha / std = sqrt(Gamma(1/beta) / Gamma(3/beta))``."""
    return torch.exp(0.5 * (torch.lgamma(1.0 / betas) - torch.lgamma(3.0 / betas)))


def gg_bin_probability(values: Tensor, scales: Tensor, betas: Tensor) -> Tensor:
    """Probability of the unit bin centred on ``values`` (offsets from the mean); no grad."""
    shape = 1.0 / betas
    t = values.abs()
    z_hi = ((t + 0.5) / scales) ** betas
    z_lo = ((t - 0.5).abs() / scales) ** betas
    lower_hi, lower_lo = torch.special.gammainc(shape, z_hi), torch.special.gammainc(shape, z_lo)
    straddle, lower = lower_hi + lower_lo, lower_hi - lower_lo
    upper = torch.special.gammaincc(shape, z_lo) - torch.special.gammaincc(shape, z_hi)
    one_sided = torch.where(z_lo > shape, upper, lower)
    return 0.5 * torch.where(t < 0.5, straddle, one_sided)


def _density(u: Tensor, scales: Tensor, betas: Tensor) -> Tensor:
    log_norm = torch.log(betas / (2.0 * scales)) - torch.lgamma(1.0 / betas)
    return torch.exp(log_norm - (u.abs() / scales) ** betas)


class _BinProbability(torch.autograd.Function):
    """Bin probability with analytic value/scale gradients and a finite-difference beta one."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, scales: Tensor, betas: Tensor, step: float) -> Tensor:
        probability = gg_bin_probability(values, scales, betas)
        ctx.save_for_backward(values, scales, betas, probability)
        ctx.step = step
        return probability

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        values, scales, betas, probability = ctx.saved_tensors
        need_v, need_s, need_b, _ = ctx.needs_input_grad
        grad_v = grad_s = grad_b = None
        if need_v or need_s:
            hi, lo = values + 0.5, values - 0.5
            p_hi, p_lo = _density(hi, scales, betas), _density(lo, scales, betas)
            if need_v:
                grad_v = grad * (p_hi - p_lo)
            if need_s:
                grad_s = grad * (lo * p_lo - hi * p_hi) / scales
        if need_b:
            # difference of log P (far smoother in beta than P in the tails), in float64:
            # float32 rounding of P divided by 2h would swamp the derivative
            h = ctx.step
            v, s, b = values.double(), scales.double(), betas.double()
            p_plus, p_minus = gg_bin_probability(v, s, b + h), gg_bin_probability(v, s, b - h)
            dlog = (p_plus.log() - p_minus.log()) / (2.0 * h)
            usable = (p_plus > 0) & (p_minus > 0)
            dlog = torch.where(usable, dlog, torch.zeros_like(dlog)).to(grad.dtype)
            grad_b = grad * probability * dlog
        return grad_v, grad_s, grad_b, None


def _prepare_table(table: TableLike, name: str) -> Tensor:
    table = torch.as_tensor(table, dtype=torch.float32).flatten()
    if table.numel() < 1 or bool((table <= 0).any()) or bool((table.diff() <= 0).any()):
        raise ValueError(f"Invalid {name}: expected positive, strictly increasing values")
    return table


class GeneralizedGaussianConditional(CompactTablesMixin, EntropyModel):
    """Generalized Gaussian conditional layer (scale ``alpha``, shape ``beta``).

    Args:
        scale_table: coding-table standard deviations (default: ``get_scale_table()``).
        beta_table: coding-table shapes (default: ``beta_levels`` log-spaced over ``beta_range``).
        beta_range: shapes are bounded to this closed interval.
        scale_bound: floor on the standard deviation, ``alpha >= scale_bound * c(beta)``.
        tail_mass: probability mass left outside each table's support (escape coded).
        beta_levels: size of the default beta table.
        beta_grad_step: step ``h`` of the central finite difference for the beta gradient.
        **kwargs: ``likelihood_bound``, ``entropy_coder``, ``entropy_coder_precision``.
    """

    scale_table: Tensor
    beta_table: Tensor

    def __init__(
        self,
        scale_table: Optional[TableLike] = None,
        beta_table: Optional[TableLike] = None,
        *,
        beta_range: Tuple[float, float] = (0.5, 3.0),
        scale_bound: float = 0.11,
        tail_mass: float = 1e-9,
        beta_levels: int = 12,
        beta_grad_step: float = 1e-3,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        beta_min, beta_max = (float(b) for b in beta_range)
        if not 0 < beta_min < beta_max:
            raise ValueError(f"Invalid beta_range {beta_range}")
        if scale_bound <= 0 or not 0 < tail_mass < 1 or beta_levels < 1 or beta_grad_step <= 0:
            raise ValueError("Invalid parameters")
        self.beta_range = (beta_min, beta_max)
        self.scale_bound = float(scale_bound)
        self.tail_mass = float(tail_mass)
        self.beta_levels = int(beta_levels)
        self.beta_grad_step = float(beta_grad_step)
        for name, table in (("scale_table", scale_table), ("beta_table", beta_table)):
            self.register_buffer(
                name, torch.Tensor() if table is None else _prepare_table(table, name))

    # -- parameter bounds ------------------------------------------------------------
    def bound_beta(self, raw: Tensor) -> Tensor:
        """Map an unconstrained tensor onto ``beta_range`` with a sigmoid."""
        beta_min, beta_max = self.beta_range
        return beta_min + (beta_max - beta_min) * torch.sigmoid(raw)

    def clamp_betas(self, betas: Tensor) -> Tensor:
        """Clamp shapes to ``beta_range`` (gradients pass when they point inwards)."""
        beta_min, beta_max = self.beta_range
        betas = LowerBoundFunction.apply(betas, betas.new_tensor(beta_min))
        return -LowerBoundFunction.apply(-betas, betas.new_tensor(-beta_max))

    def lower_bound_scales(self, scales: Tensor, betas: Tensor) -> Tensor:
        """Apply the floor ``alpha >= scale_bound * c(beta)`` to already clamped shapes."""
        floor = self.scale_bound * std_factor(betas.detach())
        scales, floor = torch.broadcast_tensors(scales, floor.to(scales.dtype))
        return LowerBoundFunction.apply(scales, floor)

    # -- likelihood ------------------------------------------------------------------
    def _likelihood(
        self, inputs: Tensor, scales: Tensor, betas: Tensor, means: Optional[Tensor] = None
    ) -> Tensor:
        values = inputs - means if means is not None else inputs
        betas = self.clamp_betas(betas)
        scales = self.lower_bound_scales(scales, betas)
        values, scales, betas = torch.broadcast_tensors(values, scales, betas.to(scales.dtype))
        return _BinProbability.apply(values, scales, betas, self.beta_grad_step)

    def forward(
        self,
        inputs: Tensor,
        scales: Tensor,
        betas: Tensor,
        means: Optional[Tensor] = None,
        training: Optional[bool] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Quantize (noise in training, rounding around ``means`` in eval) and return
        ``(outputs, likelihoods)``; ``scales``/``betas``/``means`` broadcast to ``inputs``."""
        if training is None:
            training = self.training
        outputs = self.quantize(inputs, "noise" if training else "dequantize", means)
        likelihood = self._likelihood(outputs, scales, betas, means)
        if self.use_likelihood_bound:
            likelihood = self.likelihood_lower_bound(likelihood)
        return outputs, likelihood

    # -- coding tables ---------------------------------------------------------------
    def _default_beta_table(self) -> Tensor:
        beta_min, beta_max = self.beta_range
        return torch.logspace(math.log10(beta_min), math.log10(beta_max), self.beta_levels)

    def update(
        self,
        force: bool = False,
        scale_table: Optional[TableLike] = None,
        beta_table: Optional[TableLike] = None,
    ) -> bool:
        """Build the quantized CDF tables; returns False if they exist and not ``force``.

        Tables given here replace the stored ones; otherwise the stored (or default) ones are used.
        """
        if self._offset.numel() > 0 and not force:
            return False
        device = self.scale_table.device
        if scale_table is not None or self.scale_table.numel() == 0:
            table = get_scale_table() if scale_table is None else scale_table
            self.scale_table = _prepare_table(table, "scale_table").to(device)
        if beta_table is not None or self.beta_table.numel() == 0:
            table = self._default_beta_table() if beta_table is None else beta_table
            self.beta_table = _prepare_table(table, "beta_table").to(device)

        # Tables are ordered beta-major: index = beta_index * len(scale_table) + scale_index.
        stds = self.scale_table.double().repeat(len(self.beta_table))
        betas = self.beta_table.double().repeat_interleave(len(self.scale_table))
        alphas = stds * std_factor(betas)
        shape = (1.0 / betas).cpu().numpy()
        # |u / alpha| beyond which the two tails hold tail_mass
        quantile = torch.from_numpy(scipy.special.gammainccinv(shape, self.tail_mass) ** shape)
        gauss_multiplier = -scipy.stats.norm.ppf(self.tail_mass / 2)
        max_center = math.ceil(float(self.scale_table.max()) * gauss_multiplier)
        pmf_center = torch.ceil(alphas * quantile.to(device)).clamp(max=max_center).int()
        pmf_length = 2 * pmf_center + 1
        max_length = int(pmf_length.max())

        positions = torch.arange(max_length, device=device)
        samples = (positions - pmf_center[:, None]).double()
        valid = positions < pmf_length[:, None]  # only evaluate each table's own support
        pmf = torch.zeros_like(samples)
        pmf[valid] = gg_bin_probability(
            samples[valid], alphas[:, None].expand_as(samples)[valid],
            betas[:, None].expand_as(samples)[valid])
        edges = ((pmf_center.double() + 0.5) / alphas) ** betas
        tail_mass = torch.special.gammaincc(1.0 / betas, edges)[:, None]

        self._quantized_cdf = self._pmf_to_cdf(pmf, tail_mass, pmf_length, max_length)
        self._offset = -pmf_center
        self._cdf_length = pmf_length + 2
        return True

    def build_indexes(self, scales: Tensor, betas: Tensor) -> Tensor:
        """CDF table index per element: nearest table beta (in log beta), then the smallest
        table std >= the element's bounded std (the same bounds as in ``forward``)."""
        if self.scale_table.numel() == 0 or self.beta_table.numel() == 0:
            raise ValueError("Uninitialized tables. Run update() first")
        with torch.no_grad():
            betas = self.clamp_betas(betas).to(scales.dtype)
            # the floor alpha >= scale_bound * c(beta) of forward(), in std units
            stds = (scales / std_factor(betas)).clamp_min(self.scale_bound)
            stds, betas = torch.broadcast_tensors(stds, betas)
            scale_index = torch.bucketize(stds, self.scale_table[:-1].to(stds.dtype))
            log_betas = self.beta_table.log().to(betas.dtype)
            beta_index = torch.bucketize(betas.log(), (log_betas[1:] + log_betas[:-1]) / 2)
            return (beta_index * len(self.scale_table) + scale_index).int()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any
                              ) -> None:
        # Table buffers change size on update(): resize ours to the incoming ones first.
        for name in _TABLE_BUFFERS:
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if incoming is not None and incoming.shape != current.shape:
                setattr(self, name, current.new_empty(incoming.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
