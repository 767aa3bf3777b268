"""The SAM post-filter as the nodes set it: the preset's, none or custom values, an area threshold relative to the
image area or in absolute pixels, and what an image is told when it is left without a proposal. No ComfyUI import
(tested offline).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from refdiff.config import Preset
from refdiff.errors import InputError
from refdiff.prompted import Prompts, no_prompt_message
from refdiff.proposals import effective_min_area, sam_post_filter

POST_FILTER_OPTIONS = ["preset", "none", "custom"]
RELATIVE = "relative to image area"
ABSOLUTE = "absolute pixels (released code)"
AREA_FILTER_OPTIONS = ["preset", RELATIVE, ABSOLUTE]
# The image area at which min_area holds as given under RELATIVE (the Preset field's default, 640 x 480).
DEFAULT_REFERENCE = Preset(name="defaults").sam_min_area_reference or 640 * 480
AREA_FILTER_TOOLTIP = (f"How min_area is read. '{RELATIVE}': min_area holds for a {DEFAULT_REFERENCE} px image "
                       f"(640 x 480) and scales with the image's area, so the same share of the picture is dropped "
                       f"at any size; '{ABSOLUTE}': min_area in pixels whatever the image size, as the authors' code "
                       f"(a small image can lose every mask); 'preset': the preset's choice (relative).")


@dataclass(frozen=True)
class FilterSettings:
    """The post-filter of one node run: keep the ``keep_largest`` largest masks (None: all) of area above
    ``min_area`` px at ``reference`` px of image area (None: ``min_area`` in absolute pixels)."""

    keep_largest: int | None
    min_area: float
    reference: int | None

    def threshold(self, height: int, width: int) -> float:
        """The area threshold in pixels for a height x width image."""
        return effective_min_area(self.min_area, height, width, self.reference)

    def describe(self) -> str:
        """One line for the nodes' reports."""
        keep = "every mask" if self.keep_largest is None else f"the {self.keep_largest} largest masks"
        if not self.min_area:
            return f"post-filter: {keep}, no area threshold"
        scale = ("absolute pixels" if self.reference is None
                 else f"at a {self.reference} px image, scaled with the image area")
        return f"post-filter: {keep} of area > {self.min_area:g} px ({scale})"


def area_reference(area_filter: str, preset: Preset) -> int | None:
    """The ``sam_min_area_reference`` an ``area_filter`` combo value stands for."""
    if area_filter == "preset":
        return preset.sam_min_area_reference
    if area_filter == RELATIVE:
        return preset.sam_min_area_reference or DEFAULT_REFERENCE
    if area_filter == ABSOLUTE:
        return None
    raise InputError(f"area_filter must be one of {AREA_FILTER_OPTIONS}, got {area_filter!r}")


def sam_filter_settings(post_filter: str, preset: Preset, keep_largest: int, min_area: int,
                        area_filter: str = "preset") -> FilterSettings:
    """RefDiffSAMProposals' filter: the preset's, none, or the custom values (keep_largest 0 = all)."""
    reference = area_reference(area_filter, preset)
    if post_filter == "preset":
        return FilterSettings(preset.sam_keep_largest, float(preset.sam_min_area), reference)
    if post_filter == "none":
        return FilterSettings(None, 0.0, reference)
    if post_filter == "custom":
        return FilterSettings(int(keep_largest) or None, float(min_area), reference)
    raise InputError(f"post_filter must be one of {POST_FILTER_OPTIONS}, got {post_filter!r}")


def segment_filter_settings(preset: Preset, keep_largest: int = -1, min_area: int = -1,
                            area_filter: str = "preset") -> FilterSettings:
    """RefDiffSegment's filter: each value -1 = the preset's; keep_largest 0 = all, min_area 0 = no threshold."""
    keep = preset.sam_keep_largest if int(keep_largest) < 0 else (int(keep_largest) or None)
    area = float(preset.sam_min_area) if int(min_area) < 0 else float(min_area)
    return FilterSettings(keep, area, area_reference(area_filter, preset))


def no_masks_message(height: int, width: int) -> str:
    """What an image is told when SAM itself found no mask (before any post-filter)."""
    return (f"SAM found no mask in this {width} x {height} image, so the mask is empty: lower pred_iou_thresh or "
            "stability_score_thresh, or raise points_per_side")


def node_fix(settings: FilterSettings, height: int, width: int, lower_min_area: str) -> str:
    """How to keep the masks with the node's own inputs; ``lower_min_area`` says how that node lowers min_area."""
    if settings.reference is None:
        scaled = effective_min_area(settings.min_area, height, width, DEFAULT_REFERENCE)
        return (f"on this node: set area_filter to '{RELATIVE}' (a threshold of {scaled:.0f} px here), or "
                f"{lower_min_area} (0 keeps every mask)")
    return f"on this node: {lower_min_area} (0 keeps every mask)"


def filter_image(masks: torch.Tensor, settings: FilterSettings,
                 lower_min_area: str = "lower min_area") -> tuple[torch.Tensor, str | None]:
    """The post-filter on one image's SAM masks [N, H, W]; with the note to show when none is left (None
    otherwise): SAM found none, or the filter removed them all (what was removed and how to keep them)."""
    n, height, width = masks.shape
    if n == 0:
        return masks, no_masks_message(height, width)
    kept, _, note = sam_post_filter(masks, keep_largest=settings.keep_largest, min_area=settings.min_area,
                                    min_area_reference=settings.reference,
                                    advice=node_fix(settings, height, width, lower_min_area))
    return kept, note


def filter_prompted(masks: torch.Tensor, prompts: Prompts, settings: FilterSettings, threshold: float,
                    min_score: float, lower_min_area: str = "lower min_area") -> tuple[torch.Tensor, str | None]:
    """The post-filter on one image's prompted SAM masks (as ``filter_image``); an image without a prompt or
    without a usable mask gets the reason and the fix with the prompted node's inputs."""
    if masks.shape[0] == 0:
        fix = (f"on this node: lower min_score (now {min_score:g}), or use RefDiff SAM Proposals (automatic)"
               if len(prompts) else
               f"on this node: lower threshold (now {threshold:g}), or use RefDiff SAM Proposals (automatic)")
        return masks, no_prompt_message(prompts, threshold, min_score, advice=fix)
    return filter_image(masks, settings, lower_min_area)


__all__ = ["filter_prompted", "POST_FILTER_OPTIONS", "RELATIVE", "ABSOLUTE", "AREA_FILTER_OPTIONS", "DEFAULT_REFERENCE",
           "AREA_FILTER_TOOLTIP", "FilterSettings", "area_reference", "sam_filter_settings",
           "segment_filter_settings", "no_masks_message", "node_fix", "filter_image"]
