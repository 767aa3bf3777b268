"""The diffusion-transformer (Flux, SD 3) inputs of the capture and segment nodes: defaults (docs/METHOD.md
section 15), their checks, and the competing concepts of one parse. No ComfyUI import (tested offline).
"""
from __future__ import annotations

from dataclasses import dataclass

from refdiff.errors import InputError
from refdiff.flow import DEFAULT_FLOW_T, flow_ts
from refdiff.joint_attention import BACKGROUND_CONCEPTS, DEFAULT_LAST_BLOCKS, MAP_KINDS, concept_list, parse_block_list

from .wire_types import ParsedItem

# What the generative map runs on, as the refusals name it.
SUPPORTED_MODELS = "SD 1.x/2.x and SDXL (UNet cross-attention), Flux.1 and SD 3 / 3.5 (joint attention)"
JOINT_FAMILIES: tuple[str, ...] = ("Flux", "SD3")
DEFAULT_MAP_KIND = "attention"
DEFAULT_BLOCKS = f"last{DEFAULT_LAST_BLOCKS}"
DEFAULT_BACKGROUND = ", ".join(BACKGROUND_CONCEPTS)


@dataclass(frozen=True)
class DitOptions:
    """How the joint attention of a Flux / SD 3 MODEL is read: map kind, double blocks ("last4", "all" or a
    list), flow noise fraction t and Euler steps, background concepts of the concept map."""

    map_kind: str = DEFAULT_MAP_KIND
    blocks: str = DEFAULT_BLOCKS
    flow_t: float = DEFAULT_FLOW_T
    flow_steps: int = 1
    background: tuple[str, ...] = BACKGROUND_CONCEPTS

    def describe(self) -> str:
        """One line for the nodes' summaries."""
        extra = f", background {', '.join(self.background) or 'none'}" if self.map_kind == "concept" else ""
        return f"map {self.map_kind}, blocks {self.blocks}, flow t={self.flow_t:g} x {self.flow_steps} step(s){extra}"


def parse_background(text: str) -> tuple[str, ...]:
    """Comma-separated background words ("background, floor, wall, sky"); empty entries dropped."""
    return tuple(w.strip() for w in str(text or "").split(",") if w.strip())


def dit_options(map_kind: str = DEFAULT_MAP_KIND, blocks: str = DEFAULT_BLOCKS, flow_t: float = DEFAULT_FLOW_T,
                flow_steps: int = 1, background: str = DEFAULT_BACKGROUND) -> DitOptions:
    """The options from the nodes' widget values; InputError naming the bad input."""
    problem = dit_options_problem(map_kind, blocks, flow_t, flow_steps)
    if problem:
        raise InputError(problem)
    return DitOptions(map_kind, str(blocks or DEFAULT_BLOCKS).strip() or DEFAULT_BLOCKS, float(flow_t),
                      int(flow_steps), parse_background(background))


def dit_options_problem(map_kind: str | None = None, blocks: str | None = None, flow_t: float | None = None,
                        flow_steps: int | None = None) -> str | None:
    """What validate_inputs answers for the DiT widgets before any model loads (None: nothing wrong). The block
    list is checked for its form here; against the MODEL's depth when the node runs."""
    if map_kind is not None and map_kind not in MAP_KINDS:
        return f"map_kind must be one of {list(MAP_KINDS)}, got {map_kind!r}"
    checks = (("dit_blocks", blocks is not None, lambda: parse_block_list(blocks, 10 ** 6)),
              ("flow_t / flow_steps", flow_t is not None or flow_steps is not None,
               lambda: flow_ts(DEFAULT_FLOW_T if flow_t is None else flow_t, 1 if flow_steps is None else flow_steps)))
    for name, given, check in checks:
        try:
            if given:
                check()
        except InputError as exc:
            return f"{name}: {exc}"
    return None


def concept_words(item: ParsedItem, background: tuple[str, ...] = BACKGROUND_CONCEPTS) -> list[str]:
    """The concepts competing in one expression's concept map: its root word, its other nouns, the background
    words (each once)."""
    return concept_list(item.parsed.root, item.parsed.nouns, background)


def concept_positions(item: ParsedItem, concepts: list[str]) -> list[list[int]]:
    """The context positions of each concept's word: the root's pieces for the first concept; for the others
    the pieces of every word of the text equal to it (case-insensitive); [] for a word not in the text."""
    out = [list(item.root_positions)]
    for concept in concepts[1:]:
        pos: list[int] = []
        for (word, _, _), places in zip(item.parsed.words, item.word_positions):
            if word.lower() == concept.lower():
                pos += [p for p in places if p not in pos and p not in out[0]]
        out.append(pos)
    return out


def unused_unet_inputs(kind: str, steps: int, self_attention: bool) -> str | None:
    """The UNet-only capture inputs set to a value a Flux / SD 3 capture cannot honour (None when none is)."""
    if kind == "logits":
        return ("kind: 'logits' combines the UNet's guidance branches; a Flux / SD 3 capture reads attention "
                "probabilities or concept maps: set kind to 'preset' or 'probs' and choose map_kind")
    if int(steps):
        return "steps: counts UNet DDIM steps; for a Flux / SD 3 MODEL leave it at 0 and set flow_steps"
    if self_attention:
        return ("self_attention: RefDiff Self-Attention Refine reads a UNet's self-attention; a Flux / SD 3 "
                "capture has none: turn self_attention off")
    return None


WIDGET_NAMES = {"map_kind": "map_kind", "blocks": "dit_blocks", "flow_t": "flow_t", "flow_steps": "flow_steps",
                "background": "background"}


def dit_inputs_on_unet(options: DitOptions | None, family: str) -> str | None:
    """The Flux / SD 3 widgets set away from their defaults on a UNet MODEL, which does not read them (None when
    none is)."""
    if options is None:
        return None
    default = DitOptions()
    changed = [WIDGET_NAMES[f] for f in WIDGET_NAMES if getattr(options, f) != getattr(default, f)]
    if not changed:
        return None
    return (f"{', '.join(changed)}: Flux / SD 3 inputs, but this MODEL is {family} (UNet cross-attention, read "
            "with kind, factor and blocks); set them back to their defaults or connect a Flux / SD 3 MODEL")


def check_parse_context(model_family: str, context: str, name: str = "parse") -> None:
    """InputError when a parse numbered its tokens for another text context than the model's (SD's CLIP
    positions for a Flux MODEL, or the reverse)."""
    want = model_family if model_family in JOINT_FAMILIES else "CLIP"
    if context != want:
        how = (f"connect the {model_family} CLIP to RefDiffParseText's clip input" if want != "CLIP" else
               "connect the SD checkpoint's CLIP (or none) to RefDiffParseText's clip input")
        raise InputError(f"{name}: its token positions are for the {context} text context but the attention was "
                         f"captured from a {model_family} MODEL ({want} context); {how}")


__all__ = ["SUPPORTED_MODELS", "JOINT_FAMILIES", "DEFAULT_MAP_KIND", "DEFAULT_BLOCKS", "DEFAULT_BACKGROUND",
           "DitOptions", "parse_background", "dit_options", "dit_options_problem", "concept_words",
           "concept_positions", "unused_unet_inputs", "WIDGET_NAMES", "dit_inputs_on_unet", "check_parse_context"]
