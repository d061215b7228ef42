"""roicodec: region-of-interest learned image compression at cluster scale."""

import warnings

__version__ = "0.1.0"

# CompressAI decorates its ops with torch.jit.script, which torch >= 2.10 flags as
# deprecated on every import; it is noise for our users and our one-line CLI errors.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                        category=FutureWarning)
