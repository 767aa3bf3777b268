"""What the nodes show: heatmap and mask previews, the ranked score table, and the web extension's payloads
(web/js/: the token strip and the proposal gallery, with their thumbnails). No ComfyUI import (tested offline).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from refdiff.errors import InputError
from refdiff.scoring import rank

from .attention_maps import token_generative_map
from .tensors import frame_geometry
from .token_positions import TokenChoice, item_word_positions, word_at
from .wire_types import ParsedItem

# What the nodes send to the pack's web extension (web/js/): small thumbnails, bounded in number.
VIEW_THUMB_SIDE = 96  # longest side of a thumbnail, pixels
VIEW_MAX_IMAGES = 4  # images of a batch shown on a node
VIEW_MAX_WORDS = 32  # words per image in the token strip
VIEW_MAX_PROPOSALS = 32  # proposals per image in the gallery


# ------------------------------------------------------------------------------------------ previews
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
                generative: torch.Tensor | None, discriminative: torch.Tensor | None, header: str,
                base: torch.Tensor | None = None, terms: dict[str, torch.Tensor] | None = None) -> str:
    """Text table of one image's ranked proposals: rank, index, area and each score; with spatial terms the
    fused score before them (``base``) and each term's contribution (``terms``)."""
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
        if base is not None:
            parts.append(f"base {float(base[idx]):+.4f}")
        for name, value in (terms or {}).items():
            parts.append(f"{name} {float(value[idx]):+.4f}")
        if idx == chosen:
            parts.append("<- selected")
        lines.append(", ".join(parts))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ web views
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
    maps = [token_generative_map(combined, p, geometry, mode=mode, layer_eps=layer_eps, map_eps=map_eps)
            for p in positions]
    return torch.stack(maps) if maps else torch.zeros(0, h, w)


def heat_frames(image: torch.Tensor | None, maps: torch.Tensor) -> torch.Tensor:
    """Heatmaps [N, h, w] blended half and half over an RGB image [h, w, 3] (alone when None): [N, h, w, 3]."""
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
    parse_root = word_at(positions, item.root_position)
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
                          weights: tuple[float, float] = (1.0, 1.0), source: str = "",
                          base: torch.Tensor | None = None, terms: dict[str, torch.Tensor] | None = None,
                          spatial: bool = False) -> dict[str, Any]:
    """The proposal gallery of one image (JSON): the shown proposals with their rank by fused score, area,
    s_G, s_D, fused score and thumbnail; which one was chosen and whether it was pinned. With ``spatial``
    (RefDiffSpatial's scores) each item also has ``base`` (the fused score before the terms) and ``terms``
    (each spatial term's contribution), and the view lists the applied terms."""
    n = int(masks.shape[0])
    ranks = {int(j): r + 1 for r, j in enumerate(rank(fused, n))} if n else {}
    areas = masks.flatten(1).sum(dim=1).tolist() if n else []
    items = [{"index": int(j), "rank": ranks[int(j)], "area": int(areas[j]), "fused": _number(fused[j]),
              "generative": _number(generative[j]) if generative is not None else None,
              "discriminative": _number(discriminative[j]) if discriminative is not None else None,
              "chosen": int(j) == int(chosen), "thumb": dict(thumb)}
             for j, thumb in zip(shown, thumbs)]
    if spatial:
        for item in items:
            j = item["index"]
            item["base"] = _number(base[j]) if base is not None else item["fused"]
            item["terms"] = {name: _number(value[j]) for name, value in (terms or {}).items()}
    return {"image": int(image), "count": n, "source": source, "chosen": int(chosen), "pin_index": int(pin_index),
            "pinned": 0 <= int(pin_index) < n,
            "weights": {"generative": float(weights[0]) if generative is not None else None,
                        "discriminative": float(weights[1]) if discriminative is not None else None},
            "items": items, "more": n - len(items),
            **({"spatial": list(terms or {})} if spatial else {})}


__all__ = ["heatmap", "overlay", "score_table", "VIEW_THUMB_SIDE", "VIEW_MAX_IMAGES", "VIEW_MAX_WORDS",
           "VIEW_MAX_PROPOSALS", "thumb_size", "thumb_image", "thumb_masks", "token_thumb_maps", "heat_frames",
           "mask_frames", "save_thumbnails", "strip_words", "token_strip_view", "gallery_order",
           "proposal_gallery_view"]
