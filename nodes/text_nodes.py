"""Text node: the root word of the referring expression, its token position(s), direction clues (docs/METHOD.md 4)."""
from __future__ import annotations

from typing import Any

import spacy  # noqa: F401  (the parser; without it these nodes are disabled, not broken)
from comfy_api.latest import io

from refdiff.text import DEFAULT_NO_NOUN, NO_NOUN_POLICIES, ROOT_RULES
from refdiff.tokenizer import clip_tokenizer

from . import runtime, sockets, text_inputs, token_positions
from .wire_types import ParsedBatch, match_batch


# ------------------------------------------------------------------------------------------ stage function
def parse_texts(text: str, clip: Any = None, root_rule: str = "root_or_subj", prompt_suffix: str = ", ",
                root_word: str = "", no_noun: str = DEFAULT_NO_NOUN) -> tuple[ParsedBatch, str]:
    """Parse each line of ``text``; token positions use the CLIP's own tokenizer (offline SD 1.x one if None).

    ``root_word`` may hold one word for every line or one line per text line (an empty line: the parser's
    choice). ``no_noun``: a line that names no object is warned about ("warn", the default) or raises InputError
    ("error"); warnings (also prompts cut at the token limit) are logged, listed in the summary and kept on the
    parse.
    """
    from . import comfy_backend  # ComfyUI's model classes load only when a CLIP is given

    lines = text_inputs.split_lines(text, "text")
    words = match_batch(root_word.splitlines() or [""], len(lines), "root_word") if root_word.strip() else \
        [""] * len(lines)
    context = "CLIP"
    if clip is not None and getattr(getattr(clip, "tokenizer", None), "t5xxl", None) is not None:
        from . import dit_backend  # a Flux / SD 3 CLIP: positions in the T5 (and CLIP-L) context

        context = dit_backend.clip_family(clip)
        items = [dit_backend.dit_parse_item(line, clip, root_rule=root_rule, prompt_suffix=prompt_suffix,
                                            root_word=w) for line, w in zip(lines, words)]
        cut: list[str] = []  # T5 has no token limit in ComfyUI; SD 3's CLIP-L part is cut at 77 (positions kept)
    else:
        tokenizer = comfy_backend.sd_tokenizer(clip) if clip is not None else clip_tokenizer()
        items = [token_positions.parse_item(line, tokenizer, root_rule=root_rule, prompt_suffix=prompt_suffix,
                                            root_word=w) for line, w in zip(lines, words)]
        cut = token_positions.parse_warnings(items, tokenizer)
    notes = [token_positions.root_note(item.parsed, no_noun, item.root_overridden) for item in items]
    warnings = [n for n in notes if n] + cut
    summary = token_positions.parse_summary(items, understood=True)
    if warnings:
        summary += "\n" + "\n".join("warning: " + w for w in warnings)
        runtime.warn(warnings)
    return ParsedBatch(items, warnings=warnings, context=context), summary


# ------------------------------------------------------------------------------------------ node
def no_noun_input() -> Any:
    """The no_noun combo of the nodes that parse the text (optional: graphs saved without it get the default)."""
    return io.Combo.Input("no_noun", options=sorted(NO_NOUN_POLICIES), default=DEFAULT_NO_NOUN, optional=True,
                          tooltip="A text that names no object ('the one on the right', 'leftmost', 'the biggest "
                                  "one'): 'warn' (default) runs it with an open target class (the attention map "
                                  "follows the root word, the spatial terms rank all whole-object candidates) and "
                                  "says so on the node, in its text output and in the console; 'error' refuses it "
                                  "when the prompt is queued. An empty or punctuation-only text is always refused.")


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
                                      "SD 1.x's tokenizer, identical in its positions for SD 2.x and SDXL). For "
                                      "Flux / SD 3 connect their CLIP: the positions are then T5's (and CLIP-L's)."),
                no_noun_input(),
            ],
            outputs=[
                sockets.Parse.Output(display_name="parse", tooltip="Root word, token positions and directions per "
                                                                   "text line (REFDIFF_PARSE)."),
                io.String.Output(display_name="summary", tooltip="What was found, one line per text."),
            ],
        )

    @classmethod
    def validate_inputs(cls, text=None, no_noun=DEFAULT_NO_NOUN) -> bool | str:
        # At queue time, before any model loads: an empty or punctuation-only text, or one naming no object under
        # no_noun "error".
        return token_positions.text_problem(text, no_noun) or True

    @classmethod
    def execute(cls, text, preset, root_rule, root_word, clip=None, no_noun=DEFAULT_NO_NOUN) -> io.NodeOutput:
        p = sockets.preset(preset)
        parse, summary = parse_texts(text, clip, p.root_rule if root_rule == "preset" else root_rule,
                                     p.prompt_suffix, root_word or "", no_noun)
        runtime.show_on_node(parse.warnings)
        return io.NodeOutput(parse, summary)


NODES = [RefDiffParseText]
__all__ = ["parse_texts", "no_noun_input", "NODES", "RefDiffParseText"]
