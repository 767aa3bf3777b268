"""RefDiff Mask Proposals' stage (nodes/external_masks.py, no ComfyUI): a MASK batch split between the images of an
IMAGE batch by ``counts``, normalised as refdiff.external does, optionally post-filtered; refusals name the input
and the fix."""
from __future__ import annotations

import pytest
import torch

from refdiff.config import get_preset
from refdiff.errors import InputError
from pack_nodes import load_node_module

external_masks = load_node_module("external_masks")
proposal_filter = load_node_module("proposal_filter")
wire_types = load_node_module("wire_types")

H, W = 30, 40


def box_masks(boxes: list[tuple[int, int, int, int]], height: int = H, width: int = W) -> torch.Tensor:
    """A ComfyUI MASK batch: float32 [N, H, W], 1 inside each box (y0, y1, x0, x1)."""
    out = torch.zeros(len(boxes), height, width)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        out[i, y0:y1, x0:x1] = 1.0
    return out


def images(batch: int, height: int = H, width: int = W) -> torch.Tensor:
    return torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(0))


def test_one_image_takes_every_mask_as_bool_cpu_proposals_without_the_empty_one():
    masks = box_masks([(0, 10, 0, 10), (0, 0, 0, 0), (5, 25, 10, 30)])
    masks[2] *= 0.6  # a soft mask: inside where >= 0.5
    batch, info = external_masks.mask_proposal_batch(masks, images(1))
    assert isinstance(batch, wire_types.ProposalBatch) and batch.source == "external" and len(batch) == 1
    got = batch.masks[0]
    assert got.dtype == torch.bool and got.device.type == "cpu" and got.shape == (2, H, W)
    assert torch.equal(got, masks[[0, 2]] >= 0.5)
    assert not batch.notes  # proposals are left: nothing to explain in FuseSelect
    assert "2 proposals of 3 mask(s), the batch's masks [0, 2]" in info[0] and "left out 1 empty" in info[0]


def test_counts_split_the_batch_between_images_in_batch_order():
    masks = box_masks([(0, 10, 0, 10), (10, 20, 0, 10), (0, 5, 30, 40), (20, 30, 20, 40)])
    batch, info = external_masks.mask_proposal_batch(masks, images(3), counts="1, 0, 3")
    assert [m.shape[0] for m in batch.masks] == [1, 0, 3]
    assert torch.equal(batch.masks[0], masks[:1].bool()) and torch.equal(batch.masks[2], masks[1:].bool())
    assert list(batch.notes) == [1] and "no external proposal" in batch.notes[1]
    assert "the batch's masks [1, 2, 3]" in info[2]
    assert batch.warnings == [f"image 1: {batch.notes[1]}"]


@pytest.mark.parametrize("total, suggestion", [(4, "write counts '2, 2'"), (3, None)])
def test_several_images_without_counts_are_refused_with_the_counts_to_write(total, suggestion):
    masks = box_masks([(0, 10, 0, 10)] * total)
    with pytest.raises(InputError) as err:
        external_masks.mask_proposal_batch(masks, images(2), counts="")
    msg = str(err.value)
    assert msg.startswith("counts: the image batch holds 2 images and the masks batch") and "batch order" in msg
    assert (suggestion in msg) if suggestion else "per image in batch order, write" not in msg


@pytest.mark.parametrize("counts, words", [("2, 1", "sum to 3, but there are 4 masks"), ("4", "one count per image"),
                                           ("a, b", "whole numbers")])
def test_counts_that_do_not_fit_the_batch_are_refused(counts, words):
    with pytest.raises(InputError, match="counts") as err:
        external_masks.mask_proposal_batch(box_masks([(0, 5, 0, 5)] * 4), images(2), counts=counts)
    assert words in str(err.value)


def test_counts_problems_are_found_before_the_run():
    assert external_masks.counts_problem("") is None and external_masks.counts_problem(" 3, 5 ") is None
    assert "whole numbers" in external_masks.counts_problem("3 masks")
    assert ">= 0" in external_masks.counts_problem("2, -1")


def test_masks_of_another_size_are_refused_or_resized_nearest():
    small = box_masks([(0, 5, 0, 5), (5, 15, 10, 20)], H // 2, W // 2)
    with pytest.raises(InputError) as err:
        external_masks.mask_proposal_batch(small, images(1))
    assert "masks: the masks are 20 x 15" in str(err.value) and "40 x 30" in str(err.value)
    assert "the node's resize input" in str(err.value)
    batch, info = external_masks.mask_proposal_batch(small, images(1), resize="nearest")
    assert torch.equal(batch.masks[0], box_masks([(0, 10, 0, 10), (10, 30, 20, 40)]).bool())
    assert "resized from 20 x 15 to 40 x 30" in info[0]
    with pytest.raises(InputError, match="masks of image 0: .*aspect ratio"):
        external_masks.mask_proposal_batch(torch.ones(2, 30, 30), images(2), counts="1, 1", resize="nearest")


def test_post_filter_keeps_the_largest_and_names_the_batch_masks_it_kept():
    masks = box_masks([(0, 4, 0, 4), (0, 20, 0, 20), (10, 20, 10, 30)])  # 16, 400, 200 px
    settings = proposal_filter.sam_filter_settings("custom", get_preset("official"), 2, 0)
    batch, info = external_masks.mask_proposal_batch(masks, images(1), settings=settings)
    assert [int(m.sum()) for m in batch.masks[0]] == [400, 200]
    assert "the batch's masks [1, 2]" in info[0] and "kept 2 of 3" in info[0]


def test_a_post_filter_that_removes_every_mask_says_how_to_keep_them():
    masks = box_masks([(0, 4, 0, 4), (0, 5, 0, 5)])  # under the official 10000 px at 640 x 480 (39 px here)
    settings = proposal_filter.sam_filter_settings("preset", get_preset("official"), 10, 10000)
    batch, info = external_masks.mask_proposal_batch(masks, images(1), settings=settings)
    assert batch.masks[0].shape == (0, H, W)
    assert "removed all 2" in batch.notes[0] and "set post_filter to 'none'" in batch.notes[0]
    assert batch.notes[0] in info[0]


def test_an_empty_mask_batch_gives_no_proposal_and_the_reason():
    batch, _ = external_masks.mask_proposal_batch(torch.zeros(0, H, W), images(1))
    assert batch.masks[0].shape == (0, H, W) and "no external proposal was given" in batch.notes[0]


@pytest.mark.parametrize("masks, image, words", [
    (torch.zeros(2, 3, H, W), images(1), "masks: expected a MASK batch [N, H, W]"),
    (box_masks([(0, 5, 0, 5)]), torch.zeros(H, W, 3), "image: expected an IMAGE [B, H, W, C]"),
    (box_masks([(0, 5, 0, 5)]) * 2, images(1), "masks: float masks must lie in [0, 1]"),
])
def test_inputs_that_are_not_masks_or_images_are_named(masks, image, words):
    with pytest.raises(InputError) as err:
        external_masks.mask_proposal_batch(masks, image)
    assert words in str(err.value)


def test_proposals_to_masks_and_back_is_the_same_batch():
    proposals = wire_types.ProposalBatch([box_masks([(0, 10, 0, 10), (5, 9, 5, 30)]).bool(), torch.zeros(0, H, W,
                                          dtype=torch.bool), box_masks([(20, 30, 0, 40)]).bool()], source="sam")
    masks, counts = external_masks.proposals_to_masks(proposals)
    assert masks.dtype == torch.float32 and masks.shape == (3, H, W) and counts == "2, 0, 1"
    back, _ = external_masks.mask_proposal_batch(masks, images(3), counts=counts)
    assert [torch.equal(a, b) for a, b in zip(back.masks, proposals.masks)] == [True] * 3


# ComfyUI core's SAM3_Detect (comfy_extras/nodes_sam3.py, not in 0.3.64): with individual_masks on, its MASK output
# is every image's instance masks concatenated in image order (an image with none adds zero masks), and its second
# output (BOUNDING_BOX) is per image a list of {x, y, width, height, score}, one per instance.
def detect_boxes(per_image: list[list[tuple[int, int, int, int]]]) -> list[list[dict]]:
    return [[{"x": float(x0), "y": float(y0), "width": float(x1 - x0), "height": float(y1 - y0), "score": 0.9 - 0.1 * k}
             for k, (y0, y1, x0, x1) in enumerate(boxes)] for boxes in per_image]


def test_sam3_detect_boxes_split_its_concatenated_mask_batch_between_the_images():
    per_image = [[(0, 10, 0, 10), (0, 10, 20, 30)], [], [(15, 25, 5, 15), (5, 20, 25, 35), (20, 30, 0, 8)]]
    masks = box_masks([b for boxes in per_image for b in boxes])  # 5 masks: 2, 0, 3
    batch, info = external_masks.mask_proposal_batch(masks, images(3), "", boxes=detect_boxes(per_image))
    assert [m.shape[0] for m in batch.masks] == [2, 0, 3]
    assert torch.equal(batch.masks[2][1], masks[3] >= 0.5) and torch.equal(batch.masks[0][0], masks[0] >= 0.5)
    assert "the batch's masks [2, 3, 4]" in info[2] and 1 in batch.notes  # the image with no instance says so
    assert external_masks.box_counts(detect_boxes(per_image), 3, 5) == [2, 0, 3]


def test_one_images_boxes_may_come_flat_or_as_one_dict():
    one = detect_boxes([[(0, 10, 0, 10), (0, 10, 20, 30)]])
    assert external_masks.box_counts(one[0], 1, 2) == [2]  # a flat list of dicts: the one image's
    assert external_masks.box_counts(one[0][0], 1, 1) == [1]
    assert external_masks.box_counts([], 1, 0) == [0]


def test_boxes_that_do_not_fit_the_masks_or_images_are_refused_naming_the_fix():
    per_image = [[(0, 10, 0, 10)], [(0, 10, 20, 30)]]
    merged = box_masks([(0, 10, 0, 10), (0, 10, 20, 30)])
    with pytest.raises(InputError, match=r"boxes: boxes of 2 image\(s\) for an image batch of 3"):
        external_masks.mask_proposal_batch(merged, images(3), "", boxes=detect_boxes(per_image))
    with pytest.raises(InputError, match="individual_masks on"):
        external_masks.mask_proposal_batch(merged[:1], images(2), "", boxes=detect_boxes(per_image))
    with pytest.raises(InputError, match="counts / boxes: both say"):
        external_masks.mask_proposal_batch(merged, images(2), "1, 1", boxes=detect_boxes(per_image))
    with pytest.raises(InputError, match="connect SAM3_Detect's second output"):
        external_masks.mask_proposal_batch(merged, images(2), "", boxes="two")


def test_sam3_scores_are_refused_where_refdiffs_scores_go():
    proposals = wire_types.ProposalBatch([torch.zeros(2, H, W, dtype=torch.bool)], source="concept")
    concept = wire_types.ScoreBatch([torch.tensor([0.9, 0.5])], kind="concept", counts=[2])
    with pytest.raises(InputError, match="generative: these are SAM 3's instance scores"):
        wire_types.check_unfused_scores(proposals, concept, None, "are fused")
