"""What the node schemas share inside ComfyUI: the category, the sockets of the pack's wire types and the
preset input. The wire types themselves are in ``wire_types.py``, which imports no ComfyUI module so that
offline tests can build them; the sockets need ``comfy_api``, hence this separate file.
"""
from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from refdiff.config import PRESETS, Preset, get_preset

from . import wire_types

CATEGORY = "RefDiff"
PRESET_NAMES = list(PRESETS)  # ["official", "paper"]

# Custom socket types (see docs/NODES.md for what each carries).
Attention = io.Custom(wire_types.ATTENTION)
Parse = io.Custom(wire_types.PARSE)
Proposals = io.Custom(wire_types.PROPOSALS)
Scores = io.Custom(wire_types.SCORES)
SamModel = io.Custom(wire_types.SAM_MODEL)
ClipModel = io.Custom(wire_types.CLIP_MODEL)


def preset_input(tooltip: str = "Which constants of the method to use: 'official' = the authors' released "
                               "code (bugs fixed), 'paper' = the equations as published.") -> Any:
    """The preset combo every node shares (official / paper)."""
    return io.Combo.Input("preset", options=PRESET_NAMES, default="official", tooltip=tooltip)


def preset(name: str) -> Preset:
    """The Preset of a preset combo value."""
    return get_preset(name)


__all__ = ["CATEGORY", "PRESET_NAMES", "Attention", "Parse", "Proposals", "Scores", "SamModel", "ClipModel",
           "preset_input", "preset"]
