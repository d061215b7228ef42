"""Cost of the task evaluation (``roicodec evaluate --task-annotations``): per stage and end to end.

On a generated COCO-format set at COCO's typical size (640x480), with a randomly
initialised codec (``--variant`` at its default size; speed does not depend on training)
and a randomly initialised torchvision detector at its default input size (the compute
real weights would cost):

- ``codec_s_per_image``: one :class:`~pipeline.eval.task.CodecStage` call on one image,
  i.e. every row of it: the original, each rate x roi-quality of the learned codec
  (encode + decode), each baseline at the matched bpp (its bpp search included);
- ``detector_s_per_image``: :class:`~pipeline.eval.task.DetectorStage` on those rows,
  per decoded image;
- ``ray``: :func:`~pipeline.eval.task.task_sweep` on ``--images`` images through local Ray
  (one codec actor, one detector actor), start-up included;
- ``val2017``: the CPU-seconds the two stages would take for COCO val2017 (5,000
  images) at these settings: divide by the actors a cluster runs.

Prints one JSON object. Times are of this machine's CPU; a GPU changes the detector's.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.codec.checkpoint import save_checkpoint  # noqa: E402
from pipeline.codec.models import build_model  # noqa: E402
from pipeline.data.samples import write_sample_set  # noqa: E402
from pipeline.eval import baselines as bl  # noqa: E402
from pipeline.eval.detectors import DEFAULT_DETECTOR, DETECTOR_ARCHS, TorchvisionDetectorSpec  # noqa: E402
from pipeline.eval.task import CodecStage, DetectorStage, task_plan, task_sweep  # noqa: E402

VAL2017 = 5000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4, help="images of the end-to-end Ray run (default %(default)s)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--variant", default="tma")
    p.add_argument("--rates", type=int, default=5, help="rate points (default %(default)s)")
    p.add_argument("--detector", choices=DETECTOR_ARCHS, default=DEFAULT_DETECTOR)
    args = p.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    rates = [i / (args.rates - 1) for i in range(args.rates)]
    run, _ = bl.available_baselines(list(bl.BASELINES))
    with tempfile.TemporaryDirectory(prefix="task-bench-") as tmp:
        root = Path(tmp)
        s = write_sample_set(root / "set", n_images=args.images, size=(args.height, args.width))
        torch.manual_seed(0)
        model = build_model(args.variant).eval()
        model.update(force=True)
        ckpt = save_checkpoint(model, root / "model.pt")
        plan = task_plan(rates, 0.3, [1.0], run, s.annotations)
        spec = TorchvisionDetectorSpec(args.detector, "random")
        codec = CodecStage(str(ckpt), plan, threads=os.cpu_count() or 1)
        batch = {"image_id": np.array([1]), "file": np.array([s.image_files[0].name]),
                 "path": np.array([str(s.image_files[0])])}
        codec(batch)  # warm-up
        t = time.perf_counter()
        rows = codec(batch)
        codec_s = time.perf_counter() - t
        detector = DetectorStage(spec, threads=os.cpu_count() or 1)
        detector(rows.slice(0, 1))  # warm-up
        t = time.perf_counter()
        detector(rows)
        detector_s = (time.perf_counter() - t) / rows.num_rows
        t = time.perf_counter()
        res = task_sweep(ckpt, s.images_dir, annotations=s.annotations, detector=spec, rates=rates,
                         baselines=run, progress=False)
        ray_s = time.perf_counter() - t
    out = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "settings": {"size": [args.height, args.width], "variant": args.variant, "rates": rates,
                     "roi_qualities": plan["roi_qualities"], "baselines": run, "detector": args.detector,
                     "rows_per_image": rows.num_rows},
        "codec_s_per_image": round(codec_s, 3), "codec_s_per_code": round(codec_s / (rows.num_rows - 1), 3),
        "detector_s_per_image": round(detector_s, 3),
        "ray": {"images": args.images, "seconds": round(ray_s, 2), "images_per_s": res["images_per_s"]},
        "val2017": {"codec_cpu_hours": round(VAL2017 * codec_s / 3600, 2),
                    "detector_cpu_hours": round(VAL2017 * rows.num_rows * detector_s / 3600, 2),
                    "detector_images": VAL2017 * rows.num_rows},
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
