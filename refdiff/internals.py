"""Capture of UNet internals beyond cross-attention: head-averaged SELF-attention (attn1) and block features.

Same rule as the cross-attention capture (docs/METHOD.md section 3): capture only what is asked, and never change
what the UNet computes. Both context managers work with forward hooks only: a forward pre-hook on each
attn1 module recomputes its query/key projections on the side (the module's own processor is left in place,
so its output is bit-identical whatever processor is installed, and it composes with
``diffusion.capture_processors`` on attn2), and forward hooks on the named blocks copy their outputs. Every
hook is removed on exit.

Self-attention is O(Q^2) per layer: a 64 x 64 grid (Q = 4096) costs 64 MiB per captured layer and CFG chunk
in float32, a 128 x 128 grid (the finest level at S = 1024) 1 GiB. Layers whose query grid has more than
``max_tokens`` tokens are therefore skipped, and probabilities are computed ``chunk`` queries at a time, so
[heads, Q, Q] is never materialised.

Batch chunks follow ``capture.py``'s convention: label 0 (COND) is the conditional branch, 1 (UNCOND) the
unconditional one; a diffusers CFG batch [uncond, cond] is ``cond_or_uncond=[1, 0]``.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .capture import BLOCKS, COND, UNCOND, LayerSelector, downsampled_grid, head_averaged_attention, query_grid
from .errors import InputError

SELF_ATTENTION_MAX_TOKENS: int = 4096  # 64 x 64: the finest grid captured by default
SELF_ATTENTION_CHUNK: int = 1024  # queries per chunk: temporaries of heads * chunk * Q floats
DEFAULT_FEATURE_BLOCKS: tuple[str, ...] = ("up_blocks.1", "up_blocks.2")
_LEVELS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


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


@dataclass(frozen=True)
class SelfAttentionLayer:
    """One self-attention (attn1) module of a UNet with its dotted name and block (down/mid/up)."""

    name: str
    block: str
    module: Any  # diffusers Attention


def _block_of(name: str) -> str:
    head = name.split(".", 1)[0]
    return {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(head, "")


def self_attention_layers(unet: Any) -> list[SelfAttentionLayer]:
    """Every attn1 module of a diffusers UNet's transformer blocks, in forward order (down, mid, up)."""
    order = {"down": 0, "mid": 1, "up": 2}
    found = [SelfAttentionLayer(name, _block_of(name), module) for name, module in unet.named_modules()
             if name.endswith(".attn1") and _block_of(name)]
    return sorted(found, key=lambda layer: order[layer.block])  # stable: keeps the order inside a block


@dataclass
class _Sum:
    """Running sum over steps of one captured tensor [n, ...] and the number of steps added."""

    total: torch.Tensor
    count: int = 1


@dataclass
class _Entry:
    name: str
    factor: int
    grid: tuple[int, int]
    layers: list[str] = field(default_factory=list)
    sums: dict[int, _Sum] = field(default_factory=dict)  # label -> running sum


@dataclass(frozen=True)
class CapturedAffinity:
    """A head-averaged self-attention map [Q, Q] (rows: queries, row-stochastic), mean over steps.

    name: the layer's dotted name, or "level{factor}" when layers were merged; layers: the layers averaged
    into it; grid: (h, w) of both axes (Q = h * w, row-major).
    """

    name: str
    factor: int
    grid: tuple[int, int]
    layers: tuple[str, ...]
    affinity: torch.Tensor


@dataclass(frozen=True)
class CapturedFeature:
    """A block's output feature map [C, h, w], mean over steps."""

    name: str
    grid: tuple[int, int]
    features: torch.Tensor


class _Store:
    """Shared bookkeeping: running sums per (entry, CFG label) kept on ``device`` in ``dtype``."""

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the captured entries, in capture order."""
        return tuple(self._entries)

    def clear(self) -> None:
        """Forget everything captured."""
        self._entries.clear()

    def _add(self, key: str, layer: str, factor: int, grid: tuple[int, int], value: torch.Tensor,
             label: int) -> None:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(key, int(factor), (int(grid[0]), int(grid[1])))
        elif entry.grid != tuple(grid):
            raise InputError(f"{key} was captured on grids {entry.grid} and {tuple(grid)}: use one image size per "
                             f"store (clear it between images)")
        if layer not in entry.layers:
            entry.layers.append(layer)
        value = value.detach().to(device=self.device, dtype=self.dtype)
        current = entry.sums.get(label)
        if current is None:
            entry.sums[label] = _Sum(value.clone())
        elif current.total.shape != value.shape:
            raise InputError(f"{key} was captured with shapes {tuple(current.total.shape)} and {tuple(value.shape)}")
        else:
            current.total += value
            current.count += 1

    def _mean(self, entry: _Entry, label: int, image: int) -> torch.Tensor:
        s = entry.sums.get(label)
        if s is None:
            raise InputError(f"{entry.name} holds no {'conditional' if label == COND else 'unconditional'} branch "
                             f"(labels captured: {sorted(entry.sums)}); keep that branch when capturing")
        if not -s.total.shape[0] <= image < s.total.shape[0]:
            raise InputError(f"image {image} is out of range: {entry.name} holds {s.total.shape[0]} image(s)")
        return s.total[image] / s.count


class SelfAttentionStore(_Store):
    """Head-averaged self-attention probabilities of the captured attn1 layers, summed over steps.

    One [n, Q, Q] running sum per entry (a layer, or a level when ``per_layer`` is False) and kept CFG label.
    """

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 per_layer: bool = True) -> None:
        super().__init__(device, dtype)
        self.per_layer = bool(per_layer)

    def add(self, name: str, factor: int, grid: tuple[int, int], probs: torch.Tensor, label: int = COND) -> None:
        """Add one layer's head-averaged probabilities [n, Q, Q] (n images) of one CFG branch."""
        q = int(grid[0]) * int(grid[1])
        if probs.ndim != 3 or probs.shape[1] != q or probs.shape[2] != q:
            raise InputError(f"self-attention of {name} has shape {tuple(probs.shape)}; expected [n, {q}, {q}] "
                             f"for the grid {tuple(grid)}")
        key = name if self.per_layer else f"level{int(factor)}"
        self._add(key, name, factor, grid, probs, int(label))

    def affinities(self, label: int = COND, image: int = 0, factor: int | None = None) -> list[CapturedAffinity]:
        """The captured maps of one image and branch, mean over steps (and over layers of a merged level)."""
        out = []
        for entry in self._entries.values():
            if factor is not None and entry.factor != int(factor):
                continue
            mean = self._mean(entry, label, image)  # a merged level's count runs over its layers and steps
            out.append(CapturedAffinity(entry.name, entry.factor, entry.grid, tuple(entry.layers), mean))
        if not out:
            raise InputError(f"no self-attention layer was captured{'' if factor is None else f' at factor {factor}'}:"
                             f" check max_tokens / factor / blocks against the UNet and the image size")
        return out


class FeatureStore(_Store):
    """Output features of the captured blocks, [n, C, h, w] per block and kept CFG label, summed over steps."""

    def add(self, name: str, grid: tuple[int, int], features: torch.Tensor, label: int = COND) -> None:
        """Add one block's output features [n, C, h, w] of one CFG branch."""
        if features.ndim != 4 or tuple(features.shape[-2:]) != tuple(grid):
            raise InputError(f"features of {name} have shape {tuple(features.shape)}; expected [n, C, {grid[0]}, "
                             f"{grid[1]}]")
        self._add(name, name, 0, grid, features, int(label))

    def features(self, label: int = COND, image: int = 0) -> list[CapturedFeature]:
        """The captured feature maps [C, h, w] of one image and branch, in capture order, mean over steps."""
        if not self._entries:
            raise InputError("no block features were captured: check the block names and that the UNet ran")
        return [CapturedFeature(e.name, e.grid, self._mean(e, label, image)) for e in self._entries.values()]

    def tensors(self, label: int = COND, image: int = 0) -> list[torch.Tensor]:
        """Just the [C, h, w] tensors of ``features``."""
        return [f.features for f in self.features(label, image)]


def _chunk_labels(cond_or_uncond: Sequence[int] | None, keep: Sequence[int]) -> tuple[list[int], list[int]]:
    labels = [COND] if cond_or_uncond is None else [int(c) for c in cond_or_uncond]
    if not labels or any(c not in (COND, UNCOND) for c in labels):
        raise InputError(f"cond_or_uncond must list 0 (cond) / 1 (uncond) per batch chunk, got {cond_or_uncond!r}")
    keep = [int(k) for k in keep]
    if not keep or any(k not in (COND, UNCOND) for k in keep):
        raise InputError(f"keep must list the branches to store, 0 (cond) and/or 1 (uncond); got {keep!r}")
    return labels, keep


def _kept_chunks(x: torch.Tensor, labels: list[int], keep: list[int]) -> list[tuple[int, torch.Tensor]]:
    """Split a batch [B, ...] into its len(labels) equal chunks and return (label, chunk) for kept labels."""
    if x.shape[0] % len(labels):
        raise InputError(f"cond_or_uncond {labels} does not split a batch of {x.shape[0]} into equal chunks")
    chunks = x.reshape(len(labels), x.shape[0] // len(labels), *x.shape[1:])
    return [(label, chunks[i]) for i, label in enumerate(labels) if label in keep]


def _head_norm(norm: Any, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention.norm_q / norm_k on head views of [B, N, heads*dh], as diffusers applies them."""
    if norm is None:
        return x
    b, n, c = x.shape
    return norm(x.view(b, n, heads, c // heads).transpose(1, 2)).transpose(1, 2).reshape(b, n, c)


def _latent_hook(unet: Any, latent_hw: dict[str, tuple[int, int]]) -> Any:
    def remember(_module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample")
        if isinstance(sample, torch.Tensor) and sample.ndim == 4:
            latent_hw["hw"] = (int(sample.shape[-2]), int(sample.shape[-1]))

    return unet.register_forward_pre_hook(remember, with_kwargs=True)


def _grid_of(num_tokens: int, latent_hw: dict[str, tuple[int, int]]) -> tuple[tuple[int, int], int]:
    return query_grid(num_tokens, latent_hw.get("hw"))


@contextmanager
def capture_self_attention(unet: Any, max_tokens: int = SELF_ATTENTION_MAX_TOKENS, factor: int | None = None,
                           blocks: Sequence[str] = BLOCKS, cond_or_uncond: Sequence[int] | None = None,
                           keep: Sequence[int] = (COND,), device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32, chunk: int = SELF_ATTENTION_CHUNK,
                           per_layer: bool = True) -> Iterator[SelfAttentionStore]:
    """Record head-averaged self-attention probabilities of a diffusers UNet's attn1 layers while inside.

    Only layers with at most ``max_tokens`` queries, at downsampling ``factor`` (None: any) and in ``blocks``
    are captured, and only the CFG branches in ``keep``. Probabilities are fp32, computed ``chunk`` queries at
    a time on the UNet's device, then stored on ``device`` in ``dtype`` (summed over steps; per layer, or
    merged per level with ``per_layer=False``). The UNet's output is unchanged; hooks are removed on exit.
    """
    if max_tokens < 1 or chunk < 1:
        raise InputError(f"max_tokens ({max_tokens}) and chunk ({chunk}) must be positive")
    selector = LayerSelector(factor, tuple(blocks))
    labels, kept = _chunk_labels(cond_or_uncond, keep)
    layers = self_attention_layers(unet)
    if not layers:
        raise InputError("this UNet has no self-attention (attn1) layer in its down/mid/up blocks")
    store = SelfAttentionStore(device=device, dtype=dtype, per_layer=per_layer)
    latent_hw: dict[str, tuple[int, int]] = {}

    def make_hook(layer: SelfAttentionLayer) -> Any:
        def hook(attn: Any, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if kwargs.get("encoder_hidden_states") is not None or (len(args) > 1 and args[1] is not None):
                return  # attn1 used as cross-attention (only_cross_attention models): not self-attention
            if not isinstance(hidden, torch.Tensor):
                return
            if hidden.ndim == 4:
                hidden = hidden.flatten(2).transpose(1, 2)
            num = int(hidden.shape[1])
            if num > max_tokens:
                return
            grid, fac = _grid_of(num, latent_hw)
            if not selector.wants(layer.block, fac):
                return
            if kwargs.get("attention_mask") is not None or getattr(attn, "spatial_norm", None) is not None:
                raise InputError(f"{layer.name}: self-attention capture does not support attention masks or spatial "
                                 f"norms; leave this layer out (factor / blocks)")
            with torch.no_grad():
                x = hidden
                if getattr(attn, "group_norm", None) is not None:
                    x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
                for label, part in _kept_chunks(x, labels, kept):
                    q = _head_norm(getattr(attn, "norm_q", None), attn.to_q(part), attn.heads)
                    k = _head_norm(getattr(attn, "norm_k", None), attn.to_k(part), attn.heads)
                    probs = head_averaged_attention(q, k, attn.heads, kind="probs", chunk=chunk)
                    store.add(layer.name, fac, grid, probs, label)

        return hook

    handles = [_latent_hook(unet, latent_hw)]
    try:
        for layer in layers:
            handles.append(layer.module.register_forward_pre_hook(make_hook(layer), with_kwargs=True))
        yield store
    finally:
        for handle in reversed(handles):
            handle.remove()


def resolve_modules(unet: Any, names: Sequence[str]) -> list[tuple[str, Any]]:
    """(name, module) for dotted module names of the UNet (e.g. "up_blocks.1"); unknown names raise InputError."""
    if isinstance(names, str):
        raise InputError(f"blocks must be a sequence of module names, got the string {names!r}")
    modules = dict(unet.named_modules())
    missing = [n for n in names if not n or n not in modules]
    if missing:
        blocks = [n for n in modules if re.fullmatch(r"(down_blocks|up_blocks)\.\d+|mid_block", n)]
        raise InputError(f"unknown UNet module(s) {missing}; this UNet's blocks are {blocks}")
    if not names:
        raise InputError("blocks is empty: name at least one UNet module (e.g. 'up_blocks.1')")
    return [(n, modules[n]) for n in dict.fromkeys(names)]


def _as_feature_map(output: Any, latent_hw: dict[str, tuple[int, int]], name: str) -> torch.Tensor:
    """A module output as [B, C, h, w]: first element of a tuple; token layouts [B, N, C] put on their grid."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if hasattr(output, "sample") and not isinstance(output, torch.Tensor):
        output = output.sample
    if not isinstance(output, torch.Tensor):
        raise InputError(f"{name} returned {type(output).__name__}, not a tensor: choose another module")
    if output.ndim == 4:
        return output
    if output.ndim == 3:
        (h, w), _ = _grid_of(int(output.shape[1]), latent_hw)
        return output.transpose(1, 2).reshape(output.shape[0], output.shape[2], h, w)
    raise InputError(f"{name} returned a tensor of shape {tuple(output.shape)}; expected [B, C, h, w] or [B, N, C]")


@contextmanager
def capture_block_features(unet: Any, blocks: Sequence[str] = DEFAULT_FEATURE_BLOCKS,
                           cond_or_uncond: Sequence[int] | None = None, keep: Sequence[int] = (COND,),
                           device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32) -> Iterator[FeatureStore]:
    """Record the outputs of named UNet modules (default up_blocks.1 and up_blocks.2) while inside.

    Any dotted module name works: a block returns [B, C, h, w] (down blocks: their first output), a token
    layout [B, N, C] (e.g. "...attn2.to_q") is put back on its grid. Kept CFG branches only; stored on
    ``device`` in ``dtype``, summed over steps. The UNet's output is unchanged; hooks are removed on exit.
    """
    chosen = resolve_modules(unet, blocks)
    labels, kept = _chunk_labels(cond_or_uncond, keep)
    store = FeatureStore(device=device, dtype=dtype)
    latent_hw: dict[str, tuple[int, int]] = {}

    def make_hook(name: str) -> Any:
        def hook(_module: Any, _args: tuple, output: Any) -> None:
            with torch.no_grad():
                fmap = _as_feature_map(output, latent_hw, name)
                for label, part in _kept_chunks(fmap, labels, kept):
                    store.add(name, (int(fmap.shape[-2]), int(fmap.shape[-1])), part, label)

        return hook

    handles = [_latent_hook(unet, latent_hw)]
    try:
        for name, module in chosen:
            handles.append(module.register_forward_hook(make_hook(name)))
        yield store
    finally:
        for handle in reversed(handles):
            handle.remove()


__all__ = ["SELF_ATTENTION_MAX_TOKENS", "SELF_ATTENTION_CHUNK", "DEFAULT_FEATURE_BLOCKS", "self_attention_bytes",
           "finest_self_attention_factor", "SelfAttentionLayer", "self_attention_layers", "CapturedAffinity",
           "CapturedFeature", "SelfAttentionStore", "FeatureStore", "capture_self_attention", "resolve_modules",
           "capture_block_features"]
