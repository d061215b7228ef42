"""The main job on real photos (scikit-image's samples): Ray Data masks -> Ray Train (fine-tuning the
pretrained default model) -> evaluation -> MLflow champion -> side-by-side pictures.

See ``pipeline.demo`` for the stages. Outputs go under ``--out`` (default demo_out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

from pipeline.codec.models import ENTROPY_FAMILIES, ENTROPY_MODELS, MODELS  # noqa: E402
from pipeline.demo import DEMO_INIT, FROM_INIT, SCRATCH_STEPS, run_demo  # noqa: E402
from pipeline.errors import run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    parser.add_argument("--init", default=DEMO_INIT, metavar="WEIGHTS",
                        help=f"the model to fine-tune: {DEMO_INIT} (the pretrained default model, the default), a "
                             f"checkpoint, or compressai:mbt2018-mean:Q; 'none' trains a small model from scratch")
    parser.add_argument("--steps", type=int,
                        help=f"training steps (default {FROM_INIT['steps']} when fine-tuning; from scratch "
                             f"{SCRATCH_STEPS}, the second stage on larger crops included)")
    parser.add_argument("--variant", default="tma", choices=sorted(MODELS), help="codec variant (default tma)")
    parser.add_argument("--entropy", choices=ENTROPY_MODELS,
                        help="entropy model of the latent (default: the init's; from scratch hyperprior; context: "
                             "channel groups with a checkerboard context)")
    parser.add_argument("--family", choices=ENTROPY_FAMILIES,
                        help="entropy family of the latent (default: the variant's)")
    parser.add_argument("--roi-quality", type=float, default=0.1,
                        help="non-ROI value for the evaluation, in [0,1] (default 0.1)")
    parser.add_argument("--perceptual-steps", type=int, default=0, metavar="N",
                        help="after the MSE training, N steps of TLIC's perceptual stage from it (its own run); "
                             "the pictures then show both models at the same file size (default 0: off)")
    args = parser.parse_args(argv)
    if args.perceptual_steps < 0:
        parser.error("--perceptual-steps must be >= 0")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")

    def demo() -> None:
        run_demo(args.out, steps=args.steps, variant=args.variant, roi_quality=args.roi_quality,
                 entropy=args.entropy, family=args.family, perceptual_steps=args.perceptual_steps,
                 init=None if args.init.lower() == "none" else args.init)

    return run_cli(demo, "demo", (ValueError, OSError, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
