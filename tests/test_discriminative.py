"""Discriminative matching (docs/METHOD.md section 8): positional bias, crop branch, masked-attention branch, s_D."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from refdiff.config import OFFICIAL, PAPER
from refdiff.discriminative import (
    ClipScorer,
    crop_inputs,
    discriminative_scores,
    mask_attention_bias,
    mask_boxes,
    masks_to_grid,
    pad_square_resize,
    positional_bias,
)
from refdiff.errors import InputError
from refdiff.testing.clip import tiny_clip

ATOL = 1e-5


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    return tiny_clip(seed=0)


@pytest.fixture(scope="module")
def one_block(scorer: ClipScorer) -> ClipScorer:
    """The tiny model cut to its first residual block."""
    model = copy.deepcopy(scorer.model)
    model.visual.transformer.resblocks = model.visual.transformer.resblocks[:1]
    return ClipScorer(model, scorer.tokenizer)


def _image(height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(height, width, 3, generator=torch.Generator().manual_seed(seed))


def _box_mask(height: int, width: int, *boxes: tuple[int, int, int, int]) -> torch.Tensor:
    """bool [len(boxes), H, W] with masks[i][y0:y1, x0:x1] = True."""
    masks = torch.zeros(len(boxes), height, width, dtype=torch.bool)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        masks[i, y0:y1, x0:x1] = True
    return masks


def _reference_features(scorer: ClipScorer, pixels01: torch.Tensor, drop_last: bool = False) -> torch.Tensor:
    """open_clip's own encode_image (optionally without the last block), L2-normalised."""
    model = scorer.model
    if drop_last:
        model = copy.deepcopy(model)
        model.visual.transformer.resblocks = model.visual.transformer.resblocks[:-1]
    with torch.inference_mode():
        return F.normalize(model.encode_image(scorer._normalise(pixels01)), dim=-1)


# ---------------------------------------------------------------------------------------------------------
# positional bias (Eq. 6)
# ---------------------------------------------------------------------------------------------------------
def test_positional_bias_left_right_hand_values() -> None:
    left = positional_bias(["left"], 2, 6)
    expected = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])  # 1 - c / (2/3 * 6), clipped at 0
    assert left.dtype == torch.float32 and left.shape == (2, 6)
    torch.testing.assert_close(left, expected.expand(2, 6))
    torch.testing.assert_close(positional_bias(["right"], 2, 6), expected.flip(0).expand(2, 6))


def test_positional_bias_rows_and_product() -> None:
    rows = torch.tensor([6, 5, 4, 3, 2, 1, 0, 0, 0]) / 6.0  # height 9: 1 - r / 6, 0 from row 6 on
    torch.testing.assert_close(positional_bias(["top"], 9, 3), rows[:, None].expand(9, 3))
    torch.testing.assert_close(positional_bias(["Bottom"], 9, 3), rows.flip(0)[:, None].expand(9, 3))
    both = positional_bias(["left", "top"], 9, 6)
    cols = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    torch.testing.assert_close(both, rows[:, None] * cols[None, :])


def test_positional_bias_no_clue_aliases_and_errors() -> None:
    torch.testing.assert_close(positional_bias([], 4, 5), torch.ones(4, 5))
    torch.testing.assert_close(positional_bias(["leftmost"], 3, 6), positional_bias(["left"], 3, 6))
    torch.testing.assert_close(positional_bias(["upper"], 6, 2), positional_bias(["top"], 6, 2))
    torch.testing.assert_close(positional_bias("left", 3, 6), positional_bias(["left", "left"], 3, 6))
    extent_half = positional_bias(["left"], 1, 4, extent=0.5)  # 1 - c / 2
    torch.testing.assert_close(extent_half, torch.tensor([[1.0, 0.5, 0.0, 0.0]]))
    with pytest.raises(InputError, match="bright"):
        positional_bias(["bright"], 4, 4)
    with pytest.raises(InputError):
        positional_bias(["left"], 4, 4, extent=0.0)


# ---------------------------------------------------------------------------------------------------------
# s_D (Eq. 10)
# ---------------------------------------------------------------------------------------------------------
CROP = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
MASK = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
R_SENT = torch.tensor([1.0, 0.0])
R_ROOT = torch.tensor([0.0, 1.0])


def _preset_weights(preset) -> dict[str, float]:
    names = ("crop_weight", "mask_weight", "crop_root_weight", "mask_root_weight", "normalize_text")
    return {n: getattr(preset, n) for n in names}


def test_scores_official_hand_computed() -> None:
    # crop text = r_sent -> cosines (1, 0); mask text = (0.5, 0.5) / |.| = (1, 1) / sqrt(2)
    # -> cosines (1.4 / sqrt(2), 1 / sqrt(2))
    scores = discriminative_scores(CROP, MASK, R_SENT, R_ROOT, **_preset_weights(OFFICIAL))
    r2 = 2.0 ** 0.5
    torch.testing.assert_close(scores, torch.tensor([0.7 * 1 + 0.3 * 1.4 / r2, 0.7 * 0 + 0.3 * 1.0 / r2]))


def test_scores_paper_hand_computed_mixed_text_not_renormalised() -> None:
    # both texts (0.5, 0.5), not rescaled to unit length: crop dots (0.5, 0.5), mask dots (0.7, 0.5)
    scores = discriminative_scores(CROP, MASK, R_SENT, R_ROOT, **_preset_weights(PAPER))
    torch.testing.assert_close(scores, torch.tensor([0.35 + 0.21, 0.35 + 0.15]))


def test_scores_sam_clip_crop_only_and_errors() -> None:
    scores = discriminative_scores(CROP, None, R_SENT, R_ROOT, crop_weight=1.0)
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(discriminative_scores(None, MASK, R_SENT[None], R_ROOT, mask_weight=1.0,
                                                     mask_root_weight=0.0), torch.tensor([0.6, 1.0]))
    # normalisation of the text only matters for a mixed (non-unit) text vector
    torch.testing.assert_close(discriminative_scores(CROP, None, 2 * R_SENT, R_ROOT, crop_weight=1.0),
                               torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(discriminative_scores(CROP, None, 2 * R_SENT, R_ROOT, crop_weight=1.0,
                                                     normalize_text=False), torch.tensor([2.0, 0.0]))
    with pytest.raises(InputError):
        discriminative_scores(None, None, R_SENT, R_ROOT)
    with pytest.raises(InputError):
        discriminative_scores(CROP, MASK[:1], R_SENT, R_ROOT)
    with pytest.raises(InputError):
        discriminative_scores(CROP, None, torch.ones(3), torch.ones(3))


# ---------------------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------------------
def test_encode_text_unit_norm(scorer: ClipScorer) -> None:
    feats = scorer.encode_text(["the black horse on the left", "horse", "the black horse on the left"])
    assert feats.shape == (3, scorer.embed_dim) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(feats[0], feats[2])
    assert (feats[0] - feats[1]).abs().max() > 1e-3
    with pytest.raises(InputError):
        scorer.encode_text("horse")
    with pytest.raises(InputError):
        scorer.encode_text([])


# ---------------------------------------------------------------------------------------------------------
# crop branch
# ---------------------------------------------------------------------------------------------------------
def test_mask_boxes() -> None:
    masks = _box_mask(10, 12, (2, 5, 3, 9), (0, 10, 0, 12), (0, 0, 0, 0))
    masks[0, 7, 11] = True
    assert mask_boxes(masks).tolist() == [[2, 3, 8, 12], [0, 0, 10, 12], [0, 0, 0, 0]]


def test_crop_input_is_masked_bounding_box() -> None:
    image = _image(100, 100)
    masks = _box_mask(100, 100, (10, 74, 20, 84))  # a 64 x 64 box: no resampling at size 64
    masks[0, 10:40, 50:84] = False  # an L shape: its bounding box is still the 64 x 64 box
    pixels, nonempty = crop_inputs(image, masks, None, 64)
    assert pixels.shape == (1, 3, 64, 64) and nonempty.tolist() == [True]
    expected = (image * masks[0, ..., None])[10:74, 20:84].permute(2, 0, 1)
    torch.testing.assert_close(pixels[0], expected)
    assert pixels[0][:, 0:30, 30:64].abs().max() == 0  # the cut-out corner is black


def test_crop_input_keeps_the_whole_box_on_a_black_square() -> None:
    image = _image(64, 100)
    wide = _box_mask(64, 100, (0, 32, 0, 64))  # a 32 x 64 box: pasted at rows 16..48 of a 64 x 64 square
    pixels, _ = crop_inputs(image, wide, None, 64)
    torch.testing.assert_close(pixels[0][:, 16:48], image[0:32, 0:64].permute(2, 0, 1))
    assert pixels[0][:, :16].abs().max() == 0 and pixels[0][:, 48:].abs().max() == 0
    tall = _box_mask(100, 64, (2, 66, 10, 42))  # a 64 x 32 box: columns 16..48
    image_t = _image(100, 64, seed=1)
    pixels, _ = crop_inputs(image_t, tall, None, 64)
    torch.testing.assert_close(pixels[0][:, :, 16:48], image_t[2:66, 10:42].permute(2, 0, 1))
    strip = _box_mask(64, 100, (30, 31, 0, 100))  # a 1 x 100 strip: every column still reaches CLIP
    pixels, _ = crop_inputs(torch.ones(64, 100, 3), strip, None, 64)
    assert (pixels[0].amax(dim=(0, 1)) > 0).all()
    small = _box_mask(64, 100, (5, 21, 10, 26))  # 16 x 16 box is upsampled to 64 x 64, values stay in 0..1
    pixels, _ = crop_inputs(image, small, None, 64)
    assert pixels.shape == (1, 3, 64, 64) and 0 <= pixels.min() and pixels.max() <= 1


def test_opposite_clues_keep_the_first() -> None:
    torch.testing.assert_close(positional_bias(["left", "right"], 3, 6), positional_bias(["left"], 3, 6))
    torch.testing.assert_close(positional_bias(["bottom", "top", "right"], 6, 6),
                               positional_bias(["bottom", "right"], 6, 6))


def test_positional_bias_dims_the_right_object_in_the_crop_branch() -> None:
    image = torch.ones(64, 128, 3)
    masks = _box_mask(64, 128, (16, 48, 8, 40), (16, 48, 88, 120))  # identical objects, left and right
    bias = positional_bias(["left"], 64, 128)
    plain, _ = crop_inputs(image, masks, None, 64)
    torch.testing.assert_close(plain[0], plain[1])
    biased, _ = crop_inputs(image, masks, bias, 64)
    assert biased[0].mean() > 0.5  # columns 8..39 keep weights 0.91 .. 0.54
    assert biased[1].abs().max() == 0  # columns 88..119 lie beyond 2/3 of the width: weight 0


def test_crop_features_match_open_clip_encode_image(scorer: ClipScorer) -> None:
    image = _image(90, 120)
    masks = _box_mask(90, 120, (0, 90, 0, 120), (10, 50, 30, 100), (60, 61, 5, 6), (0, 0, 0, 0))
    feats = scorer.crop_features(image, masks)
    pixels, nonempty = crop_inputs(image, masks, None, scorer.image_size)
    assert nonempty.tolist() == [True, True, True, False]
    torch.testing.assert_close(feats[:3], _reference_features(scorer, pixels[:3]), atol=ATOL, rtol=0)
    assert feats[3].abs().max() == 0  # empty mask -> zero vector
    penultimate = scorer.crop_features(image, masks, layer="penultimate")
    torch.testing.assert_close(penultimate[:3], _reference_features(scorer, pixels[:3], drop_last=True),
                               atol=ATOL, rtol=0)
    assert (penultimate[0] - feats[0]).abs().max() > 1e-3


def test_crop_features_bias_and_chunks(scorer: ClipScorer) -> None:
    image = _image(64, 96)
    masks = _box_mask(64, 96, (0, 32, 0, 32), (10, 60, 40, 90), (0, 64, 0, 96), (5, 20, 70, 96), (30, 40, 2, 8))
    bias = positional_bias(["right"], 64, 96)
    whole = scorer.crop_features(image, masks, bias=bias)
    pixels, _ = crop_inputs(image, masks, bias, scorer.image_size)
    torch.testing.assert_close(whole, _reference_features(scorer, pixels), atol=ATOL, rtol=0)
    torch.testing.assert_close(scorer.crop_features(image, masks, bias=bias, chunk_size=2), whole,
                               atol=ATOL, rtol=0)
    assert (whole - scorer.crop_features(image, masks)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# masked-attention branch (Eq. 7)
# ---------------------------------------------------------------------------------------------------------
def test_attention_bias_pattern() -> None:
    grid = torch.tensor([[[True, False], [False, True]], [[False, False], [True, False]]])
    bias = mask_attention_bias(grid)
    allowed = bias == 0
    assert bias.shape == (7, 7) and set(bias.unique().tolist()) == {0.0, float("-inf")}
    assert allowed[:5, :5].all() and not allowed[:5, 5:].any()  # class + patches: no mask token
    assert allowed[5].tolist() == [False, True, False, False, True, True, False]  # itself + patches 0, 3
    assert allowed[6].tolist() == [False, False, False, True, False, False, True]  # itself + patch 2


def test_masks_to_grid_nearest_padding_and_fallback() -> None:
    square = _box_mask(64, 64, (0, 32, 0, 32), (0, 64, 0, 64))
    grid = masks_to_grid(square, 4)
    assert grid[0].nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert grid[1].all()
    # H 64, W 32: pasted at columns 16..47 of a 64 square; patch centres at x 8, 24, 40, 56 -> image x 8, 24
    tall = masks_to_grid(torch.ones(1, 64, 32, dtype=torch.bool), 4)
    assert tall[0].tolist() == [[False, True, True, False]] * 4
    # small masks that cover no patch centre: the cell(s) holding most of their pixels
    small = _box_mask(64, 64, (1, 4, 1, 4), (1, 3, 14, 18), (0, 0, 0, 0))
    grid = masks_to_grid(small, 4)
    assert grid[0].nonzero().tolist() == [[0, 0]]
    assert grid[1].nonzero().tolist() == [[0, 0], [0, 1]]  # 4 pixels in each of two cells
    assert not grid[2].any()


def test_whole_image_mask_token_equals_class_token(scorer: ClipScorer) -> None:
    # a square image (resized 48 -> 64): the full mask covers every patch, as the class token sees them
    image = _image(48, 48)
    masks = _box_mask(48, 48, (0, 48, 0, 48), (0, 20, 0, 30), (10, 40, 20, 48))
    reference = _reference_features(scorer, pad_square_resize(image, scorer.image_size)[None])[0]
    for layer, ref in (("final", reference),
                       ("penultimate", _reference_features(
                           scorer, pad_square_resize(image, scorer.image_size)[None], drop_last=True)[0])):
        feats = scorer.masked_features(image, masks, layer=layer)
        torch.testing.assert_close(feats[0], ref, atol=ATOL, rtol=0)
    assert (feats[1] - feats[0]).abs().max() > 1e-3


def test_mask_token_sees_only_its_patches_in_one_block(one_block: ClipScorer) -> None:
    image = _image(64, 64)
    masks = _box_mask(64, 64, (0, 32, 0, 32), (32, 64, 32, 64))
    base = one_block.masked_features(image, masks)
    outside = image.clone()
    outside[32:64, :] = torch.rand(32, 64, 3)  # the lower two patch rows: outside mask 0
    moved = one_block.masked_features(outside, masks)
    torch.testing.assert_close(moved[0], base[0], atol=ATOL, rtol=0)
    assert (moved[1] - base[1]).abs().max() > 1e-3  # mask 1 lies there
    inside = image.clone()
    inside[0:16, 0:16] = 1.0 - inside[0:16, 0:16]
    assert (one_block.masked_features(inside, masks)[0] - base[0]).abs().max() > 1e-3


def test_patches_carry_context_after_the_first_block(scorer: ClipScorer) -> None:
    # patches attend all patches, so with two blocks the outside reaches mask token 0 through its patches
    image = _image(64, 64)
    masks = _box_mask(64, 64, (0, 32, 0, 32))
    outside = image.clone()
    outside[32:64, :] = torch.rand(32, 64, 3)
    assert (scorer.masked_features(outside, masks)[0] - scorer.masked_features(image, masks)[0]).abs().max() > 1e-4


def test_more_proposals_do_not_change_a_mask_feature(scorer: ClipScorer) -> None:
    image = _image(70, 50)
    masks = _box_mask(70, 50, (0, 35, 0, 25), (30, 70, 10, 50), (0, 70, 0, 50), (20, 50, 20, 45), (5, 15, 5, 45))
    together = scorer.masked_features(image, masks)
    alone = torch.cat([scorer.masked_features(image, masks[i:i + 1]) for i in range(masks.shape[0])])
    torch.testing.assert_close(together, alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(scorer.masked_features(image, masks[:2])[0], together[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(scorer.masked_features(image, masks, max_masks_per_pass=2), together,
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(together.norm(dim=-1), torch.ones(5))


def test_one_encoder_pass_for_all_proposals(scorer: ClipScorer) -> None:
    calls = []
    handle = scorer.visual.transformer.resblocks[0].register_forward_hook(
        lambda module, args, output: calls.append(output.shape))
    try:
        image = _image(64, 64)
        masks = _box_mask(64, 64, *[(i, i + 20, 2 * i, 2 * i + 16) for i in range(7)])
        scorer.masked_features(image, masks)
        assert len(calls) == 1 and calls[0][1] == 1 + 16 + 7  # class + 4 x 4 patches + 7 mask tokens
        calls.clear()
        scorer.crop_features(image, masks, chunk_size=3)
        assert [c[0] for c in calls] == [3, 3, 1]
    finally:
        handle.remove()


def test_small_and_empty_masks_never_nan(scorer: ClipScorer) -> None:
    image = _image(64, 64)
    masks = _box_mask(64, 64, (1, 4, 1, 4), (0, 16, 0, 16), (0, 0, 0, 0))
    feats = scorer.masked_features(image, masks)
    assert torch.isfinite(feats).all()
    torch.testing.assert_close(feats[0], feats[1], atol=ATOL, rtol=0)  # both resolve to patch (0, 0)
    assert feats[2].abs().max() == 0


def test_masked_branch_bias_and_image_types(scorer: ClipScorer) -> None:
    image8 = (torch.rand(40, 60, 3, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    image = image8.float() / 255
    masks = _box_mask(40, 60, (0, 40, 0, 30), (0, 20, 20, 60))
    bias = positional_bias(["left", "bottom"], 40, 60)
    torch.testing.assert_close(scorer.masked_features(image8.numpy(), masks), scorer.masked_features(image, masks),
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(scorer.masked_features(image, masks, bias=bias),
                               scorer.masked_features(image * bias[..., None], masks), atol=ATOL, rtol=0)


def test_input_errors(scorer: ClipScorer) -> None:
    image = _image(32, 32)
    masks = _box_mask(32, 32, (0, 8, 0, 8))
    with pytest.raises(InputError, match="0..1"):
        scorer.masked_features(image * 3, masks)
    with pytest.raises(InputError, match="resolution"):
        scorer.crop_features(image, _box_mask(16, 32, (0, 8, 0, 8)))
    with pytest.raises(InputError, match="bias"):
        scorer.crop_features(image, masks, bias=torch.ones(16, 16))
    with pytest.raises(InputError, match="layer"):
        scorer.masked_features(image, masks, layer="last")
    with pytest.raises(InputError, match="RGB"):
        scorer.crop_features(image[..., :2], masks)
