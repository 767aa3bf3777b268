"""The generative map c (docs/METHOD.md section 5, Eq. 5): the root token's attention map, resized to the padded
square, clipped to the map's own range, cropped back to the original frame and min-max normalised.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InputError
from .image import frame_placement

if TYPE_CHECKING:
    from .image import PreparedImage

RESIZE_MODES = ("bilinear", "lanczos")
_LANCZOS_SUPPORT = 3.0  # PIL's Lanczos window: sinc(x) sinc(x / 3) on [-3, 3)


def minmax_normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - min) / (max - min + eps) over all of x: maps x into [0, 1) without dividing by zero."""
    if x.numel() == 0:
        raise InputError("minmax_normalize: the tensor is empty; give a map with at least one element")
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo + eps)


def _check_map(m: torch.Tensor, name: str) -> None:
    if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise InputError(f"{name}: expected a non-empty 2-D tensor [h, w], got {shape}")
    if not torch.isfinite(m).all():
        raise InputError(f"{name}: contains NaN or infinite values; the attention capture produced an invalid map")


def _check_mode(mode: str) -> None:
    if mode not in RESIZE_MODES:
        raise InputError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")


def clip_to_range(resized: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Clip a resized map to [min, max] of the map it was resized from.

    Lanczos rings: next to a sharp edge it overshoots the source's maximum (and undershoots its minimum), and
    after min-max normalisation that overshoot would become the map's peak, a sliver along the edge that the
    top thresholds of Eq. 8 select. The released code resizes through uint8, which clips at the map's range.
    Bilinear never leaves the range, so the clip changes nothing there.
    """
    return resized.clamp(min=source.min().item(), max=source.max().item())


def resize_map(m: torch.Tensor, height: int, width: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize a float map [h, w] to [height, width]: torch bilinear (align_corners=False) or PIL Lanczos.

    Lanczos runs on a float32 ("F") PIL image, so values are not rounded to 8 bits; its ringing is clipped
    to the source map's range (``clip_to_range``).
    """
    _check_map(m, "map")
    _check_mode(mode)
    if height < 1 or width < 1:
        raise InputError(f"resize_map: target size must be positive, got {height} x {width}")
    src = m.detach().to(device="cpu", dtype=torch.float32)
    if mode == "bilinear":
        out = F.interpolate(src[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    else:
        image = Image.fromarray(np.ascontiguousarray(src.numpy(), dtype=np.float32))  # 2-D float32: mode "F"
        out = torch.from_numpy(np.array(image.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32))
    return clip_to_range(out, src).to(m.device)


def _lanczos(x: torch.Tensor) -> torch.Tensor:
    """PIL's Lanczos kernel: sinc(x) sinc(x / 3) on [-3, 3), 0 elsewhere."""
    inside = (x >= -_LANCZOS_SUPPORT) & (x < _LANCZOS_SUPPORT)
    return torch.where(inside, torch.sinc(x) * torch.sinc(x / _LANCZOS_SUPPORT), torch.zeros_like(x))


def _lanczos_weights(in_size: int, out_size: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of PIL's Lanczos resampling matrix [out_size, in_size] (Resample.c precompute_coeffs)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _LANCZOS_SUPPORT * filterscale
    center = (rows.double() + 0.5) * scale
    lo = torch.floor(center - support + 0.5).clamp(min=0)
    hi = torch.floor(center + support + 0.5).clamp(max=in_size)
    src = torch.arange(in_size, dtype=torch.float64)
    w = _lanczos((src[None] - center[:, None] + 0.5) / filterscale)
    w = torch.where((src[None] >= lo[:, None]) & (src[None] < hi[:, None]), w, torch.zeros_like(w))
    total = w.sum(dim=1, keepdim=True)
    return torch.where(total != 0, w / torch.where(total != 0, total, torch.ones_like(total)), w)


def _bilinear_weights(in_size: int, out_size: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of torch's bilinear (align_corners=False, no antialias) matrix [out_size, in_size]."""
    scale = in_size / out_size
    src = ((rows.double() + 0.5) * scale - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    frac = src - i0.double()
    w = torch.zeros(rows.numel(), in_size, dtype=torch.float64)
    w.scatter_add_(1, i0[:, None], (1.0 - frac)[:, None])
    w.scatter_add_(1, i1[:, None], frac[:, None])
    return w


def _resize_weights(in_size: int, out_size: int, start: int, count: int, mode: str) -> torch.Tensor:
    """Rows [start, start + count) of the 1-D resampling matrix that maps in_size samples to out_size."""
    rows = torch.arange(start, start + count)
    return (_bilinear_weights if mode == "bilinear" else _lanczos_weights)(in_size, out_size, rows)


def generative_map(token_map: torch.Tensor, prep: "PreparedImage", mode: str = "lanczos",
                   eps: float = 1e-8) -> torch.Tensor:
    """Eq. 5: the square token map resized to the padded square, clipped to the token map's range
    (``clip_to_range``: no Lanczos overshoot), cropped to the frame, min-max normalised.

    Returns float32 [H, W] in [0, 1] at the original image's size. Normalising after the crop makes the
    in-frame map span [0, 1], so the thresholds of Eq. 8 and the scores of Eq. 9 do not depend on how much
    black padding the image needed (attention on the padding would otherwise set the range).

    Both resizes are separable linear maps, so the frame is computed as ``Wy[y0:y0+H] @ map @ Wx[x0:x0+W].T``
    with the rows of the resampling matrices that land in the frame: the same numbers as resizing the whole
    ``side x side`` square and cropping (``resize_map`` then slicing; float64 weights, equal to 1e-5), but
    memory is O(H W) instead of O(side^2).
    """
    _check_map(token_map, "token_map")
    _check_mode(mode)
    x0, y0, side, width, height = frame_placement(prep)
    src = token_map.detach().to(device="cpu", dtype=torch.float64)
    h, w = src.shape
    wy = _resize_weights(h, side, y0, height, mode)
    wx = _resize_weights(w, side, x0, width, mode)
    frame = clip_to_range((wy @ src @ wx.T).to(torch.float32), src)
    return minmax_normalize(frame, eps=eps).to(token_map.device)


__all__ = ["minmax_normalize", "clip_to_range", "resize_map", "generative_map", "RESIZE_MODES"]
