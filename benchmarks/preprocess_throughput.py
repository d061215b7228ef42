"""Throughput of the mask preprocessing job: Ray Data with 1 and 2 CLIP actors vs a plain loop.

Every variant does the same work per image: read + decode the PNG, saliency map, CLIP
text mask for one prompt (a randomly initialised model of a real architecture,
ViT-B-32 by default, so the compute is what real weights would cost), both masks
encoded as PNG, rows written as Parquet shards of ``--batch-size`` rows. The plain
loop runs the job's own stage functions in one process, batch by batch.

Steady state: between the first and the last shard written (by file time), counting
the rows of all shards but the first. That leaves out Ray start-up, actor start-up
(spawn, imports, model build, prompt embeddings), pipeline fill and the first batch;
the plain loop builds its model and embeds the prompt once before all runs. One
``ray.init`` serves all Ray runs and is not timed with them.

Variants run interleaved ``--repeats`` times and medians are reported. Each run
records the 1-minute load average before it starts: on a machine shared with other
jobs wall-clock rates follow their load (and a starved driver writes shards in bursts,
which shortens the window), so compare runs made at a low load.

Threads: the plain loop uses torch's default (all cores); with Ray, each actor gets
cores / actors CPUs and as many torch threads, while decode/saliency tasks share the
same cores. OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``, set before
torch loads and inherited by Ray's workers), so threads spinning in barriers do not
steal the cores other stages need. Prints one JSON object.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (see the docstring)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.data.preprocess import TextMaskStage, decode_batch, preprocess  # noqa: E402
from pipeline.data.samples import photo_like_image  # noqa: E402
from pipeline.data.shards import shard_name, write_shard  # noqa: E402


def make_images(folder: Path, count: int, size: int) -> list[Path]:
    """Write ``count`` photo-like PNGs of ``size`` x ``size``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:05d}.png"
        Image.fromarray(photo_like_image(size, size, seed=i)[0]).save(path)
        paths.append(path)
    return paths


def steady_state(shard_dir: Path) -> dict[str, float]:
    """Images/s between the first and the last shard written (the first shard's rows left out)."""
    shards = sorted((p.stat().st_mtime, pq.read_metadata(p).num_rows) for p in shard_dir.glob("*.parquet"))
    rows = sum(n for _, n in shards[1:])
    seconds = shards[-1][0] - shards[0][0]
    return {"images": rows, "seconds": round(seconds, 3), "images_per_s": round(rows / seconds, 3)}


def plain_loop(paths: list[Path], out: Path, prompt: str, batch_size: int, max_side: int,
               stage: TextMaskStage) -> dict:
    """The job's stages in one process, without Ray (``stage`` holds the loaded model)."""
    load = os.getloadavg()[0]
    for index in range(0, len(paths), batch_size):
        items = [{"image_id": p.name, "uri": str(p), "prompts": json.dumps([prompt])}
                 for p in paths[index:index + batch_size]]
        decoded = decode_batch(pa.Table.from_pylist(items), max_side, "spectral_residual")
        write_shard(stage(decoded), out / shard_name("plain", index // batch_size))
    return {"load_avg_before": round(load, 2), **steady_state(out)}


def ray_run(folder: Path, out: Path, prompt: str, batch_size: int, max_side: int, clip: dict,
            actors: int) -> dict:
    """The Ray Data job with ``actors`` CLIP actors sharing this machine's cores."""
    cpus = max(1, (os.cpu_count() or 1) // actors)
    load = os.getloadavg()[0]
    summary = preprocess(folder, out, prompts=[prompt], rows_per_shard=batch_size, batch_size=batch_size,
                         num_text_actors=actors, text_actor_cpus=cpus, use_gpu=False, max_side=max_side,
                         clip_model=clip["model_name"], clip_pretrained=clip["pretrained"], clip_config=clip["config"])
    return {"load_avg_before": round(load, 2), "end_to_end_s": summary["seconds"],
            "end_to_end_images_per_s": summary["images_per_s"], **steady_state(out)}


def main() -> None:
    """Run the plain loop and the Ray job at each actor count, interleaved; print JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=160, help="number of images")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (and rows per shard)")
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="CLIP actor counts to run")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repetitions of every variant")
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture, random weights")
    p.add_argument("--clip-config", default=None, help="or an open_clip model config JSON")
    p.add_argument("--prompt", default="a person")
    p.add_argument("--max-side", type=int, default=1024)
    args = p.parse_args()
    if args.images < 3 * args.batch_size:
        p.error("--images must be at least 3 batches (the steady window spans shards 2..n)")

    clip = {"model_name": args.clip_model, "pretrained": None, "config": args.clip_config}
    work = Path(tempfile.mkdtemp(prefix="roicodec-bench-"))
    try:
        paths = make_images(work / "images", args.images, args.size)
        results: dict = {
            "machine": {"cpu_count": os.cpu_count(),
                        "ray_actor_cpus": {a: max(1, (os.cpu_count() or 1) // a) for a in args.actors}},
            "config": {"images": args.images, "size": args.size, "batch_size": args.batch_size,
                       "repeats": args.repeats, "clip_model": args.clip_model, "clip_weights": "random init",
                       "work_per_image": "decode PNG, spectral-residual saliency, CLIP text mask (1 prompt), "
                                         "2 PNG encodes, Parquet write"},
            "excluded": "steady state runs from the first to the last shard written, rows of the first shard "
                        "left out: Ray start, actor start-up (spawn, imports, model build, prompt embeddings), "
                        "pipeline fill and the first batch are excluded; the plain loop's model build and "
                        "prompt embedding happen before timing",
        }
        t0 = time.perf_counter()
        stage = TextMaskStage({**clip, "allow_download": False, "input_size": None}, threads=None)
        results["plain_model_load_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=max(4, 2 * (os.cpu_count() or 1)), include_dashboard=False,
                 log_to_driver=False)
        results["ray_init_s"] = round(time.perf_counter() - t0, 3)
        stage(decode_batch(pa.Table.from_pylist([{"image_id": paths[0].name, "uri": str(paths[0]),
                                                  "prompts": json.dumps([args.prompt])}]), args.max_side,
                           "spectral_residual"))  # warm-up: embeds the prompt once
        runs: dict[str, list[dict]] = {"plain_loop": [], **{f"ray_{a}_actor": [] for a in args.actors}}
        try:
            for rep in range(args.repeats):
                runs["plain_loop"].append(plain_loop(paths, work / f"plain{rep}", args.prompt, args.batch_size,
                                                     args.max_side, stage))
                for actors in args.actors:
                    runs[f"ray_{actors}_actor"].append(ray_run(work / "images", work / f"ray{actors}-{rep}",
                                                               args.prompt, args.batch_size, args.max_side,
                                                               clip, actors))
        finally:
            ray.shutdown()
        wall = {k: round(statistics.median(r["images_per_s"] for r in v), 3) for k, v in runs.items()}
        results["runs"] = runs
        results["median_steady_images_per_s"] = wall
        results["ratio_vs_plain_loop"] = {k: round(v / wall["plain_loop"], 3) for k, v in wall.items()
                                          if k != "plain_loop"}
        # > 0: Ray is that much slower than the plain loop; < 0: faster (stages overlap across processes)
        results["ray_overhead"] = {k: round(1 - v, 3) for k, v in results["ratio_vs_plain_loop"].items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
