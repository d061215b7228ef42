"""The `roicodec` command as a user runs it: real processes, real files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.codec.checkpoint import load_checkpoint, save_checkpoint
from pipeline.codec.coding import decode, image_to_tensor
from pipeline.codec.models import build_model

from conftest import TINY, image_and_mask


def roicodec(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def roicodec_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """``pipeline.cli.main`` in this process (no interpreter start-up), as a CompletedProcess."""
    from pipeline.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory, untrained) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    x, m = image_and_mask(45, 67, seed=11)
    image = root / "photo.png"
    Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(image)
    mask = root / "mask.png"
    Image.fromarray((m[0, 0].numpy() * 255).astype(np.uint8)).save(mask)
    ckpt = save_checkpoint(untrained["tma"], root / "tma.pt")
    torch.manual_seed(99)
    other = save_checkpoint(build_model("tma", **TINY), root / "other.pt")
    text = root / "notes.txt"
    text.write_text("not an image")
    return {"root": root, "image": image, "mask": mask, "ckpt": ckpt, "other": other, "text": text}


def test_help_explains_every_knob(capsys):
    top = roicodec_in_process(capsys, "--help")
    assert top.returncode == 0 and "compress" in top.stdout and "decompress" in top.stdout
    help_text = roicodec_in_process(capsys, "compress", "--help").stdout
    for knob in ("--roi-quality", "--rate", "--target-bpp", "--mask", "--prompt", "--saliency",
                 "--checkpoint", "uniform quality"):
        assert knob in help_text


def test_compress_decompress_round_trip(files):
    root = files["root"]
    roic, png = root / "photo.roic", root / "decoded.png"
    proc = roicodec("compress", files["image"], "--checkpoint", files["ckpt"], "--mask",
                    files["mask"], "--roi-quality", "0.2", "--rate", "0.6", "-o", roic)
    assert proc.returncode == 0, proc.stderr
    assert "bpp" in proc.stdout
    proc = roicodec("decompress", roic, "--checkpoint", files["ckpt"], "-o", png)
    assert proc.returncode == 0, proc.stderr
    decoded = image_to_tensor(Image.open(png))
    assert decoded.shape[-2:] == (45, 67)
    expected = decode(load_checkpoint(files["ckpt"]), roic.read_bytes())
    assert (decoded - expected).abs().max() <= 1 / 255 + 1e-6  # 8-bit PNG rounding only


def test_target_bpp_stays_under_budget(files, capsys):
    roic = files["root"] / "budget.roic"
    proc = roicodec_in_process(capsys, "compress", files["image"], "--checkpoint", files["ckpt"], "--target-bpp", "2.0",
                    "-o", roic)
    assert proc.returncode == 0, proc.stderr
    assert 8 * roic.stat().st_size / (45 * 67) <= 2.0


def test_a_training_checkpoint_folder_names_its_model(files, capsys):
    root = files["root"]
    folder = root / "checkpoint_00000100"
    folder.mkdir()
    assert_one_line_error(roicodec_in_process(capsys, "compress", files["image"], "--checkpoint", folder,
                                              "-o", root / "f.roic"), "checkpoint not found", "model.pt")
    (folder / "model.pt").write_bytes(files["ckpt"].read_bytes())
    for command in (("compress", files["image"], "-o", root / "f.roic"), ("decompress", root / "f.roic", "-o", root / "f.png")):
        assert roicodec_in_process(capsys, *command, "--checkpoint", folder).returncode == 0
    assert roicodec_in_process(capsys, "compress", files["image"], "--checkpoint", files["ckpt"],
                               "-o", root / "file.roic").returncode == 0
    assert (root / "f.roic").read_bytes() == (root / "file.roic").read_bytes()
    assert (root / "f.png").is_file()


def test_bad_inputs_get_one_line_errors(files, capsys):
    root, ckpt = files["root"], files["ckpt"]
    assert_one_line_error(roicodec("compress", files["text"], "--checkpoint", ckpt, "-o", root / "a.roic"),
                          "not a readable image")
    # the same handler in-process for the other cases (a process start costs seconds)
    def run(*args):
        return roicodec_in_process(capsys, *args)

    assert_one_line_error(run("compress", files["image"], "--checkpoint", root / "missing.pt",
                              "-o", root / "a.roic"), "checkpoint not found")
    assert_one_line_error(run("compress", files["image"], "--checkpoint", files["text"],
                              "-o", root / "a.roic"), "not a readable checkpoint")
    assert_one_line_error(run("compress", files["image"], "--checkpoint", ckpt,
                              "--roi-quality", "1.5", "-o", root / "a.roic"), "outside [0, 1]")
    good = root / "good.roic"
    assert run("compress", files["image"], "--checkpoint", ckpt, "-o", good).returncode == 0
    truncated = root / "truncated.roic"
    truncated.write_bytes(good.read_bytes()[:-7])
    assert_one_line_error(run("decompress", truncated, "--checkpoint", ckpt, "-o", root / "t.png"),
                          "corrupted or truncated")
    assert_one_line_error(run("decompress", good, "--checkpoint", files["other"], "-o",
                              root / "o.png"), "different checkpoint")
    assert_one_line_error(run("decompress", files["image"], "--checkpoint", ckpt, "-o",
                              root / "p.png"), "not a .roic file")


def test_convert_an_old_checkpoint_and_decode_with_limits(files, capsys, untrained):
    """`roicodec convert` turns a format-1 checkpoint into a loadable one; `decompress`
    honours --max-pixels and --float64."""
    root = files["root"]
    model = untrained["tma"]
    old = {k: v for k, v in model.state_dict().items()
           if not k.startswith(("latent_codec.hyper_int.", "latent_codec.table_index."))}
    torch.save({"format": "roicodec-checkpoint/1", "variant": "tma", "config": model.config,
                "state_dict": old, "extra": {}}, root / "old.pt")
    out = root / "small.roic"
    proc = roicodec_in_process(capsys, "compress", files["image"], "--checkpoint", root / "old.pt", "-o", out)
    assert_one_line_error(proc, "roicodec convert")
    proc = roicodec_in_process(capsys, "convert", root / "old.pt", root / "new.pt")
    assert proc.returncode == 0 and "integer-exact" in proc.stdout, proc.stderr
    assert roicodec_in_process(capsys, "compress", files["image"], "--checkpoint", root / "new.pt",
                               "-o", out).returncode == 0
    proc = roicodec_in_process(capsys, "decompress", out, "--checkpoint", root / "new.pt", "-o",
                               root / "small.png", "--max-pixels", 100)
    assert_one_line_error(proc, "67x45 pixels, more than the decoder's limit of 100")
    proc = roicodec_in_process(capsys, "decompress", out, "--checkpoint", root / "new.pt", "-o",
                               root / "small.png", "--float64")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(root / "small.png").size == (67, 45)


def test_quality_maps_and_soft_masks_from_the_command_line(tmp_path, capsys, trained):
    """``--quality-map``: the painted half (white) decodes better than the rest, whose cells take the
    coarsest step; ``--soft`` keeps a gray mask's grades (more than two steps in the level map), which
    the same mask without it does not; a quality map with a mask source is a one-line error."""
    from pipeline.codec.bitstream import unpack
    from pipeline.codec.level_map import unpack_levels
    from pipeline.eval.metrics import masked_psnr

    ckpt = save_checkpoint(trained("sft"), tmp_path / "sft.pt")
    x, _ = image_and_mask(128, 192, seed=8)
    image = tmp_path / "photo.png"
    Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(image)
    quality = np.zeros((128, 192), dtype=np.uint8)
    quality[:, :96] = 255
    Image.fromarray(quality).save(tmp_path / "quality.png")

    def compress(*args: str) -> tuple[subprocess.CompletedProcess, Path]:
        out = tmp_path / f"{len(list(tmp_path.glob('*.roic')))}.roic"
        return roicodec_in_process(capsys, "compress", image, "--checkpoint", ckpt, "--rate", "0.8", "-o", out,
                                   *args), out

    proc, roic = compress("--quality-map", tmp_path / "quality.png")
    assert proc.returncode == 0 and "graded" in proc.stdout, proc.stderr
    header, groups = unpack(roic.read_bytes())
    steps = unpack_levels(groups[2][0], (8, 12))[0, 0]
    assert header.version == 4 and header.roi_quality == 0.0
    assert (steps[:, :6] == 4).all() and (steps[:, 6:] == 64).all()
    decoded = decode(load_checkpoint(ckpt), roic.read_bytes())
    left = torch.zeros(1, 1, 128, 192)
    left[..., :96] = 1
    assert masked_psnr(x, decoded, left) > masked_psnr(x, decoded, 1 - left) + 2.0

    gray = torch.linspace(0, 1, 192).expand(128, 192)  # a ramp: binary, half the cells are ROI
    Image.fromarray((gray.numpy() * 255).round().astype(np.uint8)).save(tmp_path / "gray.png")
    counts = {}
    for soft in (True, False):
        proc, roic = compress("--mask", tmp_path / "gray.png", "--roi-quality", "0.1", *(["--soft"] if soft else []))
        assert proc.returncode == 0, proc.stderr
        counts[soft] = len(unpack_levels(unpack(roic.read_bytes())[1][2][0], (8, 12)).unique())
    assert counts[True] > 2 and counts[False] == 2, counts
    assert_one_line_error(compress("--quality-map", tmp_path / "quality.png", "--mask", tmp_path / "gray.png")[0],
                          "--quality-map gives every pixel's quality")
