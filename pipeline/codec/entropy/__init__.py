"""Entropy models for y: the families (Gaussian, generalized Gaussian) and their coders."""

from pipeline.codec.entropy.compact import CompactGaussianConditional, CompactTablesMixin, pad_for_decoding
from pipeline.codec.entropy.families import FAMILIES, EntropyFamily, build_family
from pipeline.codec.entropy.generalized_gaussian import GeneralizedGaussianConditional, gg_bin_probability, std_factor

__all__ = ["FAMILIES", "CompactGaussianConditional", "CompactTablesMixin", "EntropyFamily",
           "GeneralizedGaussianConditional", "build_family", "gg_bin_probability", "pad_for_decoding", "std_factor"]
