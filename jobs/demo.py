"""The one-command demo on the bundled sample set (see ``pipeline.demo``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

from pipeline.demo import run_demo  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    parser.add_argument("--variant", default="tma", help="codec variant (default tma)")
    parser.add_argument("--retrain", action="store_true", help="train even if a checkpoint exists")
    args = parser.parse_args()
    run_demo(args.out, steps=args.steps, variant=args.variant, retrain=args.retrain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
