"""Eq. 9 (generative score), fusion, ranking and selection; and a planted-blob run of maps + proposals +
scoring that must find the object under the attention."""
from __future__ import annotations

import pytest
import torch

from refdiff.errors import InputError
from refdiff.image import PreparedImage
from refdiff.maps import generative_map
from refdiff.proposals import threshold_proposals
from refdiff.config import OFFICIAL, PAPER
from refdiff.scoring import fuse_and_select, fuse_scores, fusion_weights, generative_scores, rank, select_mask

C = torch.tensor([[0.0, 0.2, 0.4], [0.6, 0.8, 1.0]])


def _m(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def test_generative_scores_hand_computed() -> None:
    masks = torch.stack([
        _m([[1, 1, 0], [0, 0, 0]]),  # in: (0 + .2) / 2 = .1, out: (.4 + .6 + .8 + 1) / 4 = .7
        _m([[0, 0, 0], [0, 1, 1]]),  # in: 1.8 / 2 = .9, out: 1.2 / 4 = .3
        _m([[1, 0, 1], [0, 1, 0]]),  # in: 1.2 / 3 = .4, out: 1.8 / 3 = .6
    ])
    eps = 1e-6
    expected = torch.tensor([0.2 / (2 + eps) - 2.8 / (4 + eps),
                             1.8 / (2 + eps) - 1.2 / (4 + eps),
                             1.2 / (3 + eps) - 1.8 / (3 + eps)])
    got = generative_scores(C, masks)
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(got, torch.tensor([-0.6, 0.6, -0.2]), atol=1e-5, rtol=0)


def test_generative_scores_eps_in_both_denominators() -> None:
    full = torch.ones(1, 2, 3, dtype=torch.bool)
    empty = torch.zeros(1, 2, 3, dtype=torch.bool)
    # whole image: outside is 0 / eps = 0, inside is the plain mean 3.0 / 6
    torch.testing.assert_close(generative_scores(C, full), torch.tensor([3.0 / (6 + 1e-6)]))
    # empty mask: inside 0 / eps = 0, outside the mean
    torch.testing.assert_close(generative_scores(C, empty), torch.tensor([-3.0 / (6 + 1e-6)]))
    # a large eps shows where it enters: .2 / (2 + .5) - 2.8 / (4 + .5)
    one = _m([[1, 1, 0], [0, 0, 0]])[None]
    torch.testing.assert_close(generative_scores(C, one, eps=0.5), torch.tensor([0.2 / 2.5 - 2.8 / 4.5]))


def test_generative_scores_empty_and_bad_input() -> None:
    out = generative_scores(C, torch.zeros(0, 2, 3, dtype=torch.bool))
    assert out.shape == (0,) and out.dtype == torch.float32
    with pytest.raises(InputError, match="resolution"):
        generative_scores(C, torch.zeros(1, 3, 2, dtype=torch.bool))
    with pytest.raises(InputError, match="bool"):
        generative_scores(C, torch.zeros(1, 2, 3))
    with pytest.raises(InputError, match="NaN"):
        generative_scores(torch.full((2, 3), float("nan")), torch.zeros(1, 2, 3, dtype=torch.bool))


def test_fuse_scores() -> None:
    g = torch.tensor([1.0, -2.0, 0.5])
    d = torch.tensor([0.3, 0.2, 0.1])
    torch.testing.assert_close(fuse_scores(g, d), torch.tensor([0.05 + 0.3, -0.1 + 0.2, 0.025 + 0.1]))
    torch.testing.assert_close(fuse_scores(g, d, gen_weight=0.1, disc_weight=0.9),
                               torch.tensor([0.1 + 0.27, -0.2 + 0.18, 0.05 + 0.09]))
    torch.testing.assert_close(fuse_scores(g, None), 0.05 * g)  # variant G / GS: ranking of s_G unchanged
    torch.testing.assert_close(fuse_scores(None, d), d)  # variant DS
    with pytest.raises(InputError, match="None"):
        fuse_scores(None, None)
    with pytest.raises(InputError, match="same proposals"):
        fuse_scores(g, d[:2])


def test_rank_descending_stable_nan_last() -> None:
    s = torch.tensor([0.5, 0.9, float("nan"), 0.9, -1.0, 0.5])
    assert rank(s, 6).tolist() == [1, 3, 0, 5, 4, 2]
    assert rank(s, 2).tolist() == [1, 3]
    assert rank(s, 100).tolist() == [1, 3, 0, 5, 4, 2]
    assert rank(s, 0).tolist() == []
    assert rank(torch.zeros(0), 5).tolist() == []
    with pytest.raises(InputError):
        rank(s, -1)


def test_select_mask() -> None:
    masks = torch.zeros(3, 4, 5, dtype=torch.bool)
    masks[0, 0] = True
    masks[1, 1] = True
    masks[2, 2] = True
    assert torch.equal(select_mask(masks, torch.tensor([0.1, 0.7, 0.3]), 4, 5), masks[1])
    assert torch.equal(select_mask(masks, torch.tensor([float("nan"), -5.0, -7.0]), 4, 5), masks[1])
    none = select_mask(torch.zeros(0, 4, 5, dtype=torch.bool), torch.zeros(0), 4, 5)
    assert none.shape == (4, 5) and none.dtype == torch.bool and not none.any()
    all_nan = select_mask(masks, torch.full((3,), float("nan")), 4, 5)
    assert all_nan.shape == (4, 5) and not all_nan.any()
    with pytest.raises(InputError, match="scores"):
        select_mask(masks, torch.zeros(2), 4, 5)
    with pytest.raises(InputError, match="image's size"):
        select_mask(masks, torch.zeros(3), 5, 4)


def test_fusion_weights_follow_the_preset_only_when_both_scores_exist() -> None:
    assert fusion_weights(PAPER, True) == (0.1, 0.9)
    assert fusion_weights(OFFICIAL, True) == (0.05, 1.0)
    assert fusion_weights(PAPER, True, gen_weight=0.5) == (0.5, 0.9)
    assert fusion_weights(PAPER, False, 0.5, 0.5) == (1.0, 1.0)
    assert fusion_weights(None, True, 0.2, 0.3) == (0.2, 0.3)
    with pytest.raises(InputError, match="preset"):
        fusion_weights(None, True, 0.2)


def test_fuse_and_select_planted() -> None:
    masks = torch.zeros(3, 4, 5, dtype=torch.bool)
    for i in range(3):
        masks[i, i] = True
    g, d = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.0, 0.3, 0.2])
    # paper: 0.1 s_G + 0.9 s_D = [0.1, 0.27, 0.08] -> proposal 1, then 0, then 2
    choice = fuse_and_select(masks, g, d, PAPER, top_k=2)
    torch.testing.assert_close(choice.fused, torch.tensor([0.1, 0.27, 0.08]))
    assert choice.top_k == [1, 0] and choice.index == 1 and torch.equal(choice.mask, masks[1])
    assert (choice.gen_weight, choice.disc_weight) == (0.1, 0.9)
    # s_G alone (variant G/GS) is used as it is: weight 1, whatever the preset
    alone = fuse_and_select(masks, g, None, PAPER)
    torch.testing.assert_close(alone.fused, g)
    assert alone.index == 0 and alone.top_k == [0, 1, 2] and (alone.gen_weight, alone.disc_weight) == (1.0, 1.0)
    # a pinned index wins over the scores; the ranking stays
    pinned = fuse_and_select(masks, g, d, PAPER, top_k=2, pin_index=2)
    assert pinned.index == 2 and torch.equal(pinned.mask, masks[2]) and pinned.top_k == [1, 0]
    with pytest.raises(InputError, match="pin_index 3"):
        fuse_and_select(masks, g, d, PAPER, pin_index=3)
    # NaN scores never win; all NaN: nothing is chosen and the mask is empty (never the whole image)
    assert fuse_and_select(masks, torch.tensor([float("nan"), 0.0, 1.0]), None, PAPER).index == 2
    nan = fuse_and_select(masks, torch.full((3,), float("nan")), None, PAPER)
    assert nan.index == -1 and nan.mask.shape == (4, 5) and not nan.mask.any()
    # no proposal: index -1, empty mask of the image's size, pinned or not
    for pin in (-1, 0):
        none = fuse_and_select(masks[:0], None, None, PAPER, pin_index=pin)
        assert none.index == -1 and none.top_k == [] and none.fused.shape == (0,) and not none.mask.any()
        assert none.mask.shape == (4, 5)
    with pytest.raises(InputError, match="one score per proposal"):
        fuse_and_select(masks, g[:2], None, PAPER)
    with pytest.raises(InputError, match="top_k"):
        fuse_and_select(masks, g, None)


# --- planted blob -------------------------------------------------------------------------------------------

W, H = 160, 100  # a wide image: padded square side 160, frame at y0 = 30
RECTS = {"a": (10, 20, 50, 70), "b": (65, 10, 105, 50), "c": (115, 50, 150, 90)}  # x0, y0, x1, y1 in the frame


def _rect_mask(x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
    m = torch.zeros(H, W, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def _blob(grid: int, side: int, offset: tuple[int, int], rect: tuple[int, int, int, int], amp: float,
          power: float) -> torch.Tensor:
    """A blob exp(-(u^p + v^p)) over ``rect`` on the token grid of the padded square (u, v = 1 at the rect's
    edges): p = 2 is a Gaussian, a large p is flat-topped like attention spread evenly over an object."""
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * side / grid
    x0, y0, x1, y1 = rect
    u = ((centres[None, :] - (x0 + x1) / 2 - offset[0]) / ((x1 - x0) / 2)).abs()
    v = ((centres[:, None] - (y0 + y1) / 2 - offset[1]) / ((y1 - y0) / 2)).abs()
    return amp * torch.exp(-(u ** power + v ** power))


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / float((a | b).sum())


def _planted_map(mode: str, power: float, noise: float = 0.05) -> torch.Tensor:
    """Generative map of a strong blob over object b, weaker ones over a and c, and uniform noise."""
    grid, side, offset = 32, max(W, H), (0, (W - H) // 2)
    prep = PreparedImage(pixels=torch.zeros(1, 3, 64, 64), size=64, side=side, offset=offset, width=W, height=H)
    gen = torch.Generator().manual_seed(0)
    token_map = (_blob(grid, side, offset, RECTS["b"], 1.0, power)
                 + _blob(grid, side, offset, RECTS["a"], 0.45, power)
                 + _blob(grid, side, offset, RECTS["c"], 0.35, power) + noise * torch.rand(grid, grid, generator=gen))
    c = generative_map(token_map, prep, mode=mode)
    assert c.shape == (H, W)
    return c


@pytest.mark.parametrize("mode", ["lanczos", "bilinear"])
def test_planted_blob_threshold_proposals_find_its_object(mode: str) -> None:
    # noise on a flat top would split its c >= 0.95 core; the distractors a and c are the difficulty here
    c = _planted_map(mode, power=16.0, noise=0.0)
    masks = threshold_proposals(c)  # Ref-Diff/G: threshold proposals, best by s_G
    best = select_mask(masks, generative_scores(c, masks), H, W)
    assert _iou(best, _rect_mask(*RECTS["b"])) > 0.5
    assert not (best & (_rect_mask(*RECTS["a"]) | _rect_mask(*RECTS["c"]))).any()


@pytest.mark.parametrize("mode", ["lanczos", "bilinear"])
def test_planted_gaussian_blob_best_threshold_mask_is_its_core(mode: str) -> None:
    # Eq. 9 favours the high-threshold core of a peaked blob: small, but inside the right object
    c = _planted_map(mode, power=2.0)
    masks = threshold_proposals(c)
    best = select_mask(masks, generative_scores(c, masks), H, W)
    inside = float((best & _rect_mask(*RECTS["b"])).sum()) / float(best.sum())
    assert best.sum() > 50 and inside > 0.95


@pytest.mark.parametrize("power", [2.0, 16.0])
def test_planted_blob_ranks_sam_style_proposals(power: float) -> None:
    c = _planted_map("lanczos", power)
    rects = torch.stack([_rect_mask(*RECTS[k]) for k in "abc"])
    proposals = torch.cat([rects, rects.any(dim=0, keepdim=True)])  # the three objects and their union
    s = generative_scores(c, proposals)
    assert rank(s, 4)[0].item() == 1
    assert s[1] > s[3] and s[0] > s[2]  # the union dilutes b; the stronger distractor (a) beats c
