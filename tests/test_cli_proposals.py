"""`refdiff segment --proposals`: masks from another segmenter (an .npz / .npy file or a folder of PNGs) are scored
and chosen among instead of SAM's; bad files are named before any model loads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refdiff import cli
from refdiff.pipeline import RefDiff

from test_cli import flat, tiny_from_pretrained
from tiny_runs import two_box_image

H, W = 45, 67
BLOB = (20, 35, 40, 60)  # rows, columns of the planted attention blob
BOXES = [(0, 8, 0, 8), (0, 0, 0, 0), (19, 36, 39, 61), (30, 45, 0, 20)]  # index 1 empty, index 2 the blob's


def boxes(height: int = H, width: int = W) -> np.ndarray:
    out = np.zeros((len(BOXES), height, width), bool)
    for i, (y0, y1, x0, x1) in enumerate(BOXES):
        out[i, y0 * height // H:y1 * height // H, x0 * width // W:x1 * width // W] = True
    return out


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray(two_box_image(H, W)).save(path)
    return path


@pytest.fixture()
def planted(monkeypatch):
    """Tiny models, and a generative map c that is 1 on the planted blob and 0 elsewhere (what the scoring of
    the given masks must find, whatever the random UNet's attention looks like)."""
    seen: dict = {}
    monkeypatch.setattr(RefDiff, "from_pretrained", tiny_from_pretrained(seen))
    c = torch.zeros(H, W)
    y0, y1, x0, x1 = BLOB
    c[y0:y1, x0:x1] = 1.0
    monkeypatch.setattr(RefDiff, "_generative_map", lambda self, *args, **kwargs: (c, 5))
    return seen


def write(kind: str, folder: Path, masks: np.ndarray) -> Path:
    if kind == "npz":
        np.savez(folder / "masks.npz", masks=masks, scores=np.arange(len(masks)))
        return folder / "masks.npz"
    if kind == "npy":
        np.save(folder / "masks.npy", masks.astype(np.float32))
        return folder / "masks.npy"
    pngs = folder / "pngs"
    pngs.mkdir()
    for i, m in enumerate(masks):
        Image.fromarray(m.astype(np.uint8) * 255).save(pngs / f"mask_{i}.png")
    return pngs


def run(image: Path, tmp_path: Path, *extra: str, variant: str = "GS") -> tuple[int, dict | None]:
    js = tmp_path / "s.json"
    code = cli.main(["segment", str(image), "the red box", "-o", str(tmp_path / "m.png"), "--json", str(js),
                     "--image-size", "64", "--variant", variant, *extra])
    return code, (json.loads(js.read_text()) if js.exists() else None)


@pytest.mark.parametrize("kind", ["npz", "npy", "pngs"])
def test_the_given_mask_around_the_planted_blob_is_chosen(kind, image, tmp_path, planted, capsys):
    masks = boxes()
    path = write(kind, tmp_path, masks)
    code, data = run(image, tmp_path, "--proposals", str(path))
    err = capsys.readouterr().err
    assert code == 0, err
    assert planted["sam"] is None  # no SAM checkpoint was asked for
    assert data["proposals_file"] == str(path) and data["file_indices"] == [0, 2, 3]  # the empty mask is left out
    assert data["proposal_areas"] == [int(m.sum()) for m in masks[[0, 2, 3]]]
    assert data["chosen"] == 1 and data["top_k"][0] == 1  # the second kept mask, the file's mask 2
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "m.png")) > 0, masks[2])
    assert "external" in data["timings"] and "sam" not in data["timings"]
    assert "left out 1 empty external mask(s) [1] of 4" in flat(err)


def test_masks_of_half_the_size_need_nearest_resizing(image, tmp_path, planted, capsys, monkeypatch):
    small = np.zeros((len(BOXES), 90, 134), bool)  # twice the size: same aspect ratio
    small[:, :, :] = np.repeat(np.repeat(boxes(), 2, axis=1), 2, axis=2)
    path = write("npz", tmp_path, small)
    code, _ = run(image, tmp_path, "--proposals", str(path))
    err = flat(capsys.readouterr().err)
    assert code == 2 and f"--proposals {path}: the masks are 134 x 90" in err and "67 x 45" in err
    assert "--proposals-resize nearest" in err
    code, data = run(image, tmp_path, "--proposals", str(path), "--proposals-resize", "nearest")
    assert code == 0, capsys.readouterr().err
    assert data["file_indices"] == [0, 2, 3] and data["chosen"] == 1
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "m.png")) > 0, boxes()[2])


def test_post_filter_only_when_asked(image, tmp_path, planted, capsys):
    """The official post-filter keeps masks above 10000 px at 640 x 480 (98 px here): the 8 x 8 box goes."""
    path = write("npz", tmp_path, boxes())
    code, data = run(image, tmp_path, "--proposals", str(path), "--proposals-post-filter")
    assert code == 0, capsys.readouterr().err
    assert data["proposal_areas"] == [int(boxes()[i].sum()) for i in (2, 3)]
    assert data["file_indices"] is None and data["chosen"] == 0


@pytest.mark.parametrize("case", ["missing", "suffix", "empty-folder", "ambiguous-npz", "pickle", "values",
                                  "aspect", "variant"])
def test_a_bad_masks_file_is_named_before_any_model_loads(case, image, tmp_path, loud_loaders, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "masks.txt").write_text("0 1")
    np.savez(tmp_path / "two.npz", a=boxes(), b=boxes())
    np.save(tmp_path / "objects.npy", np.array([{"mask": 1}], dtype=object))
    np.save(tmp_path / "sevens.npy", np.full((2, H, W), 7, np.uint8))
    np.save(tmp_path / "square.npy", np.ones((2, 50, 50), bool))
    np.save(tmp_path / "good.npy", boxes())
    path, variant, words = {
        "missing": ("nope.npz", "GS", ["no such file or folder"]),
        "suffix": ("masks.txt", "GS", ["cannot read masks from a .txt file"]),
        "empty-folder": ("empty", "GS", ["holds no .png masks"]),
        "ambiguous-npz": ("two.npz", "GS", ["the .npz holds ['a', 'b']", "'masks'"]),
        "pickle": ("objects.npy", "GS", ["pickle"]),
        "values": ("sevens.npy", "GS", ["integer masks must hold 0 and 1", "values 7"]),
        "aspect": ("square.npy", "GS", ["another aspect ratio"]),
        "variant": ("good.npy", "G", ["variant G makes its own proposals", "full, GS, DS or sam-clip"]),
    }[case]
    full = tmp_path / path
    code, _ = run(image, tmp_path, "--proposals", str(full), variant=variant)
    err = flat(capsys.readouterr().err)
    assert code == 2 and err.startswith("refdiff segment: error: "), err
    assert f"--proposals {full}" in err and all(w in err for w in words), err
    assert not (tmp_path / "m.png").exists()


def test_help_describes_the_proposal_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["segment", "--help"])
    out = flat(capsys.readouterr().out)
    for words in ("--proposals MASKS", "folder of PNG masks", "--proposals-resize {error,nearest}",
                  "--proposals-post-filter", "no SAM checkpoint is needed"):
        assert words in out


@pytest.mark.parametrize("how", [("--variant", "full+ordinals"), ("--preset", "plus")])
def test_an_ordinal_in_the_text_picks_the_second_mask_from_the_left(how, image, tmp_path, planted, capsys):
    """The spatial terms from the command line (a spatial variant, or preset plus, whose prompted proposal mode
    the given masks replace): "the second box from the left" moves the choice from the planted blob's mask to
    the second of the three masks by box centre from the left (the file's mask 3: centres x = 4, 10, 50)."""
    path = write("npz", tmp_path, boxes())
    plain = cli.main(["segment", str(image), "the second box from the left", "-o", str(tmp_path / "p.png"),
                      "--json", str(tmp_path / "plain.json"), "--image-size", "64", "--variant", "full",
                      "--proposals", str(path)])
    assert plain == 0, capsys.readouterr().err
    before = json.loads((tmp_path / "plain.json").read_text())
    assert before["file_indices"][before["chosen"]] == 2  # without the terms: the blob's mask (s_G)
    option, value = how
    # the random CLIP spreads the masks' scores beyond the pool's margin: a wide margin keeps all three in the pool
    args = ["segment", str(image), "the second box from the left", "-o", str(tmp_path / "m.png"),
            "--json", str(tmp_path / "s.json"), "--image-size", "64", "--proposals", str(path), option, value,
            "--set", "spatial_pool_margin=1.0"]
    if option == "--preset":
        args += ["--variant", "full"]
    assert cli.main(args) == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["file_indices"][data["chosen"]] == 3
    assert any(k.startswith("spatial_ordinal") for k in data["scores"]), sorted(data["scores"])
