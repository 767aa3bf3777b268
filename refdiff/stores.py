"""Stores of what the capture hooks record, for every backend: cross-attention maps (``AttentionStore``),
self-attention probabilities (``SelfAttentionStore``) and block features (``FeatureStore``).

Hooks hand a store a batch and its ``cond_or_uncond`` labels (``capture.py``'s convention: 0 = conditional,
1 = unconditional, one equal chunk per label); ``split_branches`` cuts the batch into its chunks. All stores
share one bookkeeping: entries by name, per CFG label, on ``device`` in ``dtype``, one query grid per entry.
The cross-attention store keeps every step apart ("step{i}/{layer}") and concatenates pieces of one entry
(e.g. images run as separate batches); the self-attention and feature stores sum over steps and return means.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .capture import COND, UNCOND, CrossAttentionMaps, check_kind, normalise_block
from .errors import InputError

BRANCHES: tuple[int, ...] = (COND, UNCOND)


def check_branches(cond_or_uncond: Sequence[int] | None, keep: Sequence[int] = BRANCHES
                   ) -> tuple[list[int], list[int]]:
    """(labels, kept): the label of each batch chunk (None: one conditional chunk) and the branches to keep,
    both checked (0 = cond, 1 = uncond)."""
    labels = [COND] if cond_or_uncond is None else [int(c) for c in cond_or_uncond]
    if not labels or any(c not in BRANCHES for c in labels):
        raise InputError(f"cond_or_uncond must list 0 (cond) / 1 (uncond) per batch chunk, got {cond_or_uncond!r}")
    kept = [int(k) for k in keep]
    if not kept or any(k not in BRANCHES for k in kept):
        raise InputError(f"keep must list the branches to store, 0 (cond) and/or 1 (uncond); got {list(keep)!r}")
    return labels, kept


def split_branches(x: torch.Tensor, cond_or_uncond: Sequence[int] | None = None,
                   keep: Sequence[int] = BRANCHES) -> list[tuple[int, torch.Tensor]]:
    """(label, chunk [n, ...]) for the CFG chunks of a batch [B, ...] whose label is in ``keep``, in batch order."""
    labels, kept = check_branches(cond_or_uncond, keep)
    if x.shape[0] % len(labels):
        raise InputError(f"cond_or_uncond {labels} (0 = cond, 1 = uncond) does not split a batch of {x.shape[0]} "
                         "into equal chunks")
    n = x.shape[0] // len(labels)
    return [(label, x[i * n:(i + 1) * n]) for i, label in enumerate(labels) if label in kept]


@dataclass
class _Entry:
    """One stored entry: its grid, the layers filed under it, and per CFG label its pieces (one running sum in
    a summing store) and the number of additions."""

    name: str
    factor: int
    grid: tuple[int, int]
    block: str = ""
    layers: list[str] = field(default_factory=list)
    parts: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)


class _Store:
    """Shared bookkeeping of the stores: entries by name, per CFG label, kept on ``device`` in ``dtype``.

    ``summing``: each addition is added to a running sum (``_value`` gives the mean); otherwise pieces are
    kept and concatenated along their leading (image) dimension."""

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 summing: bool = True) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self._summing = bool(summing)
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

    def _add(self, key: str, layer: str, factor: int, grid: tuple[int, int], value: torch.Tensor, label: int,
             block: str = "") -> None:
        grid = (int(grid[0]), int(grid[1]))
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(key, int(factor), grid, block)
        elif entry.grid != grid:
            raise InputError(f"{key} was captured on grids {entry.grid} and {grid}: use one image size per store "
                             "(clear it between images)")
        if layer not in entry.layers:
            entry.layers.append(layer)
        value = value.detach().to(device=self.device, dtype=self.dtype)
        parts = entry.parts.get(label)
        if parts is None:
            entry.parts[label] = [value.clone() if self._summing else value]
        elif not self._summing:
            parts.append(value)
        elif parts[0].shape != value.shape:
            raise InputError(f"{key} was captured with shapes {tuple(parts[0].shape)} and {tuple(value.shape)}")
        else:
            parts[0] += value
        entry.counts[label] = entry.counts.get(label, 0) + 1

    def _value(self, entry: _Entry, label: int, image: int) -> torch.Tensor | None:
        """One image's stored value of a branch (the mean over additions in a summing store); None if absent."""
        parts = entry.parts.get(label)
        if not parts:
            return None
        x = parts[0] / entry.counts[label] if self._summing else torch.cat(parts, dim=0)
        if not -x.shape[0] <= image < x.shape[0]:
            raise InputError(f"image {image} is out of range: {entry.name} holds {x.shape[0]} image(s)")
        return x[image]

    def _mean(self, entry: _Entry, label: int, image: int) -> torch.Tensor:
        """``_value``, with an InputError naming the branch when it was not captured."""
        value = self._value(entry, label, image)
        if value is None:
            raise InputError(f"{entry.name} holds no {'conditional' if label == COND else 'unconditional'} branch "
                             f"(labels captured: {sorted(entry.parts)}); keep that branch when capturing")
        return value


def _resize_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[h, w, T] -> [H, W, T] with bilinear interpolation (identity when the grid already matches)."""
    if tuple(x.shape[:2]) == tuple(grid):
        return x
    y = F.interpolate(x.permute(2, 0, 1)[None], size=grid, mode="bilinear", align_corners=False)
    return y[0].permute(1, 2, 0)


class AttentionStore(_Store):
    """Collects head-averaged cross-attention maps of captured layers, per step, on the CPU in float32.

    Each ``add`` splits the batch into its cond/uncond chunks and files them under "step{step}/{name}"; a
    layer seen again in the same step (e.g. cond and uncond run as separate batches) is merged. A chunk
    holding several images keeps a leading image dimension [n, h, w, K]; ``maps(image=i)`` picks one.
    Set ``step`` (or call ``next_step``) between UNet evaluations.
    """

    def __init__(self, kind: str = "logits", device: torch.device | str = "cpu") -> None:
        super().__init__(device, torch.float32, summing=False)
        self.kind = check_kind(kind)
        self.step = 0

    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the captured entries ("step{i}/{layer}"), in capture order."""
        return self.names

    def next_step(self) -> None:
        """Advance the step counter used to name entries."""
        self.step += 1

    def clear(self) -> None:
        """Forget every captured map and reset the step counter."""
        super().clear()
        self.step = 0

    def add(self, name: str, block: str, factor: int, grid: tuple[int, int], attn: torch.Tensor,
            cond_or_uncond: Sequence[int] | None = None) -> None:
        """Record one layer's head-averaged attention [B, Q, K] (Q = h*w); chunks ordered by cond_or_uncond."""
        h, w = int(grid[0]), int(grid[1])
        if attn.ndim != 3 or attn.shape[1] != h * w:
            raise InputError(f"attention of layer {name} has shape {tuple(attn.shape)}; expected [B, {h * w}, K]"
                             f" for the grid {h}x{w}")
        key = f"step{self.step}/{name}"
        for label, chunk in split_branches(attn, cond_or_uncond):
            self._add(key, name, factor, (h, w), chunk.reshape(chunk.shape[0], h, w, -1), label,
                      normalise_block(block))

    def maps(self, image: int = 0) -> CrossAttentionMaps:
        """Stack the captured entries of one image into CrossAttentionMaps.

        Entries on smaller grids are resized (bilinear) to the largest grid. If only some entries have an
        unconditional branch, the others use their conditional map in its place (so u + g (c - u) = c).
        """
        if not self._entries:
            raise InputError("no cross-attention layer was captured: check capture_factor / capture_blocks "
                             "against the UNet and the image size")
        entries = list(self._entries.values())
        big = max((e.grid for e in entries), key=lambda g: g[0] * g[1])

        def pick(entry: _Entry, label: int) -> torch.Tensor | None:
            x = self._value(entry, label, image)
            return None if x is None else _resize_grid(x, big)

        conds = [pick(e, COND) for e in entries]
        if any(c is None for c in conds):
            missing = [e.name for e, c in zip(entries, conds) if c is None]
            raise InputError(f"layers {missing} have no conditional branch: cond_or_uncond must contain 0")
        unconds = [pick(e, UNCOND) for e in entries]
        uncond = None
        if any(u is not None for u in unconds):
            uncond = torch.stack([c if u is None else u for c, u in zip(conds, unconds)])
        return CrossAttentionMaps(cond=torch.stack(conds), uncond=uncond, layers=tuple(e.name for e in entries),
                                  kind=self.kind)


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


class SelfAttentionStore(_Store):
    """Head-averaged self-attention probabilities of the captured attn1 layers, summed over steps.

    One [n, Q, Q] running sum per entry (a layer, or a level when ``per_layer`` is False) and kept CFG label.
    """

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 per_layer: bool = True) -> None:
        super().__init__(device, dtype, summing=True)
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

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__(device, dtype, summing=True)

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


__all__ = ["BRANCHES", "check_branches", "split_branches", "AttentionStore", "CapturedAffinity", "CapturedFeature",
           "SelfAttentionStore", "FeatureStore"]
