"""The node pack's ComfyUI-free modules (nodes/text_inputs.py, token_positions.py, tensors.py, previews.py,
wire_types.py): one text per image, the root word's token positions through the SD 1.x tokenizer, image/mask
conversions, previews and tables, the payloads' batch checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from refdiff.errors import InputError
from pack_nodes import load_node_module as _load

previews = _load("previews")
tensors = _load("tensors")
text_inputs = _load("text_inputs")
token_positions = _load("token_positions")
wire_types = _load("wire_types")


@pytest.fixture(scope="module")
def tokenizer():
    from refdiff.tokenizer import clip_tokenizer

    return clip_tokenizer()


# ------------------------------------------------------------------------------------------------ text
def test_text_lines_and_batches():
    assert text_inputs.split_lines("the dog\n\n  the cat  \n") == ["the dog", "the cat"]
    assert text_inputs.texts_for_batch("the dog", 3) == ["the dog"] * 3
    assert text_inputs.texts_for_batch("a\nb", 2) == ["a", "b"]
    with pytest.raises(InputError, match="text: 3 entries for a batch of 2 images"):
        text_inputs.texts_for_batch("a\nb\nc", 2)
    with pytest.raises(InputError, match="prompt is empty"):
        text_inputs.split_lines(" \n\t", "prompt")


def test_find_word_matches_whole_words_only():
    assert text_inputs.find_word("the man in that hat", "hat") == (16, 19)  # not inside "that" (12..16)
    assert text_inputs.find_word("The Horse", "horse") == (4, 9)
    with pytest.raises(InputError, match="root_word 'at' is not a whole word"):
        text_inputs.find_word("the cat", "at")
    with pytest.raises(InputError, match="single word"):
        text_inputs.find_word("the cat", "the cat")


def test_root_position_counts_the_start_token(tokenizer):
    item = token_positions.parse_item("the man in the red hat", tokenizer)
    assert item.parsed.root == "man"
    assert item.root_position == 2 and item.root_positions == [2]  # <start>=0, the=1, man=2
    assert item.tokens[:3] == ["<|startoftext|>", "the</w>", "man</w>"]
    assert item.prompt == "the man in the red hat, "


def test_root_word_override_is_found_by_offsets_not_substrings(tokenizer):
    item = token_positions.parse_item("a photo of the hat that is red", tokenizer, root_word="hat")
    assert item.root_overridden and item.parsed.root == "hat"
    assert item.root_position == 5  # a=1 photo=2 of=3 the=4 hat=5 ("that" is 6)
    assert item.tokens[5] == "hat</w>"


def test_multi_piece_root_word_uses_its_last_piece(tokenizer):
    item = token_positions.parse_item("the skateboarder on the left", tokenizer)
    assert item.parsed.root == "skateboarder"
    assert item.root_positions == [2, 3]  # skate + boarder</w>
    assert item.root_position == 3 and item.tokens[3] == "boarder</w>"
    assert item.parsed.directions == ("left",)


def test_prompt_weight_syntax_is_ignored_for_parsing(tokenizer):
    item = token_positions.parse_item("(dog:1.3) on the [left]", tokenizer)
    assert item.parsed.text == "dog on the left"
    assert item.parsed.root == "dog" and item.root_position == 1
    assert item.parsed.directions == ("left",)


def test_direction_clues_are_whole_words(tokenizer):
    assert token_positions.parse_item("the bright lamp", tokenizer).parsed.directions == ()
    assert token_positions.parse_item("the upper shelf on the right", tokenizer).parsed.directions == ("top", "right")


def test_parse_summary_names_root_position_and_directions(tokenizer):
    items = [token_positions.parse_item("the dog on the left", tokenizer)]
    summary = token_positions.parse_summary(items)
    assert "root 'dog'" in summary and "token 2 (dog</w>)" in summary and "directions: left" in summary


def test_too_long_text_is_reported(tokenizer):
    long_text = "the dog " + " ".join(["very"] * 80) + " big"
    items = [token_positions.parse_item(long_text, tokenizer)]
    warnings = token_positions.parse_warnings(items, tokenizer)
    assert len(warnings) == 1 and "cut off" in warnings[0] and "'big,'" in warnings[0]
    with pytest.raises(InputError, match="too long"):
        token_positions.parse_item(long_text, tokenizer, root_word="big")


# ------------------------------------------------------------------------------------------ images/masks
def test_images_to_rgb_keeps_every_frame():
    image = torch.zeros(2, 3, 4, 3)
    image[1] = 1.0
    image[0, 0, 0] = torch.tensor([0.5, 0.25, 1.0])
    frames = tensors.images_to_rgb(image)
    assert len(frames) == 2 and frames[0].dtype == np.uint8 and frames[0].shape == (3, 4, 3)
    assert frames[0][0, 0].tolist() == [128, 64, 255]
    assert (frames[1] == 255).all()
    with pytest.raises(InputError, match="IMAGE batch"):
        tensors.images_to_rgb(torch.zeros(3, 4, 3))


def test_prepared_squares_pad_centred_and_resize():
    image = torch.ones(1, 53, 77, 3) * 0.5  # wider than high: padded above and below
    square = tensors.prepared_squares(image, size=128)
    assert square.shape == (1, 128, 128, 3)
    assert float(square[0, :15].max()) == 0.0 and float(square[0, -15:].max()) == 0.0  # black bands
    assert abs(float(square[0, 64, 64, 0]) - 0.5) < 0.01  # the image itself in the middle
    geometry = tensors.frame_geometry(53, 77, 128)
    assert (geometry.side, geometry.offset, geometry.size, geometry.width, geometry.height) == \
        (77, (0, 12), 128, 77, 53)


def test_masks_to_output_is_float_cpu_batch():
    out = tensors.masks_to_output([torch.ones(3, 5, dtype=torch.bool), torch.zeros(3, 5, dtype=torch.bool)])
    assert out.dtype == torch.float32 and out.device.type == "cpu" and out.shape == (2, 3, 5)
    assert out[0].sum() == 15 and out[1].sum() == 0


def test_mask_maps_latent_samples_and_square_latents():
    maps = tensors.mask_maps(torch.ones(2, 3, 5, dtype=torch.float64))
    assert len(maps) == 2 and maps[0].dtype == torch.float32 and maps[0].shape == (3, 5)
    assert len(tensors.mask_maps(torch.ones(3, 5))) == 1  # one mask [H, W] is a batch of one
    with pytest.raises(InputError, match="c: expected a MASK"):
        tensors.mask_maps(torch.ones(1, 1, 3, 5))
    samples = torch.zeros(2, 4, 8, 8)
    assert tensors.latent_samples({"samples": samples}) is samples
    for bad in (samples, {"samples": torch.zeros(4, 8, 8)}, {}):
        with pytest.raises(InputError, match="latent: expected a LATENT from VAEEncode"):
            tensors.latent_samples(bad)
    tensors.check_square_latent((8, 8))
    with pytest.raises(InputError, match="attention: the latent 8x6 is not square"):
        tensors.check_square_latent((8, 6), "attention")


def test_heat_frames_blend_half_and_half():
    image = torch.zeros(2, 3, 3)
    image[..., 1] = 1.0  # green
    frame = previews.heat_frames(image, torch.ones(1, 2, 3))[0]  # heatmap(1) = red
    assert frame.shape == (2, 3, 3) and frame[0, 0].tolist() == [0.5, 0.5, 0.0]


def test_heatmap_and_overlay_colours():
    c = torch.tensor([[0.0, 0.5, 1.0]])
    hm = previews.heatmap(c)
    assert hm.shape == (1, 3, 3)
    assert hm[0, 0].tolist() == [0.0, 0.0, 0.5] and hm[0, 1].tolist() == [0.0, 1.0, 1.0]
    assert hm[0, 2].tolist() == [1.0, 0.0, 0.0]
    mask = torch.tensor([[1.0, 0.0]])
    out = previews.overlay(None, mask, color=(1.0, 0.0, 0.0), alpha=0.5)
    assert out[0, 0].tolist() == [0.5, 0.0, 0.0] and out[0, 1].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(InputError, match="preview"):
        previews.overlay(torch.zeros(2, 2, 3), mask)


def test_score_table_ranks_and_marks_the_selection():
    masks = torch.zeros(3, 2, 2, dtype=torch.bool)
    masks[0, 0, 0] = True
    masks[1] = True
    fused = torch.tensor([0.1, 0.7, -0.2])
    table = previews.score_table(masks, fused, [1, 0], 1, torch.tensor([1.0, 2.0, 3.0]), None, "image 0")
    lines = table.splitlines()
    assert lines[0] == "image 0"
    assert lines[1].startswith("  #1 proposal 1, area 4, fused +0.7000, s_G +2.0000") and "selected" in lines[1]
    assert lines[2].startswith("  #2 proposal 0, area 1") and "selected" not in lines[2]
    empty = previews.score_table(torch.zeros(0, 2, 2, dtype=torch.bool), torch.zeros(0), [], -1, None, None, "x")
    assert "no proposal: empty mask" in empty


def test_parse_blocks():
    assert text_inputs.parse_blocks("down, mid;up") == ("down", "mid", "up")
    assert text_inputs.parse_blocks("input output") == ("input", "output")
    with pytest.raises(InputError, match="blocks is empty"):
        text_inputs.parse_blocks(" , ")


def test_parse_thresholds():
    assert text_inputs.parse_thresholds("preset", (0.5,)) == (0.5,)
    assert text_inputs.parse_thresholds(" ", (0.5,)) == (0.5,)
    assert text_inputs.parse_thresholds("0.3, 0.5 1", (0.5,)) == (0.3, 0.5, 1.0)
    with pytest.raises(InputError, match="not a list of numbers"):
        text_inputs.parse_thresholds("0.3, high", (0.5,))
    with pytest.raises(InputError, match="must lie in \\(0, 1\\]"):
        text_inputs.parse_thresholds("0.3, 0", (0.5,))


# ------------------------------------------------------------------------------------------ wire types
def test_match_batch_and_score_pairing():
    assert wire_types.match_batch(["a"], 3, "x") == ["a", "a", "a"]
    with pytest.raises(InputError, match="x: 2 entries for a batch of 3"):
        wire_types.match_batch(["a", "b"], 3, "x")
    proposals = wire_types.ProposalBatch([torch.zeros(2, 4, 4, dtype=torch.bool)], source="sam")
    scores = wire_types.ScoreBatch([torch.zeros(2)], kind="generative", counts=[2])
    scores.check_against(proposals, "generative")
    wrong = wire_types.ScoreBatch([torch.zeros(3)], kind="generative", counts=[3])
    with pytest.raises(InputError, match="computed for 1 image\\(s\\) with \\[3\\] proposals"):
        wrong.check_against(proposals, "generative")


def test_proposal_counts_line():
    proposals = wire_types.ProposalBatch([torch.zeros(2, 4, 4, dtype=torch.bool), torch.zeros(0, 4, 4)],
                                         source="sam")
    assert proposals.describe() == "image 0: 2 proposals, image 1: 0 proposals"
