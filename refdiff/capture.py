"""Capture math shared by every backend (docs/METHOD.md section 3, Eq. 4): attention output and head-averaged
maps, layer selection by downsampling factor, the cost of self-attention capture, and the aggregation of
captured cross-attention into token maps. The stores the hooks fill are in ``stores.py``.

The attention output of a captured layer is computed with PyTorch's fused SDPA, exactly as the default
processors do; the head-averaged map a = mean_heads softmax(Q K^T / sqrt(d)) (or its pre-softmax logits) is
computed on the side in fp32, chunked over queries to bound memory. Layers that are not captured keep their
own (fast) attention path.

All functions take projected tensors laid out as ``[B, N, heads * dh]``: what a diffusers ``Attention``
module produces with ``to_q``/``to_k``/``to_v`` and what ComfyUI's attn2 replace hook receives.

Batch chunks follow ComfyUI's ``cond_or_uncond`` convention: label 0 is the conditional branch, label 1 the
unconditional one, and the batch holds ``len(cond_or_uncond)`` equal chunks in that order. A diffusers
classifier-free-guidance batch ``[uncond, cond]`` is therefore ``[1, 0]``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import InputError
from .schedule import classifier_free_guidance

CAPTURE_KINDS: tuple[str, ...] = ("probs", "logits")
BLOCKS: tuple[str, ...] = ("down", "mid", "up")
COND, UNCOND = 0, 1
SELF_ATTENTION_MAX_TOKENS: int = 4096  # 64 x 64: the finest self-attention grid captured by default
SELF_ATTENTION_CHUNK: int = 1024  # queries per chunk: temporaries of heads * chunk * Q floats
_LEVELS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
# ComfyUI names the UNet's parts "input", "middle" and "output"; diffusers "down", "mid" and "up".
BLOCK_ALIASES: dict[str, str] = {"down": "down", "input": "down", "mid": "mid", "middle": "mid",
                                 "up": "up", "output": "up"}


def check_kind(kind: str) -> str:
    """``kind`` when it is a capture kind ("probs" or "logits"); InputError otherwise."""
    if kind not in CAPTURE_KINDS:
        raise InputError(f"capture_kind must be one of {CAPTURE_KINDS}, got {kind!r}")
    return kind


def _split_heads(x: torch.Tensor, heads: int, name: str) -> torch.Tensor:
    """[B, N, heads*dh] -> [B, heads, N, dh] (a view when possible)."""
    if x.ndim != 3:
        raise InputError(f"{name} must have shape [B, N, heads*dh], got {tuple(x.shape)}")
    b, n, c = x.shape
    if heads < 1 or c % heads:
        raise InputError(f"{name} has {c} channels, not divisible by heads={heads}")
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def attention_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                     attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention output [B, Q, heads*dh] (before to_out) with fused SDPA.

    Same computation as diffusers' AttnProcessor2_0 and ComfyUI's attention, so capturing changes nothing.
    """
    qh, kh, vh = _split_heads(q, heads, "q"), _split_heads(k, heads, "k"), _split_heads(v, heads, "v")
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, dropout_p=0.0, is_causal=False)
    b, _, n, dh = out.shape
    return out.transpose(1, 2).reshape(b, n, heads * dh).to(q.dtype)


def head_averaged_attention(q: torch.Tensor, k: torch.Tensor, heads: int, kind: str = "probs",
                            scale: float | None = None, chunk: int = 4096) -> torch.Tensor:
    """Head-averaged cross-attention [B, Q, K] in fp32: softmax(QK^T*scale) ("probs") or QK^T*scale ("logits").

    scale defaults to 1/sqrt(dh) as SDPA uses it; queries are processed ``chunk`` at a time.
    """
    check_kind(kind)
    if chunk < 1:
        raise InputError(f"chunk must be a positive number of queries, got {chunk}")
    qh, kh = _split_heads(q, heads, "q"), _split_heads(k, heads, "k")
    scale = qh.shape[-1] ** -0.5 if scale is None else float(scale)
    kt = kh.float().transpose(-1, -2)  # [B, heads, dh, K]
    b, _, n, _ = qh.shape
    out = torch.empty((max(b, kt.shape[0]), n, kt.shape[-1]), dtype=torch.float32, device=q.device)
    for start in range(0, n, chunk):
        scores = torch.matmul(qh[:, :, start:start + chunk].float(), kt) * scale  # [B, heads, c, K]
        if kind == "probs":
            scores = scores.softmax(dim=-1)
        out[:, start:start + chunk] = scores.mean(dim=1)
    return out


def downsampled_grid(latent_hw: tuple[int, int], factor: int) -> tuple[int, int]:
    """Grid of a UNet level ``factor`` = 2**k below the latent: each stride-2 step rounds up, as SD's convs do."""
    if factor < 1 or factor & (factor - 1):
        raise InputError(f"downsampling factor must be a power of two >= 1, got {factor}")
    h, w = int(latent_hw[0]), int(latent_hw[1])
    for _ in range(int(math.log2(factor))):
        h, w = -(-h // 2), -(-w // 2)
    return h, w


def query_grid(num_queries: int, latent_hw: tuple[int, int] | None = None) -> tuple[tuple[int, int], int]:
    """Find the query grid (h, w) and downsampling factor of a layer with ``num_queries`` queries.

    With ``latent_hw`` the factor is the power of two whose grid has that many cells; without it the grid
    must be square.
    """
    if latent_hw is None:
        side = math.isqrt(num_queries)
        if side * side != num_queries:
            raise InputError(f"cannot infer the query grid of {num_queries} queries without the latent size")
        return (side, side), 1
    factor = 1
    while True:
        grid = downsampled_grid(latent_hw, factor)
        if grid[0] * grid[1] == num_queries:
            return grid, factor
        if grid == (1, 1) or grid[0] * grid[1] < num_queries:
            raise InputError(f"{num_queries} queries match no downsampling of the latent {tuple(latent_hw)}")
        factor *= 2


def self_attention_bytes(grid: int | tuple[int, int], element_size: int = 4, layers: int = 1,
                         chunks: int = 1) -> int:
    """Bytes one captured self-attention map needs: Q^2 * element_size per layer and CFG chunk (Q = h * w).

    ``layers`` and ``chunks`` multiply it (a store keeps one [Q, Q] map per layer, or per level when layers are
    merged, and per kept CFG chunk; steps are summed in place and cost nothing more).
    """
    h, w = (int(grid), int(grid)) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    if h < 1 or w < 1 or element_size < 1 or layers < 0 or chunks < 0:
        raise InputError(f"self_attention_bytes: grid {grid!r}, element_size {element_size}, layers {layers} and "
                         f"chunks {chunks} must be positive")
    q = h * w
    return q * q * int(element_size) * int(layers) * int(chunks)


def finest_self_attention_factor(latent_hw: tuple[int, int], max_tokens: int = SELF_ATTENTION_MAX_TOKENS,
                                 levels: Sequence[int] = _LEVELS) -> int:
    """The smallest downsampling factor whose query grid has at most ``max_tokens`` tokens.

    At S = 512 (latent 64 x 64) with the default 4096 this is 1; at S = 1024 (latent 128 x 128) it is 2.
    """
    for factor in sorted(int(f) for f in levels):
        h, w = downsampled_grid(latent_hw, factor)
        if h * w <= max_tokens:
            return factor
    raise InputError(f"no UNet level of the latent {tuple(latent_hw)} has at most max_tokens={max_tokens} tokens; "
                     f"raise max_tokens")


def normalise_block(block: str) -> str:
    """Map a block name (diffusers "down"/"mid"/"up" or ComfyUI "input"/"middle"/"output") to down/mid/up."""
    key = str(block).strip().lower()
    if key not in BLOCK_ALIASES:
        raise InputError(f"unknown UNet block {block!r}; use one of {BLOCKS} (or input/middle/output)")
    return BLOCK_ALIASES[key]


@dataclass(frozen=True)
class LayerSelector:
    """Which cross-attention layers to capture: by downsampling factor (latent side / query grid side) and block.

    ``factor=None`` selects every factor. Block names are normalised to down/mid/up.
    """

    factor: int | None = 4
    blocks: tuple[str, ...] = BLOCKS

    def __post_init__(self) -> None:
        if self.factor is not None and (int(self.factor) < 1 or int(self.factor) & (int(self.factor) - 1)):
            raise InputError(f"capture_factor must be a power of two >= 1 (e.g. 4), got {self.factor}")
        if isinstance(self.blocks, str):
            raise InputError(f"capture_blocks must be a tuple of block names, got the string {self.blocks!r}")
        blocks = tuple(dict.fromkeys(normalise_block(b) for b in self.blocks))
        if not blocks:
            raise InputError(f"capture_blocks is empty; choose some of {BLOCKS}")
        object.__setattr__(self, "blocks", blocks)

    def wants(self, block: str, factor: int) -> bool:
        """True when a layer in ``block`` at downsampling ``factor`` is to be captured."""
        return normalise_block(block) in self.blocks and (self.factor is None or int(factor) == int(self.factor))


@dataclass
class CrossAttentionMaps:
    """Captured head-averaged cross-attention, one entry per layer and step.

    cond / uncond: [L, h, w, T] float32 (T = 77 * prompt chunks); layers: "step{i}/{layer name}" per entry;
    kind: "probs" or "logits". uncond is None when no unconditional branch was captured.
    """

    cond: torch.Tensor
    uncond: torch.Tensor | None
    layers: tuple[str, ...]
    kind: str

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the maps."""
        return int(self.cond.shape[1]), int(self.cond.shape[2])

    @property
    def num_tokens(self) -> int:
        """T: the length of the text sequence."""
        return int(self.cond.shape[-1])

    def combined(self, guidance_scale: float = 9.0) -> torch.Tensor:
        """[L, h, w, T]: probs -> the conditional maps (paper); logits -> u + g (c - u) (released code)."""
        return combine_guidance(self.cond, self.uncond, self.kind, guidance_scale)


def combine_guidance(cond: torch.Tensor, uncond: torch.Tensor | None, kind: str,
                     guidance_scale: float = 9.0) -> torch.Tensor:
    """Guidance combination of captured maps: u + g (c - u) for logits with an uncond branch, else cond."""
    check_kind(kind)
    if kind == "probs" or uncond is None:
        return cond
    if uncond.shape != cond.shape:
        raise InputError(f"uncond maps {tuple(uncond.shape)} and cond maps {tuple(cond.shape)} differ in shape")
    return classifier_free_guidance(uncond, cond, guidance_scale)


def _check_maps(maps: torch.Tensor) -> None:
    if maps.ndim != 4:
        raise InputError(f"maps must have shape [L, h, w, T], got {tuple(maps.shape)}")
    if maps.shape[0] == 0:
        raise InputError("maps hold no layer: no cross-attention layer was captured")


def _minmax_layers(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Min-max normalise each [.., h, w] map over its spatial dims (dims 1 and 2 of [L, h, w, ...])."""
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    return (x - lo) / (hi - lo + eps)


def token_map(maps: torch.Tensor, tokens: int | Sequence[int], eps: float = 1e-8) -> torch.Tensor:
    """[h, w] map of token(s) (mean over several): each layer min-max normalised (eps), then layers averaged."""
    _check_maps(maps)
    idx = [int(tokens)] if isinstance(tokens, int) else [int(t) for t in tokens]
    num = maps.shape[-1]
    if not idx or any(not 0 <= t < num for t in idx):
        raise InputError(f"token positions {idx} must be non-empty and within 0..{num - 1} of the text sequence")
    x = maps[..., idx].float().mean(dim=-1)  # [L, h, w]
    return _minmax_layers(x, eps).mean(dim=0)


def all_token_maps(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """[T, h, w]: token_map of every token at once (per-layer min-max, then mean over layers)."""
    _check_maps(maps)
    return _minmax_layers(maps.float(), eps).mean(dim=0).permute(2, 0, 1).contiguous()


__all__ = ["CAPTURE_KINDS", "BLOCKS", "COND", "UNCOND", "SELF_ATTENTION_MAX_TOKENS", "SELF_ATTENTION_CHUNK",
           "check_kind", "attention_output", "head_averaged_attention", "downsampled_grid", "query_grid",
           "self_attention_bytes", "finest_self_attention_factor", "normalise_block", "LayerSelector",
           "CrossAttentionMaps", "combine_guidance", "token_map", "all_token_maps"]
