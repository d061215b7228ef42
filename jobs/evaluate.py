"""Evaluate checkpoints (``roicodec evaluate``'s options) and optionally pick the champion.

One checkpoint, like ``roicodec evaluate``::

    python jobs/evaluate.py --checkpoint ckpt.pt --images imgs/ --masks masks/ --json eval.json [--sweep]

Champion selection: sweep every checkpoint of a folder, or every run of an MLflow
experiment with a ``checkpoint/model.pt`` artifact, rank by the criterion (default
``bd_rate_roi_vs_jpeg``, lower is better) and point the ``champion`` alias of the
registered model version of the best run at it::

    python jobs/evaluate.py --select-champion --checkpoints runs/ --images imgs/ --masks masks/ --json champ.json
    python jobs/evaluate.py --select-champion --experiment roicodec --mlflow-uri sqlite:///runs/mlflow.db \\
        --images imgs/ --masks masks/ --json champ.json

Ranked by a task metric (COCO detection AP over bpp, see ``roicodec evaluate --help``)::

    python jobs/evaluate.py --select-champion --checkpoints runs/ --images val2017/ \\
        --task-annotations instances_val2017.json --criterion bd_rate_map_vs_jpeg --json champ.json

On a cluster: ``ray job submit --working-dir . -- python jobs/evaluate.py ...``.
Exit code 0 on success; on bad input one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

from pipeline.errors import run_cli  # noqa: E402
from pipeline.eval.cli import (EVALUATE_DESCRIPTION, EVALUATE_EPILOG, add_evaluate_arguments,  # noqa: E402
                               lpips_from_args, run_evaluate_command, sweep_rates)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/evaluate.py", description=EVALUATE_DESCRIPTION,
                                epilog=EVALUATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_evaluate_arguments(p)
    g = p.add_argument_group("champion selection")
    g.add_argument("--select-champion", action="store_true",
                   help="sweep every candidate, rank by --criterion and set the MLflow 'champion' alias")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--checkpoints", metavar="DIR", help="folder of candidate checkpoints (*.pt, recursive)")
    src.add_argument("--experiment", metavar="NAME", help="MLflow experiment whose runs are the candidates")
    g.add_argument("--criterion", default="bd_rate_roi_vs_jpeg",
                   help="bd_rate_<roi|psnr>_vs_<jpeg|webp|jpeg2000|uniform> (lower is better) or "
                        "bd_psnr_... (higher is better); with --task-annotations also bd_rate_map_vs_..., "
                        "bd_rate_segm_map_vs_... and bd_ap_map_vs_... (AP points, higher is better); "
                        "default %(default)s")
    g.add_argument("--registered-model", default=None,
                   help="only versions of this registered model (default: any version made from the run)")
    g.add_argument("--no-alias", action="store_true", help="rank only; do not move the alias")
    return p


def run_champion(args: argparse.Namespace) -> int:
    from pipeline.eval.evaluate import EvaluationError, to_json
    from pipeline.eval.rd import select_champion

    candidates = args.checkpoints or args.experiment
    if candidates is None:
        candidates = args.checkpoint
    if candidates is None:
        raise EvaluationError("--select-champion needs --checkpoints DIR or --experiment NAME")
    out_json = Path(args.json)
    lpips = lpips_from_args(args)  # loaded once for every candidate
    extra = ({} if lpips is None else {"lpips": lpips}) | ({"graded": True} if args.soft else {})  # rd_sweep's
    if args.soft and args.task_annotations is not None:
        raise EvaluationError("--soft (graded quality maps) ranks by --sweep points, not --task-annotations")
    if args.task_annotations is not None:  # rank by task metrics, e.g. --criterion bd_rate_map_vs_jpeg
        from functools import partial

        from pipeline.eval.cli import task_keywords
        from pipeline.eval.task import task_sweep, write_task_outputs

        keywords = task_keywords(args)
        keywords["detector"].check()  # missing weights: one line now, not a failure per candidate
        extra = {"sweep": partial(task_sweep, **keywords), "write_outputs": write_task_outputs}
    result = select_champion(
        candidates, args.images, args.masks, criterion=args.criterion, tracking_uri=args.mlflow_uri,
        registered_model=args.registered_model, set_alias=not args.no_alias,
        out_dir=Path(args.plots) if args.plots else out_json.with_name(out_json.stem + "_rd"),
        progress=not args.no_progress, roi_quality=args.roi_quality, rates=sweep_rates(args.sweep_rates),
        roi_qualities=args.sweep_roi_qualities, baselines=args.baselines, **extra)
    to_json(result, out_json)
    for row in result["ranking"]:
        value = "nan" if row["value"] is None else f"{row['value']:+.2f}"
        print(f"  {value:>9}  {row['checkpoint']}" + (f"  ({row['error']})" if row.get("error") else ""))
    best = result["best"]
    alias = result["alias"]
    print(f"best by {result['criterion']}: {best['checkpoint']}"
          + (f" -> {alias['registered_model']} v{alias['version']} is '{alias['alias']}'" if alias else
             " (no registered model version found for its run; alias not set)"))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def evaluate() -> int:
        if args.select_champion:
            return run_champion(args)
        if args.checkpoint is None:
            build_parser().error("--checkpoint is required (or --select-champion)")
        return run_evaluate_command(args)

    return run_cli(evaluate, "evaluate", (ValueError, OSError, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
