"""The command line: help, outputs on tiny models, and errors that name the bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from refdiff import cli
from refdiff.pipeline import RefDiff


def test_help_explains_every_option_with_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["segment", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # help is wrapped to the terminal width
    for option in ["--variant", "--preset", "--sd", "--sam", "--clip", "--overlay", "--json", "--device",
                   "--seed", "--dtype", "--image-size"]:
        assert option in out
    assert "default: official" in out and "ViT-B-16/openai" in out


def test_missing_image_is_named(tmp_path, capsys):
    code = cli.main(["segment", str(tmp_path / "nope.png"), "the cat", "-o", str(tmp_path / "m.png")])
    assert code == 2
    err = capsys.readouterr().err
    assert "nope.png" in err and "no such file" in err


def test_segment_writes_mask_overlay_and_json(tmp_path, monkeypatch, capsys):
    from refdiff.testing.clip import tiny_clip
    from refdiff.testing.sam import tiny_sam
    from refdiff.testing.sd import tiny_sd

    seen = {}

    def fake_from_pretrained(cls, sd=None, sam=None, clip=None, preset="official", device=None, dtype=None,
                             sd_config=None, **kwargs):
        seen.update(sd=sd, sam=sam, clip=clip, preset=preset, device=device, dtype=dtype, kwargs=kwargs)
        return RefDiff(sd=tiny_sd(), sam=tiny_sam(), clip=tiny_clip(), preset=preset, sam_points_per_side=4,
                       sam_pred_iou_thresh=0.0, sam_stability_score_thresh=0.0, sam_min_area=0, **kwargs)

    monkeypatch.setattr(RefDiff, "from_pretrained", classmethod(fake_from_pretrained))
    img = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 51, 3), dtype=np.uint8)).save(img)
    out, over, js = tmp_path / "mask.png", tmp_path / "over.png", tmp_path / "s.json"
    code = cli.main(["segment", str(img), "the dog on the right", "-o", str(out), "--overlay", str(over),
                     "--json", str(js), "--preset", "paper", "--image-size", "64", "--variant", "GS",
                     "--sam", "x.pth", "--seed", "2"])
    assert code == 0, capsys.readouterr().err
    assert seen["preset"] == "paper" and seen["sam"] == "x.pth" and seen["kwargs"]["image_size"] == 64
    mask = np.asarray(Image.open(out))
    assert mask.shape == (37, 51) and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(Image.open(over)).shape == (37, 51, 3)
    data = json.loads(js.read_text())
    assert data["root_token"] == "dog" and data["direction"] == ["right"] and data["variant"] == "GS"
    assert len(data["scores"]["fused"]) == len(data["proposal_areas"])
    if data["chosen"] >= 0:
        assert data["mask_area"] == data["proposal_areas"][data["chosen"]] == int((mask > 0).sum())


def test_overlay_tints_only_the_mask():
    rgb = np.zeros((2, 2, 3), np.uint8)
    mask = np.array([[True, False], [False, False]])
    out = cli.overlay(rgb, mask, color=(200, 0, 0), opacity=0.5)
    assert out[0, 0].tolist() == [100, 0, 0] and out[1, 1].tolist() == [0, 0, 0]
