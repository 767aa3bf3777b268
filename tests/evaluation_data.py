"""A tiny synthetic benchmark in the exact refer / COCO / PhraseCut file formats, and a planted-answer model.

Ground truths are rectangles whose pixels are known by hand (pycocotools fills a polygon with integer corners
(x0, y0)-(x1, y1) as rows y0..y1-1, columns x0..x1-1), so IoUs of the planted predictions are exact fractions.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from refdiff.errors import InputError

IMAGE_SIZES = {101: (20, 30), 102: (16, 16), 103: (12, 14), 104: (12, 14), 105: (10, 10)}  # id -> (H, W)


def rect(h: int, w: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Bool [h, w] mask of rows r0..r1-1 and columns c0..c1-1."""
    m = np.zeros((h, w), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def gt_masks() -> dict[int, np.ndarray]:
    """The ground-truth masks of the annotations, by annotation id (hand-derived)."""
    return {
        1001: rect(20, 30, 2, 6, 3, 9) | rect(20, 30, 10, 14, 15, 20),  # two parts: 24 + 20 px
        1002: rect(20, 30, 5, 15, 2, 3),  # RLE, column-major: 45 zeros, 10 ones -> column 2, rows 5..14
        1003: rect(16, 16, 4, 12, 4, 12),  # 64 px
        1004: rect(12, 14, 0, 12, 0, 7),  # left half: 84 px
        1006: rect(12, 14, 3, 6, 3, 6),  # compressed RLE: 9 px
        1007: rect(10, 10, 1, 5, 1, 5),
    }


def _compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"counts": rle["counts"].decode("ascii"), "size": list(rle["size"])}


def _annotations() -> list[dict[str, Any]]:
    segs: dict[int, tuple[int, Any]] = {
        1001: (101, [[3, 2, 9, 2, 9, 6, 3, 6], [15, 10, 20, 10, 20, 14, 15, 14]]),
        1002: (101, {"counts": [45, 10, 545], "size": [20, 30]}),
        1003: (102, [[4, 4, 12, 4, 12, 12, 4, 12]]),
        1004: (103, [[0, 0, 7, 0, 7, 12, 0, 12]]),
        1005: (104, [[1, 1, 2, 2]]),  # corrupt: a "polygon" of two points
        1006: (104, _compressed_rle(gt_masks()[1006])),
        1007: (105, [[1, 1, 5, 1, 5, 5, 1, 5]]),
    }
    return [{"id": ann_id, "image_id": img, "segmentation": seg, "category_id": 1,
             "iscrowd": int(isinstance(seg, dict)), "area": 1.0, "bbox": [0, 0, 1, 1]}
            for ann_id, (img, seg) in segs.items()]


# (ref_id, ann_id, image_id, split, [(sent_id, sent)]) per dataset file
REFS: dict[str, list[tuple[int, int, int, str, list[tuple[int, str]]]]] = {
    "refcoco/refs(unc).p": [
        (1, 1001, 101, "val", [(10, "left part"), (11, "whole picture")]),
        (2, 1002, 101, "val", [(12, "thin line"), (13, "exact line")]),
        (3, 1003, 102, "val", [(14, "square")]),
        (4, 1004, 103, "testA", [(15, "left half")]),
        (5, 1005, 104, "testB", [(16, "broken")]),
        (6, 1006, 104, "testB", [(17, "small box")]),
        (7, 9999, 104, "testB", [(18, "ghost")]),  # annotation missing from instances.json
        (8, 1007, 105, "train", [(19, "train thing")]),
    ],
    "refcoco+/refs(unc).p": [
        (21, 1001, 101, "val", [(30, "left part")]),
        (22, 1004, 103, "testA", [(31, "left half")]),
        (23, 1003, 102, "testB", [(32, "square")]),
    ],
    "refcocog/refs(umd).p": [
        (41, 1001, 101, "val", [(50, "left part"), (51, "whole picture")]),
        (42, 1003, 102, "test", [(52, "square")]),
        (43, 1007, 105, "train", [(53, "train thing")]),
    ],
    "refcocog/refs(google).p": [
        (41, 1001, 101, "val", [(50, "left part")]),
        (43, 1007, 105, "train", [(53, "train thing")]),
    ],
}


def planted_prediction(text: str, h: int, w: int) -> np.ndarray:
    """The 'full' variant's prediction for each sentence (other variants predict the whole image)."""
    table = {
        "left part": lambda: rect(20, 30, 2, 6, 3, 9),  # I 24, U 44
        "whole picture": lambda: np.ones((20, 30), bool),  # I 44, U 600
        "thin line": lambda: rect(20, 30, 5, 10, 2, 3),  # I 5, U 10
        "exact line": lambda: rect(20, 30, 5, 15, 2, 3),  # I 10, U 10
        "square": lambda: np.zeros((16, 16), bool),  # I 0, U 64
        "left half": lambda: np.ones((12, 14), bool),  # I 84, U 168
        "small box": lambda: rect(12, 14, 3, 6, 3, 6),  # I 9, U 9
    }
    mask = table[text]() if text in table else np.zeros((h, w), bool)
    assert mask.shape == (h, w), (text, mask.shape, (h, w))
    return mask


def make_refer_data(root: Path, *, missing_images: tuple[int, ...] = ()) -> Path:
    """Write refcoco, refcoco+, refcocog (umd + google) in the refer layout under root; returns root."""
    instances = {"info": {}, "licenses": [], "categories": [{"id": 1, "name": "thing", "supercategory": "x"}],
                 "images": [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": h, "width": w}
                            for i, (h, w) in IMAGE_SIZES.items()],
                 "annotations": _annotations()}
    for rel, refs in REFS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = [{"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 1,
                 "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                 "sent_ids": [s for s, _ in sents],
                 "sentences": [{"sent_id": s, "sent": t, "raw": t.upper() + "!", "tokens": t.split()}
                               for s, t in sents]}
                for ref_id, ann_id, image_id, split, sents in refs]
        path.write_bytes(pickle.dumps(data, protocol=2))
        (path.parent / "instances.json").write_text(json.dumps(instances))
    img_dir = root / "images/mscoco/images/train2014"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in IMAGE_SIZES.items():
        if i not in missing_images:
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(img_dir / f"COCO_train2014_{i:012d}.jpg")
    return root


def make_phrasecut_data(root: Path) -> Path:
    """Write a VGPhraseCut_v0 folder: refer_val.json (two tasks), image_data_split.json, images/."""
    pc = root / "VGPhraseCut_v0"
    (pc / "images").mkdir(parents=True, exist_ok=True)
    tasks = [
        {"task_id": "201__1", "image_id": 201, "phrase": "two boxes",
         "Polygons": [[[[2, 2], [6, 2], [6, 6], [2, 6]]], [[[10, 10], [13, 10], [13, 13], [10, 13]]]],
         "instance_boxes": [[2, 2, 5, 5], [10, 10, 4, 4]], "phrase_structure": {"name": "box"}},
        {"task_id": "201__2", "image_id": 201, "phrase": "one box",
         "Polygons": [[[[10, 10], [13, 10], [13, 13], [10, 13]]]],
         "instance_boxes": [[10, 10, 4, 4]], "phrase_structure": {"name": "box"}},
    ]
    (pc / "refer_val.json").write_text(json.dumps(tasks))
    (pc / "image_data_split.json").write_text(json.dumps([{"image_id": 201, "width": 16, "height": 16,
                                                           "split": "val"}]))
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(pc / "images" / "201.jpg")
    return root


class Interrupted(Exception):
    """Raised by PlantedModel to simulate a run killed after some sentences."""


@dataclass
class FakeResult:
    """The fields of refdiff.pipeline.Result that the evaluation reads."""

    mask: np.ndarray
    proposals: np.ndarray
    scores: dict[str, np.ndarray | None]
    index: int
    top_k: list[int] = field(default_factory=list)
    root_token: str = ""
    direction: tuple[str, ...] = ()
    attention: np.ndarray | None = None
    variant: str = "full"
    preset: str = "official"


class PlantedModel:
    """Stands in for RefDiff: the 'full' variant returns planted_prediction, the others the whole image."""

    def __init__(self, fail_after: int | None = None, raise_for: tuple[str, ...] = ()) -> None:
        self.fail_after = fail_after
        self.raise_for = raise_for
        self.calls: list[tuple[str, tuple[str, ...], int]] = []
        self.cleared = 0

    def segment_variants(self, image: np.ndarray, text: str, variants: Any, seed: int = 0) -> dict[str, FakeResult]:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise Interrupted(f"stopped after {self.fail_after} sentences")
        self.calls.append((text, tuple(variants), seed))
        if text in self.raise_for:
            raise InputError(f"no root word in {text!r}")
        h, w = image.shape[:2]
        out = {}
        for v in variants:
            mask = planted_prediction(text, h, w) if v == "full" else np.ones((h, w), bool)
            scores = {"generative": np.array([0.25, 0.75]), "discriminative": None, "fused": np.array([0.5, 0.125])}
            out[v] = FakeResult(mask, np.stack([np.zeros_like(mask), mask]), scores, 1, [1, 0], variant=v)
        return out

    def clear_cache(self) -> None:
        self.cleared += 1
