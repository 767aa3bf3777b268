"""SEGS (ComfyUI-Impact-Pack's detections of one image) in and out of the pack's wires, through ``refdiff.segs``
and ``refdiff.external``. No ComfyUI import (tested offline).

A SEGS describes a single image, so both directions take an IMAGE of one image and refuse a batch with a message
saying how to split it. The SEG class is Impact Pack's own when Impact Pack is loaded (``impact.core.SEG``), else a
namedtuple with the same fields and defaults, which Impact's nodes read alike.
"""
from __future__ import annotations

import sys
from collections import namedtuple
from typing import Any

import torch

from refdiff.errors import InputError
from refdiff.external import external_proposals
from refdiff.segs import DEFAULT_LABEL, SEG_FIELDS, masks_to_seg_parts, segs_to_masks

from .wire_types import ProposalBatch

SOURCE = "segs"  # ProposalBatch.source of these proposals
SEGS_TYPE = "SEGS"  # the socket type name Impact Pack gives SEGS
FallbackSEG = namedtuple("SEG", SEG_FIELDS, defaults=[None])
ONE_IMAGE = ("a SEGS describes one image (Impact Pack), but the image batch holds {n} images; give one image "
             "(e.g. through ImageFromBatch, batch_index and length 1), one node per image")


def seg_class() -> type:
    """Impact Pack's SEG namedtuple when Impact Pack is loaded (and has the seven known fields), else FallbackSEG."""
    core = sys.modules.get("impact.core")
    cls = getattr(core, "SEG", None)
    if isinstance(cls, type) and tuple(getattr(cls, "_fields", ())) == SEG_FIELDS:
        return cls
    return FallbackSEG


def one_image(image: Any, name: str = "image") -> torch.Tensor:
    """The [H, W, C] frame of an IMAGE holding a single image; InputError naming ``name`` otherwise."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        raise InputError(f"{name}: expected an IMAGE [B, H, W, C], got {getattr(image, 'shape', type(image))}")
    if image.shape[0] != 1:
        raise InputError(f"{name}: " + ONE_IMAGE.format(n=int(image.shape[0])))
    return image[0]


def segs_proposal_batch(segs: Any, image: torch.Tensor, resize: str = "error", threshold: float = 0.5,
                        name: str = "segs") -> tuple[ProposalBatch, list[str]]:
    """REFDIFF_PROPOSALS of a SEGS and the one image it describes: every SEG's mask pasted at its crop region
    (``refdiff.segs``), then normalised as any external masks (``refdiff.external``: inside where >= threshold,
    empty masks left out, resized when ``resize`` is "nearest"). Returns the batch and its info lines."""
    frame = one_image(image)
    pasted = segs_to_masks(segs, name)
    given = external_proposals(pasted.masks, int(frame.shape[0]), int(frame.shape[1]), resize=resize,
                               threshold=threshold, name=name)
    notes = {0: given.empty_reason} if given.empty_reason else {}
    labels = [pasted.labels[k] or "?" for k in given.kept]
    info = [f"image 0: {given.masks.shape[0]} proposals of {len(pasted.labels)} SEG(s), the SEGS' {given.kept}"
            + (f" (labels {labels})" if labels else "")]
    info += [f"{name}: {n}" for n in pasted.notes + given.notes]
    return ProposalBatch([given.masks], source=SOURCE, notes=notes), info  # CPU masks (refdiff.external)


def selection_segs(masks: torch.Tensor, fused: torch.Tensor, chosen: int, order: list[int], image: torch.Tensor,
                   label: str = "", crop_factor: float = 3.0) -> tuple[Any, Any, str]:
    """The selected proposal and the ranked top-k (``order``, best first) of one image as two SEGS, each SEG with
    its box, the crop region about it (``crop_factor``), its mask, the image crop, the fused score as confidence
    and ``label`` (default "refdiff"). An empty mask makes no SEG; the info line says what was left out."""
    frame = one_image(image)
    n, h, w = masks.shape
    if tuple(frame.shape[:2]) != (h, w):
        raise InputError(f"image: {w} x {h} proposals (W x H) but the image is {frame.shape[1]} x {frame.shape[0]}; "
                         "give the image the proposals were made from")
    seg = seg_class()
    name = label.strip() or DEFAULT_LABEL

    def build(indices: list[int]) -> tuple[Any, list[int]]:
        parts, kept = masks_to_seg_parts(masks[indices], fused[indices] if indices else [], name, frame,
                                         crop_factor)
        items = [seg(p.cropped_image, p.cropped_mask, p.confidence, p.crop_region, p.bbox, p.label, None)
                 for p in parts]
        return ((h, w), items), [indices[k] for k in kept]

    selected, sel_kept = build([chosen] if chosen >= 0 else [])
    top, top_kept = build(list(order))
    said = f"selected proposal {sel_kept[0]}" if sel_kept else "no proposal selected (empty SEGS)"
    left = [j for j in order if j not in set(top_kept)]
    info = (f"image 0: {said}; top-k SEGS of proposals {top_kept}"
            + (f" (empty proposals {left} make no SEG)" if left else "") + f"; label {name!r}, crop_factor "
            f"{crop_factor:g}")
    return selected, top, info


__all__ = ["SOURCE", "SEGS_TYPE", "FallbackSEG", "seg_class", "one_image", "segs_proposal_batch", "selection_segs"]
