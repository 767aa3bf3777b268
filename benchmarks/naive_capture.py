"""The naive capture the method's released code used, kept here as a memory baseline only.

Every self-attention (attn1) and cross-attention (attn2) layer of the UNet computes its attention explicitly
in float32: scores = Q K^T * scale for all heads, probs = softmax(scores), out = probs @ V. The per-head
cross-attention probabilities of every attn2 layer are kept (fp32) until the step ends. This is what made the
released code need a 40 GB+ GPU at S = 1024; ``refdiff.capture`` computes the output with fused SDPA and only
the head-averaged maps of the selected layers on the side.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch


class NaiveStore:
    """Per-head fp32 cross-attention probabilities of every attn2 call: [B * heads, Q, 77] each."""

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []

    def nbytes(self) -> int:
        """Bytes held by the kept maps."""
        return sum(m.numel() * m.element_size() for m in self.maps)


class NaiveAttnProcessor:
    """Explicit fp32 attention (classic AttnProcessor math, upcast to float32); keeps cross-attention maps."""

    def __init__(self, store: NaiveStore) -> None:
        self.store = store

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if getattr(attn, "group_norm", None) is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states)).float()
        key = attn.head_to_batch_dim(attn.to_k(context)).float()
        value = attn.head_to_batch_dim(attn.to_v(context)).float()
        scores = torch.bmm(query, key.transpose(1, 2)) * attn.scale  # [B*heads, Q, K] fp32, materialised
        probs = scores.softmax(dim=-1)
        del scores
        if is_cross:
            self.store.maps.append(probs.detach())
        out = torch.bmm(probs, value).to(hidden_states.dtype)
        out = attn.batch_to_head_dim(out)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def attention_modules(unet: Any) -> list[tuple[str, Any]]:
    """(name, module) of every attn1/attn2 Attention module of a diffusers UNet."""
    return [(name, module) for name, module in unet.named_modules()
            if name.endswith("attn1") or name.endswith("attn2")]


@contextmanager
def naive_capture(unet: Any, store: NaiveStore) -> Iterator[int]:
    """Install NaiveAttnProcessor on every attn1/attn2 layer; restore the original processors on exit."""
    modules = attention_modules(unet)
    originals = [(module, module.processor) for _, module in modules]
    try:
        for _, module in modules:
            module.set_processor(NaiveAttnProcessor(store))
        yield len(modules)
    finally:
        for module, processor in originals:
            module.set_processor(processor)


def naive_peak_estimate_bytes(unet: Any, latent_hw: tuple[int, int], batch: int, tokens: int = 77) -> int:
    """A lower bound of the naive capture's extra peak for one UNet call: the largest layer's fp32 scores and
    probabilities (2 x B*heads*Q*K*4 bytes) plus the kept cross-attention maps of every attn2 layer."""
    from refdiff.capture import downsampled_grid
    from refdiff.diffusion import cross_attention_layers

    largest = 0
    kept = 0
    for layer in cross_attention_layers(unet):
        h, w = downsampled_grid(latent_hw, layer.factor)
        heads = int(layer.module.heads)
        queries = h * w
        largest = max(largest, 2 * batch * heads * queries * queries * 4)  # attn1 at this level: K = Q
        kept += batch * heads * queries * tokens * 4
    return largest + kept


__all__ = ["NaiveStore", "NaiveAttnProcessor", "attention_modules", "naive_capture", "naive_peak_estimate_bytes"]
