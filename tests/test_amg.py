"""The memory-bounded automatic mask generator gives segment_anything's records exactly, upsamples only what
passes the IoU filter, and never more than its chunk budget at once."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator

from refdiff.amg import MemoryBoundedMaskGenerator, chunk_size, postprocess_bytes_per_mask
from refdiff.errors import InputError
from refdiff.proposals import make_mask_generator
from refdiff.testing.sam import tiny_sam

IMAGE = np.random.default_rng(0).integers(0, 256, (101, 131, 3), dtype=np.uint8)  # odd-sized


def _iou_quantile(sam: torch.nn.Module, q: float) -> float:
    """A predicted-IoU threshold that keeps about a fraction 1 - q of the candidates of IMAGE."""
    gen = SamAutomaticMaskGenerator(sam, points_per_side=8)
    gen.predictor.set_image(IMAGE)
    pts = torch.as_tensor(gen.predictor.transform.apply_coords(gen.point_grids[0] * np.array([131, 101]), (101, 131)))
    _, iou, _ = gen.predictor.predict_torch(pts[:, None, :], torch.ones(len(pts), 1, dtype=torch.int))
    return float(torch.quantile(iou.flatten(), q))


def _records(gen: SamAutomaticMaskGenerator, image: np.ndarray) -> list[dict]:
    return gen.generate(image)


def _assert_same(ours: list[dict], stock: list[dict]) -> None:
    assert len(ours) == len(stock)
    for a, b in zip(ours, stock):
        assert np.array_equal(a["segmentation"], b["segmentation"])
        assert a["area"] == b["area"] and a["bbox"] == b["bbox"] and a["point_coords"] == b["point_coords"]
        assert a["predicted_iou"] == b["predicted_iou"] and a["stability_score"] == b["stability_score"]


@pytest.mark.parametrize("keep_fraction, stability, chunk_mb", [
    (0.5, 0.0, 512), (0.5, 0.0, 0.5), (1.0, 0.0, 0.2), (0.5, 0.7, 1.0)])
def test_same_records_as_segment_anything(keep_fraction: float, stability: float, chunk_mb: float) -> None:
    sam = tiny_sam()
    iou_thresh = _iou_quantile(sam, 1 - keep_fraction) if keep_fraction < 1 else 0.0
    # offset 0.01 and NMS at 1.0: the random model's candidates get varied stability scores and many survive
    kwargs = dict(points_per_side=8, points_per_batch=16, pred_iou_thresh=iou_thresh,
                  stability_score_thresh=stability, stability_score_offset=0.01, box_nms_thresh=1.0)
    stock = _records(SamAutomaticMaskGenerator(sam, **kwargs), IMAGE)
    ours = _records(MemoryBoundedMaskGenerator(sam, chunk_mb=chunk_mb, **kwargs), IMAGE)
    assert len(stock) >= 20  # a real comparison, not two empty lists
    if stability > 0:
        assert len(stock) < 192 * keep_fraction * 0.9  # the stability filter removed some
    _assert_same(ours, stock)


def test_same_records_with_crop_layers() -> None:
    sam = tiny_sam(seed=1)
    kwargs = dict(points_per_side=4, points_per_batch=8, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                  crop_n_layers=1, box_nms_thresh=1.0, crop_nms_thresh=1.0)
    stock = _records(SamAutomaticMaskGenerator(sam, **kwargs), IMAGE)
    assert len(stock) >= 20
    _assert_same(_records(MemoryBoundedMaskGenerator(sam, chunk_mb=0.3, **kwargs), IMAGE), stock)


def test_nothing_passes_gives_no_records() -> None:
    gen = MemoryBoundedMaskGenerator(tiny_sam(), points_per_side=4, pred_iou_thresh=1e9)
    assert gen.generate(IMAGE) == []


def test_only_survivors_are_upsampled_in_bounded_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    sam = tiny_sam()
    iou_thresh = _iou_quantile(sam, 0.75)  # about a quarter of the candidates pass
    sizes: list[int] = []
    original = sam.postprocess_masks

    def spy(masks: torch.Tensor, *args: object) -> torch.Tensor:
        sizes.append(masks.shape[0] * masks.shape[1])
        return original(masks, *args)

    monkeypatch.setattr(sam, "postprocess_masks", spy)
    chunk_mb = 1.0
    gen = MemoryBoundedMaskGenerator(sam, chunk_mb=chunk_mb, points_per_side=8, points_per_batch=64,
                                     pred_iou_thresh=iou_thresh, stability_score_thresh=0.0)
    gen.generate(IMAGE)
    limit = chunk_size(chunk_mb, sam.image_encoder.img_size, 101, 131)
    candidates = 64 * 3
    assert max(sizes) <= limit < candidates  # the budget splits the batch
    assert 0 < sum(sizes) < candidates / 2  # only the IoU survivors were upsampled (about a quarter)


def test_chunk_size_arithmetic() -> None:
    # 4 bytes at 1024^2 + 4 bytes and 3 booleans per image pixel
    assert postprocess_bytes_per_mask(1024, 3000, 4000) == 4 * 1024 ** 2 + 7 * 12_000_000
    assert chunk_size(512, 1024, 3000, 4000) == 512 * 2 ** 20 // (4 * 1024 ** 2 + 84_000_000) == 6
    assert chunk_size(0.001, 1024, 3000, 4000) == 1  # never zero


def test_bad_chunk_budget_is_named() -> None:
    with pytest.raises(InputError, match="chunk_mb"):
        make_mask_generator(tiny_sam(), chunk_mb=0)
