"""roicodec: region-of-interest learned image compression at cluster scale."""

__version__ = "0.1.0"
