"""Mask proposals (docs/METHOD.md section 6): the weight-free threshold filter (Eq. 8), SAM automatic masks, and the
``official`` post-filter. Proposals are bool tensors [N, H, W] at the image's own resolution.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from .config import DEFAULT_THRESHOLDS
from .errors import DependencyError, InputError

if TYPE_CHECKING:
    from segment_anything import SamAutomaticMaskGenerator
    from segment_anything.modeling import Sam


def _check_masks(masks: torch.Tensor, name: str = "masks") -> None:
    if not isinstance(masks, torch.Tensor) or masks.dim() != 3 or masks.dtype != torch.bool:
        desc = f"{masks.dtype} {tuple(masks.shape)}" if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise InputError(f"{name}: expected a bool tensor [N, H, W], got {desc}")


def dedupe_masks(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop exact duplicate masks, keeping the first of each; returns (masks, their indices), order kept."""
    _check_masks(masks)
    n = masks.shape[0]
    if n < 2:
        return masks, torch.arange(n)
    _, inverse = torch.unique(masks.reshape(n, -1).cpu(), dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), n, dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(n), reduce="amin")
    keep = first.sort().values
    return masks[keep.to(masks.device)], keep


def threshold_proposals(c: torch.Tensor, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> torch.Tensor:
    """Eq. 8: one mask {c >= mu} per threshold mu, in the order of ``thresholds``; empty masks and exact
    duplicates (of an earlier mu) are dropped, so N may be 0 (a [0, H, W] tensor)."""
    if not isinstance(c, torch.Tensor) or c.dim() != 2:
        raise InputError(f"generative map: expected a 2-D tensor [H, W], got "
                         f"{tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}")
    if torch.isnan(c).any():
        raise InputError("generative map: contains NaN; recompute it from a finite attention map")
    mu = torch.as_tensor([float(t) for t in thresholds], dtype=c.dtype, device=c.device)
    masks = c[None] >= mu[:, None, None]
    masks = masks[masks.flatten(1).any(dim=1)]
    return dedupe_masks(masks)[0]


def make_mask_generator(sam: "Sam", points_per_side: int = 32, points_per_batch: int = 64,
                        pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                        box_nms_thresh: float = 0.7, crop_n_layers: int = 0, min_mask_region_area: int = 0,
                        chunk_mb: float = 512, **extra: Any) -> "SamAutomaticMaskGenerator":
    """A SamAutomaticMaskGenerator with SAM's AMG defaults (a SAM2AutomaticMaskGenerator for a SAM 2 model) (docs/METHOD.md section 6), returning binary masks.

    It is ``refdiff.amg.MemoryBoundedMaskGenerator``: the stock generator's records, with at most ``chunk_mb``
    megabytes of candidate masks upsampled at once. ``extra`` goes to the generator unchanged (e.g.
    crop_overlap_ratio); ``config.sam_generator_kwargs`` gives the named arguments of a preset.
    """
    from .sam2_models import is_sam2_model, make_sam2_mask_generator
    if is_sam2_model(sam):  # SAM 2 / 2.1: sam2's generator with the same settings (refdiff.sam2_models)
        return make_sam2_mask_generator(
            sam, points_per_side=points_per_side, points_per_batch=points_per_batch, pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh, box_nms_thresh=box_nms_thresh,
            crop_n_layers=crop_n_layers, min_mask_region_area=min_mask_region_area, chunk_mb=chunk_mb, **extra)
    from .amg import MemoryBoundedMaskGenerator
    mode = extra.pop("output_mode", "binary_mask")
    if mode != "binary_mask":
        raise InputError(f"output_mode must be 'binary_mask' (proposals are dense masks), got {mode!r}")
    if min_mask_region_area > 0:
        try:
            import cv2  # noqa: F401
        except ImportError as exc:
            raise DependencyError("min_mask_region_area > 0 needs OpenCV: pip install opencv-python-headless, "
                                  "or set sam_min_mask_region_area to 0") from exc
    return MemoryBoundedMaskGenerator(
        sam, chunk_mb=chunk_mb, points_per_side=points_per_side, points_per_batch=points_per_batch, pred_iou_thresh=pred_iou_thresh,
        stability_score_thresh=stability_score_thresh, box_nms_thresh=box_nms_thresh,
        crop_n_layers=crop_n_layers, min_mask_region_area=min_mask_region_area, output_mode="binary_mask",
        **extra)


def sam_proposals(generator: "SamAutomaticMaskGenerator", image: np.ndarray) -> torch.Tensor:
    """SAM automatic masks of an RGB uint8 image [H, W, 3] at its own resolution: bool [N, H, W] (N may be
    0), in the generator's order."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InputError(f"image: SAM needs an RGB uint8 array [H, W, 3] (refdiff.image.load_image), got {desc}")
    if getattr(generator, "output_mode", "binary_mask") != "binary_mask":
        raise InputError("mask generator: output_mode must be 'binary_mask'; build it with make_mask_generator")
    height, width = image.shape[:2]
    records = generator.generate(np.ascontiguousarray(image))
    if not records:
        return torch.zeros(0, height, width, dtype=torch.bool)
    return torch.from_numpy(np.stack([np.asarray(r["segmentation"], dtype=bool) for r in records]))


def filter_proposals(masks: torch.Tensor, keep_largest: int | None = 10,
                     min_area: float = 10000) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``official`` post-filter: keep the ``keep_largest`` largest masks (None: all), then drop those of
    area <= ``min_area`` px (0 drops only empty masks). Returns (kept masks, their indices into ``masks``), in
    input order; the result may be empty. Area ties at the cut keep the lower index. ``sam_post_filter``
    applies it at an image's size."""
    _check_masks(masks)
    if keep_largest is not None and keep_largest < 0:
        raise InputError(f"keep_largest must be >= 0 or None, got {keep_largest}")
    if min_area < 0:
        raise InputError(f"min_area must be >= 0, got {min_area}")
    areas = masks.flatten(1).sum(dim=1).cpu()
    order = torch.sort(areas, descending=True, stable=True).indices
    if keep_largest is not None:
        order = order[:keep_largest]
    keep = order[areas[order] > min_area].sort().values
    return masks[keep.to(masks.device)], keep


def effective_min_area(min_area: float, height: int, width: int, reference: int | None = 640 * 480) -> float:
    """The area threshold of the post-filter for a height x width image: ``min_area`` x (height x width) /
    ``reference``, so it is the same fraction of the picture at any size; ``reference`` None keeps ``min_area``
    in absolute pixels (the released code)."""
    if min_area < 0:
        raise InputError(f"min_area must be >= 0, got {min_area}")
    if height < 1 or width < 1:
        raise InputError(f"image size must be positive, got {width} x {height}")
    if reference is None:
        return float(min_area)
    if isinstance(reference, bool) or not isinstance(reference, (int, float)) or reference <= 0:
        raise InputError(f"sam_min_area_reference must be a positive image area in pixels (e.g. {640 * 480} for "
                         f"640 x 480) or None for absolute pixels, got {reference!r}")
    return float(min_area) * (height * width) / float(reference)


def _px(value: float) -> str:
    """An area for a message: whole pixels as integers, otherwise one decimal."""
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def filtered_out_message(n_masks: int, largest_area: int, height: int, width: int, keep_largest: int | None,
                         min_area: float, reference: int | None, threshold: float, advice: str | None = None) -> str:
    """What to tell the user when the post-filter removed all ``n_masks`` proposals of a width x height image:
    what was removed, then how to keep them (``advice``, e.g. in a node's own inputs; default: the Preset fields)."""
    which = f"all {n_masks} masks" if n_masks > 1 else "the only mask"
    head = f"the SAM post-filter removed {which} of this {width} x {height} image, so the mask is empty"
    if keep_largest == 0:
        account, fix = f"{head}: sam_keep_largest=0 keeps none", "raise sam_keep_largest (None keeps all)"
        return f"{account}; {fix if advice is None else advice}"
    if reference is None:
        rule = f"sam_min_area={_px(min_area)} in absolute pixels, as sam_min_area_reference=None"
        scaled = effective_min_area(min_area, height, width, 640 * 480)
        fix = (f"set sam_min_area_reference={640 * 480} to scale the threshold with the image area "
               f"({_px(scaled)} px here), or lower sam_min_area (0 keeps every mask)")
    else:
        rule = (f"sam_min_area={_px(min_area)} at the reference area sam_min_area_reference={reference} px, "
                f"scaled to this image's {height * width} px")
        fix = "lower sam_min_area (0 keeps every mask), or set sam_min_area_reference=None for absolute pixels"
    return (f"{head}: the largest has {largest_area} px, not above the area threshold of {_px(threshold)} px "
            f"({rule}); {fix if advice is None else advice}")


def sam_post_filter(masks: torch.Tensor, keep_largest: int | None = 10, min_area: float = 10000,
                    min_area_reference: int | None = 640 * 480, advice: str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """The ``official`` post-filter at the masks' image size (threshold ``effective_min_area``).

    Returns (kept masks, their indices, a message when it removed every mask, else None): an empty result is
    never silent. ``advice`` replaces the message's closing fix (default: which Preset fields to change)."""
    _check_masks(masks)
    n, height, width = masks.shape
    threshold = effective_min_area(min_area, height, width, min_area_reference)
    kept, keep = filter_proposals(masks, keep_largest=keep_largest, min_area=threshold)
    if n == 0 or kept.shape[0]:
        return kept, keep, None
    largest = int(masks.flatten(1).sum(dim=1).max())
    return kept, keep, filtered_out_message(n, largest, height, width, keep_largest, min_area,
                                            min_area_reference, threshold, advice)


__all__ = ["threshold_proposals", "dedupe_masks", "make_mask_generator", "sam_proposals", "filter_proposals",
           "effective_min_area", "sam_post_filter", "filtered_out_message"]
