"""Conversions the nodes share, free of any ComfyUI import: IMAGE/MASK tensors <-> the library's arrays,
one text per image, the root word's token positions, summaries and previews.

The method itself (maps, proposals, scores) lives in ``refdiff``; nothing here computes a step of it.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from refdiff.errors import InputError
from refdiff.image import PreparedImage, load_image, pad_to_square, prepare_image
from refdiff.text import (parse_text, root_token_position, strip_prompt_weights, truncation_warning,
                          word_token_positions)

from .payloads import ParsedItem, match_batch


# ------------------------------------------------------------------------------------------------ text
def split_lines(text: str, name: str = "text") -> list[str]:
    """The non-empty lines of a multi-line text input; InputError naming the input when there are none."""
    if not isinstance(text, str):
        raise InputError(f"{name} must be a string, got {type(text).__name__}")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise InputError(f"{name} is empty: type a referring expression such as 'the dog on the left' "
                         "(one line for all images, or one line per image)")
    return lines


def texts_for_batch(text: str, batch: int, name: str = "text") -> list[str]:
    """One text per image: a single line serves the whole batch, otherwise one line per image."""
    return match_batch(split_lines(text, name), batch, name)


def find_word(text: str, word: str, name: str = "root_word") -> tuple[int, int]:
    """Character span of the first whole-word, case-insensitive occurrence of ``word`` in ``text``."""
    word = word.strip()
    if not word or re.search(r"\s", word):
        raise InputError(f"{name} must be a single word of the text, got {word!r}")
    match = re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", text, flags=re.IGNORECASE)
    if match is None:
        raise InputError(f"{name} {word!r} is not a whole word of the text {text!r}; leave {name} empty to "
                         "use the parser's root word, or pick a word that occurs in the text")
    return match.start(), match.end()


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
    plain = strip_prompt_weights(text)
    if not plain.strip():
        raise InputError(f"text {text!r} holds no words once prompt-weight syntax is removed")
    parsed = parse_text(plain, root_rule=root_rule, nlp=nlp)
    overridden = bool(root_word and root_word.strip())
    if overridden:
        start, end = find_word(parsed.text, root_word)
        parsed = dataclasses.replace(parsed, root=parsed.text[start:end], root_span=(start, end))
    prompt = parsed.text + prompt_suffix
    positions = word_token_positions(prompt, parsed.root_span, tokenizer)
    position = root_token_position(parsed, tokenizer, prompt_suffix=prompt_suffix, max_length=max_length)
    return ParsedItem(parsed=parsed, prompt=prompt, root_positions=[p for p in positions if p < max_length - 1],
                      root_position=position, tokens=token_strings(prompt, tokenizer, max_length),
                      root_rule=root_rule, root_overridden=overridden)


def parse_warnings(items: Sequence[ParsedItem], tokenizer: Any, max_length: int = 77) -> list[str]:
    """Messages for prompts the model cuts at its token limit."""
    out = []
    for item in items:
        msg = truncation_warning(item.prompt, tokenizer, max_length)
        if msg:
            out.append(msg)
    return out


def parse_summary(items: Sequence[ParsedItem]) -> str:
    """A human-readable account of each parse: root word, its token position(s), direction clues."""
    lines = []
    for i, item in enumerate(items):
        p = item.parsed
        how = "given" if item.root_overridden else f"rule {item.root_rule}"
        piece = item.tokens[item.root_position] if item.root_position < len(item.tokens) else "?"
        lines.append(f"[{i}] {p.text!r}: root {p.root!r} ({how}) at token {item.root_position} ({piece}); "
                     f"all pieces {item.root_positions}; directions: {', '.join(p.directions) or 'none'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- images/masks
def images_to_rgb(image: torch.Tensor, name: str = "image") -> list[np.ndarray]:
    """A ComfyUI IMAGE batch [B, H, W, C] (float 0..1) as a list of RGB uint8 arrays [H, W, 3]."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[0] < 1:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"{name}: expected an IMAGE batch [B, H, W, C], got {shape}")
    return [load_image(frame.detach().cpu().float().clamp(0, 1).numpy(), name=f"{name}[{i}]")
            for i, frame in enumerate(image)]


def prepared_squares(image: torch.Tensor, size: int = 1024, resize_filter: str = "lanczos",
                     name: str = "image") -> torch.Tensor:
    """Each image padded to a centred black square and resized to ``size`` (docs/METHOD.md section 1), as an
    IMAGE batch [B, size, size, 3] in 0..1, ready for VAEEncode."""
    out = [(prepare_image(rgb, size=size, resize_filter=resize_filter).pixels[0].permute(1, 2, 0) + 1.0) / 2.0
           for rgb in images_to_rgb(image, name)]
    return torch.stack(out).clamp(0.0, 1.0).contiguous()


def frame_geometry(height: int, width: int, size: int) -> PreparedImage:
    """Where an H x W image sits in its prepared ``size`` square, without resizing any pixels."""
    _, offset = pad_to_square(np.zeros((int(height), int(width), 3), dtype=np.uint8))
    return PreparedImage(pixels=torch.empty(0), size=int(size), side=max(int(height), int(width)),
                         offset=offset, width=int(width), height=int(height))


def masks_to_output(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """A list of [H, W] masks (bool or float) as a ComfyUI MASK batch: float32 [B, H, W] on the CPU."""
    if not masks:
        raise InputError("no mask to output: the batch is empty")
    return torch.stack([m.detach().to(device="cpu", dtype=torch.float32) for m in masks]).contiguous()


def heatmap(c: torch.Tensor) -> torch.Tensor:
    """A float map [H, W] in 0..1 coloured blue -> cyan -> yellow -> red, as RGB float [H, W, 3]."""
    x = c.detach().float().cpu().clamp(0.0, 1.0)
    stops = torch.tensor([[0.0, 0.0, 0.5], [0.0, 0.4, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    pos = x * (len(stops) - 1)
    lo = pos.floor().long().clamp(max=len(stops) - 2)
    frac = (pos - lo.float())[..., None]
    return stops[lo] * (1.0 - frac) + stops[lo + 1] * frac


def overlay(image: torch.Tensor | None, mask: torch.Tensor, color: Sequence[float] = (1.0, 0.2, 0.2),
            alpha: float = 0.5) -> torch.Tensor:
    """An RGB preview [H, W, 3]: ``mask`` (bool or 0..1) tinted over ``image`` (black when None)."""
    m = mask.detach().float().cpu()
    base = torch.zeros(*m.shape, 3) if image is None else image.detach().float().cpu()[..., :3]
    if tuple(base.shape[:2]) != tuple(m.shape):
        raise InputError(f"preview: mask is {tuple(m.shape)} but the image is {tuple(base.shape[:2])}")
    tint = torch.tensor([float(v) for v in color]).view(1, 1, 3)
    weight = (float(alpha) * m)[..., None]
    return (base * (1.0 - weight) + tint * weight).clamp(0.0, 1.0)


def score_table(masks: torch.Tensor, fused: torch.Tensor, order: Sequence[int], chosen: int,
                generative: torch.Tensor | None, discriminative: torch.Tensor | None, header: str) -> str:
    """Text table of one image's ranked proposals: rank, index, area and each score."""
    lines = [header]
    if masks.shape[0] == 0:
        lines.append("  no proposal: empty mask")
        return "\n".join(lines)
    areas = masks.flatten(1).sum(dim=1).tolist()
    for rank_i, idx in enumerate(order):
        parts = [f"  #{rank_i + 1} proposal {idx}", f"area {int(areas[idx])}", f"fused {float(fused[idx]):+.4f}"]
        if generative is not None:
            parts.append(f"s_G {float(generative[idx]):+.4f}")
        if discriminative is not None:
            parts.append(f"s_D {float(discriminative[idx]):+.4f}")
        if idx == chosen:
            parts.append("<- selected")
        lines.append(", ".join(parts))
    return "\n".join(lines)


def parse_blocks(blocks: str) -> tuple[str, ...]:
    """"down,mid,up" (or input/middle/output, any separator) -> a tuple of block names."""
    names = tuple(b for b in re.split(r"[\s,;+/]+", str(blocks).strip().lower()) if b)
    if not names:
        raise InputError("blocks is empty; use e.g. 'down,mid,up'")
    return names


__all__ = ["split_lines", "texts_for_batch", "find_word", "token_strings", "parse_item", "parse_warnings",
           "parse_summary", "images_to_rgb", "prepared_squares", "frame_geometry", "masks_to_output",
           "heatmap", "overlay", "score_table", "parse_blocks"]
