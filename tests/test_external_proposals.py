"""Proposals from outside the pack: the normalisation rules of refdiff.external, and RefDiff(..., proposals=masks)
giving the same scores and choice as the same masks from the pack's own SAM path."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from refdiff.errors import InputError
from refdiff.external import external_proposals, load_proposal_files, proposal_files, split_counts
from refdiff.pipeline import RefDiff

from tiny_runs import FAST

TEXT = "the red box on the left"
DENSE = {**FAST, "sam_points_per_side": 6, "sam_box_nms_thresh": 1.0}  # more SAM proposals to rank
SEED = 2


# ------------------------------------------------------------------------------------------ normalisation
def test_float_masks_are_inside_at_or_above_one_half():
    m = torch.tensor([[[0.0, 0.49], [0.5, 1.0]]])
    out = external_proposals(m, 2, 2)
    assert out.masks.dtype == torch.bool
    assert out.masks[0].tolist() == [[False, False], [True, True]]


def test_uint8_255_masks_and_01_integers_are_read_as_binary():
    a = np.zeros((2, 4, 4), np.uint8)
    a[0, :2] = 255
    a[1, 2:] = 255
    assert external_proposals(a, 4, 4).masks.sum().item() == 16
    b = (a > 0).astype(np.int64)
    assert torch.equal(external_proposals(b, 4, 4).masks, external_proposals(a, 4, 4).masks)


@pytest.mark.parametrize("bad, words", [
    (np.full((1, 3, 3), 7, np.uint8), "0 and 1"),
    (np.full((1, 3, 3), 1.5, np.float32), "[0, 1]"),
    (np.full((1, 3, 3), np.nan, np.float32), "NaN"),
    (np.zeros((2, 3, 3, 3), bool), "[N, H, W]"),
    ("masks.png", "tensor or numpy array"),
])
def test_unusable_masks_are_refused_with_what_would_fix_them(bad, words):
    with pytest.raises(InputError, match="proposals") as err:
        external_proposals(bad, 3, 3)
    assert words in str(err.value)


def test_one_mask_and_singleton_channels_are_accepted():
    m = np.zeros((5, 6), bool)
    m[1:3, 2:4] = True
    assert external_proposals(m, 5, 6).masks.shape == (1, 5, 6)
    assert external_proposals(m[None, None], 5, 6).masks.shape == (1, 5, 6)
    assert external_proposals(m[None, :, :, None], 5, 6).masks.shape == (1, 5, 6)


def test_another_size_is_refused_by_default_naming_both_shapes():
    with pytest.raises(InputError) as err:
        external_proposals(np.ones((2, 20, 30), bool), 40, 60)
    msg = str(err.value)
    assert "30 x 20" in msg and "60 x 40" in msg and "nearest" in msg


def test_nearest_resize_keeps_the_mask_where_it_was_and_says_so():
    m = np.zeros((1, 20, 30), bool)
    m[0, 0:10, 0:15] = True  # the top-left quarter
    out = external_proposals(m, 40, 60, resize="nearest")
    assert out.masks.shape == (1, 40, 60)
    assert out.masks[0, :20, :30].all() and not out.masks[0, 20:].any() and not out.masks[0, :, 30:].any()
    assert any("resized from 30 x 20 to 60 x 40" in n for n in out.notes)


def test_another_aspect_ratio_is_refused_even_with_resizing():
    with pytest.raises(InputError, match="aspect ratio"):
        external_proposals(np.ones((1, 20, 20), bool), 40, 60, resize="nearest")


def test_empty_masks_are_left_out_and_named():
    m = np.zeros((4, 5, 5), bool)
    m[1, :2] = True
    m[3, 3:] = True
    out = external_proposals(m, 5, 5)
    assert out.masks.shape[0] == 2 and out.kept == [1, 3] and out.given == 4
    assert torch.equal(out.masks[0], torch.from_numpy(m[1]))
    assert any("[0, 2]" in n and "[1, 3]" in n for n in out.notes)


@pytest.mark.parametrize("given", [np.zeros((0, 5, 5), bool), [], np.zeros((3, 5, 5), np.float32)])
def test_no_usable_mask_gives_no_proposal_and_a_reason(given):
    out = external_proposals(given, 5, 5)
    assert out.masks.shape == (0, 5, 5)
    assert out.empty_reason and out.empty_reason in out.notes


def test_counts_split_masks_between_images_and_refuse_wrong_totals():
    assert split_counts("", 4, 1) == [4]
    assert split_counts("3, 1", 4, 2) == [3, 1]
    assert split_counts([0, 2], 2, 2) == [0, 2]
    with pytest.raises(InputError, match="sum to 3"):
        split_counts("2, 1", 4, 2)
    with pytest.raises(InputError, match="one count per image"):
        split_counts("4", 4, 2)
    with pytest.raises(InputError, match="no counts"):
        split_counts(None, 4, 2)
    with pytest.raises(InputError, match="whole numbers"):
        split_counts("two, one", 3, 2)
    with pytest.raises(InputError, match=">= 0"):
        split_counts("-1, 5", 4, 2)


def test_proposal_files_npz_npy_and_png_folder(tmp_path):
    from PIL import Image

    m = np.zeros((3, 6, 8), bool)
    for i in range(3):
        m[i, i:i + 2, 2 * i:2 * i + 3] = True
    np.savez(tmp_path / "one.npz", m)
    np.savez(tmp_path / "named.npz", masks=m, other=np.zeros(2))
    np.savez(tmp_path / "ambiguous.npz", a=m, b=m)
    np.save(tmp_path / "m.npy", m)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in (2, 0, 1):  # mask_10 sorts after mask_2 (natural order)
        Image.fromarray(m[i].astype(np.uint8) * 255).save(folder / f"mask_{[0, 2, 10][i]}.png")
    for name in ("one.npz", "named.npz", "m.npy", "pngs"):
        got = external_proposals(load_proposal_files(tmp_path / name), 6, 8).masks
        assert torch.equal(got, torch.from_numpy(m)), name
    with pytest.raises(InputError, match="'masks'"):
        load_proposal_files(tmp_path / "ambiguous.npz")
    with pytest.raises(InputError, match="no such file"):
        proposal_files(tmp_path / "missing.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .png"):
        proposal_files(tmp_path / "empty")
    (tmp_path / "masks.txt").write_text("x")
    with pytest.raises(InputError, match=".txt"):
        proposal_files(tmp_path / "masks.txt")


# ------------------------------------------------------------------------------------------ RefDiff
@pytest.fixture(scope="module")
def own_runs(models, image):
    """The pack's own SAM path: one run per preset with every variant that uses SAM proposals."""
    sd, sam, clip = models
    out = {}
    for preset in ("official", "paper"):
        model = RefDiff(sd=sd, sam=sam, clip=clip, preset=preset, **DENSE)
        out[preset] = model.segment_variants(image, TEXT, ["full", "GS", "DS", "sam-clip"], seed=SEED)
    return out


@pytest.mark.parametrize("preset", ["official", "paper"])
@pytest.mark.parametrize("as_float", [False, True])
def test_external_masks_rank_and_choose_as_the_same_masks_from_sam(models, image, own_runs, preset, as_float):
    sd, _, clip = models
    own = own_runs[preset]
    masks = own["full"].proposals
    assert masks.shape[0] >= 3, "the tiny SAM must give several proposals for this comparison to mean anything"
    given = masks.astype(np.float32) if as_float else torch.from_numpy(masks)
    model = RefDiff(sd=sd, sam=None, clip=clip, preset=preset, **DENSE)  # no SAM: it must not be needed
    ext = model.segment_variants(image, TEXT, ["full", "GS", "DS", "sam-clip"], seed=SEED, proposals=given)
    for name, mine in own.items():
        theirs = ext[name]
        np.testing.assert_array_equal(theirs.proposals, mine.proposals)
        for kind in ("generative", "discriminative", "fused"):
            if mine.scores[kind] is None:
                assert theirs.scores[kind] is None
            else:
                np.testing.assert_allclose(theirs.scores[kind], mine.scores[kind], rtol=1e-5, atol=1e-6)
        assert theirs.index == mine.index and theirs.top_k == mine.top_k
        np.testing.assert_array_equal(theirs.mask, mine.mask)
        assert "external" in theirs.timings and "sam" not in theirs.timings


def _planted_model(models, c: torch.Tensor) -> RefDiff:
    """A RefDiff whose generative map is ``c`` (the diffusion stages are not what these tests check)."""
    sd, _, clip = models
    model = RefDiff(sd=sd, sam=None, clip=clip, preset="official", **FAST)
    model._generative_map = lambda *args, **kwargs: (c, 5)
    return model


def _boxes(height: int, width: int, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    out = np.zeros((len(boxes), height, width), bool)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        out[i, y0:y1, x0:x1] = True
    return out


@pytest.mark.parametrize("blob_at", [0, 2, 3])
def test_the_mask_around_a_planted_attention_blob_wins_under_gs(models, image, blob_at):
    h, w = image.shape[:2]
    c = torch.zeros(h, w)
    c[20:35, 40:60] = 1.0  # the planted blob
    others = [(0, 10, 0, 10), (5, 30, 4, 25), (30, 45, 0, 20)]
    boxes = others[:blob_at] + [(19, 36, 39, 61)] + others[blob_at:]
    masks = _boxes(h, w, boxes)
    result = _planted_model(models, c)(image, TEXT, variant="GS", proposals=masks)
    assert result.index == blob_at
    assert result.top_k[0] == blob_at
    np.testing.assert_array_equal(result.mask, masks[blob_at])


def test_an_empty_mask_before_the_blob_mask_is_left_out_and_said(models, image):
    h, w = image.shape[:2]
    c = torch.zeros(h, w)
    c[20:35, 40:60] = 1.0
    masks = _boxes(h, w, [(0, 10, 0, 10), (0, 0, 0, 0), (19, 36, 39, 61)])
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        result = _planted_model(models, c)(image, TEXT, variant="GS", proposals=masks)
    assert result.proposals.shape[0] == 2 and result.index == 1
    np.testing.assert_array_equal(result.mask, masks[2])
    assert any("[1]" in w and "[0, 2]" in w for w in result.warnings)


@pytest.mark.parametrize("given", [np.zeros((0, 45, 67), bool), np.zeros((2, 45, 67), bool)])
def test_no_external_mask_gives_minus_one_an_empty_mask_and_the_reason(models, image, given):
    sd, _, clip = models
    model = RefDiff(sd=sd, sam=None, clip=clip, preset="official", **FAST)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        result = model(image, TEXT, variant="full", proposals=given)
    assert result.index == -1 and not result.mask.any() and result.mask.shape == image.shape[:2]
    assert result.top_k == [] and result.proposals.shape == (0, *image.shape[:2])
    assert any("empty" in w and "external" in w for w in result.warnings)


def test_variants_with_their_own_proposals_refuse_external_masks(models, image):
    sd, _, clip = models
    model = RefDiff(sd=sd, sam=None, clip=clip, **FAST)
    masks = _boxes(45, 67, [(0, 10, 0, 10)])
    for variant in ("G", "G-refine", "cluster"):
        with pytest.raises(InputError, match=variant):
            model(image, TEXT, variant=variant, proposals=masks)


def test_the_preset_post_filter_applies_only_when_asked(models, image):
    sd, _, clip = models
    model = RefDiff(sd=sd, sam=None, clip=clip, preset="official", image_size=64)
    masks = _boxes(45, 67, [(0, 5, 0, 5), (5, 12, 4, 12)])  # 25 and 56 px, under official's 98 px at 67 x 45
    kept = model(image, TEXT, variant="DS", proposals=masks)
    assert kept.proposals.shape[0] == 2 and kept.index >= 0 and not kept.warnings
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        filtered = model(image, TEXT, variant="DS", proposals=masks, proposals_post_filter=True)
    assert filtered.index == -1 and filtered.proposals.shape[0] == 0
    assert any("post-filter removed all 2 masks" in w and "proposals_post_filter=False" in w
               for w in filtered.warnings)


def test_masks_of_another_size_are_refused_before_any_model_runs(models, image, loud_loaders):
    model = RefDiff.from_pretrained(preset="official", **FAST)
    with pytest.raises(InputError, match="nearest"):
        model(image, TEXT, variant="DS", proposals=np.ones((1, 20, 30), bool))


def test_external_masks_spare_ds_the_diffusion_pass_under_the_prompted_mode(models, image, loud_loaders):
    """Under proposal_mode='prompted', DS runs the diffusion pass only for SAM's prompts; given masks need none,
    so no Stable Diffusion (and no SAM) is loaded."""
    _, _, clip = models
    model = RefDiff(sd=None, sam=None, clip=clip, preset="official", **{**FAST, "proposal_mode": "prompted"})
    masks = _boxes(45, 67, [(0, 10, 0, 10), (5, 30, 4, 25)])
    result = model(image, TEXT, variant="DS", proposals=masks)
    assert result.index >= 0 and result.proposals.shape[0] == 2
    assert "external" in result.timings and not any(k.startswith(("generative_map", "diffusion", "capture"))
                                                    for k in result.timings)
