"""What the all-in-one node checks before the heavy work: which models its variant needs, the capture factor it
asks of the MODEL, and the types of its linked inputs. No ComfyUI import (tested offline).
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from refdiff.config import PRESETS, Preset, get_preset, get_variant
from refdiff.errors import InputError



VARIANT_CHOICES = ["full", "G", "GS", "DS", "sam-clip", "prompted"]
# RefDiffSegment's proposal_mode input: the preset's, or SAM's automatic generator / prompts at c's peaks / SAM 3's
# instances of the target noun
PROPOSAL_MODE_CHOICES = ["preset", "automatic", "prompted", "concept"]
# The optional model inputs of RefDiffSegment: (input, what it is, the node that gives it).
SAM_INPUT = ("sam", "a SAM model", "RefDiff SAM Loader")
CLIP_INPUT = ("clip_scorer", "a CLIP scorer", "RefDiff CLIP Loader")
SAM3_INPUT = ("sam3", "a SAM 3 model", "RefDiff SAM 3 Loader")
# RefDiffSegment's optional MASK batch: masks from another segmenter that replace SAM's proposals.
PROPOSALS_INPUT = "proposals"


def variant_inputs(variant: str, external: bool = False, concept: bool = False) -> list[tuple[str, str, str]]:
    """The optional model inputs a variant needs: SAM for SAM proposals (not when ``external`` masks are wired
    to 'proposals' in their place), SAM 3 instead under ``concept`` proposals, the CLIP scorer for s_D."""
    v = get_variant(variant)
    by_sam3 = concept and v.proposals == "sam" and not external
    sam = v.proposals == "prompted" or (v.proposals == "sam" and not external and not by_sam3)
    return [SAM_INPUT] * sam + [SAM3_INPUT] * by_sam3 + [CLIP_INPUT] * bool(v.discriminative)


def concept_mode(proposal_mode: str = "preset", preset: str = "official", connected: Collection[str] = ()) -> bool:
    """Whether RefDiffSegment's SAM variants take SAM 3's instances: proposal_mode 'concept', or 'preset' under a
    preset that uses SAM 3 whenever one is connected (plus: concept_with_sam3)."""
    if proposal_mode == "concept":
        return True
    if proposal_mode != "preset" or preset not in PRESETS:
        return False
    p = get_preset(preset)
    return p.proposal_mode == "concept" or (p.concept_with_sam3 and SAM3_INPUT[0] in connected)


def takes_external(variant: str) -> bool:
    """Whether masks wired to 'proposals' can stand in for the variant's proposals (SAM's automatic ones)."""
    return get_variant(variant).proposals == "sam"


def variant_inputs_problem(variant: str, connected: Collection[str], concept: bool = False) -> str | None:
    """The message when ``variant`` needs a model input that is not ``connected`` (None when all are), or makes
    its own proposals while masks are wired to 'proposals': it names each missing input, the loader that
    fills it, and the variants that run with what is connected."""
    if variant not in VARIANT_CHOICES:
        return f"variant must be one of {VARIANT_CHOICES}, got {variant!r}"
    external = PROPOSALS_INPUT in connected
    if external and not takes_external(variant):
        usable = " or ".join(f"'{name}'" for name in VARIANT_CHOICES if takes_external(name))
        return (f"{PROPOSALS_INPUT}: variant '{variant}' makes its own proposals, so the masks wired to "
                f"'{PROPOSALS_INPUT}' would not be used; choose variant {usable}, or disconnect '{PROPOSALS_INPUT}'")
    needed = variant_inputs(variant, external, concept)
    missing = [need for need in needed if need[0] not in connected]
    if not missing:
        return None
    others = [f"'{name}'" for name in VARIANT_CHOICES
              if name != variant and (takes_external(name) or not external)
              and all(need[0] in connected for need in variant_inputs(name, external, concept))]
    what = " and ".join(label for _, label, _ in missing)
    fix = " and ".join(f"a {loader} to '{name}'" for name, _, loader in missing)
    alternative = f", or choose variant {' or '.join(others)}" if others else ""
    return f"variant '{variant}' needs {what}: connect {fix}{alternative}"


def capture_factor(factor: int, preset: Preset) -> int:
    """The capture factor of RefDiffSegment's ``factor`` input: -1 = the preset's; 0 (every level) is refused,
    since the generative map reads one level."""
    factor = int(factor)
    if factor < 0:
        return int(preset.capture_factor)
    if factor == 0:
        raise InputError(f"factor 0 (every UNet level) is for RefDiff Self-Attention Refine; the generative map "
                         f"reads one level: give a power of two such as {preset.capture_factor} (-1 = the "
                         f"preset's {preset.capture_factor})")
    return factor


def linked_type_problem(received: Mapping[str, Any], declared: Mapping[str, Mapping[str, tuple]],
                        matches: Callable[[Any, Any], bool]) -> str | None:
    """The check ComfyUI skips for a node whose validate_inputs asks for ``input_types``: each linked input's
    type (``received``) against its declared type (INPUT_TYPES' required/optional), with ComfyUI's own
    ``matches`` (comfy_execution.validation.validate_node_input)."""
    for name, kind in received.items():
        spec = declared.get("required", {}).get(name) or declared.get("optional", {}).get(name)
        if spec is not None and not matches(kind, spec[0]):
            return f"{name}: a {kind} output is linked, but {name} takes {spec[0]}; connect a {spec[0]} output"
    return None


def proposal_mode_preset(preset: Preset, proposal_mode: str = "preset") -> Preset:
    """The preset with RefDiffSegment's ``proposal_mode`` input applied ('preset' keeps the preset's)."""
    if proposal_mode not in PROPOSAL_MODE_CHOICES:
        raise InputError(f"proposal_mode must be one of {PROPOSAL_MODE_CHOICES}, got {proposal_mode!r}")
    # a mode asked for is the mode used (as refdiff.RefDiff: concept_with_sam3 off then)
    return preset if proposal_mode == "preset" else preset.with_(proposal_mode=proposal_mode, concept_with_sam3=False)


__all__ = ["VARIANT_CHOICES", "PROPOSAL_MODE_CHOICES", "proposal_mode_preset", "SAM_INPUT", "CLIP_INPUT", "SAM3_INPUT", "concept_mode", "PROPOSALS_INPUT",
           "takes_external", "variant_inputs", "variant_inputs_problem",
           "capture_factor", "linked_type_problem"]
