"""The generative map (Eq. 5): min-max normalisation, resizing, crop back to the original frame."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from refdiff.errors import InputError
from refdiff.image import PreparedImage, pad_to_square
from refdiff.maps import clip_to_range, generative_map, minmax_normalize, resize_map
from refdiff.proposals import threshold_proposals
from refdiff.scoring import generative_scores


def _prep(width: int, height: int) -> PreparedImage:
    """The PreparedImage geometry of a width x height image, offset as refdiff.image.pad_to_square puts it."""
    _, offset = pad_to_square(np.zeros((height, width, 3), dtype=np.uint8))
    return PreparedImage(pixels=torch.zeros(1, 3, 64, 64), size=64, side=max(width, height), offset=offset,
                         width=width, height=height)


def test_minmax_normalize_hand_values() -> None:
    out = minmax_normalize(torch.tensor([2.0, 4.0, 6.0]))
    torch.testing.assert_close(out, torch.tensor([0.0, 2.0 / (4.0 + 1e-8), 4.0 / (4.0 + 1e-8)]))
    torch.testing.assert_close(minmax_normalize(torch.tensor([1.0, 3.0]), eps=1.0), torch.tensor([0.0, 2.0 / 3.0]))
    assert torch.equal(minmax_normalize(torch.full((2, 2), 7.0)), torch.zeros(2, 2))  # constant: 0 / eps
    with pytest.raises(InputError):
        minmax_normalize(torch.zeros(0))


def test_resize_bilinear_hand_values() -> None:
    # align_corners=False, x2: source positions -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1)
    out = resize_map(torch.tensor([[0.0, 1.0]]), 1, 4, mode="bilinear")
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.25, 0.75, 1.0]]))


def test_resize_lanczos_is_pil_float_without_rounding() -> None:
    m = torch.linspace(0.0, 1e-3, 35).reshape(5, 7)  # far below one 8-bit step
    out = resize_map(m, 23, 17, mode="lanczos")
    ref = np.asarray(Image.fromarray(m.numpy()).resize((17, 23), Image.Resampling.LANCZOS))
    ref = np.clip(ref, 0.0, np.float32(1e-3))  # PIL's float output, its ringing clipped to the map's range
    assert out.shape == (23, 17) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=0)
    assert len(torch.unique(out)) > 100  # not quantised
    flat = resize_map(torch.full((4, 4), 0.123456), 10, 9, mode="lanczos")
    torch.testing.assert_close(flat, torch.full((10, 9), 0.123456))


def test_lanczos_overshoot_is_clipped_to_the_maps_range() -> None:
    # a sharp step: PIL's float Lanczos rings to about 1.1 beside the edge and -0.1 before it
    step = torch.zeros(8, 8)
    step[:, 4:] = 1.0
    ringing = np.asarray(Image.fromarray(step.numpy()).resize((64, 64), Image.Resampling.LANCZOS))
    assert ringing.max() > 1.05 and ringing.min() < -0.05  # the overshoot the clip must remove
    out = resize_map(step, 64, 64, mode="lanczos")
    assert out.min().item() == 0.0 and out.max().item() == 1.0
    np.testing.assert_array_equal(out.numpy(), np.clip(ringing, 0.0, 1.0))
    shifted = resize_map(step * 3.0 + 2.0, 64, 64, mode="lanczos")  # the map's own range, not [0, 1]
    assert shifted.min().item() == 2.0 and shifted.max().item() == 5.0
    assert torch.equal(clip_to_range(torch.tensor([-1.0, 0.5, 9.0]), torch.tensor([0.0, 2.0])),
                       torch.tensor([0.0, 0.5, 2.0]))


@pytest.mark.parametrize("mode", ["bilinear", "lanczos"])
def test_sharp_plateau_is_selected_under_both_resize_modes(mode: str) -> None:
    # Planted answer: a flat, sharp-edged plateau of attention. Eq. 5 -> Eq. 8 -> Eq. 9 -> argmax must pick
    # the plateau, not a sliver of Lanczos overshoot along its edge (IoU ~0.01 without the clip).
    width, height = 256, 192
    prep = _prep(width, height)  # side 256, offset (0, 32)
    x0, y0 = prep.offset
    token = torch.zeros(32, 32)
    token[10:20, 8:22] = 1.0
    cell = prep.side // 32
    plateau = torch.zeros(height, width, dtype=torch.bool)
    plateau[10 * cell - y0:20 * cell - y0, 8 * cell - x0:22 * cell - x0] = True
    c = generative_map(token, prep, mode=mode)
    masks = threshold_proposals(c)
    best = masks[int(generative_scores(c, masks).argmax())]
    iou = (best & plateau).sum().item() / (best | plateau).sum().item()
    assert iou >= 0.5, f"{mode}: IoU {iou:.3f} with the plateau"


def test_resize_rejects_bad_input() -> None:
    with pytest.raises(InputError, match="resize mode"):
        resize_map(torch.zeros(2, 2), 4, 4, mode="bicubic")
    with pytest.raises(InputError, match="2-D"):
        resize_map(torch.zeros(1, 2, 2), 4, 4)
    with pytest.raises(InputError, match="positive"):
        resize_map(torch.zeros(2, 2), 0, 4)


@pytest.mark.parametrize("mode", ["bilinear", "lanczos"])
@pytest.mark.parametrize("size", [(160, 100), (77, 131), (64, 64), (3, 50)])
def test_generative_map_shape_range(mode: str, size: tuple[int, int]) -> None:
    width, height = size
    token = torch.rand(16, 16, generator=torch.Generator().manual_seed(1))
    c = generative_map(token, _prep(width, height), mode=mode)
    assert c.shape == (height, width) and c.dtype == torch.float32
    assert c.min().item() == 0.0 and 1.0 - 1e-6 <= c.max().item() <= 1.0


@pytest.mark.parametrize("mode", ["bilinear", "lanczos"])
@pytest.mark.parametrize("size", [(160, 100), (77, 131), (5, 300)])
def test_generative_map_equals_resize_crop_normalise(mode: str, size: tuple[int, int]) -> None:
    # Eq. 5 done the plain way: the whole side x side square, then the crop, then min-max
    width, height = size
    prep = _prep(width, height)
    token = torch.rand(32, 32, generator=torch.Generator().manual_seed(2))
    square = resize_map(token, prep.side, prep.side, mode=mode)
    x0, y0 = prep.offset
    expected = minmax_normalize(square[y0:y0 + height, x0:x0 + width])
    torch.testing.assert_close(generative_map(token, prep, mode=mode), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["bilinear", "lanczos"])
@pytest.mark.parametrize("size", [(160, 100), (90, 150)])
def test_generative_map_crop_finds_planted_peak(mode: str, size: tuple[int, int]) -> None:
    width, height = size
    prep = _prep(width, height)
    x0, y0 = prep.offset
    assert (x0, y0) != (0, 0)
    # full-resolution token map: resizing is the identity, so the crop must be exact
    token = torch.zeros(prep.side, prep.side)
    token[y0 + 7, x0 + 11] = 1.0  # frame position (x=11, y=7)
    token[0, 0] = token[-1, -1] = 0.5  # corners of the square lie in the padding for these shapes
    c = generative_map(token, prep, mode=mode)
    assert (c == c.max()).nonzero().tolist() == [[7, 11]]
    assert c[7, 11].item() == pytest.approx(1.0, abs=1e-6)
    # low-resolution token map: the peak cell's centre lands on the matching frame pixel
    grid = 16
    cell = prep.side / grid
    token = torch.zeros(grid, grid)
    gy, gx = 9, 5
    token[gy, gx] = 1.0
    c = generative_map(token, prep, mode=mode)
    yy, xx = divmod(int(c.argmax()), width)
    assert abs(xx - ((gx + 0.5) * cell - x0)) <= cell / 2
    assert abs(yy - ((gy + 0.5) * cell - y0)) <= cell / 2


def test_generative_map_normalises_after_the_crop() -> None:
    # a hot spot in the padding must not squash the frame's range
    prep = _prep(120, 60)
    x0, y0 = prep.offset
    token = torch.zeros(prep.side, prep.side)
    token[y0:y0 + 60, x0:x0 + 120] = torch.linspace(0.0, 1.0, 120)
    token[0, :] = 100.0  # row 0 is padding (y0 = 30)
    c = generative_map(token, prep, mode="bilinear")
    assert c.min().item() == 0.0 and c.max().item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(c[0], torch.linspace(0.0, 1.0, 120), atol=1e-6, rtol=0)


def test_generative_map_rejects_bad_input() -> None:
    prep = _prep(40, 20)
    bad = torch.rand(8, 8)
    bad[2, 3] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        generative_map(bad, prep)
    with pytest.raises(InputError, match="resize mode"):
        generative_map(torch.rand(8, 8), prep, mode="nearest")
    wrong = PreparedImage(pixels=prep.pixels, size=64, side=40, offset=(0, 30), width=40, height=20)
    with pytest.raises(InputError, match="does not fit"):
        generative_map(torch.rand(8, 8), wrong)


def test_generative_map_large_side_is_cheap() -> None:
    # a 6000 x 200 panorama: only the frame's 200 rows of the 6000 x 6000 square are computed
    prep = _prep(6000, 200)
    start = time.perf_counter()
    c = generative_map(torch.rand(32, 32, generator=torch.Generator().manual_seed(3)), prep, mode="lanczos")
    assert time.perf_counter() - start < 2.0
    assert c.shape == (200, 6000) and c.min().item() == 0.0 and c.max().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(generative_map(torch.ones(32, 32), prep, mode="bilinear"), torch.zeros(200, 6000))
