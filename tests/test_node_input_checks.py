"""What the nodes check and say before or instead of a silent result, without ComfyUI: the SAM post-filter as the
nodes set it (relative to the image area or in absolute pixels, and the note of an image left without a mask),
a text that names no object, and the all-in-one node's variant / factor / linked-type checks."""
from __future__ import annotations

import pytest
import torch

from refdiff.config import get_preset
from refdiff.errors import InputError
from pack_nodes import load_node_module as _load

proposal_filter = _load("proposal_filter")
input_checks = _load("input_checks")
token_positions = _load("token_positions")
wire_types = _load("wire_types")

OFFICIAL = get_preset("official")
PAPER = get_preset("paper")


def squares(height: int, width: int, sides: list[int]) -> torch.Tensor:
    """Masks [N, H, W] holding one filled side x side square each (area side**2)."""
    masks = torch.zeros(len(sides), height, width, dtype=torch.bool)
    for i, side in enumerate(sides):
        masks[i, :side, :side] = True
    return masks


# ---------------------------------------------------------------------------------------- post-filter
def test_preset_filter_is_relative_to_the_image_area():
    s = proposal_filter.sam_filter_settings("preset", OFFICIAL, 0, 0)
    assert (s.keep_largest, s.min_area, s.reference) == (10, 10000.0, 640 * 480)
    # 131 x 97 = 12707 px: 10000 px at 307200 px scales to 413.6 px
    assert s.threshold(97, 131) == pytest.approx(10000 * 12707 / 307200)
    absolute = proposal_filter.sam_filter_settings("preset", OFFICIAL, 0, 0, proposal_filter.ABSOLUTE)
    assert absolute.reference is None and absolute.threshold(97, 131) == 10000.0


def test_a_131x97_image_keeps_its_masks_relative_and_says_why_absolute():
    masks = squares(97, 131, [21, 30, 10])  # 441, 900 and 100 px
    kept, note = proposal_filter.filter_image(masks, proposal_filter.sam_filter_settings("preset", OFFICIAL, 0, 0))
    assert note is None and sorted(kept.flatten(1).sum(1).tolist()) == [441, 900]
    settings = proposal_filter.sam_filter_settings("preset", OFFICIAL, 0, 0, proposal_filter.ABSOLUTE)
    kept, note = proposal_filter.filter_image(masks, settings, "set post_filter to 'custom' and lower min_area")
    assert kept.shape == (0, 97, 131)
    assert note == ("the SAM post-filter removed all 3 masks of this 131 x 97 image, so the mask is empty: the "
                    "largest has 900 px, not above the area threshold of 10000 px (sam_min_area=10000 in absolute "
                    "pixels, as sam_min_area_reference=None); on this node: set area_filter to 'relative to image "
                    "area' (a threshold of 414 px here), or set post_filter to 'custom' and lower min_area (0 keeps "
                    "every mask)")


def test_tiny_and_huge_images_scale_the_threshold():
    settings = proposal_filter.segment_filter_settings(OFFICIAL)
    assert settings.threshold(8, 8) == pytest.approx(10000 * 64 / 307200)  # 2.1 px
    kept, note = proposal_filter.filter_image(squares(8, 8, [1, 2]), settings)
    assert note is None and kept.flatten(1).sum(1).tolist() == [4]  # the 4 px square stays, the 1 px one goes
    assert settings.threshold(3000, 4000) == pytest.approx(10000 * 12e6 / 307200)  # 390625 px
    kept, note = proposal_filter.filter_image(squares(300, 400, [100]), settings)  # 10000 px of 120000: 3906 px
    assert note is None and kept.shape[0] == 1


def test_a_relative_filter_that_removes_everything_says_so():
    settings = proposal_filter.segment_filter_settings(OFFICIAL, min_area=200000)
    kept, note = proposal_filter.filter_image(squares(97, 131, [20]), settings)
    assert kept.shape[0] == 0
    assert note.startswith("the SAM post-filter removed the only mask of this 131 x 97 image")
    assert note.endswith("scaled to this image's 12707 px); on this node: lower min_area (0 keeps every mask)")


def test_no_sam_mask_at_all_is_named():
    kept, note = proposal_filter.filter_image(torch.zeros(0, 8, 8, dtype=torch.bool),
                                              proposal_filter.segment_filter_settings(OFFICIAL))
    assert kept.shape == (0, 8, 8)
    assert note == ("SAM found no mask in this 8 x 8 image, so the mask is empty: lower pred_iou_thresh or "
                    "stability_score_thresh, or raise points_per_side")


def test_segment_sentinels_take_the_preset_values():
    assert proposal_filter.segment_filter_settings(OFFICIAL) == proposal_filter.FilterSettings(10, 10000.0, 307200)
    assert proposal_filter.segment_filter_settings(PAPER) == proposal_filter.FilterSettings(None, 0.0, 307200)
    assert proposal_filter.segment_filter_settings(OFFICIAL, 0, 0) == proposal_filter.FilterSettings(None, 0.0, 307200)
    custom = proposal_filter.segment_filter_settings(OFFICIAL, 3, 50, proposal_filter.ABSOLUTE)
    assert custom == proposal_filter.FilterSettings(3, 50.0, None)
    assert proposal_filter.sam_filter_settings("none", OFFICIAL, 5, 5) == proposal_filter.FilterSettings(None, 0.0,
                                                                                                          307200)
    assert proposal_filter.sam_filter_settings("custom", OFFICIAL, 0, 7).keep_largest is None
    with pytest.raises(InputError, match="area_filter must be one of"):
        proposal_filter.area_reference("relative", OFFICIAL)
    assert "scaled with the image area" in proposal_filter.segment_filter_settings(OFFICIAL).describe()
    assert "absolute pixels" in custom.describe()


def test_proposal_notes_become_warnings_in_image_order():
    batch = wire_types.ProposalBatch([torch.zeros(0, 4, 4, dtype=torch.bool)] * 3, source="sam",
                                     notes={2: "b", 0: "a"})
    assert batch.warnings == ["image 0: a", "image 2: b"]
    assert wire_types.ProposalBatch([], source="sam").warnings == []


# ---------------------------------------------------------------------------------------- text
def test_text_problems_at_queue_time():
    assert token_positions.text_problem("   ", "error").startswith("text is empty")
    message = token_positions.text_problem("on the left", "error")
    assert message == ("text 'on the left' names no object for the attention map to follow: add the object's "
                       "noun, e.g. 'the dog on the left'; or set no_noun to 'warn' to run it anyway")
    assert token_positions.text_problem("on the left", "warn") is None
    assert token_positions.text_problem("the horse on the left", "error") is None
    assert "names no object" in token_positions.text_problem("the horse\non the left", "error")
    assert "holds no words" in token_positions.text_problem("(:1.2)", "error")
    assert token_positions.text_problem(None, "error") is None  # a linked text is checked when the node runs
    assert token_positions.text_problem("a dog", "ignore") == "no_noun must be one of ['warn', 'error'], got 'ignore'"


@pytest.mark.parametrize("text", ["on the left", "the second from the left", "leftmost", "the biggest one",
                                  "the one on the right", "the white thing on the left"])
def test_texts_naming_no_object_pass_the_queue_by_default_with_a_note(text):
    assert token_positions.text_problem(text) is None
    parsed, _ = token_positions.parse_line(text)
    assert "the target class is open" in token_positions.root_note(parsed)


@pytest.mark.parametrize("text", ["...", "a dog\n?!"])
def test_punctuation_only_text_is_refused_at_queue_time(text):
    assert "holds only punctuation: give a referring expression" in token_positions.text_problem(text)


def test_root_note_under_each_policy():
    parsed, _ = token_positions.parse_line("on the left")
    with pytest.raises(InputError, match="names no object"):
        token_positions.root_note(parsed, "error")
    assert "names no object" in token_positions.root_note(parsed, "warn")
    assert token_positions.root_note(token_positions.parse_line("the dog on the left")[0], "error") is None
    left_zebra, _ = token_positions.parse_line("left zebra")  # parsed root 'left', noun 'zebra': warned
    assert left_zebra.nouns and not left_zebra.root_is_noun
    assert "'zebra'" in token_positions.root_note(left_zebra, "error")
    chosen, overridden = token_positions.parse_line("left zebra", root_word="zebra")
    assert overridden and token_positions.root_note(chosen, "error", overridden) is None


# ---------------------------------------------------------------------------------------- all-in-one node
def test_variant_needs_its_models():
    problem = input_checks.variant_inputs_problem
    assert problem("full", {"sam", "clip_scorer"}) is None
    assert problem("full", {"clip_scorer", "model"}) == ("variant 'full' needs a SAM model: connect a RefDiff SAM "
                                                         "Loader to 'sam', or choose variant 'G'")
    assert problem("full", {"sam"}) == ("variant 'full' needs a CLIP scorer: connect a RefDiff CLIP Loader to "
                                        "'clip_scorer', or choose variant 'G' or 'GS'")
    assert problem("DS", set()) == ("variant 'DS' needs a SAM model and a CLIP scorer: connect a RefDiff SAM Loader "
                                    "to 'sam' and a RefDiff CLIP Loader to 'clip_scorer', or choose variant 'G'")
    assert problem("G", set()) is None and problem("GS", {"sam"}) is None
    assert problem("cluster", {"sam", "clip_scorer"}).startswith("variant must be one of")


def test_masks_wired_to_proposals_stand_in_for_sam_and_are_refused_where_unused():
    problem = input_checks.variant_inputs_problem
    assert problem("GS", {"proposals"}) is None and problem("full", {"proposals", "clip_scorer"}) is None
    assert problem("DS", {"proposals"}) == ("variant 'DS' needs a CLIP scorer: connect a RefDiff CLIP Loader to "
                                            "'clip_scorer', or choose variant 'GS'")
    for variant in ("G", "prompted"):
        assert problem(variant, {"proposals", "sam", "clip_scorer"}) == (
            f"proposals: variant '{variant}' makes its own proposals, so the masks wired to 'proposals' would not "
            "be used; choose variant 'full' or 'GS' or 'DS' or 'sam-clip', or disconnect 'proposals'")


def test_concept_proposals_need_sam3_instead_of_sam():
    problem, mode = input_checks.variant_inputs_problem, input_checks.concept_mode
    assert mode("concept") and not mode("automatic", "plus", {"sam3"})
    assert mode("preset", "plus", {"sam3"}) and not mode("preset", "plus", set()) and not mode("preset", "official",
                                                                                               {"sam3"})
    assert problem("full", {"sam3", "clip_scorer"}, concept=True) is None
    assert problem("GS", {"sam"}, concept=True) == ("variant 'GS' needs a SAM 3 model: connect a RefDiff SAM 3 "
                                                   "Loader to 'sam3', or choose variant 'G'")
    assert problem("prompted", {"sam3", "clip_scorer"}, concept=True).startswith("variant 'prompted' needs a SAM")
    assert input_checks.proposal_mode_preset(get_preset("plus"), "automatic").concept_with_sam3 is False


def test_capture_factor_input():
    assert input_checks.capture_factor(-1, OFFICIAL) == OFFICIAL.capture_factor == 4
    assert input_checks.capture_factor(8, OFFICIAL) == 8
    with pytest.raises(InputError, match=r"factor 0 .*\(-1 = the preset's 4\)"):
        input_checks.capture_factor(0, OFFICIAL)


def test_linked_types_are_checked_as_comfyui_would():
    declared = {"required": {"image": ("IMAGE", {})}, "optional": {"sam": ("REFDIFF_SAM", {})}}
    same = lambda received, expected: received == expected  # noqa: E731  (ComfyUI's matcher, reduced)
    assert input_checks.linked_type_problem({"image": "IMAGE", "sam": "REFDIFF_SAM"}, declared, same) is None
    assert input_checks.linked_type_problem({"sam": "MODEL"}, declared, same) == (
        "sam: a MODEL output is linked, but sam takes REFDIFF_SAM; connect a REFDIFF_SAM output")
    assert input_checks.linked_type_problem({"other": "MODEL"}, declared, same) is None
