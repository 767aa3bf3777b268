"""What the nodes send to the pack's web extension (nodes/previews.py, token_positions.py; no ComfyUI): the token
override of the generative map, the per-word thumbnails of the token strip, the proposal gallery ranked by fused
score, and that every payload is plain JSON (no NaN) with thumbnails written as small PNG files."""
from __future__ import annotations

import json

import pytest
import torch
from pack_nodes import load_node_module as _load

from refdiff.capture import token_map
from refdiff.errors import InputError
from refdiff.maps import generative_map

previews = _load("previews")
tensors = _load("tensors")
text_inputs = _load("text_inputs")
token_positions = _load("token_positions")

TEXT = "the skateboarder next to the red skateboarder"
# <start>=0 the=1 skate=2 boarder=3 next=4 to=5 the=6 red=7 skate=8 boarder=9 ,=10 <end>=11
WORD_POSITIONS = [[1], [2, 3], [4], [5], [6], [7], [8, 9]]


@pytest.fixture(scope="module")
def tokenizer():
    from refdiff.tokenizer import clip_tokenizer

    return clip_tokenizer()


@pytest.fixture(scope="module")
def item(tokenizer):
    return token_positions.parse_item(TEXT, tokenizer)


# ------------------------------------------------------------------------------------------ token override
def test_parse_records_every_words_token_positions(item):
    assert [w for w, _, _ in item.parsed.words] == TEXT.split()
    assert item.word_positions == WORD_POSITIONS
    assert item.parsed.root == "skateboarder" and item.root_position == 3


def test_empty_override_is_the_parse_root(item):
    choice = token_positions.resolve_token(item, "")
    assert (choice.position, choice.label, choice.source, choice.word) == (3, "skateboarder", "parser", 1)


def test_root_word_of_the_parse_is_reported_as_such(tokenizer):
    parsed = token_positions.parse_item(TEXT, tokenizer, root_word="red")
    choice = token_positions.resolve_token(parsed, "  ")
    assert (choice.position, choice.source, choice.word) == (7, "root_word", 5)


def test_override_word_reads_its_last_piece_first_occurrence_any_case(item):
    assert token_positions.resolve_token(item, "red").position == 7
    assert token_positions.resolve_token(item, "RED").position == 7
    assert token_positions.resolve_token(item, "the").position == 1  # the first "the", not position 6
    choice = token_positions.resolve_token(item, "skateboarder")
    assert (choice.position, choice.word, choice.source) == (3, 1, "token_override")


def test_override_number_is_a_token_position(item):
    second_the = token_positions.resolve_token(item, "6")
    assert (second_the.position, second_the.label, second_the.word) == (6, "the", 4)
    piece = token_positions.resolve_token(item, "#8")  # first piece of the second "skateboarder"
    assert (piece.position, piece.label, piece.word) == (8, "skate", 6)
    comma = token_positions.resolve_token(item, "10")  # the prompt suffix: a token of no word
    assert (comma.position, comma.label, comma.word) == (10, ",", None)


def test_override_that_is_no_word_is_refused_by_name(item):
    with pytest.raises(InputError, match=r"token_override 'dog' is not a word of the text .*its words: the, "
                                         r"skateboarder, next.*root word 'skateboarder'"):
        token_positions.resolve_token(item, "dog")
    with pytest.raises(InputError, match=r"token_override 'skate' is not a word"):  # a piece is not a word
        token_positions.resolve_token(item, "skate")
    for bad in ("0", "11", "99"):  # the start token, the end token, past the text
        with pytest.raises(InputError, match=r"token_override: token position \d+ is outside .*1\.\.10"):
            token_positions.resolve_token(item, bad)
    with pytest.raises(InputError, match=r"token_override \(image 1\) 'dog'"):
        token_positions.resolve_token(item, "dog", name="token_override (image 1)")


def test_override_lines_follow_the_batch():
    assert text_inputs.overrides_for_batch("", 2) == ["", ""]
    assert text_inputs.overrides_for_batch(" red ", 3) == ["red"] * 3
    assert text_inputs.overrides_for_batch("red\n", 2) == ["red", "red"]  # a trailing newline is no second line
    assert text_inputs.overrides_for_batch("\nred", 2) == ["", "red"]
    assert text_inputs.overrides_for_batch("red\n", 1) == ["red"]
    with pytest.raises(InputError, match="token_override: 3 entries for a batch of 2"):
        text_inputs.overrides_for_batch("a\nb\nc", 2)


# ------------------------------------------------------------------------------------------ thumbnails
def test_thumb_size_keeps_the_aspect_with_the_longest_side_96():
    assert previews.thumb_size(53, 77) == (66, 96)
    assert previews.thumb_size(200, 100) == (96, 48)
    assert previews.thumb_size(1, 1000) == (1, 96)
    assert previews.thumb_size(10, 10, side=32) == (32, 32)


def planted_maps() -> torch.Tensor:
    """Two layers of 8x8 attention over 6 tokens: token 2 hot top-left, token 4 hot bottom-right."""
    maps = torch.rand(2, 8, 8, 6, generator=torch.Generator().manual_seed(0)) * 0.1
    maps[:, 1:3, 1:3, 2] += 1.0
    maps[:, 5:7, 5:7, 4] += 1.0
    return maps


def test_token_thumbnails_find_each_tokens_hot_spot():
    thumbs = previews.token_thumb_maps(planted_maps(), [2, 4], (96, 96))
    assert thumbs.shape == (2, 96, 96)
    for k, (row, col) in enumerate(((24, 24), (72, 72))):  # centres of the planted spots, 12 px per cell
        assert float(thumbs[k].min()) == pytest.approx(0.0, abs=1e-6)
        assert float(thumbs[k].max()) == pytest.approx(1.0, abs=1e-6)
        assert float(thumbs[k, row, col]) > 0.9
        assert float(thumbs[k, 96 - row, 96 - col]) < 0.2


def test_token_thumbnail_is_eq5_at_thumbnail_size():
    """The same steps as c: token_map, then generative_map on the frame scaled to the thumbnail."""
    maps = planted_maps()
    size = previews.thumb_size(53, 77)
    thumbs = previews.token_thumb_maps(maps, [4], size, mode="bilinear")
    geometry = tensors.frame_geometry(size[0], size[1], 96)
    assert (geometry.side, geometry.offset) == (96, (0, 15))
    expected = generative_map(token_map(maps, 4), geometry, mode="bilinear")
    assert thumbs.shape == (1, 66, 96)
    assert torch.equal(thumbs[0], expected)
    assert previews.token_thumb_maps(maps, [], size).shape == (0, 66, 96)


def test_frames_blend_as_hand_computed():
    white = torch.ones(4, 6, 3)
    cold = previews.heat_frames(white, torch.zeros(1, 4, 6))  # heatmap(0) = (0, 0, 0.5)
    assert torch.allclose(cold[0, 0, 0], torch.tensor([0.5, 0.5, 0.75]))
    hot = previews.heat_frames(None, torch.ones(1, 4, 6))  # heatmap(1) = red
    assert torch.allclose(hot[0, 3, 5], torch.tensor([1.0, 0.0, 0.0]))
    masks = torch.zeros(2, 4, 6)
    masks[0] = 1.0
    tinted = previews.mask_frames(None, masks)  # inside: black * 0.55 + 0.45 * (0.2, 0.9, 1.0)
    assert tinted.shape == (2, 4, 6, 3)
    assert torch.allclose(tinted[0, 1, 1], torch.tensor([0.09, 0.405, 0.45]))
    assert float(tinted[1].abs().max()) == 0.0
    on_white = previews.mask_frames(white, masks)
    assert torch.allclose(on_white[1, 2, 2], torch.full((3,), 0.35))  # outside: dimmed to 0.35
    assert torch.allclose(on_white[0, 2, 2], torch.tensor([0.64, 0.955, 1.0]))  # 0.55 + 0.45 * color


def test_thumbnails_of_image_and_masks_keep_what_matters():
    image = torch.zeros(40, 80, 3)
    image[:, 40:] = 1.0
    small = previews.thumb_image(image, (20, 40))
    assert small.shape == (20, 40, 3)
    assert float(small[10, 5, 0]) == pytest.approx(0.0, abs=1e-6) and float(small[10, 35, 0]) == pytest.approx(1.0)
    masks = torch.zeros(1, 40, 80, dtype=torch.bool)
    masks[0, :20] = True
    m = previews.thumb_masks(masks, (20, 40))
    assert m.shape == (1, 20, 40) and float(m[0, 2, 2]) == pytest.approx(1.0) and float(m[0, 18, 2]) == 0.0
    assert previews.thumb_masks(masks[:0], (20, 40)).shape == (0, 20, 40)
    dot = torch.zeros(1, 100, 100, dtype=torch.bool)
    dot[0, 55, 31] = True  # one pixel: still one full thumbnail pixel, where it lies
    small = previews.thumb_masks(dot, (10, 10))
    assert float(small.sum()) == 1.0 and float(small[0, 5, 3]) == 1.0
    assert torch.equal(previews.thumb_masks(dot, (200, 200))[0, 110:112, 62:64], torch.ones(2, 2))  # enlarged too


def test_save_thumbnails_writes_pngs_view_can_serve(tmp_path):
    from PIL import Image

    frames = [torch.zeros(5, 7, 3), torch.ones(6, 4, 3) * torch.tensor([1.0, 0.5, 0.0])]
    refs = previews.save_thumbnails(frames, tmp_path, "refdiff_tokens_abc")
    assert refs == [{"filename": "refdiff_tokens_abc_00000_.png", "subfolder": "", "type": "temp"},
                    {"filename": "refdiff_tokens_abc_00001_.png", "subfolder": "", "type": "temp"}]
    with Image.open(tmp_path / refs[1]["filename"]) as im:
        assert im.size == (4, 6) and im.mode == "RGB"
        assert im.getpixel((0, 0)) == (255, 128, 0)


# ------------------------------------------------------------------------------------------ token strip
def test_token_strip_marks_root_and_gives_the_value_each_click_sets(item):
    choice = token_positions.resolve_token(item, "red")
    shown = previews.strip_words(item)
    assert shown == list(range(7))
    thumbs = [{"filename": f"t{i}.png", "subfolder": "", "type": "temp"} for i in shown]
    view = previews.token_strip_view(item, choice, shown, thumbs, image=0, override="red")
    json.dumps(view, allow_nan=False)
    tokens = view["tokens"]
    assert [t["word"] for t in tokens] == TEXT.split()
    assert [t["root"] for t in tokens] == [False] * 5 + [True, False]
    assert [t["parse_root"] for t in tokens] == [False, True] + [False] * 5
    assert [t["position"] for t in tokens] == [1, 3, 4, 5, 6, 7, 9]
    # a repeated word is selected by its token position, the first occurrence by the word itself
    assert [t["override"] for t in tokens] == ["the", "skateboarder", "next", "to", "6", "red", "9"]
    assert view["root"] == {"label": "red", "position": 7, "token": "red</w>", "source": "token_override", "word": 5}
    assert view["parse_root"] == "skateboarder" and view["more"] == 0 and view["override"] == "red"
    assert tokens[6]["thumb"] == thumbs[6]
    # every value the strip offers selects its own word again
    for t, i in zip(tokens, shown):
        assert token_positions.resolve_token(item, t["override"]).word == i


def test_token_strip_is_bounded_and_skips_words_past_the_token_limit(tokenizer):
    long_text = "the dog " + " ".join(["very"] * 80) + " big"
    parsed = token_positions.parse_item(long_text, tokenizer)
    positions = parsed.word_positions
    assert positions[-1] == [] and positions[1] == [2]  # "big" is cut off at 77 tokens
    assert len(previews.strip_words(parsed)) == previews.VIEW_MAX_WORDS == 32
    shown = previews.strip_words(parsed, limit=1000)
    assert len(shown) == 75  # tokens 1..75: the words before the cut
    view = previews.token_strip_view(parsed, token_positions.resolve_token(parsed, ""), shown[:32], [{}] * 32)
    assert len(view["tokens"]) == 32 and view["more"] == len(parsed.parsed.words) - 32
    with pytest.raises(InputError, match="beyond the model's token limit"):
        token_positions.resolve_token(parsed, "big")


# ------------------------------------------------------------------------------------------ gallery
def test_gallery_order_ranks_by_fused_and_keeps_the_chosen():
    fused = torch.tensor([0.1, 0.5, float("nan"), 0.3])
    assert previews.gallery_order(fused) == [1, 3, 0, 2]  # NaN last
    assert previews.gallery_order(fused, chosen=0, limit=2) == [1, 0]
    assert previews.gallery_order(fused, chosen=2, limit=3) == [1, 3, 2]
    assert previews.gallery_order(fused, chosen=1, limit=2) == [1, 3]
    assert previews.gallery_order(torch.zeros(0)) == []
    assert previews.gallery_order(torch.arange(50.0)) == list(range(49, 17, -1))  # bounded: 32 best


def test_gallery_view_carries_every_score_and_no_nan():
    masks = torch.zeros(3, 4, 5, dtype=torch.bool)
    masks[0, :2] = True  # area 10
    masks[1, :, :1] = True  # area 4
    masks[2, 0, 0] = True  # area 1
    s_g = torch.tensor([0.2, -0.1, float("nan")])
    s_d = torch.tensor([0.3, 0.6, 0.1])
    fused = 0.05 * s_g + s_d
    shown = previews.gallery_order(fused, chosen=0)
    assert shown == [1, 0, 2]
    thumbs = [{"filename": f"p{j}.png", "subfolder": "", "type": "temp"} for j in shown]
    view = previews.proposal_gallery_view(masks, fused, s_g, s_d, shown, 0, thumbs, pin_index=0,
                                          weights=(0.05, 1.0), source="sam")
    text = json.dumps(view, allow_nan=False)
    assert "NaN" not in text
    items = view["items"]
    assert [(i["index"], i["rank"], i["area"], i["chosen"]) for i in items] == [(1, 1, 4, False), (0, 2, 10, True),
                                                                                (2, 3, 1, False)]
    assert items[0]["fused"] == pytest.approx(0.595) and items[0]["generative"] == pytest.approx(-0.1)
    assert items[0]["discriminative"] == pytest.approx(0.6)
    assert items[2]["fused"] is None and items[2]["generative"] is None
    assert items[2]["discriminative"] == pytest.approx(0.1)
    assert (view["count"], view["chosen"], view["pin_index"], view["pinned"], view["more"]) == (3, 0, 0, True, 0)
    assert view["weights"] == {"generative": 0.05, "discriminative": 1.0} and view["source"] == "sam"
    alone = previews.proposal_gallery_view(masks, s_d, None, s_d, [1], 1, [{}], pin_index=-1)
    assert alone["weights"] == {"generative": None, "discriminative": 1.0} and not alone["pinned"]
    assert alone["items"][0]["generative"] is None and alone["more"] == 2
