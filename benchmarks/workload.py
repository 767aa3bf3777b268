"""What the benchmark runs on: the mode's settings, the random-weight models, and the fixed inputs (one
synthetic image, the sentences, the proposals). Every configuration sees the same image and sentence.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from refdiff.config import OFFICIAL, Preset

SENTENCE = "the black horse jumping on the left"
# Extra sentences for the K-sentences ratio; the first is SENTENCE. All name something in the image.
SENTENCES: tuple[str, ...] = (
    SENTENCE,
    "the white dog on the right",
    "a red ball at the top",
    "the small grey cat in the middle",
    "the green bush at the bottom",
    "the blue box next to the horse",
    "the dark shape in the upper right corner",
)
SEED = 0


@dataclass(frozen=True)
class ModeSettings:
    """The sizes and counts of one benchmark mode."""

    name: str
    sizes: tuple[int, ...]  # S values for the per-size stages
    image_hw: tuple[int, int]  # (H, W) of the synthetic image
    proposals: int  # N of the per-stage proposal set (the official preset keeps at most 10)
    clip_counts: tuple[int, ...]  # N values of the CLIP-scaling ratio
    sentence_counts: tuple[int, ...]  # K values of the K-sentences ratio
    sam_points: int  # points_per_side of the preset in this mode
    sam_points_per_batch: int
    sam_min_area: int  # the official post-filter's area threshold in this mode
    repeats: int
    warmup: int
    tiny: bool  # tiny random models instead of full-size ones
    photo_hw: tuple[int, int] = (2000, 3000)  # (H, W) of the photo-sized image of the AMG-batch ratio (6 MP)
    sam_types: tuple[str, ...] = ("vit_b", "vit_h")
    sam_type: str = "vit_h"  # the SAM of the pipeline runs (the presets' choice)

    def preset(self, size: int) -> Preset:
        """The official preset at image size S, with this mode's SAM grid and area filter."""
        return OFFICIAL.with_(image_size=int(size), sam_points_per_side=self.sam_points,
                              sam_points_per_batch=self.sam_points_per_batch, sam_min_area=self.sam_min_area)

    def sam_settings(self) -> list[tuple[str, dict[str, int]]]:
        """(label, generator overrides) of the SAM-settings ratio: the preset, fewer points, a larger batch."""
        p, b = self.sam_points, self.sam_points_per_batch
        return [
            (f"preset: points_per_side {p}, points_per_batch {b}", dict(points_per_side=p, points_per_batch=b)),
            (f"points_per_side {p // 2}", dict(points_per_side=max(1, p // 2), points_per_batch=b)),
            (f"points_per_side {p // 4}", dict(points_per_side=max(1, p // 4), points_per_batch=b)),
            (f"points_per_side {p}, points_per_batch {4 * b}", dict(points_per_side=p, points_per_batch=4 * b)),
        ]


FULL = ModeSettings(name="full", sizes=(512, 1024), image_hw=(480, 640), proposals=10,
                    clip_counts=(1, 10, 50, 100), sentence_counts=(1, 3, 7), sam_points=32,
                    sam_points_per_batch=64, sam_min_area=10000, repeats=3, warmup=1, tiny=False)
SHORT = ModeSettings(name="short", sizes=(64, 128), image_hw=(60, 80), proposals=10,
                     clip_counts=(1, 10, 50, 100), sentence_counts=(1, 3, 7), sam_points=4,
                     sam_points_per_batch=16, sam_min_area=0, repeats=1, warmup=1, tiny=True,
                     photo_hw=(300, 400))
MODES: dict[str, ModeSettings] = {"full": FULL, "short": SHORT}


def synthetic_image(height: int, width: int, seed: int = SEED) -> np.ndarray:
    """A fixed RGB uint8 scene: a dark "horse" on the left, a white blob on the right, a red disc at the top,
    a green band at the bottom, on a textured background (no download, identical in every run)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = ys / height, xs / width
    img = np.stack([110 + 60 * y, 140 + 40 * x, 90 + 50 * (1 - y)], axis=-1)
    img += rng.normal(0, 12, img.shape)
    shapes = [  # (centre y, centre x, radius y, radius x, colour)
        (0.55, 0.25, 0.20, 0.16, (25, 22, 20)),
        (0.58, 0.75, 0.16, 0.12, (235, 235, 230)),
        (0.15, 0.50, 0.09, 0.07, (210, 30, 30)),
        (0.52, 0.50, 0.08, 0.06, (120, 120, 125)),
        (0.20, 0.85, 0.08, 0.10, (40, 40, 60)),
    ]
    for cy, cx, ry, rx, colour in shapes:
        inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
        img[inside] = np.asarray(colour, dtype=np.float32) + rng.normal(0, 8, (int(inside.sum()), 3))
    img[y > 0.88] = (40, 150, 50)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_proposals(height: int, width: int, count: int, seed: int = SEED) -> torch.Tensor:
    """``count`` fixed, distinct proposals bool [N, H, W] (ellipses and boxes, half-axes 15-40 % of the side),
    largest first; stand-ins for SAM's masks, which are meaningless with random weights."""
    rng = np.random.default_rng(seed + 1000 + count)
    cy, cx = rng.uniform(0.2, 0.8, count), rng.uniform(0.2, 0.8, count)
    ry, rx = rng.uniform(0.15, 0.4, count), rng.uniform(0.15, 0.4, count)
    box = rng.random(count) < 0.5
    ys = torch.linspace(0.0, 1.0, height)[None, :, None]
    xs = torch.linspace(0.0, 1.0, width)[None, None, :]
    t = lambda a: torch.as_tensor(a, dtype=torch.float32)[:, None, None]  # noqa: E731
    dy, dx = (ys - t(cy)) / t(ry), (xs - t(cx)) / t(rx)
    ellipse = dy ** 2 + dx ** 2 <= 1.0
    rect = (dy.abs() <= 1.0) & (dx.abs() <= 1.0)
    masks = torch.where(torch.as_tensor(box)[:, None, None], rect, ellipse)
    order = masks.flatten(1).sum(dim=1).argsort(descending=True)
    return masks[order].contiguous()


@dataclass
class Models:
    """The random-weight models of one run and how long building them took."""

    sd: Any  # refdiff.diffusion.SDComponents
    sams: dict[str, Any]  # model type -> segment_anything Sam
    clip: Any  # refdiff.discriminative.ClipScorer
    build_s: dict[str, float] = field(default_factory=dict)
    description: dict[str, str] = field(default_factory=dict)


def build_models(settings: ModeSettings, device: torch.device, dtype: torch.dtype) -> Models:
    """Tiny (short mode) or full-size (SD 1.5, SAM vit_b/vit_h, CLIP ViT-B/16) random-weight models on device.

    SAM stays float32 (segment_anything runs it so); SD and CLIP take ``dtype``.
    """
    from refdiff.testing.clip import full_clip_vit_b16, tiny_clip
    from refdiff.testing.sam import random_sam, tiny_sam
    from refdiff.testing.sd import full_sd15, tiny_sd

    build_s: dict[str, float] = {}

    def timed(name: str, make: Any) -> Any:
        start = time.perf_counter()
        value = make()
        build_s[name] = time.perf_counter() - start
        return value

    if settings.tiny:
        sd = timed("sd", lambda: tiny_sd(SEED, device=device, dtype=dtype))
        sam = timed("sam", lambda: tiny_sam(SEED).to(device))
        sams = {t: sam for t in settings.sam_types}
        clip = timed("clip", lambda: tiny_clip(SEED).to(device=device, dtype=dtype))
        description = {"sd": "tiny SD 1.x-shaped UNet/VAE/text encoder (refdiff.testing.sd.tiny_sd)",
                       "sam": "tiny SAM, 256 px (refdiff.testing.sam.tiny_sam), used for every SAM row",
                       "clip": "tiny open_clip ViT (refdiff.testing.clip.tiny_clip)"}
    else:
        sd = timed("sd", lambda: full_sd15(device=device, dtype=dtype, seed=SEED))
        sams = {t: timed(f"sam_{t}", lambda t=t: random_sam(t, SEED).to(device)) for t in settings.sam_types}
        clip = timed("clip", lambda: full_clip_vit_b16(SEED).to(device=device, dtype=dtype))
        description = {"sd": "SD 1.5 UNet + VAE + CLIP text encoder, random weights (full_sd15)",
                       "sam": "SAM " + ", ".join(settings.sam_types) + ", random weights (random_sam)",
                       "clip": "open_clip ViT-B/16 (QuickGELU), random weights (full_clip_vit_b16)"}
    return Models(sd=sd, sams=sams, clip=clip, build_s=build_s, description=description)


__all__ = ["SENTENCE", "SENTENCES", "SEED", "ModeSettings", "FULL", "SHORT", "MODES", "synthetic_image",
           "synthetic_proposals", "Models", "build_models"]
