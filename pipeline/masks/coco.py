"""ROI masks from COCO ground truth (pycocotools), with prompt words matched to categories.

A prompt word is matched to a category of the annotation file: lower-cased,
punctuation removed, a leading article ("a", "the", ...) dropped, then tried as is,
singularised ("puppies" -> "puppy"), and through a synonym table for the 80 COCO
categories ("faces" -> person, "automobile" -> car, "puppy" -> dog). When the whole
phrase does not match, its trailing words are tried ("a red car" -> "car").
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path, PurePosixPath

import numpy as np

from pipeline.masks.ops import MaskError, binarize, resize

# Common words for each of the 80 COCO categories (singular; plurals are handled).
COCO_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("people", "man", "men", "woman", "women", "child", "children", "kid", "boy",
               "girl", "human", "pedestrian", "face", "head", "hand", "body", "player", "baby",
               "lady", "guy", "adult", "persons", "someone", "portrait", "rider", "skier"),
    "bicycle": ("bike", "cycle", "push bike"),
    "car": ("automobile", "auto", "license plate", "licence plate", "number plate", "taxi",
            "cab", "sedan", "suv", "van", "vehicle", "wheel"),
    "motorcycle": ("motorbike", "scooter", "moped"),
    "airplane": ("plane", "aeroplane", "aircraft", "jet", "airliner"),
    "bus": ("minibus", "autobus", "omnibus"),
    "train": ("locomotive", "tram", "railcar"),
    "truck": ("lorry", "pickup", "pickup truck"),
    "boat": ("ship", "sailboat", "yacht", "canoe", "kayak", "ferry"),
    "traffic light": ("traffic signal", "stoplight", "stop light"),
    "fire hydrant": ("hydrant",),
    "stop sign": (),
    "parking meter": ("meter",),
    "bench": ("park bench",),
    "bird": ("pigeon", "seagull", "gull", "duck", "parrot", "sparrow"),
    "cat": ("kitten", "kitty"),
    "dog": ("puppy", "pup", "doggy", "doggie", "hound"),
    "horse": ("pony", "foal"),
    "sheep": ("lamb",),
    "cow": ("cattle", "bull", "calf", "ox", "oxen"),
    "elephant": (),
    "bear": (),
    "zebra": (),
    "giraffe": (),
    "backpack": ("rucksack", "knapsack"),
    "umbrella": ("parasol",),
    "handbag": ("purse", "bag"),
    "tie": ("necktie",),
    "suitcase": ("luggage",),
    "frisbee": (),
    "skis": ("ski",),
    "snowboard": (),
    "sports ball": ("ball", "football", "soccer ball", "basketball", "tennis ball", "baseball"),
    "kite": (),
    "baseball bat": ("bat",),
    "baseball glove": ("glove", "mitt"),
    "skateboard": (),
    "surfboard": (),
    "tennis racket": ("racket", "racquet"),
    "bottle": (),
    "wine glass": ("glass",),
    "cup": ("mug",),
    "fork": (),
    "knife": ("knives",),
    "spoon": (),
    "bowl": (),
    "banana": (),
    "apple": (),
    "sandwich": (),
    "orange": (),
    "broccoli": (),
    "carrot": (),
    "hot dog": ("hotdog",),
    "pizza": (),
    "donut": ("doughnut",),
    "cake": (),
    "chair": (),
    "couch": ("sofa",),
    "potted plant": ("plant", "houseplant", "flower pot", "pot plant"),
    "bed": (),
    "dining table": ("table",),
    "toilet": (),
    "tv": ("television", "tv monitor", "monitor", "screen"),
    "laptop": ("notebook computer",),
    "mouse": ("computer mouse", "mice"),
    "remote": ("remote control",),
    "keyboard": (),
    "cell phone": ("phone", "mobile phone", "smartphone", "cellphone", "mobile"),
    "microwave": (),
    "oven": ("stove",),
    "toaster": (),
    "sink": (),
    "refrigerator": ("fridge",),
    "book": (),
    "clock": (),
    "vase": (),
    "scissors": (),
    "teddy bear": ("teddy", "stuffed animal"),
    "hair drier": ("hair dryer", "hairdryer", "blow dryer"),
    "toothbrush": (),
}

_ARTICLES = {"a", "an", "the", "some", "any", "this", "that", "these", "those", "my", "all"}


def _normalise(text: str) -> list[str]:
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    while words and words[0] in _ARTICLES:
        words = words[1:]
    return words


def _singular(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses", "uses")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def _phrase_table(names: Iterable[str]) -> dict[str, str]:
    """Normalised phrase -> category name: the names themselves first, then COCO synonyms."""
    names = list(names)
    table: dict[str, str] = {}
    for canonical, synonyms in COCO_SYNONYMS.items():
        for phrase in (canonical, *synonyms):
            table[" ".join(_normalise(phrase))] = canonical
    for name in names:  # a file's own names win over synonyms
        table[" ".join(_normalise(name))] = name
    return table


def match_category(text: str, names: Iterable[str] = COCO_SYNONYMS) -> str | None:
    """The category (from ``names``, default the 80 COCO ones) a prompt word refers to, or None."""
    names = list(names)
    table = _phrase_table(names)
    words = _normalise(text)
    for start in range(len(words)):
        tail = words[start:]
        for candidate in (tail, tail[:-1] + [_singular(tail[-1])]):
            hit = table.get(" ".join(candidate))
            if hit is None:
                continue
            if hit not in names:  # a COCO name, maybe spelled otherwise in this file ("TV")
                hit = table.get(" ".join(_normalise(hit)))
            return hit if hit in names else None  # a category the file lacks: no looser match
    return None


class CocoMasks:
    """One COCO-format annotation file: find images, match categories, draw ROI masks."""

    def __init__(self, annotation_file: str | Path) -> None:
        from pycocotools.coco import COCO

        self.path = Path(annotation_file)
        if not self.path.is_file():
            raise MaskError(f"COCO annotation file not found: {self.path}")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                self.coco = COCO(str(self.path))
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            raise MaskError(f"not a COCO annotation file: {self.path} ({exc})") from exc
        self.categories: dict[int, str] = {c["id"]: c["name"] for c in self.coco.dataset.get("categories", [])}
        self._ids_by_name = {name: cid for cid, name in self.categories.items()}
        self._images_by_file: dict[str, int] = {}
        for img in self.coco.dataset.get("images", []):
            name = PurePosixPath(img["file_name"])
            self._images_by_file[str(name)] = img["id"]
            self._images_by_file.setdefault(name.name, img["id"])

    def images(self) -> list[tuple[int, str]]:
        """(COCO image id, file name) of every image in the file, in file order."""
        return [(img["id"], img["file_name"]) for img in self.coco.dataset.get("images", [])]

    def image_id(self, file_name: str | Path) -> int:
        """The COCO id of an image given its file name (as in the file, or its base name)."""
        key = PurePosixPath(Path(file_name).as_posix())
        for candidate in (str(key), key.name):
            if candidate in self._images_by_file:
                return self._images_by_file[candidate]
        raise MaskError(f"image {key.name!r} is not in {self.path.name}")

    def resolve_category(self, word: str) -> str:
        """The file's category name for a prompt word; MaskError naming the known ones if none."""
        name = match_category(word, self.categories.values())
        if name is None:
            known = ", ".join(sorted(self.categories.values()))
            coco_name = match_category(word)
            if coco_name is None:
                raise MaskError(f"unknown category {word!r} ({self.path.name} has: {known})")
            raise MaskError(f"{word!r} means COCO category {coco_name!r}, which {self.path.name} does not "
                            f"have (it has: {known})")
        return name

    def categories_in(self, image_id: int) -> list[str]:
        """Sorted names of the categories annotated in one image."""
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))
        return sorted({self.categories[a["category_id"]] for a in anns})

    def mask(self, image_id: int, categories: Sequence[str] | None = None,
             size: tuple[int, int] | None = None) -> np.ndarray:
        """Binary float32 mask of the image's objects of ``categories`` (words; None = all).

        ``size = (height, width)`` resizes from the annotated size when the image file
        differs from it (e.g. a downscaled copy).
        """
        info = self.coco.imgs[image_id]
        height, width = int(info["height"]), int(info["width"])
        if categories is None:
            ann_ids = self.coco.getAnnIds(imgIds=[image_id], iscrowd=None)
        else:
            cat_ids = [self._ids_by_name[self.resolve_category(c)] for c in categories]
            ann_ids = self.coco.getAnnIds(imgIds=[image_id], catIds=cat_ids, iscrowd=None) if cat_ids else []
        out = np.zeros((height, width), np.float32)
        for ann in self.coco.loadAnns(ann_ids):
            np.maximum(out, self.coco.annToMask(ann).astype(np.float32), out=out)
        if size is not None and tuple(size) != (height, width):
            out = binarize(resize(out, size), 0.5)
        return out


@lru_cache(maxsize=4)
def _load(path: str, mtime_ns: int) -> CocoMasks:
    return CocoMasks(path)


def load_coco(annotation_file: str | Path) -> CocoMasks:
    """A cached :class:`CocoMasks` for a file (reloaded when the file changes)."""
    path = Path(annotation_file)
    if not path.is_file():
        raise MaskError(f"COCO annotation file not found: {path}")
    return _load(str(path.resolve()), path.stat().st_mtime_ns)
