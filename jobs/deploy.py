"""Deploy the ROI codec HTTP service (Ray Serve) with the web page. See ``--help``.

Locally: ``python jobs/deploy.py --checkpoint demo_out/runs/demo-photos-tma-from-default/checkpoint_00000600/model.pt``
(the demo's model; starts a local Ray if none is running, deploys, prints the URL, serves
until Ctrl-C). The MLflow
champion: ``python jobs/deploy.py --model-uri models:/roicodec-tma@champion
--mlflow-uri sqlite:///ray_results/mlflow.db``. On a cluster prefer
``serve run cluster/serve_config.yaml`` (or ``serve deploy``), which uses the same builder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

from pipeline.errors import run_cli  # noqa: E402
from pipeline.masks.text import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED  # noqa: E402


def _replicas(text: str) -> str | int:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use 'auto' or a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: use 'auto' or a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deploy.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="codec checkpoint file (every replica must be able to read it); "
                                          "neither this nor --model-uri: the installed pretrained model")
    src.add_argument("--model-uri", help="MLflow model, e.g. models:/roicodec-tma@champion (or models:/NAME/3)")
    p.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI for --model-uri "
                                                      "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default %(default)s; 0.0.0.0 to expose)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default %(default)s)")
    p.add_argument("--route-prefix", default="/", help="URL prefix of the app (default %(default)s)")
    p.add_argument("--name", default="roicodec", help="Serve application name (default %(default)s)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a running local "
                                                   "cluster if any, else a new one)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local Ray (default: all)")
    p.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, help="open_clip ViT (default %(default)s)")
    p.add_argument("--clip-pretrained", default=DEFAULT_CLIP_PRETRAINED,
                   help="pretrained tag, checkpoint file, or 'none' (default %(default)s)")
    p.add_argument("--clip-config", metavar="JSON", default=None,
                   help="open_clip model config JSON (random weights unless --clip-pretrained is a file)")
    p.add_argument("--clip-download", action="store_true", help="allow downloading CLIP weights")
    p.add_argument("--no-text-masks", action="store_true", help="no CLIP model (prompts answer 503)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="request body limit (default %(default)s)")
    p.add_argument("--max-pixels", type=int, default=2048 * 2048, help="image size limit (default %(default)s)")
    p.add_argument("--use-gpu", choices=("auto", "true", "false"), default="auto",
                   help="GPU replicas (default: if torch sees a GPU)")
    p.add_argument("--codec-replicas", type=_replicas, default="auto",
                   help="'auto' (autoscaling, default) or a fixed number of codec replicas")
    p.add_argument("--codec-max-replicas", type=int, default=4, help="autoscaling maximum (default %(default)s)")
    p.add_argument("--mask-replicas", type=_replicas, default="auto", help="like --codec-replicas, for CLIP")
    p.add_argument("--mask-max-replicas", type=int, default=2, help="autoscaling maximum (default %(default)s)")
    p.add_argument("--codec-num-cpus", type=float, default=1.0, help="CPUs per codec replica")
    p.add_argument("--mask-num-cpus", type=float, default=0.5, help="CPUs per mask replica")
    p.add_argument("--no-block", action="store_true",
                   help="return after deploying (the app lives as long as this Ray cluster)")
    return p


def app_args(ns: argparse.Namespace) -> dict:
    """The ``build_app`` args (``serve_config.yaml``'s ``args``) of parsed options."""
    args = {"checkpoint": ns.checkpoint, "model_uri": ns.model_uri, "mlflow_tracking_uri": ns.mlflow_uri,
            "clip_model": ns.clip_model, "clip_pretrained": ns.clip_pretrained, "clip_config": ns.clip_config,
            "clip_download": ns.clip_download, "text_masks": not ns.no_text_masks,
            "max_upload_mb": ns.max_upload_mb, "max_pixels": ns.max_pixels, "use_gpu": ns.use_gpu,
            "codec_replicas": ns.codec_replicas, "codec_max_replicas": ns.codec_max_replicas,
            "mask_replicas": ns.mask_replicas, "mask_max_replicas": ns.mask_max_replicas,
            "codec_num_cpus": ns.codec_num_cpus, "mask_num_cpus": ns.mask_num_cpus}
    return {k: v for k, v in args.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    import ray
    from ray import serve

    from pipeline.serve.app import deploy
    from pipeline.serve.settings import ServeSettings

    args = app_args(ns)

    def check() -> None:  # one-line errors before starting anything
        s = ServeSettings.from_args(args)  # loads and checks a checkpoint file
        if s.model_uri:  # the registered model, checked as every replica will load it
            from pipeline.codec.checkpoint import load_checkpoint
            from pipeline.mlflow_store import resolve_checkpoint

            load_checkpoint(resolve_checkpoint(None, s.model_uri, s.mlflow_tracking_uri)[0])

    from mlflow.exceptions import MlflowException

    code = run_cli(check, "deploy.py", (ValueError, OSError, MlflowException))
    if code:
        return code
    if not ray.is_initialized():
        ray.init(address=ns.address, num_cpus=ns.num_cpus if ns.address is None else None)
    url = deploy(args, host=ns.host, port=ns.port, name=ns.name, route_prefix=ns.route_prefix)
    print(json.dumps({"url": url, "app": ns.name}), flush=True)
    print(f"roicodec is serving at {url} (web page), API docs at {url}docs", flush=True)
    if ns.no_block:
        return 0
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
