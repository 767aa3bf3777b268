"""Image loading, validation and the padded square of docs/METHOD.md section 1."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from refdiff.errors import InputError
from refdiff.image import image_key, load_image, pad_to_square, prepare_image


def test_grayscale_rgba_16bit_and_float_become_rgb_uint8(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = load_image(gray)
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert (out[..., 0] == gray).all() and (out[..., 2] == gray).all()

    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # opaque red; the rest transparent -> black
    out = load_image(rgba)
    assert out[0, 0].tolist() == [200, 0, 0] and out[1, 1].tolist() == [0, 0, 0]

    sixteen = np.full((2, 3), 65535, dtype=np.uint16)
    sixteen[0, 0] = 0
    out = load_image(sixteen)
    assert out[0, 0, 0] == 0 and out[1, 2, 1] == 255

    path = tmp_path / "g16.png"
    Image.fromarray(np.full((5, 7), 32768, dtype=np.uint16)).save(path)
    out = load_image(path)
    assert out.shape == (5, 7, 3) and abs(int(out[0, 0, 0]) - 128) <= 1

    assert load_image(np.full((2, 2, 3), 0.5, dtype=np.float32))[0, 0, 0] == 128
    chw = torch.zeros(3, 4, 5)
    assert load_image(chw).shape == (4, 5, 3)


@pytest.mark.parametrize("bad, words", [
    (np.full((2, 2, 3), np.nan, dtype=np.float32), "NaN"),
    (np.zeros((2, 2, 5), dtype=np.uint8), "channels"),
    (np.zeros((2, 2, 2, 2), dtype=np.uint8), "shape"),
    (np.full((2, 2, 3), -3.0, dtype=np.float32), "[0, 1]"),
    (12, "expected a path"),
])
def test_bad_arrays_raise_input_error_naming_the_input(bad, words):
    with pytest.raises(InputError, match="image") as info:
        load_image(bad)
    assert words in str(info.value)


def test_missing_and_non_image_paths(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "nope.png")
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    with pytest.raises(InputError, match="not an image"):
        load_image(junk)


def test_pad_to_square_centres_and_reports_offset():
    rgb = np.full((2, 6, 3), 255, dtype=np.uint8)
    square, (x0, y0) = pad_to_square(rgb)
    assert square.shape == (6, 6, 3) and (x0, y0) == (0, 2)
    assert square[2:4].min() == 255 and square[:2].max() == 0 and square[4:].max() == 0


def test_prepare_image_scales_to_minus_one_one_and_keeps_geometry():
    rgb = np.zeros((30, 50, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red: R channel +1, others -1 inside the frame
    prep = prepare_image(rgb, size=64)
    assert prep.pixels.shape == (1, 3, 64, 64) and prep.pixels.dtype == torch.float32
    assert prep.side == 50 and prep.offset == (0, 10) and (prep.width, prep.height) == (50, 30)
    centre = prep.pixels[0, :, 32, 32]
    assert torch.allclose(centre, torch.tensor([1.0, -1.0, -1.0]), atol=1e-2)
    assert torch.allclose(prep.pixels[0, :, 0, 32], torch.tensor([-1.0, -1.0, -1.0]), atol=1e-2)  # padding
    with pytest.raises(InputError, match="multiple of 8"):
        prepare_image(rgb, size=60)


def test_tiny_and_elongated_images_prepare():
    assert prepare_image(np.zeros((8, 8, 3), np.uint8), size=64).pixels.shape == (1, 3, 64, 64)
    prep = prepare_image(np.zeros((3, 400, 3), np.uint8), size=64)
    assert prep.offset == (0, 198) and prep.side == 400


def test_image_key_depends_on_content_and_shape():
    a = np.zeros((2, 3, 3), np.uint8)
    assert image_key(a) == image_key(a.copy())
    b = a.copy()
    b[0, 0, 0] = 1
    assert image_key(a) != image_key(b)
    assert image_key(np.zeros((3, 2, 3), np.uint8)) != image_key(a)


def test_frame_placement_checks_the_frame_fits_its_square() -> None:
    from refdiff.image import PreparedImage, frame_placement

    prep = prepare_image(np.zeros((20, 40, 3), dtype=np.uint8), size=64)
    assert frame_placement(prep) == (0, 10, 40, 40, 20)  # centred vertically in the 40 x 40 square
    wrong = PreparedImage(pixels=prep.pixels, size=64, side=40, offset=(0, 30), width=40, height=20)
    with pytest.raises(InputError, match="frame 40 x 20 at offset \\(0, 30\\) does not fit in the 40 x 40 square"):
        frame_placement(wrong)
