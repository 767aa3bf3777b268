"""Threshold proposals (Eq. 8), de-duplication, the official post-filter, and the SAM adapter's contract
(the real tiny SAM runs in test_sam.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from refdiff.config import DEFAULT_THRESHOLDS, OFFICIAL, sam_generator_kwargs
from refdiff.errors import InputError
from refdiff.proposals import dedupe_masks, effective_min_area, filter_proposals, make_mask_generator, \
    sam_post_filter, sam_proposals, threshold_proposals


def test_threshold_proposals_drop_empty_and_duplicates_keep_order() -> None:
    c = torch.tensor([[0.0, 0.3, 0.6], [0.6, 0.9, 1.0]])
    # 0.5 -> {.6, .6, .9, 1}; 0.2 and 0.25 -> the same {>= .3}; 0.5 again duplicates; 1.5 -> empty; 0.95 -> {1}
    masks = threshold_proposals(c, thresholds=(0.5, 0.2, 0.25, 0.5, 1.5, 0.95))
    expected = torch.stack([c >= 0.5, c >= 0.2, c >= 0.95])
    assert masks.dtype == torch.bool and torch.equal(masks, expected)


def test_threshold_proposals_defaults_on_a_ramp() -> None:
    c = torch.linspace(0.0, 1.0, 201).reshape(1, 201)
    masks = threshold_proposals(c)
    assert masks.shape == (19, 1, 201)
    assert torch.equal(masks, torch.stack([c >= mu for mu in DEFAULT_THRESHOLDS]))
    areas = masks.flatten(1).sum(1)
    assert (areas[1:] < areas[:-1]).all()  # mu ascending: masks shrink


def test_threshold_proposals_can_be_empty() -> None:
    masks = threshold_proposals(torch.zeros(7, 9))  # every default mu > 0
    assert masks.shape == (0, 7, 9) and masks.dtype == torch.bool
    assert threshold_proposals(torch.rand(4, 4), thresholds=()).shape == (0, 4, 4)
    with pytest.raises(InputError, match="NaN"):
        threshold_proposals(torch.full((2, 2), float("nan")))


def test_dedupe_masks_first_occurrence_in_order() -> None:
    a, b, c = (torch.zeros(3, 4, dtype=torch.bool) for _ in range(3))
    a[0, 0] = True
    b[1, :] = True
    c[2, 3] = True
    masks, idx = dedupe_masks(torch.stack([b, a, b, c, a, c]))
    assert idx.tolist() == [0, 1, 3]
    assert torch.equal(masks, torch.stack([b, a, c]))
    one, idx1 = dedupe_masks(a[None])
    assert idx1.tolist() == [0] and torch.equal(one, a[None])


def _masks_with_areas(areas: list[int], width: int = 100) -> torch.Tensor:
    flat = torch.arange(width * width)[None] < torch.tensor(areas)[:, None]
    return flat.reshape(len(areas), width, width)


def test_filter_proposals_keep_largest_then_min_area() -> None:
    masks = _masks_with_areas([5, 50, 20, 50, 0, 30])
    kept, idx = filter_proposals(masks, keep_largest=3, min_area=25)
    assert idx.tolist() == [1, 3, 5] and torch.equal(kept, masks[[1, 3, 5]])
    assert filter_proposals(masks, keep_largest=3, min_area=30)[1].tolist() == [1, 3]  # area <= min_area drops
    assert filter_proposals(masks, keep_largest=1, min_area=0)[1].tolist() == [1]  # area tie: lower index
    assert filter_proposals(masks, keep_largest=None, min_area=0)[1].tolist() == [0, 1, 2, 3, 5]  # empty goes
    # the largest are chosen before the area cut: keeping 2 of them leaves nothing above 50
    kept, idx = filter_proposals(masks, keep_largest=2, min_area=50)
    assert kept.shape == (0, 100, 100) and idx.tolist() == []


def test_filter_proposals_official_defaults() -> None:
    areas = [9000, 10000, 10001, 12000, 9999, 15000, 20000, 30000, 40000, 50000, 60000, 70000, 80000]
    masks = _masks_with_areas(areas, width=300)
    kept, idx = filter_proposals(masks, keep_largest=OFFICIAL.sam_keep_largest, min_area=OFFICIAL.sam_min_area)
    # the 10 largest are 10001 and up; of those, 10001 > 10000 survives
    assert idx.tolist() == [2, 3, 5, 6, 7, 8, 9, 10, 11, 12]
    assert kept.flatten(1).sum(1).tolist() == [areas[i] for i in idx.tolist()]
    none_left, idx = filter_proposals(_masks_with_areas([100, 5000], width=300))
    assert none_left.shape == (0, 300, 300) and idx.numel() == 0


def test_filter_proposals_bad_input() -> None:
    with pytest.raises(InputError, match="bool"):
        filter_proposals(torch.zeros(2, 3, 3))
    with pytest.raises(InputError, match="keep_largest"):
        filter_proposals(torch.zeros(2, 3, 3, dtype=torch.bool), keep_largest=-1)


def _boxes(height: int, width: int, areas: list[tuple[int, int]]) -> torch.Tensor:
    """Planted masks of a height x width image: one (h, w) box per entry, at the top-left corner."""
    masks = torch.zeros(len(areas), height, width, dtype=torch.bool)
    for i, (h, w) in enumerate(areas):
        masks[i, :h, :w] = True
    return masks


def test_effective_min_area_scales_with_the_image_area() -> None:
    assert effective_min_area(10000, 480, 640, 640 * 480) == 10000.0  # COCO size: as given
    assert effective_min_area(10000, 97, 131, 640 * 480) == pytest.approx(10000 * 12707 / 307200)  # ~413.6 px
    assert effective_min_area(10000, 3000, 4000, 640 * 480) == pytest.approx(390625.0)  # 12 MP: still ~3 %
    assert effective_min_area(10000, 97, 131, None) == 10000.0  # absolute pixels (released code)
    assert effective_min_area(0, 97, 131, 640 * 480) == 0.0
    with pytest.raises(InputError, match="sam_min_area_reference must be a positive"):
        effective_min_area(10000, 97, 131, 0)
    with pytest.raises(InputError, match="min_area must be >= 0"):
        effective_min_area(-1, 97, 131, None)


def test_small_image_keeps_its_plausible_proposals_with_the_relative_rule() -> None:
    # a 131 x 97 image (12707 px): the object boxes cover 24 %, 12 % and 4 % of it, a speck 0.4 %
    masks = _boxes(97, 131, [(60, 50), (40, 38), (20, 25), (5, 10)])
    kept, idx, note = sam_post_filter(masks, keep_largest=10, min_area=10000, min_area_reference=640 * 480)
    assert idx.tolist() == [0, 1, 2] and torch.equal(kept, masks[:3]) and note is None  # threshold ~413.6 px
    # the same masks under the released rule: 10000 px is 79 % of this image, so every proposal goes
    kept, idx, note = sam_post_filter(masks, keep_largest=10, min_area=10000, min_area_reference=None)
    assert kept.shape == (0, 97, 131) and idx.numel() == 0
    assert note == ("the SAM post-filter removed all 4 masks of this 131 x 97 image, so the mask is empty: the "
                    "largest has 3000 px, not above the area threshold of 10000 px (sam_min_area=10000 in "
                    "absolute pixels, as sam_min_area_reference=None); set sam_min_area_reference=307200 to "
                    "scale the threshold with the image area (413.6 px here), or lower sam_min_area (0 keeps "
                    "every mask)")


def test_absolute_rule_is_the_released_filter_exactly() -> None:
    areas = [9000, 10000, 10001, 12000, 9999, 15000, 20000, 30000, 40000, 50000, 60000, 70000, 80000]
    masks = _masks_with_areas(areas, width=300)  # a 300 x 300 image: the relative rule would cut at ~2930 px
    kept, idx, note = sam_post_filter(masks, keep_largest=10, min_area=10000, min_area_reference=None)
    released_kept, released_idx = filter_proposals(masks, keep_largest=10, min_area=10000)
    assert idx.tolist() == released_idx.tolist() == [2, 3, 5, 6, 7, 8, 9, 10, 11, 12] and note is None
    assert torch.equal(kept, released_kept)
    edge = _masks_with_areas([10000, 10001], width=110)  # 12100 px image; the cut stays at 10000 px
    assert sam_post_filter(edge, 10, 10000, None)[1].tolist() == [1]
    # at 640 x 480 the relative rule is the same cut
    big = torch.zeros(2, 480, 640, dtype=torch.bool)
    big[0].view(-1)[:10000] = True
    big[1].view(-1)[:10001] = True
    assert sam_post_filter(big, 10, 10000, 640 * 480)[1].tolist() == [1]


def test_post_filter_says_when_it_removes_everything() -> None:
    masks = _boxes(97, 131, [(10, 10), (3, 4)])
    kept, _, note = sam_post_filter(masks, keep_largest=10, min_area=10000, min_area_reference=640 * 480)
    assert kept.shape[0] == 0
    assert note == ("the SAM post-filter removed all 2 masks of this 131 x 97 image, so the mask is empty: the "
                    "largest has 100 px, not above the area threshold of 413.6 px (sam_min_area=10000 at the "
                    "reference area sam_min_area_reference=307200 px, scaled to this image's 12707 px); lower "
                    "sam_min_area (0 keeps every mask), or set sam_min_area_reference=None for absolute pixels")
    _, _, none_kept = sam_post_filter(masks, keep_largest=0, min_area=0, min_area_reference=None)
    assert none_kept == ("the SAM post-filter removed all 2 masks of this 131 x 97 image, so the mask is empty: "
                         "sam_keep_largest=0 keeps none; raise sam_keep_largest (None keeps all)")
    one = sam_post_filter(masks[:1], 10, 10000, None)[2]
    assert one.startswith("the SAM post-filter removed the only mask of this 131 x 97 image")
    # a caller's own advice replaces the closing fix, the account of what was removed stays
    advised = sam_post_filter(masks, 10, 10000, 640 * 480, advice="on this node: lower min_area")[2]
    assert advised == note.replace("lower sam_min_area (0 keeps every mask), or set sam_min_area_reference=None "
                                   "for absolute pixels", "on this node: lower min_area")
    assert sam_post_filter(masks, 0, 0, None, advice="raise keep_largest")[2].endswith(
        "sam_keep_largest=0 keeps none; raise keep_largest")
    # nothing to remove, or something kept: no message
    assert sam_post_filter(torch.zeros(0, 97, 131, dtype=torch.bool), 10, 10000, None)[2] is None
    assert sam_post_filter(masks, 10, 50, None)[2] is None


class _FakeGenerator:
    """Stands in for SamAutomaticMaskGenerator: returns planted records."""

    output_mode = "binary_mask"

    def __init__(self, segmentations: list[np.ndarray]) -> None:
        self.segmentations = segmentations
        self.seen: np.ndarray | None = None

    def generate(self, image: np.ndarray) -> list[dict]:
        self.seen = image
        return [{"segmentation": s, "area": int(s.sum())} for s in self.segmentations]


def test_sam_proposals_contract() -> None:
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    segs = [np.eye(5, 7, k=k, dtype=bool) for k in (0, 2, 1)]
    gen = _FakeGenerator(segs)
    masks = sam_proposals(gen, image)
    assert gen.seen is not None and np.array_equal(gen.seen, image)  # RGB passed through untouched
    assert masks.dtype == torch.bool and masks.shape == (3, 5, 7)
    assert all(np.array_equal(masks[i].numpy(), segs[i]) for i in range(3))  # generator's order
    empty = sam_proposals(_FakeGenerator([]), image)
    assert empty.shape == (0, 5, 7) and empty.dtype == torch.bool
    with pytest.raises(InputError, match="uint8"):
        sam_proposals(gen, image.astype(np.float32))
    with pytest.raises(InputError, match="uint8"):
        sam_proposals(gen, image[..., 0])


def test_make_mask_generator_uses_preset_values() -> None:
    from refdiff.testing.sam import tiny_sam

    gen = make_mask_generator(tiny_sam(), **sam_generator_kwargs(OFFICIAL), crop_overlap_ratio=0.25)
    assert gen.pred_iou_thresh == 0.88 and gen.stability_score_thresh == 0.95 and gen.box_nms_thresh == 0.7
    assert gen.points_per_batch == 64 and gen.crop_n_layers == 0 and gen.min_mask_region_area == 0
    assert gen.point_grids[0].shape == (32 * 32, 2) and gen.output_mode == "binary_mask"
    assert gen.crop_overlap_ratio == 0.25
    with pytest.raises(InputError, match="binary_mask"):
        make_mask_generator(tiny_sam(), output_mode="coco_rle")
