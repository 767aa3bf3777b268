"""Conversions the nodes share, free of any ComfyUI import: IMAGE/MASK tensors <-> the library's arrays,
one text per image, the root word's token positions, summaries and previews.

The method itself (maps, proposals, scores) lives in ``refdiff``; nothing here computes a step of it.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from refdiff.capture import token_map
from refdiff.errors import InputError
from refdiff.image import PreparedImage, load_image, pad_to_square, prepare_image
from refdiff.maps import generative_map
from refdiff.scoring import rank
from refdiff.text import (parse_text, root_token_position, strip_prompt_weights, token_spans, truncation_warning,
                          word_token_positions)

from .payloads import ParsedItem, match_batch


# ------------------------------------------------------------------------------------------------ text
def check_attention_batch(attention: Any, batch: int) -> None:
    """InputError unless the captured attention holds one entry per image, on a square (padded) latent."""
    if len(attention) != batch:
        raise InputError(f"attention holds {len(attention)} image(s) but image holds {batch}; connect the images "
                         "the attention was captured from")
    lh, lw = attention.latent_hw
    if lh != lw:
        raise InputError(f"attention: the latent is {lh}x{lw}, not square; encode the output of RefDiffPrepareImage "
                         "(the padded square) with VAEEncode")


def check_prompt(captured: str | None, parsed_prompt: str, index: int) -> None:
    """InputError when the attention was captured for another text than the one parsed."""
    if captured is None:
        return
    if strip_prompt_weights(captured).lower() != strip_prompt_weights(parsed_prompt).lower():
        raise InputError(f"parse: image {index}'s attention was captured for {captured!r} but the parse is of "
                         f"{parsed_prompt!r}; connect the same text (or the same parse) to both nodes")


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
                      root_rule=root_rule, root_overridden=overridden,
                      word_positions=word_positions(prompt, parsed.words, tokenizer, max_length))


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



# ------------------------------------------------------------------------------------------ web views
# What the nodes send to the pack's web extension (web/js/): small thumbnails, bounded in number.
VIEW_THUMB_SIDE = 96  # longest side of a thumbnail, pixels
VIEW_MAX_IMAGES = 4  # images of a batch shown on a node
VIEW_MAX_WORDS = 32  # words per image in the token strip
VIEW_MAX_PROPOSALS = 32  # proposals per image in the gallery


@dataclasses.dataclass(frozen=True)
class TokenChoice:
    """The token whose map becomes c: its position among the model's tokens (start token = 0), a label,
    where the choice came from ("parser", "root_word" or "token_override") and the index of the word of
    ``parsed.words`` it belongs to (None for a token of no word, such as the prompt's trailing comma)."""

    position: int
    label: str
    source: str
    word: int | None


def overrides_for_batch(value: str, batch: int, name: str = "token_override") -> list[str]:
    """One token override per image: empty -> none; one line for every image; or one line per image (an
    empty line keeps that image's root)."""
    lines = [line.strip() for line in str(value or "").splitlines()]
    if not any(lines):
        return [""] * batch
    if len(lines) != batch:
        while lines and not lines[-1]:
            lines.pop()
    return match_batch(lines, batch, name)


def item_word_positions(item: ParsedItem) -> list[list[int]]:
    """The BPE positions of each word of a parse (recomputed with the SD 1.x tokenizer, whose vocabulary
    SD 2.x shares, for a parse made without them)."""
    if len(item.word_positions) == len(item.parsed.words):
        return item.word_positions
    from refdiff.tokenizer import clip_tokenizer

    return word_positions(item.prompt, item.parsed.words, clip_tokenizer(), max(len(item.tokens), 2))


def _word_at(positions: Sequence[Sequence[int]], position: int) -> int | None:
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
        return TokenChoice(item.root_position, item.parsed.root, source, _word_at(positions, item.root_position))
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
        return TokenChoice(pos, label, "token_override", _word_at(positions, pos))
    listed = ", ".join(w for w, _, _ in words)
    raise InputError(f"{name} {value!r} is not a word of the text {item.parsed.text!r} (its words: {listed}) "
                     f"nor a token position (1..{last}); pick one of those words, or leave {name} empty to use "
                     f"the root word {item.parsed.root!r}")


def thumb_size(height: int, width: int, side: int = VIEW_THUMB_SIDE) -> tuple[int, int]:
    """(h, w) of a thumbnail of an H x W image whose longest side is ``side`` pixels."""
    scale = float(side) / max(int(height), int(width), 1)
    return max(1, round(int(height) * scale)), max(1, round(int(width) * scale))


def thumb_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An RGB frame [H, W, C] (0..1) resized (antialiased) to ``size``, as [h, w, 3]."""
    x = image.detach().float().cpu()[..., :3].permute(2, 0, 1)[None]
    y = F.interpolate(x, size=tuple(int(v) for v in size), mode="bilinear", align_corners=False, antialias=True)
    return y[0].permute(1, 2, 0).clamp(0.0, 1.0).contiguous()


def thumb_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks [N, H, W] (bool or 0..1) resized to ``size`` by the maximum over each thumbnail pixel's footprint,
    so that a small or thin mask stays visible; float [N, h, w] in 0..1."""
    x = masks.detach().float().cpu()[:, None]
    if x.shape[0] == 0:
        return torch.zeros(0, *size)
    return F.adaptive_max_pool2d(x, tuple(int(v) for v in size))[:, 0].clamp(0.0, 1.0)


def token_thumb_maps(combined: torch.Tensor, positions: Sequence[int], size: tuple[int, int],
                     mode: str = "lanczos", layer_eps: float = 1e-8, map_eps: float = 1e-8) -> torch.Tensor:
    """Eq. 5 for each token position, at thumbnail size [N, h, w]: the steps of c (per-layer min-max, layer
    mean, resize to the padded square, crop to the frame, min-max) with square and frame scaled to ``size``."""
    h, w = (int(v) for v in size)
    geometry = frame_geometry(h, w, max(h, w))
    maps = [generative_map(token_map(combined, int(p), eps=layer_eps), geometry, mode=mode, eps=map_eps)
            for p in positions]
    return torch.stack(maps) if maps else torch.zeros(0, h, w)


def heat_frames(image: torch.Tensor | None, maps: torch.Tensor) -> torch.Tensor:
    """Heatmaps [N, h, w] blended half and half over an RGB thumbnail [h, w, 3] (alone when None)."""
    heat = heatmap(maps)
    if image is None:
        return heat
    return (0.5 * image.detach().float().cpu()[None, ..., :3] + 0.5 * heat).clamp(0.0, 1.0)


def mask_frames(image: torch.Tensor | None, masks: torch.Tensor, color: Sequence[float] = (0.2, 0.9, 1.0),
                alpha: float = 0.45, dim: float = 0.35) -> torch.Tensor:
    """Thumbnail masks [N, h, w] shown on an RGB thumbnail [h, w, 3] (black when None): the image dimmed to
    ``dim`` outside the mask, tinted with ``color`` inside, so that even a small mask stands out; [N, h, w, 3]."""
    if masks.shape[0] == 0:
        return torch.zeros(0, *masks.shape[1:], 3)
    base = torch.zeros(*masks.shape[1:], 3) if image is None else image.detach().float().cpu()[..., :3]
    frames = []
    for m in masks:
        m = m.detach().float().cpu()
        frames.append(overlay(base * (dim + (1.0 - dim) * m)[..., None], m, color=color, alpha=alpha))
    return torch.stack(frames)


def save_thumbnails(frames: Sequence[torch.Tensor], folder: str | Path, prefix: str, subfolder: str = "",
                    kind: str = "temp") -> list[dict[str, str]]:
    """Write each RGB frame [h, w, 3] (0..1) as ``{prefix}_{i:05}_.png`` in ``folder/subfolder``; returns the
    references ComfyUI's /view serves them by ({"filename", "subfolder", "type"})."""
    from PIL import Image

    target = Path(folder) / subfolder
    target.mkdir(parents=True, exist_ok=True)
    refs = []
    for i, frame in enumerate(frames):
        pixels = (frame.detach().float().cpu()[..., :3].clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
        name = f"{prefix}_{i:05}_.png"
        Image.fromarray(pixels).save(target / name, compress_level=4)
        refs.append({"filename": name, "subfolder": subfolder, "type": kind})
    return refs


def strip_words(item: ParsedItem, limit: int = VIEW_MAX_WORDS) -> list[int]:
    """Indices of the words of a parse shown in the token strip: the first ``limit`` that have tokens."""
    return [i for i, p in enumerate(item_word_positions(item)) if p][:max(0, int(limit))]


def _number(x: Any) -> float | None:
    """A float for JSON, None when missing or not finite (JSON has no NaN)."""
    if x is None:
        return None
    value = float(x)
    return value if math.isfinite(value) else None


def token_strip_view(item: ParsedItem, choice: TokenChoice, shown: Sequence[int], thumbs: Sequence[dict],
                     image: int = 0, override: str = "") -> dict[str, Any]:
    """The token strip of one image (JSON): per shown word its text, token positions, thumbnail, whether
    its map is c (root) or the parse's root, and the ``token_override`` value that selects it."""
    words = item.parsed.words
    positions = item_word_positions(item)
    parse_root = _word_at(positions, item.root_position)
    tokens = []
    for i, thumb in zip(shown, thumbs):
        word, start, end = words[i]
        first = next(j for j, (w, _, _) in enumerate(words) if w.lower() == word.lower())
        tokens.append({"word": word, "start": start, "end": end, "positions": list(positions[i]),
                       "position": positions[i][-1], "root": choice.word == i, "parse_root": parse_root == i,
                       "override": word if first == i else str(positions[i][-1]), "thumb": dict(thumb)})
    token = item.tokens[choice.position] if choice.position < len(item.tokens) else ""
    return {"image": int(image), "text": item.parsed.text, "override": str(override or ""),
            "root": {"label": choice.label, "position": choice.position, "token": token, "source": choice.source,
                     "word": choice.word},
            "parse_root": item.parsed.root, "tokens": tokens, "more": len(words) - len(tokens)}


def gallery_order(fused: torch.Tensor, chosen: int = -1, limit: int = VIEW_MAX_PROPOSALS) -> list[int]:
    """Proposals shown in the gallery, best fused score first: the ``limit`` best, the chosen one always
    included (in last place when it ranks lower)."""
    n = int(fused.shape[0])
    shown = [int(j) for j in rank(fused, min(n, max(1, int(limit))))] if n else []
    if 0 <= chosen < n and chosen not in shown:
        shown = shown[:max(0, int(limit) - 1)] + [int(chosen)]
    return shown


def proposal_gallery_view(masks: torch.Tensor, fused: torch.Tensor, generative: torch.Tensor | None,
                          discriminative: torch.Tensor | None, shown: Sequence[int], chosen: int,
                          thumbs: Sequence[dict], image: int = 0, pin_index: int = -1,
                          weights: tuple[float, float] = (1.0, 1.0), source: str = "") -> dict[str, Any]:
    """The proposal gallery of one image (JSON): the shown proposals with their rank by fused score, area,
    s_G, s_D, fused score and thumbnail; which one was chosen and whether it was pinned."""
    n = int(masks.shape[0])
    ranks = {int(j): r + 1 for r, j in enumerate(rank(fused, n))} if n else {}
    areas = masks.flatten(1).sum(dim=1).tolist() if n else []
    items = [{"index": int(j), "rank": ranks[int(j)], "area": int(areas[j]), "fused": _number(fused[j]),
              "generative": _number(generative[j]) if generative is not None else None,
              "discriminative": _number(discriminative[j]) if discriminative is not None else None,
              "chosen": int(j) == int(chosen), "thumb": dict(thumb)}
             for j, thumb in zip(shown, thumbs)]
    return {"image": int(image), "count": n, "source": source, "chosen": int(chosen), "pin_index": int(pin_index),
            "pinned": 0 <= int(pin_index) < n,
            "weights": {"generative": float(weights[0]) if generative is not None else None,
                        "discriminative": float(weights[1]) if discriminative is not None else None},
            "items": items, "more": n - len(items)}


__all__ = ["check_attention_batch", "check_prompt", "split_lines", "texts_for_batch", "find_word", "token_strings", "parse_item", "word_positions",
           "parse_warnings", "parse_summary", "images_to_rgb", "prepared_squares", "frame_geometry",
           "masks_to_output", "heatmap", "overlay", "score_table", "parse_blocks", "VIEW_THUMB_SIDE",
           "VIEW_MAX_IMAGES", "VIEW_MAX_WORDS", "VIEW_MAX_PROPOSALS", "TokenChoice", "overrides_for_batch",
           "item_word_positions", "resolve_token", "thumb_size", "thumb_image", "thumb_masks", "token_thumb_maps",
           "heat_frames", "mask_frames", "save_thumbnails", "strip_words", "token_strip_view", "gallery_order",
           "proposal_gallery_view"]
