"""Checkpoint size: what a default-size model's checkpoint holds, by entry and by kind.

For each configuration (tma and tlic at N=128, M=192 with the hyperprior; tma with the
context model; ggm, element and channel shapes, with the context model too) builds the model
from a random initialisation, runs ``update(force=True)`` (CDF tables, integer twins), saves
it with :func:`~pipeline.codec.checkpoint.save_checkpoint` and prints one JSON object: the
file's size, the float parameter bytes (float32), the bytes of the buffers by dtype in memory
and as stored (CDF tables packed, see :mod:`pipeline.codec.checkpoint`), and the largest
state-dict entries (in memory) with their dtypes and shapes.

    python benchmarks/checkpoint_size.py [--top 12] [--configs tma,tma_context,ggm]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from pipeline.codec.checkpoint import pack_state_dict, save_checkpoint
from pipeline.codec.models import build_model

DEFAULT = {"N": 128, "M": 192}
CONFIGS = {
    "tma": ("tma", {}),
    "tlic": ("tlic", {}),
    "tma_context": ("tma", {"entropy": "context"}),
    "ggm": ("ggm", {}),
    "ggm_context": ("ggm", {"entropy": "context"}),
    "ggm_channel_context": ("ggm", {"beta_mode": "channel", "entropy": "context"}),
}


def measure(variant: str, extra: dict, top: int) -> dict:
    torch.manual_seed(0)
    model = build_model(variant, **DEFAULT, **extra).eval()
    model.update(force=True)
    state = model.state_dict()
    params = {name for name, _ in model.named_parameters()}
    by_kind: dict[str, int] = defaultdict(int)
    entries = []
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        kind = "parameters" if name in params else f"buffers.{str(t.dtype).removeprefix('torch.')}"
        by_kind[kind] += nbytes
        entries.append((nbytes, name, str(t.dtype).removeprefix("torch."), list(t.shape)))
    in_file: dict[str, int] = defaultdict(int)
    for name, t in pack_state_dict(state)[0].items():
        kind = "parameters" if name in params else f"buffers.{str(t.dtype).removeprefix('torch.')}"
        in_file[kind] += t.numel() * t.element_size()
    with tempfile.TemporaryDirectory() as tmp:
        size = save_checkpoint(model, Path(tmp) / "model.pt").stat().st_size
    entries.sort(reverse=True)
    float_params = sum(p.numel() for p in model.parameters()) * 4
    return {"file_MB": round(size / 1e6, 2), "parameters": sum(p.numel() for p in model.parameters()),
            "float32_parameter_MB": round(float_params / 1e6, 2),
            "ratio_to_float32_parameters": round(size / float_params, 3),
            "in_memory_by_kind_MB": {k: round(v / 1e6, 3) for k, v in sorted(by_kind.items())},
            "in_file_by_kind_MB": {k: round(v / 1e6, 3) for k, v in sorted(in_file.items())},
            "largest": [{"name": n, "dtype": d, "shape": s, "MB": round(b / 1e6, 3)} for b, n, d, s in entries[:top]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    print(json.dumps({name: measure(*CONFIGS[name], args.top) for name in args.configs.split(",")}, indent=1))


if __name__ == "__main__":
    main()
