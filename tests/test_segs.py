"""Masks to and from SEGS (refdiff.segs): crops pasted where their crop region says, exact round trips, the crop
region about the mask's box, and clear errors for SEGS that do not fit their image."""
from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest
import torch

from refdiff.errors import InputError
from refdiff.external import external_proposals
from refdiff.segs import crop_region, mask_bbox, masks_to_seg_parts, segs_to_masks

# the SEG of Impact Pack's modules/impact/core.py: seven fields, control_net_wrapper defaulting to None
SEG = namedtuple("SEG", ["cropped_image", "cropped_mask", "confidence", "crop_region", "bbox", "label",
                         "control_net_wrapper"], defaults=[None])


def _planted(h: int = 24, w: int = 32) -> torch.Tensor:
    """Three masks with known boxes: a rectangle, an L shape touching the right border, a single pixel."""
    m = torch.zeros(3, h, w)
    m[0, 3:9, 5:12] = 1.0  # bbox [5, 3, 12, 9]
    m[1, 10:24, 28:32] = 1.0
    m[1, 20:24, 20:28] = 1.0  # bbox [20, 10, 32, 24]
    m[2, 0, 0] = 1.0  # bbox [0, 0, 1, 1]
    return m


def _segs(parts, size):
    return size, [SEG(p.cropped_image, p.cropped_mask, p.confidence, p.crop_region, p.bbox, p.label, None)
                  for p in parts]


def test_crop_is_pasted_at_its_crop_region():
    crop = np.array([[1, 0, 0], [1, 1, 0]], dtype=np.float32)  # 3 wide, 2 high
    out = segs_to_masks(((6, 8), [SEG(None, crop, 0.7, [4, 1, 7, 3], [4, 1, 6, 3], "cup")]))
    assert out.masks.shape == (1, 6, 8) and out.masks.dtype == torch.float32
    expected = torch.zeros(6, 8)
    expected[1, 4] = expected[2, 4] = expected[2, 5] = 1.0
    assert torch.equal(out.masks[0], expected)
    assert out.labels == ["cup"] and out.confidences == pytest.approx([0.7]) and out.notes == []


def test_round_trip_masks_segs_masks_is_exact_at_any_crop_factor():
    masks = _planted()
    masks[0, 4, 6] = 0.25  # soft values survive too
    for factor in (1.0, 1.5, 3.0, 100.0):
        parts, kept = masks_to_seg_parts(masks, [0.9, 0.5, 0.1], "the cup", crop_factor=factor)
        assert kept == [0, 1, 2]
        back = segs_to_masks(_segs(parts, (24, 32)))
        assert torch.equal(back.masks, masks), factor
        assert back.labels == ["the cup"] * 3 and back.confidences == pytest.approx([0.9, 0.5, 0.1])


def test_seg_fields_boxes_crops_and_image_crop():
    masks = _planted()
    image = torch.rand(24, 32, 3)
    parts, _ = masks_to_seg_parts(masks, torch.tensor([0.9, 0.5, 0.1]), ["a", "b", ""], image=image)
    assert [p.bbox for p in parts] == [[5, 3, 12, 9], [20, 10, 32, 24], [0, 0, 1, 1]]
    assert [p.crop_region for p in parts] == [p.bbox for p in parts]  # crop_factor 1: the box itself
    assert [p.label for p in parts] == ["a", "b", "refdiff"]  # an empty label becomes the default
    first = parts[0]
    assert first.cropped_mask.dtype == np.float32 and first.cropped_mask.shape == (6, 7)
    assert first.cropped_mask.all()
    assert first.cropped_image.shape == (1, 6, 7, 3)
    assert torch.equal(first.cropped_image[0], image[3:9, 5:12])


def test_crop_factor_grows_about_the_centre_and_moves_inside_the_image():
    assert crop_region([10, 10, 14, 16], 100, 100, 3.0) == [6, 4, 18, 22]  # 12 x 18 about the centre (12, 13)
    # at the right/bottom border the region moves inward, keeping its size
    assert crop_region([90, 94, 100, 100], 100, 100, 2.0) == [80, 88, 100, 100]
    # at the left/top border too
    assert crop_region([0, 0, 4, 4], 50, 40, 3.0) == [0, 0, 12, 12]
    # larger than the image: the whole image side
    assert crop_region([20, 10, 30, 30], 50, 40, 10.0) == [0, 0, 50, 40]
    for box, factor in (([3, 5, 4, 6], 2.5), ([0, 0, 7, 3], 1.7), ([13, 2, 20, 9], 3.3)):
        x1, y1, x2, y2 = crop_region(box, 20, 12, factor)
        assert x1 <= box[0] and y1 <= box[1] and x2 >= box[2] and y2 >= box[3]
        assert 0 <= x1 and 0 <= y1 and x2 <= 20 and y2 <= 12
    with pytest.raises(InputError, match="crop_factor must be >= 1"):
        crop_region([0, 0, 2, 2], 10, 10, 0.5)


def test_empty_masks_make_no_seg_and_are_named_by_index():
    masks = torch.zeros(3, 8, 8)
    masks[1, 2:4, 2:4] = 1
    parts, kept = masks_to_seg_parts(masks, [0.3, 0.2, 0.1])
    assert kept == [1] and parts[0].bbox == [2, 2, 4, 4] and parts[0].confidence == pytest.approx(0.2)
    assert mask_bbox(torch.zeros(4, 4)) is None


def test_size_mismatch_and_bad_regions_are_refused_with_the_seg_named():
    crop = np.ones((2, 3), dtype=np.float32)
    with pytest.raises(InputError, match=r"SEG 1: cropped_mask is 3 x 2 .* crop_region \[0, 0, 4, 2\] is 4 x 2"):
        segs_to_masks(((6, 8), [SEG(None, crop, 1.0, [0, 0, 3, 2], None, "a"), SEG(None, crop, 1.0, [0, 0, 4, 2],
                                                                                     None, "b")]))
    with pytest.raises(InputError, match="SEG 0: crop_region .* reaches outside the 8 x 6 image"):
        segs_to_masks(((6, 8), [SEG(None, crop, 1.0, [6, 5, 9, 7], None, "a")]))
    with pytest.raises(InputError, match="is empty"):
        segs_to_masks(((6, 8), [SEG(None, crop[:, :0], 1.0, [3, 3, 3, 5], None, "a")]))
    with pytest.raises(InputError, match=r"expected SEGS \(\(H, W\), \[SEG, \.\.\.\]\)"):
        segs_to_masks([SEG(None, crop, 1.0, [0, 0, 3, 2], None, "a")])
    with pytest.raises(InputError, match="not a SEG"):
        segs_to_masks(((6, 8), [crop]))


def test_region_past_the_border_with_empty_pixels_there_is_clipped_and_noted():
    crop = np.zeros((3, 4), dtype=np.float32)
    crop[0, 0] = 1.0  # at image pixel (x=6, y=4); the crop's last two columns and last row lie outside
    out = segs_to_masks(((6, 8), [SEG(None, crop, None, [6, 4, 10, 7], None, None)]))
    assert out.masks[0].sum() == 1 and out.masks[0, 4, 6] == 1
    assert "clipped" in out.notes[0] and out.labels == [""] and out.confidences == [None]


def test_torch_and_singleton_channel_crops_and_an_empty_segs():
    crop = torch.ones(1, 2, 2)
    out = segs_to_masks(((4, 4), [SEG(None, crop, torch.tensor([0.5]), [1, 1, 3, 3], None, "x")]))
    assert out.masks[0, 1:3, 1:3].all() and out.masks[0].sum() == 4 and out.confidences == [0.5]
    empty = segs_to_masks(((5, 7), []))
    assert empty.masks.shape == (0, 5, 7)


def test_segs_masks_become_the_same_proposals_as_the_masks():
    masks = _planted() > 0
    parts, _ = masks_to_seg_parts(masks, [1.0, 1.0, 1.0], crop_factor=3.0)
    pasted = segs_to_masks(_segs(parts, (24, 32)))
    assert torch.equal(external_proposals(pasted.masks, 24, 32).masks, masks)
