"""Train the ``ggm`` variant (SFT + generalized Gaussian entropy model) with Ray Train. See ``--help``.

Same options as ``jobs/train.py`` without ``--variant``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

from pipeline.train.trainer import cli_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli_main(variant="ggm", description="Train the ggm ROI codec variant (SFT transforms with a "
                                                 "generalized Gaussian entropy model) with Ray Train and MLflow."))
