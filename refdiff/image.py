"""Image input: loading and validation, and the padded square the diffusion model sees (docs/METHOD.md section 1)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import InputError

_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
            "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}


def load_image(image: Any, name: str = "image") -> np.ndarray:
    """Return the image as RGB uint8 [H, W, 3], whatever it came as (path, PIL image, array or tensor).

    Grayscale is repeated to three channels, alpha is dropped (composited on black), 16-bit and float
    inputs are rescaled. Anything unusable raises InputError naming ``name``.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"{name}: no such file {str(path)!r}; give the path of an existing image file")
        try:
            with Image.open(path) as im:
                im.load()
                return _pil_to_rgb(im, name)
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"{name}: {str(path)!r} is not an image PIL can read ({exc})") from None
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, name)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, name)
    raise InputError(f"{name}: expected a path, a PIL image, a numpy array or a torch tensor, "
                     f"got {type(image).__name__}")


def _pil_to_rgb(im: Image.Image, name: str) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return _array_to_rgb((arr / top).astype(np.float32), name)
    if im.mode == "F":
        return _array_to_rgb(np.asarray(im, dtype=np.float32), name)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, rgba)
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def _array_to_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise InputError(f"{name}: expected an array of shape [H, W] or [H, W, C], got shape {tuple(arr.shape)}")
    if arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):  # channels-first
        arr = np.moveaxis(arr, 0, -1)
    channels = arr.shape[-1]
    if channels not in (1, 2, 3, 4):
        raise InputError(f"{name}: expected 1, 3 or 4 channels, got {channels} (shape {tuple(arr.shape)})")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InputError(f"{name}: image is empty (shape {tuple(arr.shape)})")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InputError(f"{name}: contains NaN or infinite values; give finite pixel values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0 + 1e-6:
            if hi <= 255.0 and lo >= 0.0:
                arr = arr / 255.0
            else:
                raise InputError(f"{name}: float pixels must lie in [0, 1] (or [0, 255]); got [{lo:g}, {hi:g}]")
        arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    elif arr.dtype == np.uint16 or (np.issubdtype(arr.dtype, np.integer) and arr.max(initial=0) > 255):
        if arr.min(initial=0) < 0:
            raise InputError(f"{name}: negative pixel values")
        arr = (arr.astype(np.float64) / 65535.0 * 255.0).round().astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer):
        if arr.min(initial=0) < 0:
            raise InputError(f"{name}: negative pixel values")
        arr = arr.astype(np.uint8)
    else:
        raise InputError(f"{name}: unsupported pixel type {arr.dtype}")
    if channels in (2, 4):  # alpha: composite on black
        alpha = arr[..., -1:].astype(np.float32) / 255.0
        arr = np.rint(arr[..., :-1].astype(np.float32) * alpha).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr)


@dataclass(frozen=True)
class PreparedImage:
    """The padded square fed to the VAE, and where the original frame sits inside it."""

    pixels: torch.Tensor  # [1, 3, S, S] float32 in [-1, 1]
    size: int  # S
    side: int  # max(W, H): side of the padded square before resizing
    offset: tuple[int, int]  # (x0, y0) of the original image inside the side x side square
    width: int
    height: int


def frame_placement(prep: PreparedImage) -> tuple[int, int, int, int, int]:
    """(x0, y0, side, width, height) of the frame inside its square, checked to fit (maps and labels are
    cropped back to the frame with it)."""
    x0, y0 = (int(v) for v in prep.offset)
    side, width, height = int(prep.side), int(prep.width), int(prep.height)
    if x0 < 0 or y0 < 0 or x0 + width > side or y0 + height > side:
        raise InputError(f"prepared image: frame {width} x {height} at offset {(x0, y0)} does not fit in the "
                         f"{side} x {side} square; build it with refdiff.image.prepare_image")
    return x0, y0, side, width, height


def pad_to_square(rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Paste the image centred on a black square of side max(W, H); return it and the paste offset (x0, y0)."""
    h, w = rgb.shape[:2]
    side = max(h, w)
    x0, y0 = (side - w) // 2, (side - h) // 2
    square = np.zeros((side, side, 3), dtype=np.uint8)
    square[y0:y0 + h, x0:x0 + w] = rgb
    return square, (x0, y0)


def prepare_image(rgb: np.ndarray, size: int = 1024, resize_filter: str = "lanczos") -> PreparedImage:
    """Pad to a square, resize to ``size`` with ``resize_filter`` and scale to [-1, 1] (docs/METHOD.md section 1)."""
    if size < 8 or size % 8:
        raise InputError(f"image_size must be a positive multiple of 8 (the VAE downsamples by 8), got {size}")
    if resize_filter not in _FILTERS:
        raise InputError(f"resize_filter must be one of {sorted(_FILTERS)}, got {resize_filter!r}")
    rgb = load_image(rgb)
    h, w = rgb.shape[:2]
    square, offset = pad_to_square(rgb)
    resized = Image.fromarray(square).resize((size, size), _FILTERS[resize_filter])
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
    return PreparedImage(pixels=pixels.contiguous(), size=size, side=max(h, w), offset=offset, width=w, height=h)


def image_key(rgb: np.ndarray) -> str:
    """A content hash of an RGB array, used to key per-image caches."""
    import hashlib

    digest = hashlib.blake2b(np.ascontiguousarray(rgb).tobytes(), digest_size=16)
    digest.update(str(rgb.shape).encode())
    return digest.hexdigest()


__all__ = ["load_image", "PreparedImage", "frame_placement", "pad_to_square", "prepare_image", "image_key"]
