"""`refdiff segment` on an SDXL single file (tiny random SDXL written to disk, the real SD loader), with and
without --vae; SAM and CLIP are tiny in-memory models."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from refdiff import cli
from refdiff.pipeline import RefDiff
from refdiff.testing.sd import tiny_sdxl
from test_sdxl_loading import tiny_config_folder, write_sdxl_file
from tiny_runs import two_box_image


@pytest.fixture()
def tiny_sam_and_clip(monkeypatch: pytest.MonkeyPatch) -> dict:
    from refdiff.testing.clip import tiny_clip
    from refdiff.testing.sam import tiny_sam

    import refdiff.clip
    import refdiff.sam2_models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(refdiff.sam2_models, "load_any_sam", lambda *a, **k: tiny_sam())
    monkeypatch.setattr(refdiff.clip, "load_clip", lambda *a, **k: tiny_clip())
    seen: dict = {}
    real = RefDiff.__call__

    def call(self, *args, **kwargs):
        seen["sd"] = self.sd
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RefDiff, "__call__", call)
    return seen


@pytest.mark.parametrize("with_vae", [False, True])
def test_segment_runs_an_sdxl_file(tmp_path: Path, tiny_sam_and_clip: dict, with_vae: bool, capsys) -> None:
    sd = tiny_sdxl(0)
    model = write_sdxl_file(sd, tmp_path / "sd_xl_tiny.safetensors")
    config = tiny_config_folder(sd, tmp_path / "cfg")
    image = tmp_path / "scene.png"
    Image.fromarray(two_box_image()).save(image)
    extra = []
    if with_vae:
        other = tiny_sdxl(4).vae
        other.save_pretrained(tmp_path / "vae")
        extra = ["--vae", str(tmp_path / "vae")]
    argv = ["segment", str(image), "the red box", "-o", str(tmp_path / "m.png"), "--json", str(tmp_path / "s.json"),
            "--sd", str(model), "--sd-config", str(config), "--image-size", "128", "--quiet",
            "--set", "sam_points_per_side=4", "--set", "sam_pred_iou_thresh=0",
            "--set", "sam_stability_score_thresh=0", "--set", "sam_min_area=0", *extra]
    assert cli.main(argv) == 0, capsys.readouterr().err
    loaded = tiny_sam_and_clip["sd"]
    assert loaded.is_sdxl and loaded.upcast_vae is (not with_vae)
    want_vae = (other if with_vae else sd.vae).state_dict()
    assert all(np.array_equal(v.numpy(), want_vae[k].numpy()) for k, v in loaded.vae.state_dict().items())
    mask = np.asarray(Image.open(tmp_path / "m.png"))
    assert mask.shape == (45, 67) and set(np.unique(mask)) <= {0, 255}
    assert json.loads((tmp_path / "s.json").read_text())["root_token"] == "box"


def test_eval_loads_an_sdxl_file_with_its_vae(tmp_path: Path, tiny_sam_and_clip: dict) -> None:
    """`refdiff eval`'s model loader reads --sd / --sd-config / --vae; the SDXL loads through the real loader."""
    from refdiff.cli import build_parser
    from refdiff.cli.eval import load_model

    sd = tiny_sdxl(0)
    model = write_sdxl_file(sd, tmp_path / "sd_xl_tiny.safetensors")
    config = tiny_config_folder(sd, tmp_path / "cfg")
    other = tiny_sdxl(4).vae
    other.save_pretrained(tmp_path / "vae")
    args = build_parser().parse_args(["eval", "--dataset", "refcoco", "--split", "val", "-o", str(tmp_path / "o"),
                                      "--sd", str(model), "--sd-config", str(config), "--vae", str(tmp_path / "vae")])
    loaded = load_model(args, {"image_size": 128}).sd
    assert loaded.is_sdxl and not loaded.upcast_vae
    assert all(np.array_equal(v.numpy(), other.state_dict()[k].numpy()) for k, v in loaded.vae.state_dict().items())
