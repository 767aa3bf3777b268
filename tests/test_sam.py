"""SAM loading (architecture read from the weights, safe loading, errors) and mask generation with a tiny
random-weight SAM of the real classes."""
from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import sam_model_registry

from refdiff.errors import InputError, ModelLoadError
from refdiff.proposals import make_mask_generator, sam_proposals
from refdiff.sam import SAM_CHECKPOINT_FILES, SAM_CHECKPOINT_URLS, SAM_CONFIGS, _build_from_config, \
    canonical_model_type, infer_model_type, load_sam, model_type_from_name, sam_config_from_state_dict
from refdiff.testing.sam import TINY_SAM_CONFIG, tiny_sam, tiny_sam_state_dict

IMAGE = np.random.default_rng(0).integers(0, 256, (101, 131, 3), dtype=np.uint8)  # odd-sized


def _meta_state_dict(model_type: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return sam_model_registry[model_type]().state_dict()


def test_checkpoint_urls() -> None:
    assert SAM_CHECKPOINT_FILES == {"vit_h": "sam_vit_h_4b8939.pth", "vit_l": "sam_vit_l_0b3195.pth",
                                    "vit_b": "sam_vit_b_01ec64.pth"}
    assert all(url == "https://dl.fbaipublicfiles.com/segment_anything/" + SAM_CHECKPOINT_FILES[t]
               for t, url in SAM_CHECKPOINT_URLS.items())


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_official_architectures_read_from_shapes(model_type: str) -> None:
    sd = _meta_state_dict(model_type)
    assert infer_model_type(sd) == model_type
    config = sam_config_from_state_dict(sd)
    assert config == SAM_CONFIGS[model_type]
    # the configurable builder reproduces the registry's model exactly
    with torch.device("meta"):
        rebuilt = _build_from_config(config).state_dict()
    assert {k: tuple(v.shape) for k, v in rebuilt.items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_tiny_architecture_read_from_shapes() -> None:
    sd = tiny_sam_state_dict()
    assert sam_config_from_state_dict(sd) == TINY_SAM_CONFIG
    assert infer_model_type(sd) is None
    assert sum(v.numel() for v in sd.values()) < 200_000


def test_model_type_names() -> None:
    assert canonical_model_type("default") == "vit_h"
    assert canonical_model_type("ViT-B") == "vit_b"
    with pytest.raises(InputError, match="vit_"):
        canonical_model_type("vit_g")
    assert model_type_from_name("models/sams/sam_vit_l_0b3195.pth") == "vit_l"
    assert model_type_from_name("mobile_sam.pt") is None


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_round_trip(tmp_path: Path, suffix: str) -> None:
    sd = tiny_sam_state_dict(seed=1)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    sam = load_sam(path, device="cpu")
    loaded = sam.state_dict()
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert not any(t.is_meta for t in list(sam.parameters()) + list(sam.buffers()))
    assert not sam.training
    # it computes what the original computes
    kwargs = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    expected = sam_proposals(make_mask_generator(tiny_sam(seed=1), **kwargs), IMAGE)
    assert torch.equal(sam_proposals(make_mask_generator(sam, **kwargs), IMAGE), expected)


def test_load_nested_and_half_precision(tmp_path: Path) -> None:
    sd = tiny_sam_state_dict(seed=2)
    path = tmp_path / "train_ckpt.pt"
    torch.save({"model": {"module." + k: v.half() for k, v in sd.items()}, "epoch": 3}, path)
    sam = load_sam(path)
    weight = sam.image_encoder.patch_embed.proj.weight
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, sd["image_encoder.patch_embed.proj.weight"].half().float())


def test_missing_file_names_path_and_url(tmp_path: Path) -> None:
    path = tmp_path / "sam_vit_b_01ec64.pth"
    with pytest.raises(ModelLoadError) as err:
        load_sam(path)
    msg = str(err.value)
    assert str(path) in msg and SAM_CHECKPOINT_URLS["vit_b"] in msg and "models/sams" in msg
    assert SAM_CHECKPOINT_URLS["vit_h"] not in msg
    with pytest.raises(ModelLoadError) as err:
        load_sam(tmp_path / "anything.pth")
    assert all(url in str(err.value) for url in SAM_CHECKPOINT_URLS.values())


def test_wrong_or_broken_files(tmp_path: Path) -> None:
    not_sam = tmp_path / "unet.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, not_sam)
    with pytest.raises(ModelLoadError, match="not a SAM"):
        load_sam(not_sam)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelLoadError, match="could not be read"):
        load_sam(broken)
    truncated = tmp_path / "truncated.pth"
    sd = tiny_sam_state_dict()
    del sd["mask_decoder.iou_token.weight"]
    torch.save(sd, truncated)
    with pytest.raises(ModelLoadError, match=str(truncated)):
        load_sam(truncated)


class _Payload:
    """Unpickling this would call _Payload.trigger: a stand-in for code hidden in a checkpoint."""

    ran = False

    @classmethod
    def trigger(cls) -> None:
        cls.ran = True

    def __reduce__(self):
        return (_Payload.trigger, ())


def test_code_in_a_pickle_is_not_run(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"image_encoder.pos_embed": _Payload()}, f)
    _Payload.ran = False
    with pytest.raises(ModelLoadError):
        load_sam(path)
    assert not _Payload.ran


def test_model_type_must_match_the_weights(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pth"
    torch.save(tiny_sam_state_dict(), path)
    with pytest.raises(ModelLoadError, match="vit_b"):
        load_sam(path, model_type="vit_b")


def test_no_checkpoint_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []

    def offline(url: str, dst: str, *args: object, **kwargs: object) -> None:
        calls.append((url, dst))
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("REFDIFF_SAM_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ModelLoadError) as err:
        load_sam(None, model_type="vit_l")
    target = tmp_path / "cache" / "sam_vit_l_0b3195.pth"
    assert calls == [(SAM_CHECKPOINT_URLS["vit_l"], str(target))]
    assert SAM_CHECKPOINT_URLS["vit_l"] in str(err.value) and str(target) in str(err.value)
    calls.clear()
    with pytest.raises(ModelLoadError):
        load_sam()
    assert calls[0][0] == SAM_CHECKPOINT_URLS["vit_h"]  # vit_h by default, as in both presets


def test_tiny_sam_masks_at_image_size() -> None:
    sam = tiny_sam()
    gen = make_mask_generator(sam, points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    masks = sam_proposals(gen, IMAGE)
    assert masks.dtype == torch.bool and masks.dim() == 3
    assert masks.shape[0] >= 1 and masks.shape[1:] == (101, 131)
    assert masks.flatten(1).any(1).any()  # at least one non-empty mask
    # the same model and image give the same masks
    assert torch.equal(sam_proposals(gen, IMAGE), masks)


def test_tiny_sam_no_mask_passes_an_impossible_threshold() -> None:
    # stability scores are IoUs (<= 1): a threshold above 1 rejects every mask
    gen = make_mask_generator(tiny_sam(), points_per_side=8, stability_score_thresh=1.01)
    masks = sam_proposals(gen, IMAGE)
    assert masks.shape == (0, 101, 131) and masks.dtype == torch.bool


def test_tiny_sam_is_seeded() -> None:
    a, b, c = tiny_sam_state_dict(0), tiny_sam_state_dict(0), tiny_sam_state_dict(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    matrices = [k for k in a if a[k].dim() >= 2]  # every weight matrix, position tables included
    assert len(matrices) > 50 and all(not torch.equal(a[k], c[k]) and a[k].any() for k in matrices)
