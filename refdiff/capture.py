"""Cross-attention capture shared by every backend (docs/METHOD.md section 3, Eq. 4).

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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import InputError

CAPTURE_KINDS: tuple[str, ...] = ("probs", "logits")
BLOCKS: tuple[str, ...] = ("down", "mid", "up")
COND, UNCOND = 0, 1
# ComfyUI names the UNet's parts "input", "middle" and "output"; diffusers "down", "mid" and "up".
BLOCK_ALIASES: dict[str, str] = {"down": "down", "input": "down", "mid": "mid", "middle": "mid",
                                 "up": "up", "output": "up"}


def _check_kind(kind: str) -> str:
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
    _check_kind(kind)
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
    _check_kind(kind)
    if kind == "probs" or uncond is None:
        return cond
    if uncond.shape != cond.shape:
        raise InputError(f"uncond maps {tuple(uncond.shape)} and cond maps {tuple(cond.shape)} differ in shape")
    return uncond + guidance_scale * (cond - uncond)


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


def _resize_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[h, w, T] -> [H, W, T] with bilinear interpolation (identity when the grid already matches)."""
    if tuple(x.shape[:2]) == tuple(grid):
        return x
    y = F.interpolate(x.permute(2, 0, 1)[None], size=grid, mode="bilinear", align_corners=False)
    return y[0].permute(1, 2, 0)


@dataclass
class _Record:
    name: str
    block: str
    factor: int
    grid: tuple[int, int]
    chunks: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # label -> [n, h, w, K] pieces

    def stacked(self, label: int) -> torch.Tensor | None:
        pieces = self.chunks.get(label)
        return None if not pieces else torch.cat(pieces, dim=0)


class AttentionStore:
    """Collects head-averaged cross-attention maps of captured layers, per step, on the CPU in float32.

    Each ``add`` splits the batch into its cond/uncond chunks and files them under "step{step}/{name}"; a
    layer seen again in the same step (e.g. cond and uncond run as separate batches) is merged. A chunk
    holding several images keeps a leading image dimension [n, h, w, K]; ``maps(image=i)`` picks one.
    Set ``step`` (or call ``next_step``) between UNet evaluations.
    """

    def __init__(self, kind: str = "logits", device: torch.device | str = "cpu") -> None:
        self.kind = _check_kind(kind)
        self.device = torch.device(device)
        self.step = 0
        self._records: dict[str, _Record] = {}

    def __len__(self) -> int:
        return len(self._records)

    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the captured entries, in capture order."""
        return tuple(self._records)

    def next_step(self) -> None:
        """Advance the step counter used to name entries."""
        self.step += 1

    def clear(self) -> None:
        """Forget every captured map and reset the step counter."""
        self._records.clear()
        self.step = 0

    def add(self, name: str, block: str, factor: int, grid: tuple[int, int], attn: torch.Tensor,
            cond_or_uncond: Sequence[int] | None = None) -> None:
        """Record one layer's head-averaged attention [B, Q, K] (Q = h*w); chunks ordered by cond_or_uncond."""
        h, w = int(grid[0]), int(grid[1])
        if attn.ndim != 3 or attn.shape[1] != h * w:
            raise InputError(f"attention of layer {name} has shape {tuple(attn.shape)}; expected [B, {h * w}, K]"
                             f" for the grid {h}x{w}")
        labels = [COND] if cond_or_uncond is None else [int(c) for c in cond_or_uncond]
        if not labels or any(c not in (COND, UNCOND) for c in labels) or attn.shape[0] % len(labels):
            raise InputError(f"cond_or_uncond {list(labels)} (0 = cond, 1 = uncond) does not split a batch of "
                             f"{attn.shape[0]} into equal chunks")
        n = attn.shape[0] // len(labels)
        chunks = attn.detach().to(device=self.device, dtype=torch.float32).reshape(len(labels), n, h, w, -1)
        key = f"step{self.step}/{name}"
        rec = self._records.get(key)
        if rec is None:
            rec = self._records[key] = _Record(key, normalise_block(block), int(factor), (h, w))
        elif rec.grid != (h, w):
            raise InputError(f"layer {key} was captured with grids {rec.grid} and {(h, w)} in one step")
        for label, chunk in zip(labels, chunks):
            rec.chunks.setdefault(label, []).append(chunk)

    def maps(self, image: int = 0) -> CrossAttentionMaps:
        """Stack the captured entries of one image into CrossAttentionMaps.

        Entries on smaller grids are resized (bilinear) to the largest grid. If only some entries have an
        unconditional branch, the others use their conditional map in its place (so u + g (c - u) = c).
        """
        if not self._records:
            raise InputError("no cross-attention layer was captured: check capture_factor / capture_blocks "
                             "against the UNet and the image size")
        recs = list(self._records.values())
        big = max((r.grid for r in recs), key=lambda g: g[0] * g[1])

        def pick(rec: _Record, label: int) -> torch.Tensor | None:
            x = rec.stacked(label)
            if x is None:
                return None
            if not -x.shape[0] <= image < x.shape[0]:
                raise InputError(f"image {image} is out of range: layer {rec.name} holds {x.shape[0]} image(s)")
            return _resize_grid(x[image], big)

        conds = [pick(r, COND) for r in recs]
        if any(c is None for c in conds):
            missing = [r.name for r, c in zip(recs, conds) if c is None]
            raise InputError(f"layers {missing} have no conditional branch: cond_or_uncond must contain 0")
        unconds = [pick(r, UNCOND) for r in recs]
        uncond = None
        if any(u is not None for u in unconds):
            uncond = torch.stack([c if u is None else u for c, u in zip(conds, unconds)])
        return CrossAttentionMaps(cond=torch.stack(conds), uncond=uncond, layers=tuple(r.name for r in recs),
                                  kind=self.kind)


__all__ = ["CAPTURE_KINDS", "BLOCKS", "attention_output", "head_averaged_attention", "downsampled_grid",
           "query_grid", "normalise_block", "LayerSelector", "CrossAttentionMaps", "combine_guidance",
           "token_map", "all_token_maps", "AttentionStore"]
