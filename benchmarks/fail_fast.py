"""How long the things the tests only check for correctness take: the wall-clock checks that
left the test suite (a busy machine made them flaky; the tests now check what is deterministic).

- ``ggm_update_seconds``: building the generalized Gaussian's CDF tables the first time
  (``GeneralizedGaussianConditional.update()``; tests/test_entropy.py checks it is lazy).
  Target: under 5 s.
- ``clip_unloadable_seconds``: each kind of CLIP weights that cannot be loaded failing with its
  one-line ``ClipWeightsError`` (tests/test_masks.py checks that no network is touched).
  Target: under 10 s each, no network wait.

Prints one JSON object. ``python benchmarks/fail_fast.py [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

UNLOADABLE = {  # as in tests/test_masks.py
    "not cached (openai)": {"model_name": "ViT-B-32", "pretrained": "openai"},
    "unknown tag": {"model_name": "ViT-B-32", "pretrained": "no-such-tag"},
    "missing file": {"model_name": "ViT-B-32", "pretrained": "/nonexistent/weights.pt"},
    "unknown model": {"model_name": "No-Such-Model", "pretrained": None},
    "hf-hub repo not cached": {"model_name": "hf-hub:nobody/nothing-here", "pretrained": None},
    "local-dir missing": {"model_name": "local-dir:/nonexistent", "pretrained": None},
}
TARGETS = {"ggm_update_seconds": 5.0, "clip_unloadable_seconds": 10.0}


def seconds(fn, repeats: int) -> list[float]:  # noqa: ANN001
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def ggm_update() -> None:
    from pipeline.codec.entropy import GeneralizedGaussianConditional

    assert GeneralizedGaussianConditional().update()


def clip_fails(kwargs: dict) -> None:
    from pipeline.masks import ClipWeightsError, TextMasker

    try:
        TextMasker(**kwargs)
    except ClipWeightsError:
        return
    raise AssertionError(f"{kwargs} loaded")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    clip_fails(UNLOADABLE["unknown model"])  # imports (open_clip, Hugging Face) out of the timings
    ggm = seconds(ggm_update, args.repeats)
    clip = {name: max(seconds(lambda k=kwargs: clip_fails(k), args.repeats)) for name, kwargs in UNLOADABLE.items()}
    report = {
        "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "ggm_update_seconds": {"median": statistics.median(ggm), "max": max(ggm)},
        "clip_unloadable_seconds": clip,
        "targets": TARGETS,
        "within_targets": max(ggm) < TARGETS["ggm_update_seconds"]
        and max(clip.values()) < TARGETS["clip_unloadable_seconds"],
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
