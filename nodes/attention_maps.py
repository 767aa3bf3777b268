"""The generative map of every image from a REFDIFF_ATTENTION batch: checks that attention, parse and images
belong together, one token's map at an image frame (Eq. 5), and DiffSegmenter's refined map (the
self-attention refine node). No ComfyUI import (tested offline).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from refdiff.capture import token_map
from refdiff.errors import InputError
from refdiff.image import PreparedImage
from refdiff.stores import CapturedAffinity
from refdiff.maps import generative_map
from refdiff.refine import factor_token_maps, fuse_cross_attention, fuse_self_attention, refine_with_self_attention
from refdiff.text import strip_prompt_weights

from .tensors import check_square_latent, frame_geometry, masks_to_output
from .text_inputs import format_factor_weights
from .wire_types import AttentionBatch, InternalsAttentionBatch, JointAttentionBatch, ParsedBatch


def check_attention_batch(attention: Any, batch: int) -> None:
    """InputError unless the captured attention holds one entry per image, on a square (padded) latent."""
    if len(attention) != batch:
        raise InputError(f"attention holds {len(attention)} image(s) but image holds {batch}; connect the images "
                         "the attention was captured from")
    check_square_latent(attention.latent_hw, "attention")


def check_prompt(captured: str | None, parsed_prompt: str, index: int) -> None:
    """InputError when the attention was captured for another text than the one parsed."""
    if captured is None:
        return
    if strip_prompt_weights(captured).lower() != strip_prompt_weights(parsed_prompt).lower():
        raise InputError(f"parse: image {index}'s attention was captured for {captured!r} but the parse is of "
                         f"{parsed_prompt!r}; connect the same text (or the same parse) to both nodes")


def token_generative_map(combined: torch.Tensor, position: int, geometry: PreparedImage, mode: str = "lanczos",
                         layer_eps: float = 1e-8, map_eps: float = 1e-8) -> torch.Tensor:
    """Eq. 5 for one token of combined maps [L, h, w, T]: per-layer min-max and layer mean (token_map), then
    resized to the padded square of ``geometry``, cropped to its frame and min-max normalised."""
    return generative_map(token_map(combined, int(position), eps=layer_eps), geometry, mode=mode, eps=map_eps)


def check_refinable(attention: AttentionBatch, weights: Mapping[int, float]) -> InternalsAttentionBatch:
    """The attention as InternalsAttentionBatch when it holds self-attention and cross-attention at every factor
    the weights need; otherwise InputError saying which capture setting fixes it."""
    if isinstance(attention, JointAttentionBatch):
        raise InputError(f"attention: captured from a {attention.model_family} MODEL's joint attention, which has no "
                         "UNet self-attention to refine with; connect RefDiffGenerativeMap instead, or an SD "
                         "1.x/2.x / SDXL capture")
    if not isinstance(attention, InternalsAttentionBatch) or not attention.self_attention:
        raise InputError("attention: captured without self-attention; turn on self_attention on "
                         "RefDiffCaptureAttention (and set its factor to 0 = all levels)")
    missing = [f for f in attention.unet_factors if f not in attention.captured_factors and weights.get(f, 0.0) > 0]
    if missing:
        raise InputError(f"attention: cross-attention was captured at factor(s) {list(attention.captured_factors)} "
                         f"only, but this UNet also has it at {missing}, which factor_weights weighs; DiffSegmenter "
                         "fuses every level: set factor to 0 (all) on RefDiffCaptureAttention, or give those "
                         "factors weight 0")
    unweighted = [f for f in attention.captured_factors if f not in weights]
    if unweighted:
        raise InputError(f"factor_weights: no weight for the captured factor(s) {unweighted}; add e.g. "
                         f"'{unweighted[0]}:0.1' (have {format_factor_weights(weights)})")
    if sum(weights[f] for f in attention.captured_factors) <= 0:
        raise InputError(f"factor_weights: every captured factor {list(attention.captured_factors)} has weight 0")
    return attention


def choose_affinity(captured: Sequence[CapturedAffinity], self_factor: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
    """The self-attention affinity [Q, Q] to refine with and its grid: level ``self_factor`` (0 = the finest
    captured level, DiffSegmenter's choice), several entries of one level averaged."""
    if not captured:
        raise InputError("attention: no self-attention level was captured for this image")
    have = sorted({c.factor for c in captured})
    factor = have[0] if not self_factor else int(self_factor)
    chosen = [c for c in captured if c.factor == factor]
    if not chosen:
        raise InputError(f"self_factor: self-attention was captured at factor(s) {have}, not {factor}; choose one of "
                         "those (0 = the finest), or raise self_max_tokens on RefDiffCaptureAttention")
    grid = max((c.grid for c in chosen), key=lambda g: g[0] * g[1])
    affinity = fuse_self_attention([c.affinity for c in chosen], target_grid=grid, grids=[c.grid for c in chosen])
    return affinity, grid


def refined_token_map(attention: InternalsAttentionBatch, index: int, token: int, weights: Mapping[int, float],
                      iterations: int = 1, eps: float = 1e-8, self_factor: int = 0) -> torch.Tensor:
    """DiffSegmenter's map [h, w] in [0, 1] of one image's token: cross-attention fused over the captured
    factors (refdiff.refine.fuse_cross_attention), completed with the self-attention (refine_with_self_attention)."""
    maps = attention.maps[index]
    if not 0 <= int(token) < maps.num_tokens:
        raise InputError(f"parse: root token position {token} is beyond the {maps.num_tokens} captured tokens")
    by_factor = factor_token_maps(maps, attention.layer_factors, int(token), attention.guidance_scale, eps)
    score = fuse_cross_attention(by_factor, {f: weights[f] for f in by_factor}, eps)
    affinity, grid = choose_affinity(attention.self_attention[index], self_factor)
    return refine_with_self_attention(score, affinity, int(iterations), affinity_grid=grid, eps=eps)


def refined_maps(attention: AttentionBatch, parse: ParsedBatch, image: torch.Tensor, weights: Mapping[int, float],
                 iterations: int = 1, eps: float = 1e-8, self_factor: int = 0, mode: str = "lanczos",
                 map_eps: float = 1e-8) -> torch.Tensor:
    """The refined generative map of every image as a MASK batch [B, H, W] at the images' size, in [0, 1]:
    refined_token_map of the root token, then resized to the padded square and cropped to the frame (Eq. 5)."""
    if iterations < 0:
        raise InputError(f"iterations must be >= 0, got {iterations}")
    batch = int(image.shape[0])
    check_attention_batch(attention, batch)
    captured = check_refinable(attention, weights)
    items = parse.for_batch(batch, "parse")
    height, width = int(image.shape[1]), int(image.shape[2])
    out = []
    for i, item in enumerate(items):
        check_prompt(attention.prompts[i], item.prompt, i)
        small = refined_token_map(captured, i, item.root_position, weights, iterations, eps, self_factor)
        out.append(generative_map(small, frame_geometry(height, width, attention.image_hw[0]), mode=mode,
                                  eps=map_eps))
    return masks_to_output(out)


__all__ = ["check_attention_batch", "check_prompt", "token_generative_map", "check_refinable", "choose_affinity",
           "refined_token_map", "refined_maps"]
