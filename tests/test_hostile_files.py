"""Crafted .roic files with valid checksums: each decodes or raises BitstreamError, quickly,
in a process that survives (the fuzz runs in a child process, so a crash fails the test)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Callable

import pytest
import torch

from pipeline.codec.bitstream import FORMAT_VERSION, BitstreamError, serialize, unpack
from pipeline.codec.checkpoint import load_checkpoint, save_checkpoint
from pipeline.codec.coding import decode, encode
from pipeline.codec.models import build_model

from conftest import TINY, image_and_mask

FUZZ_MAX_PIXELS = 1 << 18  # keeps each decode of a large declared size short
CASE_SECONDS = 30.0


def craft(variant: str, fp: bytes, width: int, height: int, rate: float, roi_quality: float,
          groups: list[list[bytes]], version: int = FORMAT_VERSION) -> bytes:
    """A .roic file from raw fields, no validation, with a correct CRC."""
    return serialize(variant.encode("latin-1"), fp, width, height, rate, roi_quality, groups, version)


def mutations(data: bytes, seed: int) -> list[tuple[str, bytes]]:
    """About 150 CRC-valid variations of a real file."""
    header, groups = unpack(data)
    rng = random.Random(seed)
    fields = dict(variant=header.variant, fp=header.fingerprint, width=header.width, height=header.height,
                  rate=header.rate, roi_quality=header.roi_quality, groups=groups)
    cases = []

    def add(name: str, **changes) -> None:
        cases.append((name, craft(**{**fields, **changes})))

    sides = [0, 1, 2, 63, 64, 65, 511, 4096, 40000, 65535, 65536, 2 ** 31, 2 ** 32 - 1]
    for w in sides:
        add(f"width={w}", width=w)
        add(f"height={w}", height=w)
    add("65536x65536", width=65536, height=65536)
    for _ in range(6):
        add("random size", width=rng.randrange(2 ** 32), height=rng.randrange(1, 700))
    specials = [float("nan"), float("inf"), float("-inf"), -0.0, -1e-9, 1.0000001, 1e30, 0.0, 1.0]
    for v in specials:
        add(f"rate={v}", rate=v)
        add(f"roi_quality={v}", roi_quality=v)
    add("other variant", variant="sft" if header.variant != "sft" else "tlic")
    add("unknown variant", variant="nope")
    add("non-ascii variant", variant="t\xe9st")
    add("empty variant", variant="")
    add("other fingerprint", fp=bytes(8))
    add("no groups", groups=[])
    add("one more group", groups=[*groups, [b"x"]])
    add("two strings in a y group", groups=[[groups[0][0], groups[0][0]], *groups[1:]])
    add("no z string", groups=[*groups[:-1], []])
    add("empty strings", groups=[[b""] for _ in groups])
    add("version 2 (two groups)", version=2)
    add("version 2, y and z only", version=2, groups=groups[:2])
    add("version 3 (a level map read as a cell map)", version=3)
    strings = [g[0] for g in groups]  # y, z, the level map
    names = ["y", "z", "levels"]
    levels = strings[2]

    def replaced(i: int, s: bytes) -> list[list[bytes]]:
        return [[s] if j == i else [t] for j, t in enumerate(strings)]

    for _ in range(60):
        i = rng.randrange(len(strings))
        s = bytearray(strings[i])
        for _ in range(rng.choice([1, 1, 2, 8])):
            if s:
                s[rng.randrange(len(s))] = rng.randrange(256)
        add(f"{names[i]} bytes changed", groups=replaced(i, bytes(s)))
    for _ in range(30):
        i = rng.randrange(len(strings))
        cut = strings[i][:rng.randrange(len(strings[i]) + 1)]
        add(f"{names[i]} truncated to {len(cut)}", groups=replaced(i, cut))
    for _ in range(10):
        junk = bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 64, 4096])))
        i = rng.choice([0, 2])
        add(f"{names[i]} extended", groups=replaced(i, strings[i] + junk))
    add("all 0xff y", groups=replaced(0, b"\xff" * len(strings[0])))
    add("all 0xff z", groups=replaced(1, b"\xff" * len(strings[1])))
    add("no level map", groups=replaced(2, b""))
    coded = levels[1 + levels[0]:] if levels else b"\0" * 8
    for steps in ([4], [64], [4, 64], list(range(4, 20)), [5, 7, 9, 60]):  # other step lists, the same code
        add(f"level map of steps {steps[:4]}", groups=replaced(2, bytes([len(steps), *steps]) + coded))
    for steps in ([], [3], [65], [255], [8, 4], [4, 4], list(range(4, 21))):
        add(f"level map of bad steps {steps[:4]}", groups=replaced(2, bytes([len(steps), *steps]) + coded))
    for size in (0, 1, 3, 4096):
        junk = bytes(rng.randrange(256) for _ in range(size))
        add(f"level map of {size} random code bytes", groups=replaced(2, b"\x03\x04\x08\x40" + junk))
    add("level map of 0xff code", groups=replaced(2, b"\x02\x04\x08" + b"\xff" * 64))
    n_cells = 4 * (-(-header.height // 64)) * 4 * (-(-header.width // 64))
    add("v3 cell map of all ROI", version=3, groups=replaced(2, zlib.compress(b"\xff" * ((n_cells + 7) // 8))))
    add("v3 cell map inflating to 256 MB", version=3, groups=replaced(2, zlib.compress(bytes(1 << 28), 9)))
    add("swapped strings", groups=[[s] for s in reversed(strings)])
    return cases


def classify(fn: Callable[[], object]) -> tuple[str, float]:
    """``("ok" | "BitstreamError" | "other: <type>: <message>", seconds)`` of one decode."""
    t0 = time.perf_counter()
    try:
        fn()
        outcome = "ok"
    except BitstreamError:
        outcome = "BitstreamError"
    except Exception as exc:  # noqa: BLE001 - any other type is what the test looks for
        outcome = f"other: {type(exc).__name__}: {exc}"
    return outcome, time.perf_counter() - t0


def run_fuzz(checkpoints: list[str], files: list[str], out: str) -> None:
    """Child-process body: decode every mutation of every file; write the outcomes as JSON."""
    torch.set_num_threads(1)
    rows = []
    for ckpt, path in zip(checkpoints, files):
        model = load_checkpoint(ckpt)
        for i, (name, data) in enumerate(mutations(Path(path).read_bytes(), seed=len(rows))):
            outcome, seconds = classify(lambda: decode(model, data, max_pixels=FUZZ_MAX_PIXELS))
            rows.append({"file": path, "case": name, "outcome": outcome, "seconds": seconds})
    Path(out).write_text(json.dumps(rows))


def test_the_harness_reports_other_exceptions_and_slow_decodes():
    assert classify(lambda: (_ for _ in ()).throw(RuntimeError("boom")))[0].startswith("other: RuntimeError")
    assert classify(lambda: (_ for _ in ()).throw(BitstreamError("bad")))[0] == "BitstreamError"
    assert classify(lambda: time.sleep(0.2))[1] >= 0.2


@pytest.mark.timeout(900)
def test_crafted_files_decode_or_raise_bitstream_error(tmp_path, trained):
    checkpoints, files = [], []
    models = (("sft", trained("sft")), ("ggm", build_model("ggm", **TINY).eval()),
              ("tma-context", build_model("tma", **TINY, entropy="context").eval()))
    for variant, model in models:
        ckpt = save_checkpoint(model, tmp_path / f"{variant}.pt")
        x, m = image_and_mask(150, 200, seed=11)
        graded = variant == "tma-context"  # one file with a graded level map: the mask's blurred ramps
        if graded:
            m = torch.nn.functional.avg_pool2d(m, 33, stride=1, padding=16, count_include_pad=False)
        (tmp_path / f"{variant}.roic").write_bytes(encode(model, x, m, 0.3, 0.9, graded=graded))
        checkpoints.append(str(ckpt))
        files.append(str(tmp_path / f"{variant}.roic"))
    out = tmp_path / "fuzz.json"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from test_hostile_files import run_fuzz; "
            "run_fuzz(sys.argv[2].split(','), sys.argv[3].split(','), sys.argv[4])")
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), ",".join(checkpoints),
                           ",".join(files), str(out)], capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, f"decoder process died (exit {proc.returncode}): {proc.stderr[-2000:]}"
    rows = json.loads(out.read_text())
    assert len(rows) >= 300
    bad = [r for r in rows if r["outcome"].startswith("other")]
    assert not bad, bad[:5]
    slow = [r for r in rows if r["seconds"] > CASE_SECONDS]
    assert not slow, slow[:5]
    outcomes = {r["outcome"] for r in rows}
    assert outcomes == {"ok", "BitstreamError"}  # both kinds occur: payload garbage decodes to something
    huge = [r for r in rows if r["case"] == "65536x65536"]
    assert all(r["outcome"] == "BitstreamError" for r in huge) and len(huge) == len(models)


def test_pixel_limit_is_a_one_line_bitstream_error(untrained):
    model = untrained["tlic"]
    x, _ = image_and_mask(64, 64, seed=3)
    header, groups = unpack(encode(model, x))
    data = craft(header.variant, header.fingerprint, 65536, 65536, header.rate, header.roi_quality, groups)
    with pytest.raises(BitstreamError, match="65536x65536 pixels, more than the decoder's limit"):
        decode(model, data)
    small = craft(header.variant, header.fingerprint, 64, 64, header.rate, header.roi_quality, groups)
    with pytest.raises(BitstreamError, match="limit of 100"):
        decode(model, small, max_pixels=100)
