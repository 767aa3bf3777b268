"""Masks from any segmenter node (a ComfyUI MASK batch from SAM 2, SAM 3, GroundingDINO + SAM, a drawing) as the
REFDIFF_PROPOSALS the scoring and fusion nodes take, through ``refdiff.external``. No ComfyUI import (tested
offline).

Which image a mask belongs to (``counts``):
- one image: every mask of the batch is a proposal of that image (``counts`` may stay empty);
- B images: ``counts`` says how many masks each image has, in batch order ("3, 5": the first 3 masks are image
  0's, the next 5 image 1's). Empty ``counts`` with B > 1 images is refused, even when the masks divide evenly
  (N = B * k could be k per image or one mask per image repeated): the message names the counts to write.
"""
from __future__ import annotations

from typing import Any

import torch

from refdiff.errors import InputError
from refdiff.external import external_proposals, split_counts

from refdiff.proposals import sam_post_filter

from .proposal_filter import FilterSettings, node_fix
from .wire_types import ProposalBatch

SOURCE = "external"  # ProposalBatch.source of these proposals
LOWER_MIN_AREA = "set post_filter to 'none', or lower min_area"


def counts_problem(counts: str | None, name: str = "counts") -> str | None:
    """What is wrong with a counts text that can be seen before the run (not whole numbers, a negative
    count); None when it reads."""
    if counts is None or not str(counts).strip():
        return None
    try:
        values = [int(v) for v in str(counts).replace(";", ",").replace(" ", ",").split(",") if v.strip()]
    except ValueError:
        return f"{name}: {counts!r} is not a list of whole numbers; write the masks of each image, e.g. '3, 5'"
    if any(v < 0 for v in values):
        return f"{name}: counts must be >= 0, got {values}"
    return None


def box_counts(boxes: Any, images: int, masks: int, name: str = "boxes") -> list[int]:
    """The masks of each image given by ComfyUI core's SAM3_Detect boxes output (its second output: per image a
    list of {x, y, width, height, score} dicts, one per instance; with individual_masks on, its MASK output is every
    image's instance masks concatenated in that order, so image b has len(boxes[b]) of them). One image's flat list
    of dicts (or one dict) is taken as that image's. InputError naming ``name`` and the fix otherwise."""
    def is_box(b: Any) -> bool:
        return isinstance(b, dict) and all(k in b for k in ("x", "y", "width", "height"))

    if is_box(boxes):
        boxes = [[boxes]]
    elif isinstance(boxes, (list, tuple)) and boxes and all(is_box(b) for b in boxes):
        boxes = [list(boxes)]
    elif isinstance(boxes, (list, tuple)) and not boxes:
        boxes = [[] for _ in range(images)] if images == 1 else []
    if not isinstance(boxes, (list, tuple)) or not all(isinstance(b, (list, tuple)) and all(is_box(d) for d in b)
                                                       for b in boxes):
        raise InputError(f"{name}: expected SAM3_Detect's boxes (per image a list of {{x, y, width, height, score}}), "
                         f"got {type(boxes).__name__}; connect SAM3_Detect's second output")
    if len(boxes) != images:
        raise InputError(f"{name}: boxes of {len(boxes)} image(s) for an image batch of {images}; connect the image "
                         "batch that went into the same SAM3_Detect")
    counts = [len(b) for b in boxes]
    if sum(counts) != masks:
        raise InputError(f"{name}: the boxes give {counts} instance(s) per image ({sum(counts)} in all), but the masks "
                         f"batch holds {masks}; connect masks and boxes of the same SAM3_Detect, with individual_masks "
                         "on (off, it gives one merged mask per image)")
    return counts


def masks_per_image(counts: str | None, total: int, images: int, name: str = "counts") -> list[int]:
    """How many of the ``total`` masks belong to each of ``images`` images (the module's convention);
    InputError naming ``name`` and the fix otherwise."""
    if images > 1 and (counts is None or not str(counts).strip()):
        even = (f"; if they are {total // images} per image in batch order, write counts "
                f"'{', '.join([str(total // images)] * images)}'") if total % images == 0 and total else ""
        raise InputError(f"{name}: the image batch holds {images} images and the masks batch {total} masks, but "
                         f"counts is empty, so which image each mask belongs to is unknown{even}; give the number "
                         f"of masks of each image in batch order (summing to {total}), or one image")
    return split_counts(counts, total, images, name)


def mask_proposal_batch(masks: Any, image: torch.Tensor, counts: str | None = "", resize: str = "error",
                        settings: FilterSettings | None = None, name: str = "masks", counts_name: str = "counts",
                        boxes: Any = None) -> tuple[ProposalBatch, list[str]]:
    """REFDIFF_PROPOSALS of a MASK batch [N, H, W] (or one mask [H, W]) for an IMAGE batch [B, H, W, C]: the
    masks split between the images by ``counts``, each image's normalised by ``refdiff.external`` (empty masks
    left out, resized when ``resize`` is "nearest"), then the post-filter ``settings`` (None: none). Returns
    the batch (``notes``: why an image has no proposal) and one info line per image. ``name`` and
    ``counts_name`` are the node inputs the messages name. ``boxes`` (core SAM3_Detect's second output) gives the
    counts instead (``box_counts``); with it, ``counts`` must stay empty."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        raise InputError(f"image: expected an IMAGE [B, H, W, C], got {getattr(image, 'shape', type(image))}")
    batch, height, width = int(image.shape[0]), int(image.shape[1]), int(image.shape[2])
    if isinstance(masks, torch.Tensor) and masks.dim() == 2:
        masks = masks[None]
    if not isinstance(masks, torch.Tensor) or masks.dim() != 3:
        raise InputError(f"{name}: expected a MASK batch [N, H, W], got {getattr(masks, 'shape', type(masks))}")
    if boxes is not None:
        if counts is not None and str(counts).strip():
            raise InputError(f"{counts_name} / boxes: both say how many masks each image has; empty {counts_name} "
                             "(the boxes give the counts) or disconnect boxes")
        per_image = box_counts(boxes, batch, int(masks.shape[0]))
    else:
        per_image = masks_per_image(counts, int(masks.shape[0]), batch, counts_name)
    out, notes, info = [], {}, []
    first = 0
    for i, n in enumerate(per_image):
        label = f"{name} of image {i}" if batch > 1 else name
        given = external_proposals(masks[first:first + n], height, width, resize=resize, name=label)
        kept, said, note = given.masks, list(given.notes), given.empty_reason
        which = [first + k for k in given.kept]  # the batch index of each proposal
        if settings is not None and kept.shape[0]:
            before = kept.shape[0]
            kept, keep, note = sam_post_filter(kept, keep_largest=settings.keep_largest, min_area=settings.min_area,
                                               min_area_reference=settings.reference,
                                               advice=node_fix(settings, height, width, LOWER_MIN_AREA))
            which = [which[int(j)] for j in keep]
            said.append(note or f"{settings.describe()}: kept {kept.shape[0]} of {before}")
        if note:
            notes[i] = note
        out.append(kept)  # CPU: refdiff.external gives CPU masks, as REFDIFF_PROPOSALS hold
        first += n
        info.append(f"image {i}: {kept.shape[0]} proposals of {n} mask(s), the batch's masks {which}"
                    + "".join(f"; {s}" for s in said))
    return ProposalBatch(out, source=SOURCE, notes=notes), info


def proposals_to_masks(proposals: ProposalBatch) -> tuple[torch.Tensor, str]:
    """Every image's proposals as one MASK batch float32 [N, H, W] on the CPU (image 0's first) and the counts
    text ("3, 5") that splits it back (``masks_per_image``)."""
    if not len(proposals):
        raise InputError("proposals: no image in the batch")
    sizes = {tuple(m.shape[1:]) for m in proposals.masks}
    if len(sizes) > 1:
        raise InputError(f"proposals: the images have different sizes {sorted(sizes)}, which one MASK batch "
                         "cannot hold; split the image batch")
    masks = torch.cat(list(proposals.masks)).float()  # REFDIFF_PROPOSALS hold CPU masks
    return masks, ", ".join(str(int(m.shape[0])) for m in proposals.masks)


__all__ = ["SOURCE", "counts_problem", "box_counts", "masks_per_image", "mask_proposal_batch", "proposals_to_masks"]
