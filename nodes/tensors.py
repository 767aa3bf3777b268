"""ComfyUI's tensors and the library's values, converted both ways: an IMAGE batch to RGB arrays and to the
prepared squares, mask lists to a MASK batch, a LATENT dict to its samples, and where an image sits in its
square. No ComfyUI import (tested offline).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from refdiff.errors import InputError
from refdiff.image import PreparedImage, load_image, pad_to_square, prepare_image


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


def mask_maps(c: Any, name: str = "c") -> list[torch.Tensor]:
    """A MASK batch [B, H, W] (or one mask [H, W]) as a list of float32 maps [H, W] on the CPU."""
    if not isinstance(c, torch.Tensor) or c.ndim not in (2, 3):
        raise InputError(f"{name}: expected a MASK [B, H, W], got {getattr(c, 'shape', type(c).__name__)}")
    c = c[None] if c.ndim == 2 else c
    return [m.detach().float().cpu() for m in c]


def latent_samples(latent: Any) -> torch.Tensor:
    """The samples [B, C, h, w] of a LATENT dict; InputError naming VAEEncode when it is something else."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        raise InputError("latent: expected a LATENT from VAEEncode (a dict with 'samples' [B, 4, h, w])")
    return samples


def check_square_latent(latent_hw: Sequence[int], name: str = "latent") -> None:
    """InputError unless the latent grid is square, as the prepared (padded) square encodes to."""
    lh, lw = int(latent_hw[0]), int(latent_hw[1])
    if lh != lw:
        raise InputError(f"{name}: the latent {lh}x{lw} is not square; encode the output of RefDiffPrepareImage "
                         "(the padded square) with VAEEncode")


__all__ = ["images_to_rgb", "prepared_squares", "frame_geometry", "masks_to_output", "mask_maps", "latent_samples",
           "check_square_latent"]
