"""proposal_mode "concept": SAM 3's instances of the target noun are the proposals and Ref-Diff's scores, fusion
and spatial terms choose among them (docs/METHOD.md section 17). Planted answers through the public interface:
a concept segmenter given as a function (what SAM 3 run elsewhere hands over), and a tiny random SAM 3."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from refdiff.config import OFFICIAL, PAPER, PLUS, proposal_source
from refdiff.errors import InputError
from refdiff.pipeline import RefDiff

from tiny_runs import FAST

H, W = 60, 120
CARS = [(30, 50, 4, 22), (30, 50, 30, 50), (30, 50, 60, 76), (30, 50, 88, 116)]  # rows, columns: left to right
SKY = (0, 20, 0, 120)


def street() -> np.ndarray:
    """Four grey cars in a row on a road under a blue band of sky."""
    rng = np.random.default_rng(0)
    rgb = np.full((H, W, 3), 90, np.uint8)
    y0, y1, x0, x1 = SKY
    rgb[y0:y1, x0:x1] = (90, 150, 230)
    for y0, y1, x0, x1 in CARS:
        rgb[y0:y1, x0:x1] = (160, 160, 170)
    return rgb + rng.integers(0, 10, rgb.shape, dtype=np.uint8)


def box_mask(box) -> np.ndarray:
    out = np.zeros((H, W), bool)
    y0, y1, x0, x1 = box
    out[y0:y1, x0:x1] = True
    return out


class PlantedConcepts:
    """A concept segmenter that knows cars: SAM 3's answer for "car" planted (the four cars in shuffled order and
    the sky band, which a detector may return as one more "instance"), nothing for any other noun."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def __call__(self, rgb: np.ndarray, prompt: str):
        self.prompts.append(prompt)
        if prompt != "car":
            return np.zeros((0, H, W), bool), np.zeros(0)
        order = [2, 0, 3, 1]  # the second car from the left is the given mask 3, and not the best-scored
        masks = np.stack([box_mask(CARS[i]) for i in order] + [box_mask(SKY)])
        return masks, np.array([0.9, 0.8, 0.7, 0.6, 0.5])


@pytest.fixture(scope="module")
def parts(models):
    return models


def test_plus_takes_concept_when_a_sam3_is_given_and_keeps_its_mode_otherwise():
    assert proposal_source("full", PLUS) == "prompted" and proposal_source("full", PLUS, sam3=True) == "concept"
    for preset in (OFFICIAL, PAPER):
        assert proposal_source("full", preset, sam3=True) == "sam"
    concept = OFFICIAL.with_(proposal_mode="concept")
    assert proposal_source("DS", concept) == "concept" and proposal_source("G", concept) == "threshold"
    assert OFFICIAL.concept_score_weight == PAPER.concept_score_weight == 0.0
    explicit = RefDiff(preset="plus", proposal_mode="automatic", sam3=PlantedConcepts())
    assert proposal_source("full", explicit.preset, sam3=True) == "sam"


def test_the_second_car_from_the_left_among_sam3s_cars(parts):
    sd, sam, clip = parts
    concepts = PlantedConcepts()
    # the random CLIP spreads the cars' scores beyond the pool's margin: a wide margin keeps all four in the pool
    model = RefDiff(sd=sd, sam=sam, clip=clip, preset="plus", sam3=concepts, spatial_pool_margin=1.0, **FAST)
    result = model(street(), "the second car from the left")
    assert concepts.prompts == ["car"]  # the target noun, not the sentence
    assert result.proposals.shape == (5, H, W)
    np.testing.assert_array_equal(result.proposals[result.index], box_mask(CARS[1]))
    assert result.scores["concept"].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5])
    assert any(k.startswith("spatial_ordinal") for k in result.scores)
    assert not any("concept proposals" in w for w in result.warnings)
    plain = RefDiff(sd=sd, sam=sam, clip=clip, preset="official", proposal_mode="concept", sam3=concepts, **FAST)
    rightmost = RefDiff(sd=sd, sam=sam, clip=clip, preset="plus", sam3=concepts, spatial_pool_margin=1.0, **FAST)
    got = rightmost(street(), "the rightmost car")
    np.testing.assert_array_equal(got.proposals[got.index], box_mask(CARS[3]))
    assert plain(street(), "the second car from the left").proposals.shape == (5, H, W)


def test_the_detection_score_is_an_optional_fusion_term(parts):
    sd, sam, clip = parts
    kw = dict(sd=sd, sam=sam, clip=clip, preset="official", proposal_mode="concept", sam3=PlantedConcepts(), **FAST)
    off = RefDiff(**kw)(street(), "a car")
    on = RefDiff(concept_score_weight=2.0, **kw)(street(), "a car")
    np.testing.assert_allclose(on.scores["fused"], off.scores["fused"] + 2.0 * off.scores["concept"], rtol=1e-5)


def test_a_noun_sam3_finds_nothing_for_falls_back_to_automatic_proposals(parts):
    sd, sam, clip = parts
    concepts = PlantedConcepts()
    model = RefDiff(sd=sd, sam=sam, clip=clip, preset="official", proposal_mode="concept", sam3=concepts, **FAST)
    with pytest.warns(Warning, match="found no instance of 'dog'"):
        result = model(street(), "the dog on the left")
    assert concepts.prompts == ["dog"]
    assert any("SAM 3 found no instance of 'dog'" in w and "automatic SAM proposals" in w for w in result.warnings)
    assert "concept" not in result.scores and result.proposals.shape[0] > 0  # tiny SAM's automatic masks
    opened = model(street(), "the one on the right")
    assert any("names no object" in w for w in opened.warnings)


def test_sam3_runs_once_per_image_and_noun(parts):
    sd, sam, clip = parts
    concepts = PlantedConcepts()
    model = RefDiff(sd=sd, sam=sam, clip=clip, preset="official", proposal_mode="concept", sam3=concepts, **FAST)
    first = model(street(), "the car on the left")
    again = model(street(), "the leftmost car")
    assert concepts.prompts == ["car"] and len(model._concepts.data) == 1
    np.testing.assert_array_equal(first.proposals, again.proposals)


def test_concept_mode_without_a_sam3_is_refused(parts):
    sd, sam, clip = parts
    with pytest.raises(InputError, match="needs a SAM 3 model"):
        RefDiff(sd=sd, sam=sam, clip=clip, proposal_mode="concept", **FAST)(street(), "a car")


@pytest.mark.skipif(importlib.util.find_spec("sam3") is None, reason="needs the sam3 package")
def test_a_tiny_random_sam3_runs_end_to_end_through_refdiff(parts, tmp_path):
    from refdiff.testing.sam3 import save_sam3_checkpoint, tiny_sam3

    sd, sam, clip = parts
    path = save_sam3_checkpoint(tiny_sam3(seed=2), tmp_path / "sam3.safetensors")
    model = RefDiff.from_pretrained(sam3=str(path), preset="official", proposal_mode="concept",
                                    concept_threshold=0.0, concept_max=6, **FAST)
    model._sd, model._sam, model._clip = (type(model._sd)(m) for m in (sd, sam, clip))
    result = model(street(), "the second car from the left")
    assert 0 < result.proposals.shape[0] <= 6 and result.proposals.shape[1:] == (H, W)
    assert result.scores["concept"].shape == (result.proposals.shape[0],) and result.index >= 0
    assert not any("concept proposals" in w for w in result.warnings)
    again = model(street(), "the car on the right")  # the image's SAM 3 features are reused
    assert again.proposals.shape[0] == result.proposals.shape[0]
