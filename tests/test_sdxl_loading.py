"""Loading SDXL base from a diffusers folder and from a single LDM-layout file (offline, tiny random SDXL);
the refiner is refused; the loaded model segments."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from refdiff import sd as rsd
from refdiff.errors import ModelLoadError
from refdiff.testing.sd import sd_scheduler, tiny_sdxl
from test_sd_loading import _hf_text_key, open_clip_text_state, unet_key_to_ldm, vae_key_to_ldm
from tiny_runs import FAST, two_box_image

_ADD_EMBEDDING = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def sdxl_ldm_state(sd: Any) -> dict[str, torch.Tensor]:
    """The single-file (LDM / SGM) state dict of SDXL components: UNet with label_emb, VAE, CLIP-L, OpenCLIP-G."""
    ucfg = sd.unet.config
    up_has_attn = ["CrossAttn" in t for t in ucfg.up_block_types]
    state: dict[str, torch.Tensor] = {}
    for k, v in sd.unet.state_dict().items():
        stem, _, leaf = k.rpartition(".")
        ldm = f"{_ADD_EMBEDDING[stem]}.{leaf}" if stem in _ADD_EMBEDDING else unet_key_to_ldm(
            k, ucfg.layers_per_block, up_has_attn)
        state["model.diffusion_model." + ldm] = v.clone()
    levels = len(sd.vae.config.block_out_channels)
    for k, v in sd.vae.state_dict().items():
        ldm = vae_key_to_ldm(k, levels)
        state["first_stage_model." + ldm] = v.reshape(*v.shape, 1, 1).clone() if ".attn_1." in ldm and v.ndim == 2 \
            else v.clone()
    for k, v in sd.text_encoder.state_dict().items():
        state["conditioner.embedders.0.transformer.text_model." + _hf_text_key(k)] = v.clone()
    g = sd.text_encoder_2.state_dict()
    projection = g.pop("text_projection.weight")
    for k, v in open_clip_text_state(g, extra_block=False).items():
        state["conditioner.embedders.1.model." + k] = v
    state["conditioner.embedders.1.model.text_projection"] = projection.T.contiguous()  # OpenCLIP: x @ P
    return state


def write_sdxl_file(sd: Any, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in sdxl_ldm_state(sd).items()}, str(path))
    return path


def tiny_config_folder(sd: Any, folder: Path) -> Path:
    """A config= folder describing the tiny SDXL (the bundled one describes SDXL base at full size)."""
    for sub, model in (("unet", sd.unet), ("vae", sd.vae)):
        (folder / sub).mkdir(parents=True)
        model.save_config(str(folder / sub))
    for sub, model in (("text_encoder", sd.text_encoder), ("text_encoder_2", sd.text_encoder_2)):
        model.config.save_pretrained(str(folder / sub))
    sd_scheduler().save_config(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return folder


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k


@pytest.fixture(scope="module")
def tiny() -> Any:
    return tiny_sdxl(3)


def test_single_sdxl_file_is_detected_and_round_trips(tiny, tmp_path):
    state = sdxl_ldm_state(tiny)
    assert rsd.detect_family(state) == "sdxl"
    path = write_sdxl_file(tiny, tmp_path / "tiny_sdxl.safetensors")
    loaded = rsd.load_sd(path, config=tiny_config_folder(tiny, tmp_path / "cfg"), device="cpu")
    assert loaded.is_sdxl and loaded.upcast_vae
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same_weights(getattr(loaded, name), getattr(tiny, name))
    assert loaded.tokenizer_2(["a"], padding="max_length", max_length=77).input_ids[0][3:] == [0] * 74
    assert loaded.tokenizer(["a"], padding="max_length", max_length=77).input_ids[0][3:] == [49407] * 74
    assert torch.allclose(loaded.alphas_cumprod, tiny.alphas_cumprod)
    assert loaded.scaling_factor == pytest.approx(0.13025)
    from refdiff.diffusion import encode_text
    for got, want in zip(encode_text(loaded, "a red car"), encode_text(tiny, "a red car")):
        assert torch.allclose(got, want, atol=1e-6)


def test_bundled_sdxl_config_is_sdxl_base_and_checks_the_shapes(tiny, tmp_path):
    from diffusers import UNet2DConditionModel

    cfg = UNet2DConditionModel.load_config(str(rsd.bundled_config("sdxl") / "unet"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL base 1.0's UNet
    path = write_sdxl_file(tiny, tmp_path / "tiny_sdxl.safetensors")
    with pytest.raises(ModelLoadError, match="context dim 48.*sdxl.*2048"):  # the tiny file against the full-size config
        rsd.load_sd(path, device="cpu")


def test_sdxl_folder_round_trips(tiny, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, text_encoder_2=tiny.text_encoder_2,
                                     tokenizer=tiny.tokenizer, tokenizer_2=tiny.tokenizer_2, unet=tiny.unet,
                                     scheduler=sd_scheduler(), add_watermarker=False)
    pipe.save_pretrained(tmp_path / "xl")
    loaded = rsd.load_sd(tmp_path / "xl", device="cpu")
    assert loaded.is_sdxl and loaded.upcast_vae
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same_weights(getattr(loaded, name), getattr(tiny, name))
    assert loaded.tokenizer_2.pad_token_id == 0


def test_sdxl_refiner_is_refused(tiny, tmp_path):
    state = {k.replace("conditioner.embedders.1.model.", "conditioner.embedders.0.model."): v
             for k, v in sdxl_ldm_state(tiny).items() if not k.startswith("conditioner.embedders.0.transformer.")}
    with pytest.raises(ModelLoadError, match="SDXL refiner"):
        rsd.detect_family(state)
    folder = tmp_path / "refiner"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True,
        "text_encoder": [None, None], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": [None, None], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"]}))
    with pytest.raises(ModelLoadError, match="SDXL refiner"):
        rsd.load_sd(folder, device="cpu")


def test_sdxl_missing_clip_l_is_named(tiny):
    state = {k: v for k, v in sdxl_ldm_state(tiny).items() if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(ModelLoadError, match="no CLIP-L"):
        rsd.detect_family(state)


def test_loaded_sdxl_segments(tiny, tmp_path):
    from refdiff.pipeline import RefDiff
    from refdiff.testing.clip import tiny_clip
    from refdiff.testing.sam import tiny_sam

    path = write_sdxl_file(tiny, tmp_path / "tiny_sdxl.safetensors")
    loaded = rsd.load_sd(path, config=tiny_config_folder(tiny, tmp_path / "cfg"), device="cpu")
    sam, clip = tiny_sam(), tiny_clip()
    settings = {**FAST, "image_size": 128}
    got = RefDiff(sd=loaded, sam=sam, clip=clip, **settings).segment_variants(two_box_image(), "the red box")["full"]
    want = RefDiff(sd=tiny, sam=sam, clip=clip, **settings).segment_variants(two_box_image(), "the red box")["full"]
    assert len(got.proposals) > 0 and got.mask.shape == (45, 67) and got.mask.any()
    assert np.array_equal(got.mask, want.mask)  # the loaded weights segment as the in-memory model does
