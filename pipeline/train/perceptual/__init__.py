"""The perceptual second stage (TLIC): distortion terms, LPIPS and style on VGG-16, the
Laplacian-pyramid loss, and a U-Net discriminator conditioned on the decoded latent."""

from pipeline.train.perceptual.discriminator import (
    UNetDiscriminator,
    discriminator_accuracy,
    discriminator_loss,
    generator_adv_loss,
)
from pipeline.train.perceptual.losses import (
    LPIPSDistance,
    PerceptualLoss,
    PerceptualWeights,
    PerceptualWeightsError,
    VGGFeatures,
    gram_style_loss,
    laplacian_pyramid_loss,
    roi_l1,
)

__all__ = ["LPIPSDistance", "PerceptualLoss", "PerceptualWeights", "PerceptualWeightsError", "UNetDiscriminator",
           "VGGFeatures", "discriminator_accuracy", "discriminator_loss", "generator_adv_loss", "gram_style_loss",
           "laplacian_pyramid_loss", "roi_l1"]
