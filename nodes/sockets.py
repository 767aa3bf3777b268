"""What the node schemas share inside ComfyUI: the category, the sockets of the pack's wire types and the
preset input. The wire types themselves are in ``wire_types.py``, which imports no ComfyUI module so that
offline tests can build them; the sockets need ``comfy_api``, hence this separate file.
"""
from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from refdiff.config import PRESETS, SPATIAL_TERMS, Preset, get_preset

from . import wire_types
from .proposal_filter import AREA_FILTER_OPTIONS, AREA_FILTER_TOOLTIP, POST_FILTER_OPTIONS

CATEGORY = "RefDiff"
PRESET_NAMES = list(PRESETS)  # ["official", "paper", "plus"]
# What 'plus' is (refdiff.config.PLUS), said on every preset input.
PLUS_TOOLTIP = (f"'plus' = 'official' + every spatial term ({', '.join(SPATIAL_TERMS)}) + the 'paper' root rule "
                "(a side word before its noun hands over to the noun: 'bottom left donut' -> donut) + proposal_mode "
                "'prompted' (SAM prompted at the peaks of c instead of its automatic grid), or 'concept' (SAM 3's "
                "instances of the target noun) when a SAM 3 is connected to RefDiff Segment, beyond the paper. 'fast' = "
                "'official' at S = 512, without classifier-free guidance, one UNet step and proposal_mode 'prompted' "
                "(results differ from 'official'; fastest with a SAM 2.1 hiera tiny checkpoint).")

# Custom socket types (see docs/NODES.md for what each carries).
Attention = io.Custom(wire_types.ATTENTION)
Parse = io.Custom(wire_types.PARSE)
Proposals = io.Custom(wire_types.PROPOSALS)
Scores = io.Custom(wire_types.SCORES)
SamModel = io.Custom(wire_types.SAM_MODEL)
ClipModel = io.Custom(wire_types.CLIP_MODEL)
Sam3Model = io.Custom(wire_types.SAM3_MODEL)
BoundingBoxes = io.Custom(wire_types.BOUNDING_BOX)  # core's type; 0.3.64 has no io.BoundingBox


def preset_input(tooltip: str = "Which constants of the method to use: 'official' = the authors' released "
                               "code (bugs fixed), 'paper' = the equations as published.") -> Any:
    """The preset combo every node shares (official / paper / plus); its tooltip ends with what 'plus' is."""
    return io.Combo.Input("preset", options=PRESET_NAMES, default="official", tooltip=f"{tooltip} {PLUS_TOOLTIP}")


def post_filter_inputs(default: str = "preset") -> list:
    """The post-filter inputs the proposal nodes end with (read by proposal_filter.sam_filter_settings);
    ``default`` is the post_filter combo's default."""
    return [
        io.Combo.Input("post_filter", options=POST_FILTER_OPTIONS, default=default,
                       tooltip="'preset': the preset's filter; 'none': keep every mask; 'custom': the two values "
                               "below."),
        io.Int.Input("keep_largest", default=10, min=0, max=1000,
                     tooltip="custom filter: keep only the N largest masks (0 = all)."),
        io.Int.Input("min_area", default=10000, min=0, max=100000000,
                     tooltip="custom filter: drop masks of at most this many pixels (at a 640 x 480 image when "
                             "area_filter is relative: see area_filter)."),
        io.Combo.Input("area_filter", options=AREA_FILTER_OPTIONS, default="preset", optional=True,
                       tooltip=AREA_FILTER_TOOLTIP),
    ]


def preset(name: str) -> Preset:
    """The Preset of a preset combo value."""
    return get_preset(name)


__all__ = ["CATEGORY", "PRESET_NAMES", "PLUS_TOOLTIP", "Attention", "Parse", "Proposals", "Scores", "SamModel",
           "ClipModel", "Sam3Model", "BoundingBoxes", "preset_input", "preset", "post_filter_inputs"]
