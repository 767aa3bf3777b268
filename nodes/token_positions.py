"""Where the words of a referring expression sit among the diffusion model's tokens: the parse of one text
line (ParsedItem), token strings and positions, and which token the generative map c is read from (the root,
or the word or position ``token_override`` names). No ComfyUI import (tested offline).
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Sequence
from typing import Any

from refdiff.errors import InputError, RefDiffWarning
from refdiff.expression import Expression, parse_expression
from refdiff.text import (DEFAULT_NO_NOUN, NO_NOUN_POLICIES, ParsedText, check_root, parse_text, root_token_position,
                          strip_prompt_weights, token_spans, truncation_warning, word_token_positions)

from .text_inputs import find_word, split_lines
from .wire_types import ParsedItem


def _hf_tokenizer(tokenizer: Any) -> Any:
    """The transformers tokenizer inside ComfyUI's SDTokenizer wrapper (or the tokenizer itself)."""
    for _ in range(3):
        if hasattr(tokenizer, "convert_ids_to_tokens"):
            return tokenizer
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    return tokenizer


def token_strings(prompt: str, tokenizer: Any, max_length: int = 77) -> list[str]:
    """The tokens of ``prompt`` by position (0 = start token, then BPE pieces, then the end token)."""
    tok = _hf_tokenizer(tokenizer)
    ids = tok(prompt, truncation=True, max_length=max_length)["input_ids"]
    return [str(t) for t in tok.convert_ids_to_tokens(ids)]


def parse_item(text: str, tokenizer: Any, root_rule: str = "root_or_subj", prompt_suffix: str = ", ",
               root_word: str = "", nlp: Any = None, max_length: int = 77) -> ParsedItem:
    """Parse one expression (prompt-weight syntax stripped) and place its root word in the model's tokens.

    ``root_word`` (optional) replaces the parser's choice by a whole word of the text.
    """
    parsed, overridden = parse_line(text, root_rule=root_rule, root_word=root_word, nlp=nlp)
    prompt = parsed.text + prompt_suffix
    positions = word_token_positions(prompt, parsed.root_span, tokenizer)
    position = root_token_position(parsed, tokenizer, prompt_suffix=prompt_suffix, max_length=max_length)
    return ParsedItem(parsed=parsed, prompt=prompt, root_positions=[p for p in positions if p < max_length - 1],
                      root_position=position, tokens=token_strings(prompt, tokenizer, max_length),
                      root_rule=root_rule, root_overridden=overridden,
                      word_positions=word_positions(prompt, parsed.words, tokenizer, max_length))


def parse_line(text: str, root_rule: str = "root_or_subj", root_word: str = "",
               nlp: Any = None) -> tuple[ParsedText, bool]:
    """The spaCy parse of one expression with prompt-weight syntax removed, its root replaced by ``root_word``
    when one is given; returns (parse, whether the root was given)."""
    plain = strip_prompt_weights(text)
    if not plain.strip():
        raise InputError(f"text {text!r} holds no words once prompt-weight syntax is removed")
    parsed = parse_text(plain, root_rule=root_rule, nlp=nlp)
    overridden = bool(root_word and root_word.strip())
    if overridden:
        start, end = find_word(parsed.text, root_word)
        parsed = dataclasses.replace(parsed, root=parsed.text[start:end], root_span=(start, end))
    return parsed, overridden


def root_note(parsed: ParsedText, no_noun: str = DEFAULT_NO_NOUN, overridden: bool = False) -> str | None:
    """The ``no_noun`` policy (refdiff.text.check_root) on one parse: InputError under "error" when the text
    names no object; otherwise the warning to show, None when the root names an object or a ``root_word``
    override picked one of the text's nouns. The nodes log and show the warning themselves, so the Python
    warning check_root emits is not repeated."""
    if overridden and parsed.root.lower() in {n.lower() for n in parsed.nouns}:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RefDiffWarning)
            return check_root(parsed, no_noun)
    except InputError as exc:
        if no_noun not in NO_NOUN_POLICIES:
            raise
        raise InputError(f"{exc}; or set no_noun to 'warn' to run it anyway") from None


def text_problem(text: str | None, no_noun: str = DEFAULT_NO_NOUN, nlp: Any = None) -> str | None:
    """What a node's validate_inputs answers for its text widget before anything runs (None: nothing wrong): an
    empty or punctuation-only text, a line that is only prompt-weight syntax, and under ``no_noun`` "error" a line
    that names no object (which does not depend on the root rule or a root_word override). A linked text is not
    passed to validate_inputs (None here): it is checked when the node runs."""
    if no_noun not in NO_NOUN_POLICIES:
        return f"no_noun must be one of {list(NO_NOUN_POLICIES)}, got {no_noun!r}"
    if text is None:
        return None
    try:
        for line in split_lines(text, "text"):
            root_note(parse_line(line, nlp=nlp)[0], no_noun)
    except InputError as exc:
        return str(exc)
    return None


def word_positions(prompt: str, words: Sequence[tuple[str, int, int]], tokenizer: Any,
                   max_length: int = 77) -> list[list[int]]:
    """The BPE positions of each (word, start, end) of ``prompt`` (start token = 0); positions the model cuts
    off at its token limit are left out, so a word past the limit gets an empty list."""
    spans = token_spans(prompt, tokenizer)
    return [[p for p, s, e in spans if s < end and e > start and e > s and p < max_length - 1]
            for _, start, end in words]


def parse_warnings(items: Sequence[ParsedItem], tokenizer: Any, max_length: int = 77) -> list[str]:
    """Messages for prompts the model cuts at its token limit."""
    out = []
    for item in items:
        msg = truncation_warning(item.prompt, tokenizer, max_length)
        if msg:
            out.append(msg)
    return out


def describe_expression(expr: Expression) -> str:
    """One line of what an expression says (Expression.summary()): target, attributes, frame terms, relations,
    other nouns."""
    s = expr.summary()
    parts = [f"target '{s['target']}'"]
    if s["attributes"]:
        parts.append("attributes " + ", ".join(s["attributes"]))
    frame = []
    for t in s["frame"]:
        detail = ", ".join(f"{k} {v}" for k, v in t.items() if k not in ("kind", "word"))
        frame.append(f"{t['kind']} '{t['word']}'" + (f" ({detail})" if detail else ""))
    parts.append("spatial: " + ("; ".join(frame) if frame else "none"))
    rels = [f"{r['family']} '{r['other']}' ('{r['phrase']}')" for r in s["relations"]]
    parts.append("relations: " + ("; ".join(rels) if rels else "none"))
    if s["others"]:
        parts.append("other nouns " + ", ".join(s["others"]))
    return ", ".join(parts)


def parse_summary(items: Sequence[ParsedItem], understood: bool = False) -> str:
    """A human-readable account of each parse: root word, its token position(s), direction clues; with
    ``understood`` also what the expression says (describe_expression: target, attributes, spatial terms,
    relations), as the spatial terms read it."""
    lines = []
    for i, item in enumerate(items):
        p = item.parsed
        how = "given" if item.root_overridden else f"rule {item.root_rule}"
        piece = item.tokens[item.root_position] if item.root_position < len(item.tokens) else "?"
        lines.append(f"[{i}] {p.text!r}: root {p.root!r} ({how}) at token {item.root_position} ({piece}); "
                     f"all pieces {item.root_positions}; directions: {', '.join(p.directions) or 'none'}")
        if understood:
            lines.append(f"    understood: {describe_expression(parse_expression(p.text, parsed=p))}")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class TokenChoice:
    """The token whose map becomes c: its position among the model's tokens (start token = 0), a label,
    where the choice came from ("parser", "root_word" or "token_override") and the index of the word of
    ``parsed.words`` it belongs to (None for a token of no word, such as the prompt's trailing comma)."""

    position: int
    label: str
    source: str
    word: int | None


def item_word_positions(item: ParsedItem) -> list[list[int]]:
    """The BPE positions of each word of a parse (recomputed with the SD 1.x tokenizer, whose vocabulary
    SD 2.x shares, for a parse made without them)."""
    if len(item.word_positions) == len(item.parsed.words):
        return item.word_positions
    from refdiff.tokenizer import clip_tokenizer

    return word_positions(item.prompt, item.parsed.words, clip_tokenizer(), max(len(item.tokens), 2))


def word_at(positions: Sequence[Sequence[int]], position: int) -> int | None:
    """The index of the word whose BPE positions include ``position`` (None for a token of no word)."""
    return next((i for i, p in enumerate(positions) if position in p), None)


def resolve_token(item: ParsedItem, override: str = "", num_tokens: int = 77,
                  name: str = "token_override") -> TokenChoice:
    """The token c is read from: the parse's root (its last BPE piece) when ``override`` is empty; else the
    first word of the text equal to it (case-insensitive; its last piece) or, for a number, that position."""
    words = item.parsed.words
    positions = item_word_positions(item)
    value = str(override or "").strip()
    if not value:
        source = "root_word" if item.root_overridden else "parser"
        return TokenChoice(item.root_position, item.parsed.root, source, word_at(positions, item.root_position))
    last = min(len(item.tokens), int(num_tokens)) - 2  # the tokens between the start and the end token
    for i, (word, _, _) in enumerate(words):
        if word.lower() == value.lower():
            if not positions[i]:
                raise InputError(f"{name}: the word {word!r} lies beyond the model's token limit; shorten the "
                                 "text or pick an earlier word")
            return TokenChoice(positions[i][-1], word, "token_override", i)
    if re.fullmatch(r"#?\d+", value):
        pos = int(value.lstrip("#"))
        if not 1 <= pos <= last:
            raise InputError(f"{name}: token position {pos} is outside the text's tokens 1..{last} of "
                             f"{item.prompt!r}; give a word of the text, or leave {name} empty for the root")
        label = item.tokens[pos].replace("</w>", "")
        return TokenChoice(pos, label, "token_override", word_at(positions, pos))
    listed = ", ".join(w for w, _, _ in words)
    raise InputError(f"{name} {value!r} is not a word of the text {item.parsed.text!r} (its words: {listed}) "
                     f"nor a token position (1..{last}); pick one of those words, or leave {name} empty to use "
                     f"the root word {item.parsed.root!r}")


__all__ = ["token_strings", "parse_item", "parse_line", "root_note", "text_problem", "word_positions",
           "parse_warnings", "parse_summary", "TokenChoice", "item_word_positions", "resolve_token", "word_at",
           "describe_expression"]
