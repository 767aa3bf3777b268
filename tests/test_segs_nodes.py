"""The SEGS nodes' ComfyUI-free side (nodes/segs_convert.py): SEGS + image as REFDIFF_PROPOSALS, the selection as
SEGS (boxes, crops, labels, fused scores), Impact Pack's SEG class when it is loaded, and batches refused."""
from __future__ import annotations

import sys
from collections import namedtuple
from types import ModuleType

import numpy as np
import pytest
import torch

from refdiff.errors import InputError
from pack_nodes import load_node_module

convert = load_node_module("segs_convert")
SEG = convert.FallbackSEG


def _image(h: int = 20, w: int = 30) -> torch.Tensor:
    return torch.rand(1, h, w, 3)


def _masks(h: int = 20, w: int = 30) -> torch.Tensor:
    m = torch.zeros(4, h, w, dtype=torch.bool)
    m[0, 2:6, 3:9] = True  # bbox [3, 2, 9, 6]
    m[1, 10:20, 20:30] = True  # bbox [20, 10, 30, 20]
    m[3, 0:2, 0:2] = True  # m[2] stays empty
    return m


def test_segs_become_proposals_in_seg_order_with_empty_segs_left_out():
    full = torch.zeros(3, 20, 30)
    full[0, 5:9, 10:16] = 1.0
    full[2, 0:20, 0:4] = 0.8
    crops = [(full[0, 4:10, 9:17], [9, 4, 17, 10]), (torch.zeros(3, 3), [0, 0, 3, 3]), (full[2, :, :5], [0, 0, 5, 20])]
    segs = ((20, 30), [SEG(None, c.numpy(), 0.9, r, r, f"obj{i}") for i, (c, r) in enumerate(crops)])
    batch, info = convert.segs_proposal_batch(segs, _image())
    assert batch.source == "segs" and len(batch) == 1 and batch.masks[0].dtype == torch.bool
    assert torch.equal(batch.masks[0], full[[0, 2]] >= 0.5)
    assert "2 proposals of 3 SEG(s), the SEGS' [0, 2]" in info[0] and "'obj2'" in info[0]
    assert any("left out 1 empty" in line for line in info)
    soft, _ = convert.segs_proposal_batch(segs, _image(), threshold=0.9)
    assert torch.equal(soft.masks[0], full[[0]] > 0)  # the 0.8 mask is outside at threshold 0.9


def test_empty_segs_give_no_proposal_and_a_note():
    batch, _ = convert.segs_proposal_batch(((20, 30), []), _image())
    assert batch.masks[0].shape == (0, 20, 30) and "no external proposal" in batch.notes[0]


def test_segs_of_another_size_are_refused_or_resized():
    crop = np.ones((10, 10), dtype=np.float32)
    segs = ((10, 15), [SEG(None, crop, 1.0, [5, 0, 15, 10], None, "a")])
    with pytest.raises(InputError, match="segs: the masks are 15 x 10 .* but the image is 30 x 20"):
        convert.segs_proposal_batch(segs, _image())
    batch, info = convert.segs_proposal_batch(segs, _image(), resize="nearest")
    assert batch.masks[0].shape == (1, 20, 30) and batch.masks[0][0, :, 10:].all() and not batch.masks[0][0, :, :10].any()
    assert any("resized" in line for line in info)


def test_image_batches_are_refused_with_the_fix():
    with pytest.raises(InputError, match="image: a SEGS describes one image .* holds 2 images; .*ImageFromBatch"):
        convert.segs_proposal_batch(((20, 30), []), torch.rand(2, 20, 30, 3))
    with pytest.raises(InputError, match="holds 3 images"):
        convert.selection_segs(_masks(), torch.rand(4), 0, [0], torch.rand(3, 20, 30, 3))


def test_selection_becomes_segs_with_boxes_crops_labels_and_fused_scores():
    image = _image()
    fused = torch.tensor([0.2, 0.9, 0.5, 0.4])
    segs, top, info = convert.selection_segs(_masks(), fused, 1, [1, 2, 3, 0], image, "the dog", crop_factor=1.0)
    assert segs[0] == (20, 30) and top[0] == (20, 30)
    (one,) = segs[1]
    assert isinstance(one, SEG) and one.label == "the dog" and one.confidence == pytest.approx(0.9)
    assert one.bbox == [20, 10, 30, 20] and one.crop_region == [20, 10, 30, 20]
    assert one.cropped_mask.dtype == np.float32 and one.cropped_mask.shape == (10, 10) and one.cropped_mask.all()
    assert torch.equal(one.cropped_image, image[:, 10:20, 20:30])
    assert one.control_net_wrapper is None
    # the top-k in rank order, the empty proposal 2 without a SEG
    assert [s.bbox for s in top[1]] == [[20, 10, 30, 20], [0, 0, 2, 2], [3, 2, 9, 6]]
    assert [s.confidence for s in top[1]] == pytest.approx([0.9, 0.4, 0.2])
    assert "selected proposal 1" in info and "empty proposals [2] make no SEG" in info


def test_crop_factor_label_default_and_no_selection():
    segs, top, info = convert.selection_segs(_masks(), torch.rand(4), 0, [0], _image(), "", crop_factor=3.0)
    (one,) = segs[1]
    assert one.label == "refdiff" and one.bbox == [3, 2, 9, 6] and one.crop_region == [0, 0, 18, 12]
    assert one.cropped_mask.shape == (12, 18) and one.cropped_mask.sum() == 24  # the 6 x 4 mask inside its crop
    none, top_none, info = convert.selection_segs(_masks()[:0], torch.zeros(0), -1, [], _image(), "x")
    assert none == ((20, 30), []) and top_none == ((20, 30), []) and "no proposal selected" in info


def test_impact_packs_seg_class_is_used_when_it_is_loaded(monkeypatch):
    ImpactSEG = namedtuple("SEG", ["cropped_image", "cropped_mask", "confidence", "crop_region", "bbox", "label",
                                   "control_net_wrapper"], defaults=[None])
    core = ModuleType("impact.core")
    core.SEG = ImpactSEG
    monkeypatch.setitem(sys.modules, "impact.core", core)
    segs, _, _ = convert.selection_segs(_masks(), torch.rand(4), 0, [0], _image())
    assert type(segs[1][0]) is ImpactSEG
    core.SEG = namedtuple("SEG", ["mask", "box"])  # another shape: not taken for Impact's
    assert convert.seg_class() is convert.FallbackSEG
