"""Real photographs from Debian's wallpaper packages, next to scikit-image's: the default model's data.

Any machine can get them from Debian's package registry (``apt-get download``); nothing is
installed, the .deb files are only read. :data:`MANIFEST` (``wallpapers_manifest.json``,
package data) lists each chosen photo: package, package version, path inside the package,
SHA-256 of the file, licence, author, split. :func:`build_photo_set` reads exactly those files
from a folder of .deb files (or of trees extracted with ``dpkg -x NAME.deb DIR/NAME``), checks
every SHA-256 and writes the photos as PNGs, together with scikit-image's photos
(:mod:`pipeline.data.photos`)::

    OUT/train/    the wallpapers' training photos + scikit-image's 12 training photos
    OUT/heldout/  the wallpapers' held-out photos + scikit-image's 7 held-out photos
    OUT/photo_set.json   every written file: source, licence, author, split, sizes
    OUT/ATTRIBUTION.txt  author, title, licence and source of every photo

``OUT/train`` is a plain image folder, the input of the mask preprocessing job
(``python jobs/preprocess_masks.py --input OUT/train --output SHARDS``: saliency is the ROI).

**Which photos.** Sources: ``plasma-workspace-wallpapers``, ``ukui-wallpapers`` and
``lomiri-wallpapers-20.04`` of Debian 12 (bookworm), versions in the manifest. Every image
in them was looked at (full frame, and 1:1 crops where in doubt); only real photographs were
kept: no illustrations, renders, abstract or low-poly art, logos, composites. That leaves 11
of plasma's 30 wallpapers (their original 2560x1600 JPEGs; the other sizes are symlinks to
them), 1 of lomiri's 4 (the nuthatch; *Infinite-Sea* is a tinted star field composited with
drawn lines over a rendered sea) and none of ukui's 12 (all illustrations or renders). The
manifest's ``rejected`` section lists every image left out and why.

**Held-out split**, fixed before any training, by content (as :mod:`pipeline.data.photos`
does): 3 of the 12 (25 %), one of each kind of scene, each with an obvious object on a
background so that an ROI evaluation has something to measure, while the training side keeps
other photos of the same kind: a landscape with objects (*Evening Glow*: boats on a shore;
training keeps five lake and forest scenes), a close-up on a natural texture (*Fallen Leaf*;
training keeps *One Stands Out*, *Colorful Cups*, *Grey*), an object against a plain blurred
background (the nuthatch *Kleiber*; training keeps *Kite*).

**Size.** Each photo is downscaled (Lanczos, in 8-bit sRGB values as stored; EXIF rotation
applied, ICC profiles ignored) until its *shorter* side is at most ``max_short_side``
(default :data:`MAX_SHORT_SIDE` = 768: a 2560x1600 wallpaper becomes 1229x768), never
upscaled or cropped, so the whole frame stays. Downscaling also averages away the JPEG
artefacts and sensor noise of the originals, which a codec should not learn to spend bits
on. Grayscale photos become three equal channels. The scikit-image photos follow the same
rule (most are already smaller and stay as they are).

Command line (downloads the missing .debs into ``--debs``, then builds ``--out``)::

    python -m pipeline.data.wallpapers --debs wallpaper_debs --out photo_set

Deterministic: the same .debs give byte-identical PNGs, so re-running is safe.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import numpy as np
from PIL import Image, ImageOps

MANIFEST = Path(__file__).with_name("wallpapers_manifest.json")
MAX_SHORT_SIDE = 768
SPLITS = ("train", "heldout")
SKIMAGE_PREFIX = "skimage-"

Progress = Callable[[str], None]


class PhotoSetError(ValueError):
    """A missing or altered source file, a bad manifest, a failed download; the message is one line."""


@dataclass
class PhotoSet:
    """Where a written photo set lies, and what it holds."""

    root: Path
    files: dict[str, list[Path]] = field(default_factory=dict)  # split -> written PNGs

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def heldout_dir(self) -> Path:
        return self.root / "heldout"

    @property
    def index(self) -> Path:
        return self.root / "photo_set.json"


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# The manifest


def load_manifest(path: str | Path | None = None) -> dict[str, Any]:
    """The manifest (default :data:`MANIFEST`), checked for the fields every photo needs."""
    path = Path(path) if path is not None else MANIFEST
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PhotoSetError(f"cannot read the manifest {path}: {exc}") from None
    photos = manifest.get("photos") if isinstance(manifest, dict) else None
    if not isinstance(photos, list) or not photos:
        raise PhotoSetError(f"manifest {path}: no 'photos' list")
    names = set()
    for i, entry in enumerate(photos):
        missing = [k for k in ("name", "package", "version", "path", "sha256", "licence", "split")
                   if not isinstance(entry, dict) or not entry.get(k)]
        if missing:
            raise PhotoSetError(f"manifest {path}: photo {i} lacks {', '.join(missing)}")
        if entry["split"] not in SPLITS:
            raise PhotoSetError(f"manifest {path}: {entry['name']}: split must be one of {SPLITS}")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", entry["name"]) or entry["name"] in names:
            raise PhotoSetError(f"manifest {path}: bad or repeated photo name {entry['name']!r}")
        names.add(entry["name"])
    return manifest


def packages_needed(manifest: dict[str, Any]) -> dict[str, str]:
    """``{package: version}`` of the packages holding the manifest's photos, sorted by name."""
    needed: dict[str, str] = {}
    for entry in manifest["photos"]:
        version = needed.setdefault(entry["package"], entry["version"])
        if version != entry["version"]:
            raise PhotoSetError(f"manifest: {entry['package']} appears with versions {version} and {entry['version']}")
    return dict(sorted(needed.items()))


# ---------------------------------------------------------------------------------------------
# Finding and reading packages


def deb_file_name(package: str, version: str, arch: str = "all") -> str:
    """The name ``apt-get download`` gives a package's file (the epoch's ``:`` as ``%3a``)."""
    return f"{package}_{quote(version, safe='+~.-').replace('%3A', '%3a')}_{arch}.deb"


def find_source(folder: str | Path, package: str, version: str) -> Path:
    """The package's .deb in ``folder`` (version from the file name, as ``apt-get download`` names
    it), else the extracted tree ``folder/package`` (``dpkg -x NAME.deb folder/package``)."""
    folder = Path(folder)
    debs = sorted(folder.glob(f"{_glob_escape(package)}_*.deb"))
    for deb in debs:
        parts = deb.name[:-len(".deb")].split("_")
        if len(parts) == 3 and parts[0] == package and unquote(parts[1]) == version:
            return deb
    tree = folder / package
    if tree.is_dir():
        return tree
    other = ", ".join(unquote(d.name.split("_")[1]) for d in debs if d.name.count("_") == 2)
    found = f" (found only version {other})" if other else ""
    raise PhotoSetError(f"no .deb of {package} {version} in {folder}{found}; "
                        f"download it with: python -m pipeline.data.wallpapers --debs {folder}")


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _ar_members(data: bytes) -> Iterable[tuple[str, bytes]]:
    """The members of an ``ar`` archive (a .deb is one): (name, content)."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        yield name, data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)


def _data_tar(deb: Path) -> tarfile.TarFile:
    """The file-system tarball of a .deb, opened for streaming."""
    try:
        members = dict(_ar_members(deb.read_bytes()))
    except (OSError, ValueError) as exc:
        raise PhotoSetError(f"{deb}: not a readable .deb ({exc})") from None
    name = next((n for n in members if n.startswith("data.tar")), None)
    if name is None:
        raise PhotoSetError(f"{deb}: no data.tar member")
    if name in ("data.tar", "data.tar.gz", "data.tar.xz", "data.tar.bz2"):
        return tarfile.open(fileobj=io.BytesIO(members[name]), mode="r|*")
    # e.g. data.tar.zst, which Python's tarfile cannot read: let dpkg-deb decompress it
    if shutil.which("dpkg-deb") is None:
        raise PhotoSetError(f"{deb}: {name} needs dpkg-deb to be read, and it is not installed")
    out = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=False)
    if out.returncode:
        raise PhotoSetError(f"{deb}: dpkg-deb --fsys-tarfile failed: {out.stderr.decode(errors='replace').strip()}")
    return tarfile.open(fileobj=io.BytesIO(out.stdout), mode="r|")


def read_package_files(source: Path, paths: Sequence[str]) -> dict[str, bytes]:
    """The content of ``paths`` (relative, e.g. ``usr/share/...``) in a .deb or extracted tree;
    paths that are missing (or not regular files) are left out of the answer."""
    wanted = {p.lstrip("/") for p in paths}
    found: dict[str, bytes] = {}
    if source.is_dir():
        for p in wanted:
            f = source / p
            if f.is_file() and not f.is_symlink():
                found[p] = f.read_bytes()
        return found
    with _data_tar(source) as tar:
        try:
            for member in tar:
                path = member.name.removeprefix("./")
                if path in wanted and member.isfile():
                    found[path] = tar.extractfile(member).read()
                    if len(found) == len(wanted):
                        break
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise PhotoSetError(f"{source}: damaged data tarball ({exc})") from None
    return found


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def extract_photos(source_dir: str | Path, manifest: dict[str, Any] | None = None,
                   progress: Progress = _quiet) -> dict[str, bytes]:
    """``{name: original file bytes}`` of every manifest photo, read from the .debs (or extracted
    trees) in ``source_dir``, each checked against its SHA-256; a missing or different file
    raises :class:`PhotoSetError` naming it."""
    manifest = manifest if manifest is not None else load_manifest()
    out: dict[str, bytes] = {}
    for package, version in packages_needed(manifest).items():
        entries = [e for e in manifest["photos"] if e["package"] == package]
        source = find_source(source_dir, package, version)
        progress(f"  {package} {version}: {len(entries)} photo(s) from {source.name}")
        files = read_package_files(source, [e["path"] for e in entries])
        for e in entries:
            data = files.get(e["path"].lstrip("/"))
            if data is None:
                raise PhotoSetError(f"{e['name']}: {e['path']} is missing from {source}")
            digest = sha256(data)
            if digest != e["sha256"].lower():
                raise PhotoSetError(f"{e['name']}: {e['path']} in {source} has SHA-256 {digest}, "
                                    f"the manifest says {e['sha256']}")
            out[e["name"]] = data
    return out


# ---------------------------------------------------------------------------------------------
# Writing the set


def fit_short_side(img: Image.Image, max_short_side: int = MAX_SHORT_SIDE) -> Image.Image:
    """``img`` as 8-bit RGB (EXIF rotation applied), downscaled (Lanczos) so that its shorter side is
    at most ``max_short_side``; never upscaled, never cropped."""
    img = ImageOps.exif_transpose(img)
    img = img.convert("RGB")
    scale = max_short_side / min(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    return img


def _save_png(img: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    if not (path.exists() and path.read_bytes() == data):
        tmp = path.with_name(f".{path.name}.tmp")  # hidden: never an input of the preprocessing job
        tmp.write_bytes(data)
        tmp.replace(path)


def _skimage_photos(split: str) -> list[tuple[str, np.ndarray]]:
    from pipeline.data.photos import HELD_OUT, TRAIN, photo

    names = TRAIN if split == "train" else HELD_OUT
    return [(name, photo(name, max_side=1 << 20)) for name in names]  # full size; shrunk below


def build_photo_set(source_dir: str | Path, out_dir: str | Path, manifest: dict[str, Any] | str | Path | None = None,
                    max_short_side: int = MAX_SHORT_SIDE, skimage: bool = True,
                    progress: Progress = _quiet) -> PhotoSet:
    """Extract and check the manifest's photos from ``source_dir`` (see :func:`extract_photos`) and
    write them, with scikit-image's photos (``skimage``), as PNGs under ``out_dir/train`` and
    ``out_dir/heldout``, plus ``photo_set.json`` and ``ATTRIBUTION.txt``. Nothing is written
    unless every source file checks out. Returns where it all lies."""
    if max_short_side < 16:
        raise PhotoSetError(f"max_short_side must be at least 16, got {max_short_side}")
    if not isinstance(manifest, dict):
        manifest = load_manifest(manifest)
    progress(f"reading {len(manifest['photos'])} photo(s) from {source_dir}")
    originals = extract_photos(source_dir, manifest, progress)
    photo_set = PhotoSet(Path(out_dir))
    for split in SPLITS:
        (photo_set.root / split).mkdir(parents=True, exist_ok=True)
        photo_set.files[split] = []
    index: list[dict[str, Any]] = []
    progress(f"writing PNGs (shorter side at most {max_short_side} px) under {photo_set.root}")
    for entry in manifest["photos"]:
        try:
            with Image.open(io.BytesIO(originals[entry["name"]])) as src:
                src.load()
                size = src.size
                img = fit_short_side(src, max_short_side)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise PhotoSetError(f"{entry['name']}: {entry['path']} cannot be decoded ({exc})") from None
        path = photo_set.root / entry["split"] / f"{entry['name']}.png"
        _save_png(img, path)
        photo_set.files[entry["split"]].append(path)
        index.append({"file": f"{entry['split']}/{path.name}", "split": entry["split"],
                      "source": f"{entry['package']} {entry['version']}: {entry['path']}",
                      "sha256_source": entry["sha256"], "licence": entry["licence"],
                      **{k: entry[k] for k in ("upstream_licence", "author", "title") if k in entry},
                      "original_size": list(size), "size": list(img.size)})
        progress(f"  {entry['split']:8s} {path.name}  {size[0]}x{size[1]} -> {img.width}x{img.height}")
    if skimage:
        import skimage

        n_train, n_heldout = len(photo_set.files["train"]), len(photo_set.files["heldout"])
        for split in SPLITS:
            for name, arr in _skimage_photos(split):
                img = fit_short_side(Image.fromarray(arr), max_short_side)
                path = photo_set.root / split / f"{SKIMAGE_PREFIX}{name}.png"
                _save_png(img, path)
                photo_set.files[split].append(path)
                index.append({"file": f"{split}/{path.name}", "split": split,
                              "source": f"scikit-image {skimage.__version__}: skimage.data.{name}",
                              "licence": "see skimage/data/README.txt", "original_size": list(arr.shape[1::-1]),
                              "size": list(img.size)})
        progress(f"  scikit-image {skimage.__version__}: {len(photo_set.files['train']) - n_train} training and "
                 f"{len(photo_set.files['heldout']) - n_heldout} held-out photos")
    _remove_strays(photo_set)
    photo_set.index.write_text(json.dumps({"max_short_side": max_short_side, "photos": index}, indent=1,
                                          ensure_ascii=False) + "\n")
    (photo_set.root / "ATTRIBUTION.txt").write_text(_attribution(manifest), encoding="utf-8")
    return photo_set


def _remove_strays(photo_set: PhotoSet) -> None:
    """Drop PNGs an earlier build (another manifest) left in the split folders, so a folder holds
    exactly this set."""
    for split, files in photo_set.files.items():
        keep = {p.name for p in files}
        for p in (photo_set.root / split).glob("*.png"):
            if p.name not in keep:
                p.unlink()


def _attribution(manifest: dict[str, Any]) -> str:
    lines = ["Photographs in this folder, by file (PNG, downscaled from the source file named):", ""]
    for e in manifest["photos"]:
        licence = e["licence"] + (f" (upstream: {e['upstream_licence']})"
                                  if e.get("upstream_licence") and e["upstream_licence"] != e["licence"] else "")
        lines.append(f"{e['split']}/{e['name']}.png: \"{e.get('title', e['name'])}\" by {e.get('author', 'unknown')}, "
                     f"{licence}; Debian package {e['package']} {e['version']}, /{e['path'].lstrip('/')}; "
                     f"copyright: /usr/share/doc/{e['package']}/copyright in the package")
    lines += ["", "skimage-*.png: scikit-image's sample images (skimage.data); their sources and licences are "
                  "listed in skimage/data/README.txt of the installed scikit-image.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Downloading


def download_debs(cache_dir: str | Path, manifest: dict[str, Any] | None = None, progress: Progress = _quiet,
                  apt_get: str = "apt-get") -> dict[str, Path]:
    """Put the .deb of every package the manifest needs, at the manifest's version, into ``cache_dir``
    with ``apt-get download PACKAGE=VERSION`` (no root needed; nothing installed); packages already
    there are not fetched again. Returns ``{package: .deb}``."""
    manifest = manifest if manifest is not None else load_manifest()
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    debs: dict[str, Path] = {}
    for package, version in packages_needed(manifest).items():
        try:
            source = find_source(cache, package, version)
            if source.suffix == ".deb":
                progress(f"  {package} {version}: have {source.name}")
                debs[package] = source
                continue
        except PhotoSetError:
            pass
        progress(f"  {package} {version}: apt-get download ...")
        try:
            out = subprocess.run([apt_get, "download", f"{package}={version}"], cwd=cache, capture_output=True,
                                 text=True, check=False)
        except OSError as exc:
            raise PhotoSetError(f"cannot run {apt_get} ({exc}); on a Debian-based system it comes with apt") from None
        if out.returncode:
            last = next((line for line in reversed(out.stderr.splitlines()) if line.strip()), "no message")
            raise PhotoSetError(f"apt-get download {package}={version} failed: {last.strip()} "
                                f"(try 'apt-get update'; the manifest's versions are Debian 12 bookworm's)")
        debs[package] = find_source(cache, package, version)
        progress(f"  {package} {version}: got {debs[package].name} ({debs[package].stat().st_size / 1e6:.1f} MB)")
    return debs


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m pipeline.data.wallpapers", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build the default model's photo set: real photographs from Debian's wallpaper packages "
                    "(checked against the committed manifest's SHA-256s) and scikit-image's sample photos, "
                    "as PNGs under OUT/train and OUT/heldout.",
        epilog="Then: python jobs/preprocess_masks.py --input OUT/train --output SHARDS")
    p.add_argument("--debs", default="wallpaper_debs",
                   help="folder of the packages' .deb files (or trees extracted as DEBS/PACKAGE); missing "
                        ".debs are downloaded into it with apt-get (default: %(default)s)")
    p.add_argument("--out", default="photo_set", help="output folder (default: %(default)s)")
    p.add_argument("--no-download", dest="download", action="store_false",
                   help="never run apt-get; every package must already be in --debs")
    p.add_argument("--max-short-side", type=int, default=MAX_SHORT_SIDE,
                   help="downscale until the shorter side is at most this many pixels (default: %(default)s)")
    p.add_argument("--no-skimage", dest="skimage", action="store_false", help="leave out scikit-image's photos")
    p.add_argument("--manifest", default=None, help="another manifest (default: the committed one)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines, only the summary")
    return p


def main(argv: list[str] | None = None) -> int:
    """Download (unless told not to) and build; print a JSON summary; 1 with a one-line error."""
    args = build_parser().parse_args(argv)
    progress: Progress = _quiet if args.quiet else (lambda line: print(line, flush=True))
    try:
        manifest = load_manifest(args.manifest)
        if args.download:
            progress(f"packages -> {args.debs}")
            download_debs(args.debs, manifest, progress)
        photo_set = build_photo_set(args.debs, args.out, manifest, args.max_short_side, args.skimage, progress)
    except PhotoSetError as exc:
        print(f"wallpapers: error: {exc}", file=sys.stderr)
        return 1
    counts = {split: len(files) for split, files in photo_set.files.items()}
    size = sum(p.stat().st_size for files in photo_set.files.values() for p in files)
    print(json.dumps({"out": str(photo_set.root), "photos": counts, "bytes": size, "index": str(photo_set.index)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
