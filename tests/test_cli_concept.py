"""`refdiff segment --proposal-mode concept --sam3 FILE`: SAM 3's instances of the target noun as proposals from
the command line; every wrong combination of files and modes is named before any model loads."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from refdiff import cli
from refdiff.pipeline import RefDiff
from refdiff.sam3_models import SAM3_MARKER

from test_cli import flat
from tiny_runs import two_box_image


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray(two_box_image()).save(path)
    return path


def fake_sam3(tmp_path: Path) -> Path:
    """A file with SAM 3's key layout, as Meta's sam3.pt nests it (enough for the checks, which read keys)."""
    path = tmp_path / "sam3.pt"
    torch.save({"model": {"detector." + SAM3_MARKER: torch.zeros(2, 3, 14, 14)}}, path)
    return path


def run(image: Path, tmp_path: Path, *extra: str) -> int:
    return cli.main(["segment", str(image), "the second box from the left", "-o", str(tmp_path / "m.png"),
                     "--image-size", "64", *extra])


def test_help_names_the_concept_mode_and_sam3(capsys):
    with pytest.raises(SystemExit):
        cli.main(["segment", "--help"])
    out = flat(capsys.readouterr().out)
    assert "--proposal-mode {automatic,prompted,concept}" in out and "--sam3 FILE" in out
    assert "SAM 3's instances of the target noun" in out


@pytest.mark.parametrize("case", ["no-sam3", "set-no-sam3", "missing", "sam1-as-sam3", "sam2-as-sam3",
                                  "sam3-as-sam"])
def test_bad_concept_options_fail_before_any_model_loads(case, image, tmp_path, loud_loaders, capsys):
    from refdiff.testing.sam import tiny_sam_state_dict

    sam1 = tmp_path / "sam_vit_b.pth"
    torch.save(tiny_sam_state_dict(), sam1)
    sam2 = tmp_path / "sam2.1_hiera_tiny.safetensors"
    from safetensors.torch import save_file

    save_file({"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(2),
               "sam_mask_decoder.iou_token.weight": torch.zeros(2)}, str(sam2))
    args, words = {
        "no-sam3": (["--proposal-mode", "concept"], ["--proposal-mode concept needs a SAM 3 checkpoint", "--sam3"]),
        "set-no-sam3": (["--set", "proposal_mode=concept"], ["needs a SAM 3 checkpoint"]),
        "missing": (["--proposal-mode", "concept", "--sam3", str(tmp_path / "nope.pt")], ["no such file"]),
        "sam1-as-sam3": (["--sam3", str(sam1)], ["a SAM (v1, segment-anything) checkpoint", "go to --sam"]),
        "sam2-as-sam3": (["--proposal-mode", "concept", "--sam3", str(sam2)], ["a SAM 2 checkpoint", "--sam"]),
        "sam3-as-sam": (["--sam", str(fake_sam3(tmp_path))], ["is a SAM 3 checkpoint", "--sam3 FILE"]),
    }[case]
    code = run(image, tmp_path, *args)
    err = flat(capsys.readouterr().err)
    assert code == 2 and err.startswith("refdiff segment: error: "), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "m.png").exists()


@pytest.mark.skipif(importlib.util.find_spec("sam3") is None, reason="needs the sam3 package")
@pytest.mark.parametrize("how", [("--proposal-mode", "concept"), ("--preset", "plus")])
def test_segment_with_a_tiny_sam3_file(how, image, tmp_path, monkeypatch, capsys):
    """The --sam3 file is loaded by the real loader (a tiny random SAM 3), SD, SAM and CLIP are tiny ones; plus
    switches to concept proposals because a SAM 3 is given."""
    from refdiff.testing.clip import tiny_clip
    from refdiff.testing.sam import tiny_sam
    from refdiff.testing.sam3 import save_sam3_checkpoint, tiny_sam3
    from refdiff.testing.sd import tiny_sd

    real = RefDiff.from_pretrained.__func__

    def tiny(cls, sd=None, sam=None, clip=None, **kwargs):
        model = real(cls, sam3=kwargs.pop("sam3"), **kwargs)
        model._sd, model._sam, model._clip = (type(model._sd)(m) for m in (tiny_sd(), tiny_sam(), tiny_clip()))
        return model

    monkeypatch.setattr(RefDiff, "from_pretrained", classmethod(tiny))
    path = save_sam3_checkpoint(tiny_sam3(seed=4), tmp_path / "sam3.safetensors")
    js = tmp_path / "s.json"
    code = run(image, tmp_path, how[0], how[1], "--sam3", str(path), "--json", str(js),
               "--set", "concept_threshold=0.0", "--set", "concept_max=5")
    assert code == 0, capsys.readouterr().err
    data = json.loads(js.read_text())
    assert 0 < len(data["proposal_areas"]) <= 5 and "concept" in data["scores"]
    assert (tmp_path / "m.png").exists()
