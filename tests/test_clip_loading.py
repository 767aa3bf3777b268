"""load_clip: local weight files (safe reading, key checks), open_clip tags, offline failures."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from refdiff.clip import load_clip
from refdiff.discriminative import ClipScorer
from refdiff.errors import InputError, ModelLoadError
from refdiff.testing.clip import TINY_CLIP_CONFIG, full_clip_vit_b16, tiny_clip

ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny() -> ClipScorer:
    return tiny_clip(seed=1)


@pytest.fixture(scope="module")
def probe() -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.rand(40, 56, 3, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 40, 56, dtype=torch.bool)
    masks[0, :20, :30] = True
    masks[1, 10:, 20:] = True
    return image, masks


def _fingerprint(scorer: ClipScorer, probe: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    image, masks = probe
    return torch.cat([scorer.encode_text(["a cat on the left"]), scorer.masked_features(image, masks),
                      scorer.crop_features(image, masks)])


def _state(scorer: ClipScorer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in scorer.model.state_dict().items()}


def test_load_safetensors_file(tmp_path: Path, tiny: ClipScorer, probe) -> None:
    path = tmp_path / "tiny_clip.safetensors"
    save_file(_state(tiny), str(path))
    loaded = load_clip(path, model_cfg=TINY_CLIP_CONFIG)
    torch.testing.assert_close(_fingerprint(loaded, probe), _fingerprint(tiny, probe), atol=ATOL, rtol=0)
    # the activation is not stored in the weights: GELU instead of QuickGELU gives other features
    other = load_clip(str(path), model_cfg=TINY_CLIP_CONFIG, quick_gelu=False)
    assert (_fingerprint(other, probe) - _fingerprint(tiny, probe)).abs().max() > 1e-4


def test_load_wrapped_torch_file_and_dtype(tmp_path: Path, tiny: ClipScorer, probe) -> None:
    path = tmp_path / "tiny_clip.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in _state(tiny).items()}, "epoch": 3}, path)
    loaded = load_clip(path, model_cfg=TINY_CLIP_CONFIG, dtype=torch.float64)
    assert loaded.dtype == torch.float64 and loaded.device.type == "cpu"
    torch.testing.assert_close(_fingerprint(loaded, probe), _fingerprint(tiny, probe), atol=ATOL, rtol=0)
    assert load_clip(path, model_cfg=TINY_CLIP_CONFIG, dtype="fp32").dtype == torch.float32  # names resolve too
    with pytest.raises(InputError, match="int7"):
        load_clip(path, model_cfg=TINY_CLIP_CONFIG, dtype="int7")


def test_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "clip.safetensors"
    for source in (missing, str(missing)):
        with pytest.raises(ModelLoadError, match="clip.safetensors"):
            load_clip(source)
    with pytest.raises(ModelLoadError, match="folder"):
        load_clip(tmp_path)


def test_wrong_keys_and_shapes_name_the_file(tmp_path: Path, tiny: ClipScorer) -> None:
    wrong = tmp_path / "wrong_keys.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(wrong))
    with pytest.raises(ModelLoadError, match=r"wrong_keys\.safetensors.*missing keys.*unexpected keys foo"):
        load_clip(wrong, model_cfg=TINY_CLIP_CONFIG)
    state = _state(tiny)
    state["visual.proj"] = torch.zeros(64, 16)
    bad_shape = tmp_path / "bad_shape.safetensors"
    save_file(state, str(bad_shape))
    with pytest.raises(ModelLoadError, match=r"bad_shape\.safetensors.*shape mismatch visual\.proj"):
        load_clip(bad_shape, model_cfg=TINY_CLIP_CONFIG)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="junk.bin"):
        load_clip(junk, model_cfg=TINY_CLIP_CONFIG)


def test_pickled_model_object_is_refused(tmp_path: Path, tiny: ClipScorer) -> None:
    path = tmp_path / "whole_model.pth"
    torch.save(tiny.model, path)
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_clip(path, model_cfg=TINY_CLIP_CONFIG)


def test_torchscript_archive_needs_consent(tmp_path: Path, tiny: ClipScorer, probe) -> None:
    path = tmp_path / "ViT-tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(tiny.model).save(str(path))
        with pytest.raises(ModelLoadError, match="TorchScript"):
            load_clip(path, model_cfg=TINY_CLIP_CONFIG)
        loaded = load_clip(path, model_cfg=TINY_CLIP_CONFIG, allow_torchscript=True)
    torch.testing.assert_close(_fingerprint(loaded, probe), _fingerprint(tiny, probe), atol=ATOL, rtol=0)


def test_default_tag_offline_says_what_to_provide(monkeypatch: pytest.MonkeyPatch) -> None:
    import open_clip

    seen: dict[str, object] = {}

    def offline(model_name: str, **kwargs: object) -> None:
        seen.update(kwargs, model_name=model_name)
        raise RuntimeError(f"Failed to download weights for tag '{kwargs.get('pretrained')}': no network")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(ModelLoadError) as info:
        load_clip(None)
    message = str(info.value)
    assert "--clip" in message and "timm/vit_base_patch16_clip_224.openai" in message
    assert "huggingface" in message and "ViT-B-16/openai" in message
    # OpenAI's weights were trained with QuickGELU: the tag must build the model with it
    assert seen == {"model_name": "ViT-B-16", "pretrained": "openai", "force_quick_gelu": True,
                    "quick_gelu": True, "cache_dir": None, "require_pretrained": True}


def test_unknown_model_or_tag() -> None:
    with pytest.raises(ModelLoadError, match="openai"):
        load_clip("ViT-B-16/no-such-tag")
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_clip("No-Such-Model/openai")


@pytest.mark.slow
def test_full_size_vit_b16_random() -> None:
    scorer = full_clip_vit_b16(seed=0)
    assert (scorer.image_size, scorer.grid_size, scorer.embed_dim) == (224, 14, 512)
    image = torch.rand(120, 160, 3, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(3, 120, 160, dtype=torch.bool)
    masks[0, :60, :80] = True
    masks[1, 40:, 60:] = True
    masks[2, 50:52, 70:72] = True  # smaller than a patch
    feats = scorer.masked_features(image, masks)
    assert feats.shape == (3, 512) and torch.isfinite(feats).all()
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))
    crops = scorer.crop_features(image, masks)
    torch.testing.assert_close(crops.norm(dim=-1), torch.ones(3))


def test_loading_a_file_does_not_claim_random_weights(tmp_path, caplog) -> None:
    import logging

    from safetensors.torch import save_file

    from refdiff.clip import load_clip
    from refdiff.testing.clip import TINY_CLIP_CONFIG, tiny_clip_model

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip_model().state_dict().items()}, str(path))
    caplog.clear()  # building the random model above rightly logged it
    with caplog.at_level(logging.WARNING):
        load_clip(path, model_cfg=TINY_CLIP_CONFIG)
    assert "initialized randomly" not in caplog.text
