"""Train a ROI codec with Ray Train (DDP), checkpoints and MLflow. See ``--help``.

Locally: ``python jobs/train.py --smoke``; on a cluster:
``ray job submit --working-dir . -- python jobs/train.py --shards /data/shards --num-workers 4 --use-gpu``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

from pipeline.train.trainer import cli_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli_main())
