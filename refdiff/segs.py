"""Masks to and from SEGS, the detection format of ComfyUI-Impact-Pack (docs/NODES.md, "SEGS").

SEGS = ((H, W), [SEG, ...]) describes ONE image of H x W pixels. A SEG holds ``cropped_mask`` (float32 [h, w], the
mask inside ``crop_region``), ``crop_region`` [x1, y1, x2, y2] (pixels, end exclusive), ``bbox`` (the mask's box,
same convention), ``cropped_image`` (None or the image inside the crop region, [1, h, w, 3]), ``confidence`` and
``label``. This module reads and writes those fields only (any object with these attributes, e.g. Impact's SEG
namedtuple); it imports neither ComfyUI nor Impact Pack. Masks become proposals through ``refdiff.external``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .errors import InputError

SEG_FIELDS = ("cropped_image", "cropped_mask", "confidence", "crop_region", "bbox", "label", "control_net_wrapper")
DEFAULT_LABEL = "refdiff"


@dataclass
class SegsMasks:
    """The masks of a SEGS pasted at full size: ``masks`` float32 [N, H, W] (CPU) in SEG order, each SEG's label
    and confidence, and notes on what was clipped."""

    size: tuple[int, int]  # (H, W) of the SEGS
    masks: torch.Tensor
    labels: list[str]
    confidences: list[float | None]
    notes: list[str] = field(default_factory=list)


@dataclass
class SegParts:
    """The fields of one SEG made from a full-size mask (build the SEG class of the caller's choice from them)."""

    cropped_image: torch.Tensor | None  # float32 [1, h, w, C] or None
    cropped_mask: np.ndarray  # float32 [h, w]
    confidence: float
    crop_region: list[int]  # [x1, y1, x2, y2], end exclusive
    bbox: list[int]  # [x1, y1, x2, y2], end exclusive
    label: str


# ------------------------------------------------------------------------------------------ SEGS -> masks
def _size(segs: Any, name: str) -> tuple[int, int]:
    if not isinstance(segs, (tuple, list)) or len(segs) != 2 or not isinstance(segs[1], (list, tuple)):
        raise InputError(f"{name}: expected SEGS ((H, W), [SEG, ...]) as Impact Pack's detectors make them, got "
                         f"{type(segs).__name__}")
    shape = segs[0]
    try:
        h, w = (int(v) for v in tuple(shape)[:2])
    except (TypeError, ValueError):
        raise InputError(f"{name}: the SEGS size {shape!r} is not (H, W)") from None
    if h < 1 or w < 1:
        raise InputError(f"{name}: the SEGS size is {h} x {w} (H x W); a SEGS describes an image of at least 1 px")
    return h, w


def _region(value: Any, what: str) -> tuple[int, int, int, int]:
    try:
        x1, y1, x2, y2 = (int(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{what}: crop_region {value!r} is not [x1, y1, x2, y2]") from None
    if x2 <= x1 or y2 <= y1:
        raise InputError(f"{what}: crop_region {[x1, y1, x2, y2]} is empty (x2 <= x1 or y2 <= y1; the end is "
                         "exclusive)")
    return x1, y1, x2, y2


def _cropped_mask(value: Any, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().float().numpy()
    if not isinstance(value, np.ndarray):
        raise InputError(f"{what}: cropped_mask is {type(value).__name__}, not a numpy array or tensor [h, w]")
    m = value
    if m.ndim == 3 and m.shape[0] == 1:  # [1, h, w], as some SEGS nodes store it
        m = m[0]
    if m.ndim != 2:
        raise InputError(f"{what}: cropped_mask has shape {tuple(value.shape)}; expected [h, w] (or [1, h, w])")
    m = m.astype(np.float32)
    if np.isnan(m).any():
        raise InputError(f"{what}: cropped_mask contains NaN")
    return m


def segs_to_masks(segs: Any, name: str = "segs") -> SegsMasks:
    """Each SEG's ``cropped_mask`` pasted at its ``crop_region`` into an empty H x W mask: float32 [N, H, W].

    InputError when a cropped mask's size differs from its crop region's, or when mask pixels lie outside the
    image; a crop region reaching past the border with only empty pixels there is clipped (noted)."""
    h, w = _size(segs, name)
    masks, labels, confidences, notes = [], [], [], []
    for i, seg in enumerate(segs[1]):
        what = f"{name}: SEG {i}"
        if not all(hasattr(seg, f) for f in ("cropped_mask", "crop_region")):
            raise InputError(f"{what} is {type(seg).__name__}, not a SEG (no cropped_mask / crop_region)")
        x1, y1, x2, y2 = _region(seg.crop_region, what)
        crop = _cropped_mask(seg.cropped_mask, what)
        if crop.shape != (y2 - y1, x2 - x1):
            raise InputError(f"{what}: cropped_mask is {crop.shape[1]} x {crop.shape[0]} (W x H) but its crop_region "
                             f"{[x1, y1, x2, y2]} is {x2 - x1} x {y2 - y1}; the mask must cover the crop region "
                             "exactly")
        cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
        inside = crop[cy1 - y1:cy2 - y1, cx1 - x1:cx2 - x1] if cx2 > cx1 and cy2 > cy1 else crop[:0, :0]
        if float(np.abs(crop).sum()) != float(np.abs(inside).sum()):
            raise InputError(f"{what}: crop_region {[x1, y1, x2, y2]} reaches outside the {w} x {h} image (W x H) "
                             "and mask pixels lie there; give SEGS made for this image size")
        if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
            notes.append(f"SEG {i}: crop_region {[x1, y1, x2, y2]} clipped to the {w} x {h} image (only empty "
                         "pixels lay outside)")
        full = torch.zeros(h, w, dtype=torch.float32)
        if inside.size:
            full[cy1:cy2, cx1:cx2] = torch.from_numpy(np.ascontiguousarray(inside))
        masks.append(full)
        label = getattr(seg, "label", None)
        labels.append("" if label is None else str(label))
        conf = getattr(seg, "confidence", None)
        confidences.append(None if conf is None else float(np.asarray(conf, dtype=np.float64).reshape(-1)[0]))
    stacked = torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.float32)
    return SegsMasks((h, w), stacked, labels, confidences, notes)


# ------------------------------------------------------------------------------------------ masks -> SEG fields
def mask_bbox(mask: torch.Tensor) -> list[int] | None:
    """[x1, y1, x2, y2] (end exclusive) of a mask's nonzero pixels, None when it is empty."""
    inside = mask != 0
    rows, cols = torch.nonzero(inside.any(dim=1)).flatten(), torch.nonzero(inside.any(dim=0)).flatten()
    if not len(rows):
        return None
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def _span(start: int, end: int, factor: float, limit: int) -> tuple[int, int]:
    """A span ``factor`` times [start, end) about its centre, at most ``limit`` long, moved inside [0, limit)."""
    size = min(limit, max(end - start, int(math.ceil((end - start) * factor - 1e-9))))
    first = (start + end - size) // 2
    first = min(max(first, 0), limit - size)
    return first, first + size


def crop_region(bbox: Sequence[int], width: int, height: int, crop_factor: float = 1.0) -> list[int]:
    """The crop region about ``bbox``: ``crop_factor`` times its width and height about its centre, moved (not
    cut) to lie inside the image when it can and cut to the image's size when it is larger; always holds bbox."""
    if not crop_factor >= 1.0 or not math.isfinite(crop_factor):
        raise InputError(f"crop_factor must be >= 1 (1 = the mask's box, 3 = three times its size), got {crop_factor!r}")
    x1, y1, x2, y2 = (int(v) for v in bbox)
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise InputError(f"bbox {[x1, y1, x2, y2]} is not a box inside the {width} x {height} image")
    cx1, cx2 = _span(x1, x2, crop_factor, width)
    cy1, cy2 = _span(y1, y2, crop_factor, height)
    return [cx1, cy1, cx2, cy2]


def _labels(labels: str | Sequence[str] | None, n: int) -> list[str]:
    if labels is None or isinstance(labels, str):
        return [labels or DEFAULT_LABEL] * n
    labels = list(labels)
    if len(labels) != n:
        raise InputError(f"labels: {len(labels)} labels for {n} masks; give one label or one per mask")
    return [str(v) or DEFAULT_LABEL for v in labels]


def masks_to_seg_parts(masks: torch.Tensor, scores: Sequence[float] | torch.Tensor,
                       labels: str | Sequence[str] | None = None, image: torch.Tensor | None = None,
                       crop_factor: float = 1.0) -> tuple[list[SegParts], list[int]]:
    """SEG fields of full-size masks [N, H, W] (bool or float in [0, 1]) with one score each: the mask's bbox, the
    crop region about it (``crop_factor``), the mask and (when ``image`` [H, W, C] is given) the image inside the
    crop region. Empty masks make no SEG; the second value lists the indices of the masks that made one."""
    if masks.dim() != 3:
        raise InputError(f"masks: expected [N, H, W], got shape {tuple(masks.shape)}")
    n, h, w = masks.shape
    scores = [float(s) for s in (scores.flatten().tolist() if isinstance(scores, torch.Tensor) else scores)]
    if len(scores) != n:
        raise InputError(f"scores: {len(scores)} scores for {n} masks; give one score per mask")
    if image is not None and tuple(image.shape[:2]) != (h, w):
        raise InputError(f"image: {tuple(image.shape[1::-1])} (W x H) but the masks are {w} x {h}; give the image "
                         "the masks were made for")
    names = _labels(labels, n)
    parts, kept = [], []
    values = masks.detach().cpu().float()
    for i in range(n):
        box = mask_bbox(values[i])
        if box is None:
            continue
        x1, y1, x2, y2 = region = crop_region(box, w, h, crop_factor)
        crop = values[i, y1:y2, x1:x2].numpy().astype(np.float32, copy=True)
        cropped_image = None
        if image is not None:
            cropped_image = image[y1:y2, x1:x2].detach().cpu().float().clone()[None]
        parts.append(SegParts(cropped_image, crop, scores[i], region, box, names[i]))
        kept.append(i)
    return parts, kept


__all__ = ["SEG_FIELDS", "DEFAULT_LABEL", "SegsMasks", "SegParts", "segs_to_masks", "mask_bbox", "crop_region",
           "masks_to_seg_parts"]
