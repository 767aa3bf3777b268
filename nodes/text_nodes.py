"""Text node: the root word of the referring expression, its token position(s), direction clues (docs/METHOD.md 4)."""
from __future__ import annotations

from typing import Any

import spacy  # noqa: F401  (the parser; without it these nodes are disabled, not broken)
from comfy_api.latest import io

from refdiff.text import ROOT_RULES
from refdiff.tokenizer import clip_tokenizer

from . import runtime, sockets, text_inputs, token_positions
from .wire_types import ParsedBatch, match_batch


# ------------------------------------------------------------------------------------------ stage function
def parse_texts(text: str, clip: Any = None, root_rule: str = "root_or_subj", prompt_suffix: str = ", ",
                root_word: str = "") -> tuple[ParsedBatch, str]:
    """Parse each line of ``text``; token positions use the CLIP's own tokenizer (offline SD 1.x one if None).

    ``root_word`` may hold one word for every line or one line per text line (an empty line: the parser's
    choice).
    """
    from . import comfy_backend  # ComfyUI's model classes load only when a CLIP is given

    lines = text_inputs.split_lines(text, "text")
    words = match_batch(root_word.splitlines() or [""], len(lines), "root_word") if root_word.strip() else \
        [""] * len(lines)
    tokenizer = comfy_backend.sd_tokenizer(clip) if clip is not None else clip_tokenizer()
    items = [token_positions.parse_item(line, tokenizer, root_rule=root_rule, prompt_suffix=prompt_suffix, root_word=w)
             for line, w in zip(lines, words)]
    summary = token_positions.parse_summary(items)
    warnings = token_positions.parse_warnings(items, tokenizer)
    if warnings:
        summary += "\n" + "\n".join("warning: " + w for w in warnings)
        for w in warnings:
            runtime.LOG.warning("[RefDiff] %s", w)
    return ParsedBatch(items), summary


# ------------------------------------------------------------------------------------------ node
class RefDiffParseText(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefDiffParseText",
            display_name="RefDiff Parse Text",
            category=sockets.CATEGORY,
            description="Parse the referring expression with spaCy: the root word (whose attention map becomes "
                        "the generative map), its position among the diffusion model's tokens (last BPE piece), "
                        "and whole-word direction clues (left/right/top/bottom).",
            inputs=[
                io.String.Input("text", multiline=True, default="",
                                tooltip="Referring expression(s): one line for all images, or one line per image. "
                                        "Prompt-weight syntax such as (word:1.2) is ignored for parsing."),
                sockets.preset_input("Preset for 'root_rule: preset' and the prompt suffix."),
                io.Combo.Input("root_rule", options=["preset", *ROOT_RULES], default="preset",
                               tooltip="'root_or_subj': first token that is ROOT or a subject (official); "
                                       "'root': the ROOT (paper)."),
                io.String.Input("root_word", default="",
                                tooltip="Optional: use this word of the text as the root instead of the parser's "
                                        "choice (one line per text line, or one word for all)."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The checkpoint's CLIP, whose tokenizer numbers the tokens (without it: "
                                      "SD 1.x's tokenizer, identical for SD 2.x)."),
            ],
            outputs=[
                sockets.Parse.Output(display_name="parse", tooltip="Root word, token positions and directions per "
                                                                   "text line (REFDIFF_PARSE)."),
                io.String.Output(display_name="summary", tooltip="What was found, one line per text."),
            ],
        )

    @classmethod
    def execute(cls, text, preset, root_rule, root_word, clip=None) -> io.NodeOutput:
        p = sockets.preset(preset)
        parse, summary = parse_texts(text, clip, p.root_rule if root_rule == "preset" else root_rule,
                                     p.prompt_suffix, root_word or "")
        return io.NodeOutput(parse, summary)


NODES = [RefDiffParseText]
__all__ = ["parse_texts", "NODES", "RefDiffParseText"]
