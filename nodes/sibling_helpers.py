"""ComfyUI-free parts of the sibling-method nodes (docs/SIBLING_METHODS.md): the attention payload that also
carries self-attention, the factor-weight parser, the DiffSegmenter refinement of every image's map and the
feature-cluster proposals of every image. The nodes in ``sibling_nodes`` only wire these to ComfyUI.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from refdiff.capture import downsampled_grid
from refdiff.clusters import cluster_features, cluster_proposals
from refdiff.errors import InputError
from refdiff.maps import generative_map
from refdiff.refine import fuse_cross_attention, fuse_self_attention, factor_token_maps, refine_with_self_attention
from refdiff.stores import CapturedAffinity

from . import helpers
from .payloads import AttentionBatch, ParsedBatch, ProposalBatch

FACTOR_WEIGHTS_EXAMPLE = "8:0.3,4:0.5,2:0.1,1:0.1"


@dataclass
class InternalsAttentionBatch(AttentionBatch):
    """REFDIFF_ATTENTION as RefDiffCaptureAttention makes it: the cross-attention maps plus what the sibling
    methods need.

    ``layer_factors``: captured cross-attention layer name (without "step{i}/") -> downsampling factor;
    ``unet_factors``: every factor at which the UNet has cross-attention in the captured blocks;
    ``self_attention``: per image, the conditional branch's head-averaged self-attention of every captured
    level (``refdiff.stores.CapturedAffinity``, layers and steps averaged), or None when not captured;
    ``self_max_tokens``: the grid-size limit it was captured with.
    """

    layer_factors: dict[str, int] = field(default_factory=dict)
    unet_factors: tuple[int, ...] = ()
    self_attention: list[list[CapturedAffinity]] | None = None
    self_max_tokens: int = 0

    @property
    def captured_factors(self) -> tuple[int, ...]:
        """The factors of the captured cross-attention layers, ascending."""
        return tuple(sorted(set(self.layer_factors.values())))


# ------------------------------------------------------------------------------------------ factor weights
def parse_factor_weights(text: str, default: Sequence[tuple[int, float]] | Mapping[int, float] | None = None
                         ) -> dict[int, float]:
    """"8:0.3,4:0.5,2:0.1,1:0.1" -> {8: 0.3, 4: 0.5, 2: 0.1, 1: 0.1}; "preset" (or empty) -> ``default``.

    Factors are powers of two >= 1 (the UNet level: latent side / grid side), weights finite and >= 0 with a
    positive sum; pairs are separated by commas, semicolons or spaces. InputError naming the bad entry.
    """
    name = "factor_weights"
    if not isinstance(text, str):
        raise InputError(f"{name} must be a string such as {FACTOR_WEIGHTS_EXAMPLE!r}, got {type(text).__name__}")
    if not text.strip() or text.strip().lower() == "preset":
        if default is None:
            raise InputError(f"{name} is empty; give factor:weight pairs such as {FACTOR_WEIGHTS_EXAMPLE!r}")
        return {int(f): float(w) for f, w in (default.items() if isinstance(default, Mapping) else default)}
    out: dict[int, float] = {}
    for entry in (e for e in re.split(r"[\s,;]+", text.strip()) if e):
        parts = entry.split(":")
        if len(parts) != 2:
            raise InputError(f"{name}: {entry!r} is not a factor:weight pair; write e.g. {FACTOR_WEIGHTS_EXAMPLE!r}")
        try:
            factor, weight = int(parts[0]), float(parts[1])
        except ValueError:
            raise InputError(f"{name}: {entry!r} must be an integer factor and a number, e.g. '4:0.5'") from None
        if factor < 1 or factor & (factor - 1):
            raise InputError(f"{name}: factor {parts[0]} in {entry!r} must be a power of two >= 1 (1, 2, 4, 8, ...: "
                             "latent side / attention grid side)")
        if not math.isfinite(weight) or weight < 0:
            raise InputError(f"{name}: weight {parts[1]} in {entry!r} must be a finite number >= 0")
        if factor in out:
            raise InputError(f"{name}: factor {factor} is given twice")
        out[factor] = weight
    if sum(out.values()) <= 0:
        raise InputError(f"{name}: the weights {out} sum to 0; give at least one positive weight")
    return out


def format_factor_weights(weights: Mapping[int, float]) -> str:
    """{8: 0.3, 4: 0.5} -> "8:0.3,4:0.5" (the widget's spelling)."""
    return ",".join(f"{int(f)}:{float(w):g}" for f, w in weights.items())


# ------------------------------------------------------------------------------------------ refinement
def check_refinable(attention: AttentionBatch, weights: Mapping[int, float]) -> InternalsAttentionBatch:
    """The attention as InternalsAttentionBatch when it holds self-attention and cross-attention at every factor
    the weights need; otherwise InputError saying which capture setting fixes it."""
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
    helpers.check_attention_batch(attention, batch)
    captured = check_refinable(attention, weights)
    items = parse.for_batch(batch, "parse")
    height, width = int(image.shape[1]), int(image.shape[2])
    out = []
    for i, item in enumerate(items):
        helpers.check_prompt(attention.prompts[i], item.prompt, i)
        small = refined_token_map(captured, i, item.root_position, weights, iterations, eps, self_factor)
        out.append(generative_map(small, helpers.frame_geometry(height, width, attention.image_hw[0]), mode=mode,
                                  eps=map_eps))
    return helpers.masks_to_output(out)


# ------------------------------------------------------------------------------------------ clusters
def cluster_image(features: Sequence[torch.Tensor], latent_hw: tuple[int, int], height: int, width: int, *,
                  n_clusters: int = 4, cluster_factor: int = 2, normalize: bool = True, split_components: bool = True,
                  min_area: int = 0, seed: int = 0) -> torch.Tensor:
    """FreeSeg-Diff proposals bool [N, H, W] of one image from its feature maps [C_i, h_i, w_i]: k-means on the
    grid of the square latent downsampled by ``cluster_factor``, clusters mapped to the H x W frame."""
    lh, lw = int(latent_hw[0]), int(latent_hw[1])
    if lh != lw:
        raise InputError(f"latent: {lh}x{lw} is not square; encode the output of RefDiffPrepareImage (the padded "
                         "square) with VAEEncode")
    grid = downsampled_grid((lh, lw), int(cluster_factor))
    if n_clusters > grid[0] * grid[1]:
        raise InputError(f"clusters: {n_clusters} clusters for a {grid[0]}x{grid[1]} grid; lower clusters or "
                         "cluster_factor")
    labels = cluster_features(features, n_clusters=int(n_clusters), grid=grid, seed=int(seed), normalize=normalize)
    prep = helpers.frame_geometry(int(height), int(width), 8 * lh)
    return cluster_proposals(labels, prep, min_area=int(min_area), split_components=split_components).cpu()


def cluster_batch(features: Sequence[Sequence[torch.Tensor]], latent_hw: tuple[int, int], height: int, width: int,
                  **kwargs: object) -> ProposalBatch:
    """cluster_image for every image's features; REFDIFF_PROPOSALS with source "cluster"."""
    return ProposalBatch([cluster_image(f, latent_hw, height, width, **kwargs) for f in features], source="cluster")


__all__ = ["FACTOR_WEIGHTS_EXAMPLE", "InternalsAttentionBatch", "parse_factor_weights", "format_factor_weights",
           "check_refinable", "choose_affinity", "refined_token_map", "refined_maps",
           "cluster_image", "cluster_batch"]
