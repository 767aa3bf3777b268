"""What the pipeline tests share: random-weight tiny models, a two-box test image, and settings that make a
run take seconds on a CPU while random SAM still yields proposals."""
from __future__ import annotations

import numpy as np
import torch

FAST = dict(image_size=64, sam_points_per_side=4, sam_points_per_batch=16, sam_pred_iou_thresh=0.0,
            sam_stability_score_thresh=0.0, sam_min_area=0)


def tiny_models() -> tuple:
    """(tiny SD, tiny SAM, tiny CLIP), the same weights on every call."""
    from refdiff.testing.clip import tiny_clip
    from refdiff.testing.sam import tiny_sam
    from refdiff.testing.sd import tiny_sd

    torch.manual_seed(0)
    return tiny_sd(), tiny_sam(), tiny_clip()


def two_box_image(height: int = 45, width: int = 67, blue: tuple[int, int, int, int] = (10, 40, 40, 60)
                  ) -> np.ndarray:
    """A red box on the left (rows 5:30, columns 4:25) and a blue box (rows, columns ``blue``) on black, with
    seeded noise: odd-sized and wider than tall."""
    rng = np.random.default_rng(0)
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    rgb[5:30, 4:25] = (200, 30, 30)
    y0, y1, x0, x1 = blue
    rgb[y0:y1, x0:x1] = (30, 30, 200)
    return rgb + rng.integers(0, 20, rgb.shape, dtype=np.uint8)
