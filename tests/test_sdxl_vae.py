"""SDXL's VAE in fp16: encoded in float32 from the start (its activations overflow fp16), or replaced by an
fp16-safe VAE (load_sd(vae=...)): a folder, a diffusers-layout file or an LDM-layout file."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from refdiff import sd as rsd
from refdiff.diffusion import _posterior, encode_image
from refdiff.errors import ModelLoadError
from refdiff.testing.sd import tiny_sdxl
from test_sd_loading import vae_key_to_ldm
from test_sdxl_loading import tiny_config_folder, write_sdxl_file


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def overflowing_sdxl():
    """Tiny SDXL whose VAE encoder's first convolution gives activations beyond fp16's range (65504), cast to
    fp16; float32 handles them (the group norms that follow rescale them)."""
    sd = tiny_sdxl(0)
    plant(sd.vae)
    sd.vae.to(dtype=torch.float16)
    return sd


def plant(vae) -> None:
    """Weights of +-30000 (exact in fp16) in the encoder's first convolution: sums of 27 of them overflow."""
    with torch.no_grad():
        w = vae.encoder.conv_in.weight
        w.copy_(torch.where(torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) > 0, 3e4, -3e4))


def pixels() -> torch.Tensor:
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_the_planted_vae_overflows_in_fp16():
    sd = overflowing_sdxl()
    dist = _posterior(sd.vae, pixels())
    assert not torch.isfinite(dist.mean).all()


def test_sdxl_vae_encodes_in_float32_at_once_and_stays_fp16():
    sd = dataclasses.replace(overflowing_sdxl(), upcast_vae=True)
    seen: list[torch.dtype] = []
    hook = sd.vae.encoder.conv_in.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    latent = encode_image(sd, pixels())
    hook.remove()
    assert torch.isfinite(latent).all() and latent.shape == (1, 4, 8, 8)
    assert seen == [torch.float32]  # one encode, in float32: never the overflowing fp16 one
    assert {p.dtype for p in sd.vae.parameters()} == {torch.float16}
    reference = tiny_sdxl(0)  # the same weights in float32 (all of them exact in fp16 but the rest rounded)
    plant(reference.vae)
    reference.vae.to(dtype=torch.float16).to(dtype=torch.float32)
    # the upcast encode is the float32 encode of the same (fp16-exact) weights: the same numbers, not close ones
    torch.testing.assert_close(latent, encode_image(reference, pixels()), rtol=0.0, atol=0.0)


def test_sd_without_upcast_still_retries_an_overflow():
    sd = overflowing_sdxl()  # upcast_vae False: the fp16 encode runs first, then again in float32
    seen: list[torch.dtype] = []
    hook = sd.vae.encoder.conv_in.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    latent = encode_image(sd, pixels())
    hook.remove()
    assert torch.isfinite(latent).all() and seen == [torch.float16, torch.float32]


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("xl")
    sd = tiny_sdxl(0)
    return write_sdxl_file(sd, tmp / "xl.safetensors"), tiny_config_folder(sd, tmp / "cfg")


def other_vae():
    torch.manual_seed(5)
    vae = tiny_sdxl(7).vae
    return vae


@pytest.mark.parametrize("layout", ["folder", "diffusers_file", "ldm_file"])
def test_vae_override_replaces_the_vae_and_drops_the_upcast(sdxl_file, tmp_path, layout):
    path, cfg = sdxl_file
    vae = other_vae()
    if layout == "folder":
        vae.save_pretrained(tmp_path / "vae")
        source = tmp_path / "vae"
    elif layout == "diffusers_file":
        source = tmp_path / "vae.safetensors"
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(source))
    else:
        source = tmp_path / "sdxl_vae.safetensors"
        levels = len(vae.config.block_out_channels)
        state = {}
        for k, v in vae.state_dict().items():
            ldm = vae_key_to_ldm(k, levels)
            state[ldm] = v.reshape(*v.shape, 1, 1) if ".attn_1." in ldm and v.ndim == 2 else v
        save_file({k: v.contiguous() for k, v in state.items()}, str(source))
    loaded = rsd.load_sd(path, config=cfg, device="cpu", vae=source)
    assert not loaded.upcast_vae
    for k, v in vae.state_dict().items():
        assert torch.equal(loaded.vae.state_dict()[k], v), k
    assert rsd.load_sd(path, config=cfg, device="cpu").upcast_vae


def test_bad_vae_override_is_named(sdxl_file, tmp_path):
    path, cfg = sdxl_file
    with pytest.raises(ModelLoadError, match="vae .*does not exist"):
        rsd.load_sd(path, config=cfg, device="cpu", vae=tmp_path / "none.safetensors")
    bad = tmp_path / "half.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(32, 3, 3, 3)}, str(bad))
    with pytest.raises(ModelLoadError, match="half.safetensors \\(VAE\\) is missing"):
        rsd.load_sd(path, config=cfg, device="cpu", vae=bad)
