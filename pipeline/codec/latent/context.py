"""The context entropy model: channel groups with a checkerboard context in each (ELIC's
space-channel context, He et al. CVPR 2022), on CompressAI's latent codecs, portable.

Training runs CompressAI's own ``ChannelGroupsLatentCodec`` over ``CheckerboardLatentCodec``
groups (two passes, y_hat by straight-through rounding around the predicted means, as
CompressAI's ``Elic2022Official``; its "twopass_faster" form, which does not assume two
parameters per channel): group k's entropy parameters come from the hyper-decoder's
output, a channel context of groups 0..k-1 and, for the non-anchor half of the checkerboard,
a masked 5x5 convolution of the group's anchors. The leaf of each group hands its parameters
to the entropy family (Gaussian or generalized Gaussian, :mod:`pipeline.codec.entropy.families`).

Coding replaces every float network on the index path by its integer twin
(:class:`~pipeline.codec.integer.IntegerNetwork`), as the hyperprior does for ``h_s``: the
inputs are integers only (the hyper-decoder's integer output and the decoded symbols), the
means are rounded to ``Y_FRAC`` fraction bits and the decoded latent is kept in that fixed
point (``symbol * 2^Y_FRAC + mean``), so every table index and every symbol is the same on
every machine. The integer twins are calibrated without data by sampling the model itself
(hyper-latents from the bottleneck's tables, each group from its own predicted Gaussian).
All of y goes into one rANS string (CompressAI's buffered encoder, read back step by step as
its autoregressive models do), so a file has the hyperprior's layout: one y string, one z string.
"""

from __future__ import annotations

import copy
from itertools import accumulate
from typing import Any

import torch
from compressai.ans import BufferedRansEncoder, RansDecoder
from compressai.latent_codecs import ChannelGroupsLatentCodec, CheckerboardLatentCodec, LatentCodec
from compressai.layers import CheckerboardMaskedConv2d
from compressai.layers.layers import sequential_channel_ramp
from compressai.models.utils import conv
from torch import Tensor, nn

from pipeline.codec.entropy import EntropyFamily, pad_for_decoding
from pipeline.codec.integer import ACT_MAX, IntegerNetwork, change_frac
from pipeline.codec.latent.base import HYPER_LEGACY_NAMES, LatentStructure
from pipeline.codec.steps import QuantSteps, quantize_stepped, stepped

Y_FRAC = 8  # fraction bits of the decoded latent and of the means on the integer path
HALVES = ("anchor", "non_anchor")


def default_groups(M: int) -> list[int]:
    """Five uneven channel groups, ELIC's proportions: b, b, 2b, 4b and the rest (b = M // 16)."""
    b = max(1, M // 16)
    groups = [b, b, 2 * b, 4 * b, M - 8 * b]
    if groups[-1] <= 0:
        raise ValueError(f"M={M} is too small for five channel groups")
    return groups


class _GroupLeaf(LatentCodec):
    """One group's entropy model in training: the family's likelihood on its channels and
    ``y_hat = round((y - means) / step) * step + means`` with a straight-through gradient."""

    def __init__(self, first: int, end: int, family: EntropyFamily) -> None:
        super().__init__()
        self.first, self.end = first, end
        self._family = [family]  # not a submodule: the structure owns it
        self.steps: QuantSteps | None = None  # bound by ContextLatent.forward_y for one call

    def forward(self, y: Tensor, params: Tensor) -> dict[str, Any]:
        family = self._family[0]
        scales, means, extra = family.split(params)
        _, likelihoods = stepped(lambda v, s, m: family(v, s, m, extra, self.first, self.end),
                                 y, scales, means, self.steps)
        return {"likelihoods": {"y": likelihoods}, "y_hat": quantize_stepped(y, means, self.steps)}

    def _chunk(self, params: Tensor) -> tuple[Tensor, Tensor]:  # used by CheckerboardLatentCodec
        scales, means, _ = self._family[0].split(params)
        return scales, means


class _SteppedCheckerboard(CheckerboardLatentCodec):
    """CompressAI's checkerboard codec whose training pass quantises the anchors (the
    non-anchors' context) with the leaf's quantisation steps, as the coder does."""

    def _forward_twopass_faster(self, y: Tensor, side_params: Tensor) -> dict[str, Any]:
        leaf = self.latent_codec["y"]
        params = self._keep_only(self.entropy_parameters(self.merge(self._y_ctx_zero(y), side_params)), "anchor")
        _, means = leaf._chunk(params)
        y_hat_anchors = self._keep_only(quantize_stepped(y, means, leaf.steps), "anchor")
        y_ctx = self._keep_only(self.context_prediction(y_hat_anchors), "non_anchor")
        y_out = leaf(y, self.entropy_parameters(self.merge(y_ctx, side_params)))
        y_hat = y_out["y_hat"]
        self._copy(y_hat, y_hat_anchors, "anchor")
        return {"likelihoods": {"y": y_out["likelihoods"]["y"]}, "y_hat": y_hat}


class ContextLatent(LatentStructure):
    """Channel groups x checkerboard context for the latent y, with an integer coding path.

    Args:
        N, M, family: as :class:`~pipeline.codec.latent.base.LatentStructure`.
        groups: channels per group (they sum to M; default :func:`default_groups`).
        context_hidden: width of the channel-context networks (default N).
    """

    name = "context"
    legacy_names = {**HYPER_LEGACY_NAMES, "context": "latent_codec"}

    def __init__(self, N: int, M: int, family: EntropyFamily, groups: list[int] | None = None,
                 context_hidden: int | None = None) -> None:
        super().__init__(N, M, family)
        groups = list(groups) if groups is not None else default_groups(M)
        if sum(groups) != M or min(groups) < 1:
            raise ValueError(f"channel groups {groups} must be positive and sum to M={M}")
        self.groups, self.hidden = groups, context_hidden or N
        hidden, per_channel, side_channels = self.hidden, family.params_per_channel, family.params_per_channel * M
        self.bounds = list(zip(accumulate([0, *groups[:-1]]), accumulate(groups)))
        self.leaves = [_GroupLeaf(a, b, family) for a, b in self.bounds]
        channel_context = {
            f"y{k}": nn.Sequential(conv(sum(groups[:k]), hidden, kernel_size=5, stride=1), nn.ReLU(inplace=True),
                                   conv(hidden, hidden, kernel_size=5, stride=1), nn.ReLU(inplace=True),
                                   conv(hidden, 2 * groups[k], kernel_size=5, stride=1))
            for k in range(1, len(groups))}
        group_codecs = {
            f"y{k}": _SteppedCheckerboard(
                latent_codec={"y": self.leaves[k]}, forward_method="twopass_faster",  # any parameter count
                context_prediction=CheckerboardMaskedConv2d(g, 2 * g, kernel_size=5, stride=1, padding=2),
                entropy_parameters=sequential_channel_ramp(
                    2 * g + (k > 0) * 2 * g + side_channels, per_channel * g, num_layers=3,
                    make_layer=nn.Conv2d, make_act=lambda: nn.ReLU(inplace=True), kernel_size=1))
            for k, g in enumerate(groups)}
        self.codec = ChannelGroupsLatentCodec(latent_codec=group_codecs, channel_context=channel_context,
                                              groups=groups)
        self.int_channel_context = nn.ModuleDict({k: IntegerNetwork(net) for k, net in channel_context.items()})
        self.int_context_prediction = nn.ModuleList(IntegerNetwork(c.context_prediction)
                                                    for c in self._group_codecs())
        self.int_entropy_parameters = nn.ModuleList(IntegerNetwork(c.entropy_parameters)
                                                    for c in self._group_codecs())
        self.table_indexes = nn.ModuleList(family.make_table_index(g) for g in groups)
        self.register_buffer("input_fracs", torch.zeros(len(groups), dtype=torch.int64))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    @property
    def config(self) -> dict[str, Any]:
        return {"groups": self.groups, "context_hidden": self.hidden}

    def _group_codecs(self) -> list[CheckerboardLatentCodec]:
        return [self.codec.latent_codec[f"y{k}"] for k in range(len(self.groups))]

    # -- training --------------------------------------------------------------------
    def forward_y(self, y: Tensor, side: Tensor, steps: QuantSteps | None) -> tuple[Tensor, Tensor]:
        """``(y_hat, likelihoods)`` of y given the side parameters, as CompressAI's codecs compute them."""
        for leaf in self.leaves:
            leaf.steps = steps
        try:
            out = self.codec(y, side)
        finally:
            for leaf in self.leaves:
                leaf.steps = None
        return out["y_hat"], out["likelihoods"]["y"]

    # -- integer coding path ---------------------------------------------------------
    def y_path_ready(self) -> bool:
        return bool(self.ready)

    @torch.no_grad()
    def build_y_path(self, side: Tensor, seed: int = 0) -> None:
        """Integerise the context networks (``side``: typical float side parameters, whose
        integer form has ``hyper_int.output_frac`` fraction bits) and build each group's table index."""
        side_frac = self.hyper_int.output_frac
        records = self._calibration_inputs(side, seed)
        codecs = self._group_codecs()
        for k, ((first, end), cb) in enumerate(zip(self.bounds, codecs)):
            fracs = [side_frac]
            if k:
                net = self.int_channel_context[f"y{k}"]
                net.quantize_from(self.codec.channel_context[f"y{k}"], records["channel"][k], Y_FRAC)
                fracs.append(net.output_frac)
            self.int_context_prediction[k].quantize_from(cb.context_prediction, records["spatial"][k], Y_FRAC)
            fracs.append(self.int_context_prediction[k].output_frac)
            self.input_fracs[k] = min(fracs)
            self.int_entropy_parameters[k].quantize_from(cb.entropy_parameters, records["params"][k],
                                                         int(self.input_fracs[k]))
            self.family.build_table_index(self.table_indexes[k], self.int_entropy_parameters[k].output_frac,
                                          first, end)
        self.ready.fill_(True)

    def _calibration_inputs(self, side: Tensor, seed: int) -> dict[str, dict[int, Tensor]]:
        """Every context network's inputs while sampling the model: each group, anchors then
        non-anchors, drawn from its own predicted Gaussian around the predicted means (float64)."""
        nets = copy.deepcopy(self.codec, {id(self.family): self.family}).to("cpu", torch.float64).eval()
        side = side.detach().to("cpu", torch.float64)
        gen = torch.Generator().manual_seed(seed)
        n, _, h, w = side.shape
        y_hat = side.new_zeros(n, sum(self.groups), h, w)
        limit = ACT_MAX / 2 ** Y_FRAC
        records: dict[str, dict[int, Tensor]] = {"channel": {}, "spatial": {}, "params": {}}
        for k, (first, end) in enumerate(self.bounds):
            cb = nets.latent_codec[f"y{k}"]
            channel = None
            if k:
                records["channel"][k] = y_hat[:, :first].clone()
                channel = nets.channel_context[f"y{k}"](y_hat[:, :first])
            inputs = []
            for step in HALVES:
                anchors = y_hat[:, first:end]
                spatial = (anchors.new_zeros(n, 2 * (end - first), h, w) if step == "anchor"
                           else cb.context_prediction(anchors))
                if step == "non_anchor":
                    records["spatial"][k] = anchors.clone()
                inputs.append(torch.cat([t for t in (spatial, channel, side) if t is not None], 1))
                scales, means, _ = self.family.split(cb.entropy_parameters(inputs[-1]))
                noise = torch.randn(scales.shape, generator=gen, dtype=torch.float64)
                value = (torch.round(noise * scales.abs().clamp_min(0.11)) + means).clamp(-limit, limit)
                y_hat[:, first:end] += cb._keep_only(value, step)
            records["params"][k] = torch.cat(inputs)
        return records

    def code_y(self, side_int: Tensor, dtype: torch.dtype, steps: QuantSteps | None, y: Tensor | None = None,
               strings: list[bytes] | None = None) -> dict[str, Any]:
        """Encode ``y`` or decode ``strings`` (one per batch item), group by group and anchors
        before non-anchors, on the integer path; ``steps`` the quantisation steps (None: 1).

        Returns ``strings`` (when encoding), ``y_hat`` (symbols + means, what the synthesis
        sees), and the coded state ``indexes`` and ``symbols`` (full latent grids).
        """
        if not bool(self.ready):
            raise RuntimeError("the context model's integer path is not built: run update() first")
        side_frac, coder_model = self.hyper_int.output_frac, self.family.conditional
        n, _, h, w = side_int.shape
        shape = (n, sum(self.groups), h, w)
        y_int = side_int.new_zeros(shape)
        y_hat = torch.zeros(shape, dtype=dtype, device=side_int.device)
        indexes = torch.zeros(shape, dtype=torch.int32, device=side_int.device)
        symbols = torch.zeros(shape, dtype=torch.float64, device=side_int.device)
        if strings is None:
            coders = [BufferedRansEncoder() for _ in range(n)]
        else:
            coders = [RansDecoder() for _ in range(n)]
            for coder, string in zip(coders, strings):
                coder.set_stream(pad_for_decoding(string, symbols[0].numel()))
        step_halves = None if steps is None else [QuantSteps(q) for q in self._group_codecs()[0].unembed(
            steps.quarters.to(torch.float64).expand(n, 1, h, w))]
        for k, ((first, end), cb) in enumerate(zip(self.bounds, self._group_codecs())):
            frac = int(self.input_fracs[k])
            side_k = change_frac(side_int, side_frac, frac)
            channel = None
            if k:
                net = self.int_channel_context[f"y{k}"]
                channel = change_frac(net(y_int[:, :first]), net.output_frac, frac)
            halves = {name: t.new_zeros((2, n, end - first, h, w // 2))
                      for name, t in (("int", y_int), ("hat", y_hat), ("idx", indexes), ("sym", symbols))}
            for i in range(len(HALVES)):
                spatial_net = self.int_context_prediction[k]
                spatial = (side_int.new_zeros((n, 2 * (end - first), h, w)) if i == 0 else
                           change_frac(spatial_net(y_int[:, first:end]), spatial_net.output_frac, frac))
                inputs = cb.unembed(torch.cat([t for t in (spatial, channel, side_k) if t is not None], 1))[i]
                params_net = self.int_entropy_parameters[k]
                scales_int, means_int, extra_int = self.family.split(params_net(inputs))
                half_steps = None if step_halves is None else step_halves[i]
                if half_steps is not None:
                    scales_int = half_steps.divide_scales(scales_int)
                idx = self.family.table_indexes(self.table_indexes[k], scales_int, extra_int)
                means_q = change_frac(means_int, params_net.output_frac, Y_FRAC)
                means = (means_q * 2.0 ** -Y_FRAC).to(dtype)
                step = 1.0 if half_steps is None else half_steps.sizes(dtype)
                if strings is None:
                    sym = torch.round((cb.unembed(y[:, first:end])[i] - means) / step).to(torch.float64)
                    for b, coder in enumerate(coders):
                        coder_model.encode_into(coder, sym[b], idx[b])
                else:
                    sym = torch.stack([coder_model.decode_from(coder, idx[b])
                                       for b, coder in enumerate(coders)]).to(torch.float64)
                sym_q = sym if half_steps is None else half_steps.times(sym)  # exact: whole quarters
                halves["int"][i] = (sym_q * 2.0 ** Y_FRAC + means_q).clamp(-ACT_MAX, ACT_MAX)
                halves["hat"][i] = sym.to(dtype) * step + means
                halves["idx"][i], halves["sym"][i] = idx, sym
                y_int[:, first:end] = cb.embed(halves["int"])
            y_hat[:, first:end] = cb.embed(halves["hat"])
            indexes[:, first:end] = cb.embed(halves["idx"])
            symbols[:, first:end] = cb.embed(halves["sym"])
        out_strings = [coder.flush() for coder in coders] if strings is None else None
        return {"strings": out_strings, "y_hat": y_hat, "indexes": indexes, "symbols": symbols}
