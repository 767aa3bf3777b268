"""Readers of the referring segmentation benchmarks: RefCOCO, RefCOCO+, RefCOCOg (refer layout) and PhraseCut.

A reader returns an ``EvalSet``: images in a fixed order (by image id), each with the sentences to evaluate
and the ground truth of every ref, decoded lazily at the image's original size.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DependencyError, InputError
from .safe_pickle import load_refs_pickle

REFER_DATASETS = ("refcoco", "refcoco+", "refcocog")
DATASETS = REFER_DATASETS + ("phrasecut",)
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
SPLIT_BYS = ("unc", "umd", "google")
# the evaluation splits of the standard benchmark files ("train" is accepted as well)
EVAL_SPLITS: dict[tuple[str, str], tuple[str, ...]] = {
    ("refcoco", "unc"): ("val", "testA", "testB"),
    ("refcoco+", "unc"): ("val", "testA", "testB"),
    ("refcocog", "umd"): ("val", "test"),
    ("refcocog", "google"): ("val",),
    ("phrasecut", ""): ("val", "test", "miniv"),
}
COCO_IMAGE_DIRS = ("images/mscoco/images/train2014", "images/train2014", "train2014", "images")
PHRASECUT_DIRS = ("VGPhraseCut_v0", "phrasecut", "PhraseCut", ".")
TextField = Literal["sent", "raw"]


@dataclass(frozen=True)
class Target:
    """Ground truth of one ref: COCO segmentation (polygons or RLE) or PhraseCut instance polygons."""

    kind: Literal["coco", "phrasecut"]
    data: Any
    error: str | None = None  # set when the annotation is missing from the dataset files


@dataclass(frozen=True)
class Sentence:
    """One referring expression to evaluate, with the ids that identify it in the dataset files."""

    ref_id: int | str
    ann_id: int | str | None
    image_id: int | str
    sent_id: int | str
    text: str


@dataclass
class ImageItem:
    """An image, its size from the annotation files, its sentences and the ground truth of each ref."""

    image_id: int | str
    path: Path
    height: int | None
    width: int | None
    sentences: list[Sentence]
    targets: dict[int | str, Target]  # by ref_id
    error: str | None = None  # e.g. the image id is missing from instances.json


@dataclass
class EvalSet:
    """A benchmark split: images in evaluation order, each with its sentences."""

    dataset: str
    split: str
    split_by: str | None
    images: list[ImageItem] = field(default_factory=list)

    @property
    def n_sentences(self) -> int:
        """Number of sentences over all images."""
        return sum(len(im.sentences) for im in self.images)

    def limited(self, limit: int | None) -> "EvalSet":
        """The first ``limit`` sentences in evaluation order (images cut after the last one kept)."""
        if limit is None or limit >= self.n_sentences:
            return self
        if limit < 0:
            raise InputError(f"--limit must be >= 0, got {limit}")
        images: list[ImageItem] = []
        left = limit
        for im in self.images:
            if left <= 0:
                break
            images.append(replace(im, sentences=im.sentences[:left]))
            left -= len(images[-1].sentences)
        return replace(self, images=images)

    def shard(self, rank: int, world_size: int) -> "EvalSet":
        """Images i with i % world_size == rank (work shared by an image stays on one rank)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise InputError(f"shard index {rank} is not in [0, {world_size}); check --shard-index/--num-shards")
        return replace(self, images=[im for i, im in enumerate(self.images) if i % world_size == rank])


# --------------------------------------------------------------------------------------------- ground truth
def coco_segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Union of a COCO annotation's polygons (one or several parts) or its RLE, as bool [height, width]."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError as exc:  # pragma: no cover - pycocotools is a dependency
        raise DependencyError("decoding COCO annotations needs pycocotools: pip install pycocotools") from exc
    if isinstance(segmentation, list):
        # parts of fewer than 3 points cover no area; pycocotools would misread a 4-number part as a box
        polygons = [[float(v) for v in p] for p in segmentation
                    if isinstance(p, (list, tuple)) and len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            raise InputError(f"corrupt polygon annotation: none of its {len(segmentation)} part(s) has >= 3 points")
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(s) for s in segmentation["size"]]
        if size != [height, width]:
            raise InputError(f"RLE annotation of size {size} on an image of size {[height, width]}")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            total = sum(int(c) for c in counts)
            if total != height * width:
                raise InputError(f"corrupt RLE annotation: counts sum to {total}, not {height * width}")
            rle = mask_utils.frPyObjects({"counts": counts, "size": size}, height, width)
        else:
            rle = {"counts": counts.encode("ascii") if isinstance(counts, str) else counts, "size": size}
    else:
        raise InputError(f"unknown segmentation format {type(segmentation).__name__}; expected polygons or RLE")
    mask = mask_utils.decode(rle)
    if mask.ndim == 3:
        mask = mask.any(axis=2)
    return np.ascontiguousarray(mask.astype(bool))


def polygons_to_mask(instances: Any, height: int, width: int) -> np.ndarray:
    """Union of PhraseCut instances (each a list of polygons of [x, y] points), rasterised like its toolkit."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    n_drawn = 0
    for instance in instances:
        for polygon in instance:
            points = [(int(x), int(y)) for x, y in polygon]
            if len(points) >= 2:
                draw.polygon(points, outline=1, fill=1)
                n_drawn += 1
    if n_drawn == 0:
        raise InputError("corrupt PhraseCut annotation: no polygon with >= 2 points")
    return np.asarray(canvas, dtype=np.uint8).astype(bool)


def target_mask(target: Target, height: int, width: int) -> np.ndarray:
    """Decode a ref's ground truth at the image's size; a missing or empty annotation raises InputError."""
    if target.error is not None:
        raise InputError(target.error)
    try:
        if target.kind == "coco":
            mask = coco_segmentation_to_mask(target.data, height, width)
        else:
            mask = polygons_to_mask(target.data, height, width)
    except InputError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise InputError(f"corrupt annotation: {exc}") from exc
    if not mask.any():
        raise InputError("annotation decodes to an empty mask")
    return mask


# --------------------------------------------------------------------------------------------- RefCOCO/+/g
def valid_splits(dataset: str, split_by: str | None) -> tuple[str, ...] | None:
    """The evaluation splits of a dataset's standard files, or None when not tabulated."""
    return EVAL_SPLITS.get((dataset, split_by or ""))


def check_split(dataset: str, split: str, split_by: str | None) -> None:
    """Raise InputError naming the valid splits when ``split`` is not one of them."""
    known = valid_splits(dataset, split_by)
    if known is not None and split not in known and split != "train":
        by = f" ({split_by} split)" if split_by else ""
        raise InputError(f"{dataset}{by} has no split {split!r}; valid splits: {', '.join(known)} (and train)")


def find_image_dir(data_root: Path, candidates: tuple[str, ...] = COCO_IMAGE_DIRS) -> Path:
    """The first existing COCO train2014 image folder under data_root; InputError lists the places tried."""
    for rel in candidates:
        path = data_root / rel
        if path.is_dir():
            return path
    tried = ", ".join(str(data_root / rel) for rel in candidates)
    raise InputError(f"no image folder found (tried {tried}); pass --image-dir DIR with the COCO train2014 images")


def _sentence_text(sentence: dict[str, Any], text_field: TextField) -> str:
    text = sentence.get(text_field)
    if text is None:  # some files carry only one of the two fields
        text = sentence.get("sent" if text_field == "raw" else "raw", "")
    return str(text)


def load_refer(data_root: str | Path, dataset: str, split: str, *, split_by: str | None = None,
               image_dir: str | Path | None = None, text: TextField = "sent") -> EvalSet:
    """Read RefCOCO/RefCOCO+/RefCOCOg from the refer layout (refs pickle + instances.json + COCO images).

    The refs pickle is read with a restricted Unpickler: only plain data is accepted.
    """
    if dataset not in REFER_DATASETS:
        raise InputError(f"unknown refer dataset {dataset!r}; choose one of {', '.join(REFER_DATASETS)}")
    if text not in ("sent", "raw"):
        raise InputError(f"--text must be 'sent' or 'raw', got {text!r}")
    split_by = split_by or DEFAULT_SPLIT_BY[dataset]
    if split_by not in SPLIT_BYS:
        raise InputError(f"unknown --split-by {split_by!r}; choose one of {', '.join(SPLIT_BYS)}")
    check_split(dataset, split, split_by)
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise InputError(f"--data-root {root} is not a folder; it should hold {dataset}/refs({split_by}).p")
    ds_dir = root / dataset
    refs_path = ds_dir / f"refs({split_by}).p"
    inst_path = ds_dir / "instances.json"
    for path in (refs_path, inst_path):
        if not path.is_file():
            raise InputError(f"missing {path}; expected the refer layout DATA_ROOT/{dataset}/refs({split_by}).p "
                             f"and DATA_ROOT/{dataset}/instances.json")
    img_dir = Path(image_dir).expanduser() if image_dir is not None else find_image_dir(root)
    if not img_dir.is_dir():
        raise InputError(f"--image-dir {img_dir} is not a folder")

    refs = load_refs_pickle(refs_path)
    present = sorted({str(r.get("split")) for r in refs})
    split_refs = [r for r in refs if r.get("split") == split]
    if not split_refs:
        raise InputError(f"{refs_path} has no ref of split {split!r}; splits in the file: {', '.join(present)}")
    try:
        instances = json.loads(inst_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {inst_path}: {exc}") from exc
    image_ids = {r["image_id"] for r in split_refs}
    ann_ids = {r["ann_id"] for r in split_refs}
    images = {im["id"]: im for im in instances.get("images", []) if im.get("id") in image_ids}
    anns = {a["id"]: a for a in instances.get("annotations", []) if a.get("id") in ann_ids}
    del instances

    by_image: dict[Any, ImageItem] = {}
    for ref in sorted(split_refs, key=lambda r: r["ref_id"]):
        image_id = ref["image_id"]
        item = by_image.get(image_id)
        if item is None:
            info = images.get(image_id)
            if info is None:
                item = ImageItem(image_id, img_dir / f"COCO_train2014_{int(image_id):012d}.jpg", None, None, [], {},
                                 error=f"image id {image_id} is not in {inst_path}")
            else:
                item = ImageItem(image_id, img_dir / str(info["file_name"]), int(info["height"]),
                                 int(info["width"]), [], {})
            by_image[image_id] = item
        ann = anns.get(ref["ann_id"])
        if ann is None:
            target = Target("coco", None, error=f"annotation id {ref['ann_id']} is not in {inst_path}")
        else:
            target = Target("coco", ann.get("segmentation"))
        item.targets[ref["ref_id"]] = target
        for sent in ref.get("sentences", []):
            item.sentences.append(Sentence(ref["ref_id"], ref["ann_id"], image_id, sent["sent_id"],
                                           _sentence_text(sent, text)))
    ordered = [by_image[k] for k in sorted(by_image, key=_sort_key)]
    return EvalSet(dataset, split, split_by, ordered)


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value, "") if isinstance(value, int) else (1, 0, str(value))


# --------------------------------------------------------------------------------------------- PhraseCut
def find_phrasecut_dir(data_root: Path, split: str) -> Path:
    """The folder holding refer_{split}.json (VGPhraseCut_v0/, phrasecut/ or the data root itself)."""
    for rel in PHRASECUT_DIRS:
        if (data_root / rel / f"refer_{split}.json").is_file():
            return data_root / rel
    tried = ", ".join(str(data_root / rel / f"refer_{split}.json") for rel in PHRASECUT_DIRS)
    raise InputError(f"PhraseCut file not found (tried {tried}); download VGPhraseCut_v0 into the data root")


def load_phrasecut(data_root: str | Path, split: str, *, image_dir: str | Path | None = None) -> EvalSet:
    """Read VGPhraseCut (refer_{split}.json tasks with instance polygons; images/{image_id}.jpg)."""
    check_split("phrasecut", split, None)
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise InputError(f"--data-root {root} is not a folder; it should hold VGPhraseCut_v0/refer_{split}.json")
    pc_dir = find_phrasecut_dir(root, split)
    img_dir = Path(image_dir).expanduser() if image_dir is not None else pc_dir / "images"
    if not img_dir.is_dir():
        raise InputError(f"PhraseCut image folder {img_dir} is missing; pass --image-dir DIR")
    path = pc_dir / f"refer_{split}.json"
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    sizes: dict[Any, tuple[int, int]] = {}
    info_path = pc_dir / "image_data_split.json"
    if info_path.is_file():
        for info in json.loads(info_path.read_text(encoding="utf-8")):
            sizes[info["image_id"]] = (int(info["height"]), int(info["width"]))
    by_image: dict[Any, ImageItem] = {}
    for task in tasks:
        image_id = task["image_id"]
        item = by_image.get(image_id)
        if item is None:
            height, width = sizes.get(image_id, (None, None))
            item = by_image[image_id] = ImageItem(image_id, img_dir / f"{image_id}.jpg", height, width, [], {})
        task_id = task["task_id"]
        item.targets[task_id] = Target("phrasecut", task.get("Polygons") or [])
        item.sentences.append(Sentence(task_id, None, image_id, task_id, str(task.get("phrase", ""))))
    ordered = [by_image[k] for k in sorted(by_image, key=_sort_key)]
    return EvalSet("phrasecut", split, None, ordered)


def load_dataset(dataset: str, data_root: str | Path, split: str, *, split_by: str | None = None,
                 image_dir: str | Path | None = None, text: TextField = "sent") -> EvalSet:
    """Read any supported benchmark split (refcoco, refcoco+, refcocog, phrasecut)."""
    if dataset == "phrasecut":
        return load_phrasecut(data_root, split, image_dir=image_dir)
    return load_refer(data_root, dataset, split, split_by=split_by, image_dir=image_dir, text=text)


def dataset_overrides(dataset: str | None, preset: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Preset settings of the released code that the evaluation reproduces: the SAM area filter in absolute
    pixels (sam_min_area_reference=None, as the paper's tables were made), and off (0) for the official
    preset (and for fast, the official preset with speed options) on RefCOCOg, whose referred objects are often
    small. An explicit override of either field wins
    (e.g. --set sam_min_area_reference=307200 for a threshold relative to the image area)."""
    out: dict[str, Any] = {}
    if "sam_min_area_reference" not in overrides:
        out["sam_min_area_reference"] = None
    if dataset == "refcocog" and preset in ("official", "fast") and "sam_min_area" not in overrides:
        out["sam_min_area"] = 0
    return out


def load_image_rgb(path: Path) -> np.ndarray:
    """Read an image as uint8 RGB [H, W, 3] in its stored pixel order (no EXIF rotation, as COCO annotates)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as exc:
        raise InputError(f"missing image {path}") from exc
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"unreadable image {path}: {exc}") from exc


__all__ = ["Target", "Sentence", "ImageItem", "EvalSet", "DATASETS", "REFER_DATASETS", "DEFAULT_SPLIT_BY",
           "EVAL_SPLITS", "coco_segmentation_to_mask", "polygons_to_mask", "target_mask", "valid_splits",
           "check_split", "find_image_dir", "load_refer", "load_phrasecut", "load_dataset", "dataset_overrides",
           "load_image_rgb"]
