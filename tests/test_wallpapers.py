"""The wallpaper data step on a tiny made-up .deb and manifest: no network, seconds."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import wallpapers as wp

PACKAGE, VERSION = "roic-test-wallpapers", "1:0.1-1"  # an epoch, as plasma-workspace-wallpapers has
HAS_DPKG_DEB = shutil.which("dpkg-deb") is not None


def _jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    arr = np.clip(ramp + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_gray(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(width * height, dtype=np.uint8).reshape(height, width)).save(buf, format="PNG")
    return buf.getvalue()


FILES = {"usr/share/backgrounds/lake.jpg": _jpeg(64, 40, 0),
         "usr/share/backgrounds/tree.png": _png_gray(30, 50),
         f"usr/share/doc/{PACKAGE}/copyright": b"Files: *\nLicense: CC0-1.0\n"}


def _write_tree(root: Path) -> None:
    for rel, data in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "usr/share/backgrounds/lake-small.jpg").symlink_to("lake.jpg")  # as plasma's other sizes are


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = [b"!<arch>\n"]
    for name, data in members:
        out.append(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode())
        out.append(data + (b"\n" if len(data) % 2 else b""))
    return b"".join(out)


def _tar_gz(root: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(root, arcname=".")
    return buf.getvalue()


def make_deb(folder: Path, compression: str = "xz") -> Path:
    """A tiny .deb named as apt-get names it: ``dpkg-deb --build`` where there is one, else the same
    layout written here (ar archive of debian-binary, control.tar.gz, data.tar.gz)."""
    tree = folder / "tree"
    _write_tree(tree)
    deb = folder / wp.deb_file_name(PACKAGE, VERSION)
    control = (f"Package: {PACKAGE}\nVersion: {VERSION}\nArchitecture: all\nMaintainer: Test <t@example.org>\n"
               f"Description: two photos\n")
    if HAS_DPKG_DEB:
        (tree / "DEBIAN").mkdir()
        (tree / "DEBIAN" / "control").write_text(control)
        subprocess.run(["dpkg-deb", "--root-owner-group", f"-Z{compression}", "--build", str(tree), str(deb)],
                       check=True, capture_output=True)
    else:
        ctl = folder / "ctl"
        ctl.mkdir()
        (ctl / "control").write_text(control)
        deb.write_bytes(_ar([("debian-binary", b"2.0\n"), ("control.tar.gz", _tar_gz(ctl)),
                             ("data.tar.gz", _tar_gz(tree))]))
    shutil.rmtree(tree)
    return deb


def make_manifest(**changes: str) -> dict:
    def entry(name: str, path: str, split: str) -> dict:
        return {"name": name, "package": PACKAGE, "version": VERSION, "path": path,
                "sha256": wp.sha256(FILES[path]), "licence": "CC0-1.0", "author": "Someone", "title": name,
                "split": split}

    photos = [entry("test-lake", "usr/share/backgrounds/lake.jpg", "train"),
              entry("test-tree", "usr/share/backgrounds/tree.png", "heldout")]
    for key, value in changes.items():  # e.g. sha256="00..." changes the first photo
        photos[0][key] = value
    return {"photos": photos}


@pytest.fixture()
def deb_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "debs"
    folder.mkdir()
    make_deb(folder)
    return folder


def test_builds_the_set_from_a_deb_checking_every_sha(deb_dir: Path, tmp_path: Path):
    lines: list[str] = []
    out = wp.build_photo_set(deb_dir, tmp_path / "out", make_manifest(), max_short_side=16, skimage=False,
                             progress=lines.append)
    assert [p.name for p in out.files["train"]] == ["test-lake.png"]
    assert [p.name for p in out.files["heldout"]] == ["test-tree.png"]
    lake = Image.open(out.train_dir / "test-lake.png")
    tree = Image.open(out.heldout_dir / "test-tree.png")
    assert lake.mode == "RGB" and lake.size == (26, 16)  # 64x40 -> shorter side 16, aspect kept
    assert tree.mode == "RGB" and tree.size == (16, 27)  # grayscale 30x50 -> three channels
    index = json.loads(out.index.read_text())
    assert index["max_short_side"] == 16 and [p["file"] for p in index["photos"]] == \
        ["train/test-lake.png", "heldout/test-tree.png"]
    assert index["photos"][0]["original_size"] == [64, 40] and index["photos"][0]["licence"] == "CC0-1.0"
    assert "test-lake.png" in (out.root / "ATTRIBUTION.txt").read_text()
    assert any("2 photo(s)" in line for line in lines)

    before = {p: p.read_bytes() for p in out.root.rglob("*.png")}
    wp.build_photo_set(deb_dir, tmp_path / "out", make_manifest(), max_short_side=16, skimage=False)
    assert {p: p.read_bytes() for p in out.root.rglob("*.png")} == before  # deterministic

    big = wp.build_photo_set(deb_dir, tmp_path / "big", make_manifest(), skimage=False)
    assert Image.open(big.train_dir / "test-lake.png").size == (64, 40)  # never upscaled


def test_a_tampered_or_missing_file_is_a_one_line_error_and_nothing_is_written(deb_dir: Path, tmp_path: Path):
    with pytest.raises(wp.PhotoSetError) as err:
        wp.build_photo_set(deb_dir, tmp_path / "out", make_manifest(sha256="0" * 64), skimage=False)
    msg = str(err.value)
    assert "\n" not in msg and "test-lake" in msg and "usr/share/backgrounds/lake.jpg" in msg and "SHA-256" in msg
    assert not (tmp_path / "out").exists()

    with pytest.raises(wp.PhotoSetError, match=r"test-lake: usr/share/backgrounds/gone\.jpg is missing") as err:
        wp.build_photo_set(deb_dir, tmp_path / "out", make_manifest(path="usr/share/backgrounds/gone.jpg"))
    assert "\n" not in str(err.value)
    with pytest.raises(wp.PhotoSetError, match="is missing"):  # a symlink is not the photo
        wp.extract_photos(deb_dir, make_manifest(path="usr/share/backgrounds/lake-small.jpg"))

    other_version = make_manifest()
    for entry in other_version["photos"]:
        entry["version"] = "2.0"
    with pytest.raises(wp.PhotoSetError, match=r"no \.deb of roic-test-wallpapers 2\.0 .*found only version 1:0\.1-1"):
        wp.extract_photos(deb_dir, other_version)

    deb = next(deb_dir.glob("*.deb"))
    bad = tmp_path / "bad"
    bad.mkdir()
    for content in (b"<html>404</html>", deb.read_bytes()[:len(deb.read_bytes()) // 2]):  # not a .deb; truncated
        (bad / deb.name).write_bytes(content)
        with pytest.raises(wp.PhotoSetError) as err:
            wp.extract_photos(bad, make_manifest())
        assert "\n" not in str(err.value) and str(bad / deb.name) in str(err.value)


def test_reads_an_extracted_tree_too(deb_dir: Path, tmp_path: Path):
    trees = tmp_path / "trees"
    if HAS_DPKG_DEB:
        trees.mkdir()
        subprocess.run(["dpkg", "-x", str(next(deb_dir.glob("*.deb"))), str(trees / PACKAGE)], check=True)
    else:
        _write_tree(trees / PACKAGE)
    photos = wp.extract_photos(trees, make_manifest())
    assert photos == {"test-lake": FILES["usr/share/backgrounds/lake.jpg"],
                      "test-tree": FILES["usr/share/backgrounds/tree.png"]}
    (trees / PACKAGE / "usr/share/backgrounds/tree.png").write_bytes(b"not the photo")
    with pytest.raises(wp.PhotoSetError, match="test-tree: usr/share/backgrounds/tree.png in .* has SHA-256"):
        wp.extract_photos(trees, make_manifest())


@pytest.mark.skipif(not HAS_DPKG_DEB, reason="dpkg-deb builds the compressed variants")
@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_reads_every_data_tarball_compression(tmp_path: Path, compression: str):
    make_deb(tmp_path, compression)  # zstd goes through dpkg-deb --fsys-tarfile
    assert sorted(wp.extract_photos(tmp_path, make_manifest())) == ["test-lake", "test-tree"]


def _fake_apt_get(folder: Path, deb: Path | None, log: Path) -> str:
    """An ``apt-get`` that logs its arguments and copies ``deb`` into its working folder (or fails)."""
    script = folder / "apt-get"
    body = f'cp "{deb}" .' if deb else 'echo "E: Unable to locate package" >&2; exit 100'
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n{body}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@pytest.mark.skipif(os.name != "posix", reason="the fake apt-get is a shell script")
def test_download_fetches_missing_debs_at_the_manifest_version(deb_dir: Path, tmp_path: Path):
    deb = next(deb_dir.glob("*.deb"))
    cache, log = tmp_path / "cache", tmp_path / "apt.log"
    apt = _fake_apt_get(tmp_path, deb, log)
    lines: list[str] = []
    got = wp.download_debs(cache, make_manifest(), progress=lines.append, apt_get=apt)
    assert got == {PACKAGE: cache / deb.name} and got[PACKAGE].read_bytes() == deb.read_bytes()
    assert log.read_text().split() == ["download", f"{PACKAGE}={VERSION}"]
    wp.download_debs(cache, make_manifest(), progress=lines.append, apt_get=apt)
    assert len(log.read_text().splitlines()) == 1 and "have" in lines[-1]  # not fetched again

    failing = _fake_apt_get(tmp_path / "cache", None, log)
    with pytest.raises(wp.PhotoSetError) as err:
        wp.download_debs(tmp_path / "empty", make_manifest(), apt_get=failing)
    assert "\n" not in str(err.value) and "Unable to locate package" in str(err.value)


def test_command_line(deb_dir: Path, tmp_path: Path, capsys):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(make_manifest()))
    args = ["--debs", str(deb_dir), "--out", str(tmp_path / "out"), "--manifest", str(manifest), "--no-download",
            "--no-skimage", "--max-short-side", "20"]
    assert wp.main(args) == 0
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[-1])["photos"] == {"train": 1, "heldout": 1} and "test-lake.png" in out
    manifest.write_text(json.dumps(make_manifest(sha256="f" * 64)))
    assert wp.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("wallpapers: error: test-lake:") and err.count("\n") == 1


def test_skimage_photos_join_both_splits(deb_dir: Path, tmp_path: Path):
    from pipeline.data.photos import HELD_OUT, TRAIN

    out = wp.build_photo_set(deb_dir, tmp_path / "out", make_manifest(), max_short_side=64)
    assert {p.name for p in out.files["train"]} == {"test-lake.png"} | {f"skimage-{n}.png" for n in TRAIN}
    assert {p.name for p in out.files["heldout"]} == {"test-tree.png"} | {f"skimage-{n}.png" for n in HELD_OUT}
    assert all(min(Image.open(p).size) <= 64 for p in out.files["train"])
    # a stray file from another build is removed, so the folder is exactly the set
    (out.train_dir / "old.png").write_bytes(b"")
    wp.build_photo_set(deb_dir, tmp_path / "out", make_manifest(), max_short_side=64, skimage=False)
    assert sorted(p.name for p in out.train_dir.iterdir()) == ["test-lake.png"]


def test_the_committed_manifest():
    manifest = wp.load_manifest()
    photos = manifest["photos"]
    assert wp.packages_needed(manifest) == {"lomiri-wallpapers-20.04": "20.04.0-2",
                                            "plasma-workspace-wallpapers": "4:5.27.5-2"}
    held = [p for p in photos if p["split"] == "heldout"]
    assert len(photos) == 12 and 0.15 <= len(held) / len(photos) <= 0.25
    assert {p["name"] for p in held} == {"plasma-EveningGlow", "plasma-FallenLeaf", "lomiri-Kleiber"}
    assert all(len(p["sha256"]) == 64 and int(p["sha256"], 16) >= 0 for p in photos)
    assert len({p["sha256"] for p in photos}) == len(photos)
    rejected = {path for paths in manifest["rejected"].values() for path in paths}
    assert not rejected & {p["path"] for p in photos}
    assert wp.deb_file_name("plasma-workspace-wallpapers", "4:5.27.5-2") == \
        "plasma-workspace-wallpapers_4%3a5.27.5-2_all.deb"  # as apt-get download names it
