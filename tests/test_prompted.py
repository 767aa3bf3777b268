"""Attention-guided SAM prompts (refdiff.prompted): planted maps and a predictor with known answers test the peak
finding, box construction, NMS and the selection; the tiny random SAM tests the plumbing through RefDiff."""
from __future__ import annotations

import argparse
import warnings

import numpy as np
import pytest
import torch

from refdiff.config import OFFICIAL, PAPER, get_variant, needs_map, proposal_source
from refdiff.errors import InputError
from refdiff.prompted import map_prompts, mask_nms, prompt_queries, prompted_proposals, set_image_cached

H, W = 60, 90


def box_mask(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    m = torch.zeros(H, W, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


A = box_mask(10, 40, 5, 35)  # object A on the left
B = box_mask(20, 50, 55, 85)  # object B on the right


def bump(cy: float, cx: float, sigma: float = 6.0) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    return torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma ** 2))


def normalised(c: torch.Tensor) -> torch.Tensor:
    return (c - c.min()) / (c.max() - c.min())


class PlantedPredictor:
    """A SamPredictor look-alike that knows the objects: a point prompt returns the object that contains it, a box
    prompt the object whose centre lies in the box; three masks each (the object twice, as SAM's multimask output
    often repeats, and its upper half), scores 0.9 / 0.85 / 0.6. Counts set_image calls."""

    def __init__(self, objects: list[torch.Tensor]) -> None:
        self.objects, self.set_calls, self.calls = objects, 0, []
        self.features = None

    def set_image(self, image: np.ndarray) -> None:
        self.set_calls += 1
        self.features = torch.full((1, 4), float(image.mean()))

    def predict(self, point_coords=None, point_labels=None, box=None, multimask_output=True):
        self.calls.append((point_coords, box))
        hit = None
        for obj in self.objects:
            ys, xs = torch.nonzero(obj, as_tuple=True)
            if point_coords is not None:
                x, y = int(point_coords[0][0]), int(point_coords[0][1])
                inside = bool(obj[min(y, H - 1), min(x, W - 1)])
            else:
                cx, cy = float(xs.float().mean()), float(ys.float().mean())
                inside = box[0] <= cx <= box[2] and box[1] <= cy <= box[3]
            if inside:
                hit = obj
                break
        if hit is None:
            hit = torch.zeros(H, W, dtype=torch.bool)
        half = hit.clone()
        rows = torch.nonzero(hit.any(dim=1)).flatten()
        if rows.numel():
            half[int(rows[len(rows) // 2]):] = False
        masks = torch.stack([hit, hit, half]).numpy()
        scores = np.array([0.9, 0.85, 0.6], dtype=np.float32)
        if not multimask_output:
            masks, scores = masks[:1], scores[:1]
        return masks, scores, np.zeros_like(masks, dtype=np.float32)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def best_iou(masks: torch.Tensor, target: torch.Tensor) -> float:
    return max((iou(m, target) for m in masks), default=0.0)


def test_peak_in_object_a_gives_a_proposal_covering_a():
    c = normalised(bump(25, 20))  # inside A
    prompts = map_prompts(c, threshold=0.5, max_prompts=4)
    assert len(prompts) == 1
    x, y = prompts.points[0].tolist()
    assert A[int(y), int(x)]
    x0, y0, x1, y1 = prompts.boxes[0].tolist()
    assert x0 <= x <= x1 and y0 <= y <= y1 and x1 - x0 < W / 2  # the box of the bump's region, not the image
    masks, _ = prompted_proposals(PlantedPredictor([A, B]), c, H, W)
    assert best_iou(masks, A) == 1.0
    assert best_iou(masks, B) == 0.0
    # the duplicate answer is suppressed: A once, its half once
    assert masks.shape[0] == 2


def test_two_peaks_give_proposals_for_both_objects():
    c = normalised(bump(25, 20) + 0.8 * bump(35, 70))
    masks, prompts = prompted_proposals(PlantedPredictor([A, B]), c, H, W, kind="points")
    assert len(prompts) == 2
    assert prompts.peaks[0] > prompts.peaks[1]  # the highest peak first
    assert best_iou(masks, A) == 1.0 and best_iou(masks, B) == 1.0


def test_max_prompts_keeps_the_highest_peaks():
    c = normalised(bump(25, 20) + 0.8 * bump(35, 70))
    prompts = map_prompts(c, threshold=0.5, max_prompts=1)
    assert len(prompts) == 1 and A[int(prompts.points[0, 1]), int(prompts.points[0, 0])]


def test_peaks_closer_than_min_distance_count_once():
    c = normalised(bump(25, 15, 3) + bump(25, 25, 3))  # two maxima 10 px apart in one object
    assert len(map_prompts(c, threshold=0.3, min_distance=0.2)) == 1  # 0.2 * 90 = 18 px
    assert len(map_prompts(c, threshold=0.3, min_distance=0.05)) == 2


def test_boxes_prompts_use_the_region_box():
    c = normalised(bump(25, 20) + 0.8 * bump(35, 70))
    predictor = PlantedPredictor([A, B])
    masks, _ = prompted_proposals(predictor, c, H, W, kind="boxes")
    assert all(point is None and box is not None for point, box in predictor.calls)
    assert best_iou(masks, A) == 1.0 and best_iou(masks, B) == 1.0
    queries = prompt_queries(map_prompts(c), "points+boxes")
    assert len(queries) == 4  # per peak: the point alone, and the box with the point


@pytest.mark.parametrize("c", [torch.zeros(H, W), torch.full((H, W), 0.7)])
def test_flat_map_gives_no_prompt_and_no_mask(c):
    predictor = PlantedPredictor([A, B])
    masks, prompts = prompted_proposals(predictor, c, H, W)
    assert masks.shape == (0, H, W) and masks.dtype == torch.bool
    assert len(prompts) == 0 and "flat" in prompts.reason
    assert predictor.calls == []


def test_bad_maps_and_settings_are_refused():
    with pytest.raises(InputError, match="NaN"):
        map_prompts(torch.full((H, W), float("nan")))
    with pytest.raises(InputError, match="prompt_threshold"):
        map_prompts(bump(25, 20), threshold=0.0)
    with pytest.raises(InputError, match="does not match"):
        prompted_proposals(PlantedPredictor([A]), bump(25, 20), H + 1, W)


def test_mask_nms_keeps_the_best_of_near_duplicates():
    a2 = A.clone()
    a2[10, 5] = False  # IoU with A just under 1
    masks = torch.stack([a2, A, B, torch.zeros(H, W, dtype=torch.bool)])
    keep, scores = mask_nms(masks, torch.tensor([0.5, 0.9, 0.7, 1.0]), iou_threshold=0.8)
    assert keep.tolist() == [1, 2]  # A (better score than its near-copy), then B; the empty mask dropped
    assert scores.tolist() == pytest.approx([0.9, 0.7])


def test_image_embedding_is_computed_once_per_image():
    from refdiff.pipeline import LRUCache

    predictor, cache = PlantedPredictor([A]), LRUCache(4)
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    assert set_image_cached(predictor, rgb, cache, "img") is True
    predictor.features = None
    assert set_image_cached(predictor, rgb, cache, "img") is False
    assert predictor.set_calls == 1 and predictor.features is not None  # the saved embedding put back


def test_presets_keep_the_automatic_generator():
    for preset in (OFFICIAL, PAPER):
        assert preset.proposal_mode == "automatic"
        for name in ("full", "GS", "DS", "sam-clip"):
            assert proposal_source(name, preset) == "sam"
        assert not needs_map("DS", preset)
    prompted = OFFICIAL.with_(proposal_mode="prompted")
    assert proposal_source("full", prompted) == "prompted" and proposal_source("G", prompted) == "threshold"
    assert needs_map("DS", prompted) and needs_map("sam-clip", prompted)
    assert proposal_source("prompted", OFFICIAL) == "prompted"


# -- through RefDiff ------------------------------------------------------------------------------------------------
TEXT = "the red box on the left"


def test_refdiff_prompted_with_the_tiny_sam(models, image):
    from refdiff import RefDiff
    from tiny_runs import FAST

    sd, sam, clip = models
    model = RefDiff(sd=sd, sam=sam, clip=clip, **FAST)
    results = model.segment_variants(image, TEXT, ["full", "prompted"], seed=0)
    auto, fast = results["full"], results["prompted"]
    assert "sam" in auto.timings and "sam_prompted" in fast.timings
    assert fast.proposals.dtype == bool and fast.proposals.shape[1:] == image.shape[:2]
    assert fast.proposals.shape[0] >= 1 and fast.mask.shape == image.shape[:2]
    assert len(model._sam_embeddings.data) == 1
    # official unchanged: the automatic variant never touched the predictor
    plain = RefDiff(sd=sd, sam=sam, clip=clip, **FAST)(image, TEXT, "full")
    assert "sam_prompted" not in plain.timings
    np.testing.assert_array_equal(plain.proposals, auto.proposals)


def test_refdiff_prompted_mode_planted(models, image, monkeypatch):
    """proposal_mode='prompted' routes the SAM variants, DS included (which then computes c), through the prompts."""
    from refdiff import RefDiff
    from tiny_runs import FAST

    sd, _, clip = models
    h, w = image.shape[:2]
    left, right = torch.zeros(h, w, dtype=torch.bool), torch.zeros(h, w, dtype=torch.bool)
    left[5:30, 4:25] = True
    right[10:40, 40:60] = True

    predictor = PlantedPredictorAt(h, w, [left, right])
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    planted = torch.exp(-((y - 17) ** 2 + (x - 14) ** 2) / 50.0)
    monkeypatch.setattr(RefDiff, "_generative_map", lambda self, *a, **k: (planted, 3))
    model = RefDiff(sd=sd, sam=predictor, clip=clip, proposal_mode="prompted", **FAST)
    results = model.segment_variants(image, TEXT, ["full", "DS"], seed=0)
    for name in ("full", "DS"):
        r = results[name]
        assert best_iou(torch.from_numpy(r.proposals), left) == 1.0
        assert best_iou(torch.from_numpy(r.proposals), right) == 0.0
        assert r.attention is not None
    model(image, "the other box", "full")
    assert predictor.set_calls == 1  # one embedding for the image, whatever the text


def test_refdiff_flat_map_gives_an_empty_mask_with_a_reason(models, image, monkeypatch):
    from refdiff import RefDiff
    from tiny_runs import FAST

    sd, sam, clip = models
    h, w = image.shape[:2]
    monkeypatch.setattr(RefDiff, "_generative_map", lambda self, *a, **k: (torch.zeros(h, w), 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = RefDiff(sd=sd, sam=sam, clip=clip, **FAST)(image, TEXT, "prompted")
    assert r.index == -1 and not r.mask.any() and r.proposals.shape == (0, h, w)
    assert any("flat" in note and "prompt_threshold" in note for note in r.warnings)
    assert any("flat" in str(x.message) for x in caught)


class PlantedPredictorAt(PlantedPredictor):
    """PlantedPredictor on an image of another size."""

    def __init__(self, h: int, w: int, objects: list[torch.Tensor]) -> None:
        super().__init__(objects)
        self.h, self.w = h, w

    def predict(self, point_coords=None, point_labels=None, box=None, multimask_output=True):
        global H, W
        saved = H, W
        H, W = self.h, self.w
        try:
            return super().predict(point_coords, point_labels, box, multimask_output)
        finally:
            H, W = saved


def test_cli_proposal_mode_option():
    from refdiff.cli.options import add_shared_arguments, preset_overrides

    parser = argparse.ArgumentParser()
    add_shared_arguments(parser)
    assert preset_overrides(parser.parse_args(["--proposal-mode", "prompted"]))["proposal_mode"] == "prompted"
    assert preset_overrides(parser.parse_args(["--set", "proposal_mode=prompted"]))["proposal_mode"] == "prompted"
    assert "proposal_mode" not in preset_overrides(parser.parse_args([]))
    with pytest.raises(InputError, match="disagree"):
        preset_overrides(parser.parse_args(["--proposal-mode", "prompted", "--set", "proposal_mode=automatic"]))
    assert get_variant("full-prompted").name == "prompted"
