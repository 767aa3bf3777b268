"""Generative maps from the joint text-image attention of diffusion transformers (Flux, SD 3 MMDiT).

These models have no cross-attention layer: text and image tokens are concatenated and attend to each other
in one attention per double block. Two readings of it give a map per text token (docs/METHOD.md, "Diffusion
transformers", beyond the paper):

- ``attention``: the image queries' attention probabilities on the text keys (softmax over ALL joint keys,
  heads averaged, the text columns kept): the Ref-Diff analogue of Eq. 4.
- ``concept``: ConceptAttention's output-space map (Helbling et al., ICML 2025): extra concept tokens run
  through the text stream's weights, attend to themselves and to the image tokens (never the reverse, so the
  model's output is unchanged), and the dot product of each image token's attention output with each
  concept's, softmaxed over the concepts, is the map.

Tensors are laid out [B, heads, L, dh] (``to_heads`` converts ComfyUI's and diffusers' [B, L, heads*dh]).
No backend import here: ComfyUI's and diffusers' hooks both call these functions.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import InputError

MAP_KINDS: tuple[str, ...] = ("attention", "concept")
# Concepts that compete with the expression's nouns in the concept map's softmax (ConceptAttention's
# segmentation uses such generic background words beside the target concept).
BACKGROUND_CONCEPTS: tuple[str, ...] = ("background", "floor", "wall", "sky")
DEFAULT_LAST_BLOCKS: int = 4  # the last 4 double blocks (ConceptAttention's segmentation uses Flux's 15-18)
QUERY_CHUNK: int = 1024  # image queries per chunk in joint_text_probs: temporaries of heads * chunk * L floats


def check_map_kind(kind: str) -> str:
    """``kind`` when it is one of MAP_KINDS; InputError otherwise."""
    if kind not in MAP_KINDS:
        raise InputError(f"map_kind must be one of {MAP_KINDS}, got {kind!r}")
    return kind


def to_heads(x: torch.Tensor, heads: int, name: str = "x") -> torch.Tensor:
    """[B, L, heads*dh] -> [B, heads, L, dh]; a [B, heads, L, dh] tensor is returned as is."""
    if x.ndim == 4:
        if x.shape[1] != heads:
            raise InputError(f"{name} has {x.shape[1]} heads, expected {heads}")
        return x
    if x.ndim != 3 or x.shape[-1] % heads:
        raise InputError(f"{name} must be [B, L, heads*dh] or [B, heads, L, dh], got {tuple(x.shape)}")
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, L, dh] -> [B, L, heads*dh]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def text_span(txt_len: int, img_len: int, txt_first: bool = True) -> tuple[slice, slice]:
    """(text slice, image slice) of a joint sequence of txt_len + img_len tokens."""
    if txt_first:
        return slice(0, txt_len), slice(txt_len, txt_len + img_len)
    return slice(img_len, img_len + txt_len), slice(0, img_len)


def joint_text_probs(q: torch.Tensor, k: torch.Tensor, txt_len: int, img_len: int, txt_first: bool = True,
                     mask: torch.Tensor | None = None, chunk: int = QUERY_CHUNK) -> torch.Tensor:
    """Head-averaged attention of the image queries on the text keys [B, img_len, txt_len], fp32.

    q, k: [B, heads, L, dh] of the joint sequence (after RoPE and QK-norm, as the block attends); the softmax
    runs over all L keys as in the model (``mask``: its additive or boolean attention mask, if any), then the
    text columns are kept: each row is the share of an image token's attention that goes to each text token.
    """
    if q.ndim != 4 or k.shape != q.shape[:2] + k.shape[2:] or q.shape[2] != txt_len + img_len:
        raise InputError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, heads, {txt_len + img_len}, dh]")
    t_slice, i_slice = text_span(txt_len, img_len, txt_first)
    scale = q.shape[-1] ** -0.5
    kt = k.float().transpose(-1, -2)
    qi = q[:, :, i_slice]
    out = torch.empty((q.shape[0], img_len, txt_len), dtype=torch.float32, device=q.device)
    for start in range(0, img_len, int(chunk)):
        rows = slice(start, min(start + int(chunk), img_len))
        scores = torch.matmul(qi[:, :, rows].float(), kt) * scale  # [B, heads, c, L]
        if mask is not None:
            m = mask[..., i_slice, :][..., rows, :] if mask.ndim >= 2 and mask.shape[-2] == q.shape[2] else mask
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
        out[:, rows] = scores.softmax(dim=-1)[..., t_slice].mean(dim=1)
    return out


def concept_attention(cq: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, img_k: torch.Tensor,
                      img_v: torch.Tensor) -> torch.Tensor:
    """Attention output of the concept tokens [B, heads, C, dh]: concept queries on the keys [concepts; image]
    (ConceptAttention's concept self- and cross-attention). The image tokens never attend to the concepts."""
    keys = torch.cat((ck, img_k.to(ck.dtype)), dim=2)
    values = torch.cat((cv, img_v.to(cv.dtype)), dim=2)
    return F.scaled_dot_product_attention(cq, keys, values)


def output_space_map(img_out: torch.Tensor, concept_out: torch.Tensor) -> torch.Tensor:
    """ConceptAttention's map [B, N, C]: softmax over the C concepts of the dot products of each image token's
    attention output [B, N, D] with each concept's [B, C, D] (both before the output projection), fp32."""
    if img_out.ndim != 3 or concept_out.ndim != 3 or img_out.shape[-1] != concept_out.shape[-1]:
        raise InputError(f"image outputs {tuple(img_out.shape)} and concept outputs {tuple(concept_out.shape)} "
                         "must be [B, N, D] and [B, C, D]")
    scores = torch.einsum("bnd,bcd->bnc", img_out.float(), concept_out.float())
    return scores.softmax(dim=-1)


def spread_concepts(concept_map: torch.Tensor, positions: Sequence[Sequence[int]], txt_len: int) -> torch.Tensor:
    """[B, N, C] concept maps -> [B, N, txt_len] over the text positions: each position of concept i's word
    (``positions[i]``; empty for a concept not in the text, such as a background word) holds concept i's
    map, every other position 0. So the map of a word's token is its concept's, as the rest of the pipeline
    reads maps by token position."""
    b, n, c = concept_map.shape
    if len(positions) != c:
        raise InputError(f"{len(positions)} position lists for {c} concepts")
    out = concept_map.new_zeros((b, n, int(txt_len)))
    for i, pos in enumerate(positions):
        for p in pos:
            if not 0 <= int(p) < txt_len:
                raise InputError(f"concept {i}: text position {p} is outside the {txt_len} text tokens")
            out[:, :, int(p)] = concept_map[:, :, i]
    return out


def concept_list(root: str, nouns: Sequence[str], background: Sequence[str] = BACKGROUND_CONCEPTS) -> list[str]:
    """The competing concepts of one expression: its root word first, then its other nouns, then the background
    words, each once (case-insensitive)."""
    out: list[str] = []
    for word in [root, *nouns, *background]:
        w = str(word).strip()
        if w and w.lower() not in {o.lower() for o in out}:
            out.append(w)
    if not out:
        raise InputError("concepts: the expression has no root word to make a concept of")
    return out


def last_blocks(depth: int, count: int = DEFAULT_LAST_BLOCKS) -> list[int]:
    """The indices of the last ``count`` of ``depth`` double blocks."""
    if depth < 1 or count < 1:
        raise InputError(f"blocks: need a positive block count, got {count} of {depth}")
    return list(range(max(0, depth - count), depth))


def parse_block_list(text: str, depth: int) -> list[int]:
    """Double-block indices from "last4" (the default form), "all", or a comma list such as "15,16,17,18"
    (negative indices count from the end); InputError naming the valid range otherwise."""
    value = str(text or "").strip().lower().replace(" ", "")
    if not value:
        value = f"last{DEFAULT_LAST_BLOCKS}"
    if value == "all":
        return list(range(depth))
    if value.startswith("last") and value[4:].isdigit():
        return last_blocks(depth, int(value[4:]))
    try:
        picked = [int(p) for p in value.split(",") if p]
    except ValueError:
        raise InputError(f"blocks {text!r}: give 'last4', 'all' or indices such as '15,16,17,18'") from None
    out = sorted({p + depth if p < 0 else p for p in picked})
    if not out or any(not 0 <= p < depth for p in out):
        raise InputError(f"blocks {text!r}: this model has double blocks 0..{depth - 1}")
    return out


__all__ = ["MAP_KINDS", "BACKGROUND_CONCEPTS", "DEFAULT_LAST_BLOCKS", "QUERY_CHUNK", "check_map_kind", "to_heads",
           "merge_heads", "text_span", "joint_text_probs", "concept_attention", "output_space_map",
           "spread_concepts", "concept_list", "last_blocks", "parse_block_list"]
