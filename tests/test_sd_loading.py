"""Loading SD 1.x/2.x from diffusers folders, hub ids and single LDM-layout checkpoints (offline, tiny models).

Single-file checkpoints are written here from tiny random diffusers models in the original LDM/CompVis key
layout (the inverse of diffusers' single-file conversion); loading them back must give the same weights.
"""
from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from refdiff import sd as rsd
from refdiff.schedule import scaled_linear_alphas_cumprod
from refdiff.errors import InputError, ModelLoadError
from refdiff.testing.sd import (TINY_TEXT_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG, sd_scheduler,
                                text_encoder_from_config, tiny_sd_pipeline, unet_from_config, vae_from_config)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# ------------------------------------------------------------------ diffusers -> LDM layout (test writer)
_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return dict(_RESNET).get(head, head) + "." + tail


def unet_key_to_ldm(key: str, layers: int, up_has_attn: list[bool]) -> str:
    """LDM name of a diffusers UNet weight (input_blocks / middle_block / output_blocks numbering)."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    stem, _, leaf = key.rpartition(".")
    if stem in fixed:
        return f"{fixed[stem]}.{leaf}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = 1 + i * (layers + 1) + j
        return f"input_blocks.{n}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = i * (layers + 1) + j
        return f"output_blocks.{n}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        return f"output_blocks.{i * (layers + 1) + layers}.{2 if up_has_attn[i] else 1}.conv.{m[2]}"
    raise AssertionError(f"no LDM name for UNet weight {key}")


def vae_key_to_ldm(key: str, levels: int) -> str:
    """LDM name of a diffusers VAE weight (decoder levels numbered in reverse)."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
    return key.replace("conv_norm_out", "norm_out")  # conv_in, conv_out, quant_conv, post_quant_conv


def _hf_text_key(key: str) -> str:
    return key.removeprefix("text_model.")  # the same for wrapped (transformers < 5.6) and flat models


def open_clip_text_state(text_state: dict[str, torch.Tensor], extra_block: bool = True) -> dict[str, torch.Tensor]:
    """OpenCLIP (SD 2.x) layout of a CLIPTextModel state dict: fused in_proj, resblocks, ln_final, etc.

    SD 2.x uses the penultimate layer, so its checkpoints carry one resblock more than the diffusers model.
    """
    out: dict[str, torch.Tensor] = {}
    sd = {_hf_text_key(k): v for k, v in text_state.items()}
    out["token_embedding.weight"] = sd.pop("embeddings.token_embedding.weight")
    out["positional_embedding"] = sd.pop("embeddings.position_embedding.weight")
    out["ln_final.weight"] = sd.pop("final_layer_norm.weight")
    out["ln_final.bias"] = sd.pop("final_layer_norm.bias")
    n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    names = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(n_layers + int(extra_block)):
        src = i if i < n_layers else n_layers - 1  # the dropped last block: any weights of the right shape
        p = f"encoder.layers.{src}."
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [sd[p + f"self_attn.{q}_proj.{kind}"] for q in "qkv"])
            for hf, oc in names.items():
                out[f"transformer.resblocks.{i}.{oc}.{kind}"] = sd[p + f"{hf}.{kind}"].clone()
    hidden = out["ln_final.weight"].shape[0]
    out["text_projection"] = torch.randn(hidden, hidden)
    out["logit_scale"] = torch.tensor(4.6052)
    return out


def ldm_state_dict(pipe: Any, text_layout: str = "clip") -> dict[str, torch.Tensor]:
    """A single-file (LDM) state dict of a diffusers pipeline's UNet, VAE and text encoder."""
    ucfg = pipe.unet.config
    up_has_attn = ["CrossAttn" in t for t in ucfg.up_block_types]
    state = {"model.diffusion_model." + unet_key_to_ldm(k, ucfg.layers_per_block, up_has_attn): v.clone()
             for k, v in pipe.unet.state_dict().items()}
    levels = len(pipe.vae.config.block_out_channels)
    for k, v in pipe.vae.state_dict().items():
        ldm = vae_key_to_ldm(k, levels)
        state["first_stage_model." + ldm] = v.reshape(*v.shape, 1, 1).clone() if ".attn_1." in ldm and v.ndim == 2 \
            else v.clone()
    text = pipe.text_encoder.state_dict()
    if text_layout == "clip":
        for k, v in text.items():
            state["cond_stage_model.transformer.text_model." + _hf_text_key(k)] = v.clone()
        n_pos = pipe.text_encoder.config.max_position_embeddings
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(n_pos)[None]
    else:
        for k, v in open_clip_text_state(text).items():
            state["cond_stage_model.model." + k] = v
    return state


def write_config_folder(pipe: Any, folder: Path, *, tokenizer: bool = True) -> Path:
    """A diffusers-layout configuration folder (configs only, no weights) describing a pipeline."""
    pipe.save_pretrained(folder)
    for weights in list(folder.rglob("*.safetensors")) + list(folder.rglob("*.bin")):
        weights.unlink()
    if not tokenizer:
        shutil.rmtree(folder / "tokenizer")
    return folder


def sd2_tiny_pipeline(prediction_type: str = "v_prediction") -> Any:
    """Tiny SD 2.x-shaped pipeline: linear transformer projections, gelu text encoder, v-prediction."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from refdiff.tokenizer import clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        unet = unet_from_config({**TINY_UNET_CONFIG, "use_linear_projection": True})
        vae = vae_from_config(TINY_VAE_CONFIG)
        text = text_encoder_from_config({**TINY_TEXT_CONFIG, "hidden_act": "gelu"})
    sched = DDIMScheduler.from_config(sd_scheduler().config, prediction_type=prediction_type)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k].float().cpu(), sb[k].float().cpu()), k


def assert_frozen(sd: Any) -> None:
    for model in (sd.unet, sd.vae, sd.text_encoder):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())


@pytest.fixture(scope="module")
def tiny_pipe() -> Any:
    return tiny_sd_pipeline(seed=3)


def test_hub_id_recognition() -> None:
    assert rsd.looks_like_hub_id("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert rsd.looks_like_hub_id("org/name.v2")
    for path in ("./org/name", "/abs/model", "models/model.safetensors", "model.ckpt", "single", "a/b/c"):
        assert not rsd.looks_like_hub_id(path), path


# ------------------------------------------------------------------------------------- diffusers folder
def test_diffusers_folder_loads_back(tiny_pipe: Any, tmp_path: Path) -> None:
    tiny_pipe.save_pretrained(tmp_path / "tiny")
    sd = rsd.load_sd(tmp_path / "tiny", device="cpu", dtype="fp32")
    assert_same_weights(sd.unet, tiny_pipe.unet)
    assert_same_weights(sd.vae, tiny_pipe.vae)
    assert_same_weights(sd.text_encoder, tiny_pipe.text_encoder)
    assert_frozen(sd)
    assert sd.device == torch.device("cpu") and sd.dtype == torch.float32
    assert sd.prediction_type == "epsilon" and sd.scaling_factor == pytest.approx(0.18215)
    torch.testing.assert_close(sd.alphas_cumprod, scaled_linear_alphas_cumprod(0.00085, 0.012, 1000))
    assert sd.tokenizer.model_max_length == 77
    assert sd.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]


def test_diffusers_folder_dtype(tiny_pipe: Any, tmp_path: Path) -> None:
    tiny_pipe.save_pretrained(tmp_path / "tiny")
    sd = rsd.load_sd(str(tmp_path / "tiny"), device="cpu", dtype="bf16")
    assert sd.dtype == torch.bfloat16
    assert {p.dtype for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters()} == {torch.bfloat16}


def test_folder_without_model_index(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json") as err:
        rsd.load_sd(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_incomplete_sdxl_folder_names_its_missing_parts(tmp_path: Path) -> None:
    listing = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
               "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    (tmp_path / "model_index.json").write_text(json.dumps(listing))
    with pytest.raises(ModelLoadError, match=r"StableDiffusionXLPipeline\) lacks the components \['vae', "
                                             r"'text_encoder', 'tokenizer', 'scheduler', 'tokenizer_2'\]"):
        rsd.load_sd(tmp_path)


def test_bad_config_argument_fails_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"never read")
    with pytest.raises(InputError, match="'sdxl-v' is neither one of sd1, sd2, sd2-v, sdxl"):
        rsd.load_sd(path, config="sdxl-v")
    with pytest.raises(InputError, match="config must be"):
        rsd.load_sd(path, config=2)  # type: ignore[arg-type]


def test_config_with_folder_is_an_input_error(tiny_pipe: Any, tmp_path: Path) -> None:
    tiny_pipe.save_pretrained(tmp_path / "tiny")
    with pytest.raises(InputError, match="single-file"):
        rsd.load_sd(tmp_path / "tiny", config="sd1")


# ------------------------------------------------------------------------------------------- hub ids
def test_hub_id_offline_says_what_to_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelLoadError) as err:
        rsd.load_sd("refdiff-tests/not-cached", local_files_only=True)
    msg = str(err.value)
    assert "refdiff-tests/not-cached" in msg
    assert "unet/diffusion_pytorch_model.safetensors" in msg and "local folder" in msg and ".safetensors" in msg


def test_missing_path_names_it(tmp_path: Path) -> None:
    for missing in (tmp_path / "nope.safetensors", tmp_path / "sub" / "model", "./not/here"):
        with pytest.raises(ModelLoadError, match="does not exist") as err:
            rsd.load_sd(missing)
        assert str(missing).lstrip("./") in str(err.value)


# ------------------------------------------------------------------------------------------ single files
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_loads_offline_with_config_folder(tiny_pipe: Any, tmp_path: Path, suffix: str) -> None:
    state = ldm_state_dict(tiny_pipe)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 470000}, str(path))
    config = write_config_folder(tiny_pipe, tmp_path / "config")
    sd = rsd.load_sd(path, device="cpu", dtype="fp32", config=config)
    assert_same_weights(sd.unet, tiny_pipe.unet)
    assert_same_weights(sd.vae, tiny_pipe.vae)
    assert_same_weights(sd.text_encoder, tiny_pipe.text_encoder)
    assert_frozen(sd)
    assert sd.prediction_type == "epsilon"
    torch.testing.assert_close(sd.alphas_cumprod, scaled_linear_alphas_cumprod(0.00085, 0.012, 1000))
    ids = torch.tensor([sd.tokenizer("a cat", padding="max_length", max_length=77).input_ids])
    with torch.no_grad():
        got = sd.text_encoder(ids)[0]
        want = tiny_pipe.text_encoder(ids)[0]
    torch.testing.assert_close(got, want)


def test_single_file_fp16_dtype(tiny_pipe: Any, tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.half().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in ldm_state_dict(tiny_pipe).items()}, str(path))
    sd = rsd.load_sd(path, device="cpu", dtype=torch.float32, config=write_config_folder(tiny_pipe, tmp_path / "c"))
    assert {p.dtype for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters()} == {torch.float32}
    w = sd.unet.state_dict()["conv_in.weight"]
    torch.testing.assert_close(w, tiny_pipe.unet.conv_in.weight.half().float(), rtol=0, atol=0)


def test_sd2_single_file_open_clip_layout(tmp_path: Path) -> None:
    pipe = sd2_tiny_pipeline("v_prediction")
    path = tmp_path / "tiny_sd2.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_state_dict(pipe, text_layout="open_clip").items()}, str(path))
    config = write_config_folder(pipe, tmp_path / "config", tokenizer=False)
    sd = rsd.load_sd(path, device="cpu", dtype="fp32", config=str(config))
    assert_same_weights(sd.unet, pipe.unet)
    assert_same_weights(sd.vae, pipe.vae)
    assert_same_weights(sd.text_encoder, pipe.text_encoder)  # the extra (penultimate-skip) block is dropped
    assert sd.prediction_type == "v_prediction"
    # SD 2.x pads with "!" (id 0) as OpenCLIP does; SD 1.x pads with <|endoftext|>.
    assert sd.tokenizer.pad_token == "!" and sd.tokenizer.pad_token_id == 0
    ids = sd.tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert ids[:5] == [49406, 320, 2368, 49407, 0] and len(ids) == 77


def test_missing_weight_is_an_error_not_a_random_layer(tiny_pipe: Any, tmp_path: Path) -> None:
    state = ldm_state_dict(tiny_pipe)
    dropped = "model.diffusion_model.output_blocks.1.0.in_layers.2.weight"
    assert dropped in state
    del state[dropped]
    path = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(ModelLoadError, match=r"missing 1 weight\(s\).*up_blocks\.0\.resnets\.1\.conv1\.weight") as err:
        rsd.load_sd(path, config=write_config_folder(tiny_pipe, tmp_path / "c"))
    assert "partial.safetensors" in str(err.value)


def test_missing_text_weight_is_an_error(tiny_pipe: Any, tmp_path: Path) -> None:
    state = ldm_state_dict(tiny_pipe)
    del state["cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight"]
    path = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(ModelLoadError, match=r"text encoder.*layers\.1\.mlp\.fc2\.weight"):
        rsd.load_sd(path, config=write_config_folder(tiny_pipe, tmp_path / "c"))


def test_tiny_checkpoint_does_not_fit_bundled_config(tiny_pipe: Any, tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_state_dict(tiny_pipe).items()}, str(path))
    with pytest.raises(ModelLoadError, match="context dim 32.*sd1.*768.*config="):
        rsd.load_sd(path)


# ----------------------------------------------------------------------------------- family detection
def _ldm_like(context: int, text: str = "clip", in_channels: int = 4, **extra: tuple[int, ...]) -> dict:
    """A dict of meta tensors with the keys/shapes family detection reads."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, in_channels, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, context),
        "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    }
    if text == "clip":
        shapes["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = (49408, 768)
    elif text == "open_clip":
        shapes["cond_stage_model.model.token_embedding.weight"] = (49408, 1024)
    shapes.update(extra)
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def test_detect_sd1_picks_bundled_sd1_config() -> None:
    state = _ldm_like(768)
    assert rsd.detect_family(state) == "sd1"
    folder, family = rsd.resolve_config(state)
    assert family == "sd1" and folder == rsd.CONFIG_DIR / "sd1"
    assert json.loads((folder / "unet" / "config.json").read_text())["cross_attention_dim"] == 768


def test_detect_sd2_defaults_to_epsilon_and_warns() -> None:
    state = _ldm_like(1024, "open_clip")
    assert rsd.detect_family(state) == "sd2"
    with pytest.warns(UserWarning, match="sd2-v"):
        folder, family = rsd.resolve_config(state)
    assert family == "sd2" and folder.name == "sd2"
    folder, family = rsd.resolve_config(state, "sd2-v")
    assert family == "sd2-v"
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == \
        "v_prediction"
    marked = {**state, "v_pred": torch.empty(0, device="meta")}
    assert rsd.detect_family(marked) == "sd2-v"
    assert rsd.resolve_config(marked)[1] == "sd2-v"


def test_detection_accepts_shapes() -> None:
    state = {k: tuple(v.shape) for k, v in _ldm_like(768).items()}
    assert rsd.detect_family(state) == "sd1"
    assert rsd.context_dim(state) == 768


def test_config_family_mismatch_and_bad_names() -> None:
    with pytest.raises(ModelLoadError, match="sd1 checkpoint.*'sd2'"):
        rsd.resolve_config(_ldm_like(768), "sd2")
    with pytest.raises(ModelLoadError, match="sd1 checkpoint but config='sdxl'.*'sd1'"):
        rsd.resolve_config(_ldm_like(768), "sdxl")
    with pytest.raises(InputError, match="unknown config 'sd3'"):
        rsd.resolve_config(_ldm_like(768), "sd3")
    with pytest.raises(ModelLoadError, match="does not exist"):
        rsd.resolve_config(_ldm_like(768), "/no/such/config")
    with pytest.raises(ModelLoadError, match=r"text encoder of SD 1.x .* context dim 1024 \(that of SD 2.x"):
        rsd.detect_family(_ldm_like(1024, "clip"))


@pytest.mark.parametrize("extra, family", [
    ({"conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,)}, "SDXL refiner"),
    ({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,)}, "SD3"),
    ({"double_blocks.0.img_attn.norm.key_norm.scale": (128,)}, "Flux"),
])
def test_unsupported_families_are_named(extra: dict, family: str) -> None:
    state = {k: torch.empty(s, device="meta") for k, s in extra.items()}
    with pytest.raises(ModelLoadError, match=f"{family}.*Stable Diffusion 1.x, 2.x and SDXL base"):
        rsd.detect_family(state)


def test_inpainting_and_partial_files_are_named() -> None:
    with pytest.raises(ModelLoadError, match="SD inpainting.*9"):
        rsd.detect_family(_ldm_like(768, in_channels=9))
    with pytest.raises(ModelLoadError, match="no text encoder"):
        rsd.detect_family(_ldm_like(768, text="none"))
    unet_only = {k: v for k, v in _ldm_like(768).items() if k.startswith("model.")}
    with pytest.raises(ModelLoadError, match="no VAE and no text encoder"):
        rsd.detect_family(unet_only)
    with pytest.raises(ModelLoadError, match="diffusers-layout component"):
        rsd.detect_family({"down_blocks.0.resnets.0.conv1.weight": torch.empty(1, device="meta")})


def test_unsupported_family_file_names_file_and_family(tmp_path: Path) -> None:
    path = tmp_path / "sd_xl_refiner_1.0.safetensors"
    save_file({"conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(4),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    with pytest.raises(ModelLoadError, match="sd_xl_refiner_1.0.safetensors is a SDXL refiner checkpoint"):
        rsd.load_sd(path)


def test_bundled_configs_are_the_published_architectures() -> None:
    """Parameter counts of SD 1.5 and SD 2.x (UNet, VAE, text encoder), built on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    want = {"sd1": (859_520_964, 83_653_863, 123_060_480), "sd2": (865_910_724, 83_653_863, 340_387_840),
            "sd2-v": (865_910_724, 83_653_863, 340_387_840), "sdxl": (2_567_463_684, 83_653_863, 123_060_480)}
    for name in rsd.BUNDLED_CONFIGS:
        folder = rsd.bundled_config(name)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet")))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder / "vae")))
            text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))
        got = tuple(sum(p.numel() for p in m.parameters()) for m in (unet, vae, text))
        assert got == want[name], name
        assert (folder / "model_index.json").is_file()
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (0.00085, 0.012, "scaled_linear")
        assert sched["prediction_type"] == ("v_prediction" if name == "sd2-v" else "epsilon")
        scheduler = rsd._load_scheduler(folder)
        assert type(scheduler).__name__ == sched["_class_name"]
        torch.testing.assert_close(scheduler.alphas_cumprod, scaled_linear_alphas_cumprod(0.00085, 0.012, 1000))
        scaling = json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]
        assert scaling == (0.13025 if name == "sdxl" else 0.18215)
    from transformers import CLIPTextModelWithProjection
    with torch.device("meta"):  # SDXL's OpenCLIP ViT-bigG/14 text tower with its projection
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(
            str(rsd.bundled_config("sdxl") / "text_encoder_2")))
    assert sum(p.numel() for p in clip_g.parameters()) == 694_659_840
    text2 = json.loads((rsd.bundled_config("sd2") / "text_encoder" / "config.json").read_text())
    assert (text2["hidden_size"], text2["num_hidden_layers"], text2["hidden_act"]) == (1024, 23, "gelu")


# ------------------------------------------------------------------------------------ wrong file kinds
def test_non_checkpoint_files_are_named(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    fake_st = tmp_path / "broken.safetensors"
    fake_st.write_bytes(b"\x00\x01not a safetensors header" * 10)
    fake_ckpt = tmp_path / "broken.ckpt"
    fake_ckpt.write_bytes(b"garbage bytes, not a pickle or a zip" * 10)
    cases = [(text, "not a checkpoint file"), (fake_st, "not a readable .safetensors"),
             (fake_ckpt, "not a readable PyTorch checkpoint")]
    for path, why in cases:
        with pytest.raises(ModelLoadError, match=why) as err:
            rsd.load_sd(path)
        assert str(path) in str(err.value)


def test_truncated_safetensors_is_named(tiny_pipe: Any, tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_state_dict(tiny_pipe).items()}, str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="cut.safetensors is not a readable .safetensors"):
        rsd.load_sd(path)


class _Payload:
    """An object whose unpickling would run code: weights_only loading must refuse it."""

    def __reduce__(self) -> tuple:
        return (print, ("this must never run",))


def test_ckpt_with_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "x": _Payload()}, str(path))
    with pytest.raises(ModelLoadError, match="unsafe.ckpt contains Python objects.*safetensors"):
        rsd.load_sd(path)
    assert "this must never run" not in capsys.readouterr().out


def test_read_checkpoint_unwraps_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "nested.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2), "b": 3}, "epoch": 1}, str(path))
    assert list(rsd.read_checkpoint(path)) == ["a"]
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 1}, str(empty))
    with pytest.raises(ModelLoadError, match="empty.pt holds no tensors"):
        rsd.read_checkpoint(empty)


def test_single_file_old_clip_key_layout(tiny_pipe: Any, tmp_path: Path) -> None:
    """Some SD 1.x files name the text encoder without the text_model level (cond_stage_model.transformer.*)."""
    state = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
             for k, v in ldm_state_dict(tiny_pipe).items()}
    assert "cond_stage_model.transformer.embeddings.token_embedding.weight" in state
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    sd = rsd.load_sd(path, device="cpu", dtype="fp32", config=write_config_folder(tiny_pipe, tmp_path / "c"))
    assert_same_weights(sd.text_encoder, tiny_pipe.text_encoder)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_full_size_ldm_layout_fits_bundled_config(name: str) -> None:
    """A full-size SD 1.5 / SD 2.x LDM key layout (meta tensors) loads strictly into the bundled UNet and VAE."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from refdiff.testing.sd import SD15_UNET_CONFIG, SD15_VAE_CONFIG

    unet_cfg = dict(SD15_UNET_CONFIG) if name == "sd1" else {
        **SD15_UNET_CONFIG, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
        "use_linear_projection": True}
    with torch.device("meta"):
        pipe = type("Parts", (), {})()
        pipe.unet = UNet2DConditionModel(**unet_cfg)
        pipe.vae = AutoencoderKL(**SD15_VAE_CONFIG)
        pipe.text_encoder = text_encoder_from_config(TINY_TEXT_CONFIG, device="meta")
    state = ldm_state_dict(pipe, text_layout="clip" if name == "sd1" else "open_clip")
    # Names and shapes of the published SD 1.5 checkpoint (v1-5-pruned-emaonly), as a check of this writer.
    if name == "sd1":
        known = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
                 "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
                 "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
                 "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
                 "model.diffusion_model.output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
                 "model.diffusion_model.time_embed.0.weight": (1280, 320),
                 "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
                 "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
                 "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3)}
        assert {k: tuple(state[k].shape) for k in known} == known
    folder = rsd.bundled_config(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got_folder, family = rsd.resolve_config(state)
    assert (got_folder, family) == (folder, name)
    unet = rsd._load_unet(state, folder, torch.float16, "full")
    vae = rsd._load_vae(state, folder, torch.float16, "full")
    assert unet.config.cross_attention_dim == rsd.FAMILY_CONTEXT_DIM[name]
    assert sum(p.numel() for p in unet.parameters()) == (859_520_964 if name == "sd1" else 865_910_724)
    assert {p.dtype for p in vae.parameters()} == {torch.float16}


def test_single_file_default_uses_bundled_config_of_family(tiny_pipe: Any, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """load_sd(file) with no config: detection -> bundled folder -> weights (tiny stand-in for the sd1 folder)."""
    bundled = tmp_path / "configs"
    write_config_folder(tiny_pipe, bundled / "sd1", tokenizer=False)
    monkeypatch.setattr(rsd, "CONFIG_DIR", bundled)
    monkeypatch.setitem(rsd.FAMILY_CONTEXT_DIM, "sd1", 32)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_state_dict(tiny_pipe).items()}, str(path))
    sd = rsd.load_sd(path, device="cpu", dtype="fp32")
    assert_same_weights(sd.unet, tiny_pipe.unet)
    assert_same_weights(sd.text_encoder, tiny_pipe.text_encoder)
    assert sd.tokenizer.pad_token == "<|endoftext|>" and sd.tokenizer.model_max_length == 77


def test_generated_tokenizers_pad_as_their_family() -> None:
    sd1 = rsd._load_tokenizer(rsd.bundled_config("sd1"), "sd1")
    sd2 = rsd._load_tokenizer(rsd.bundled_config("sd2"), "sd2")
    assert sd1("a cat", padding="max_length", max_length=77).input_ids[3:6] == [49407, 49407, 49407]
    assert sd2("a cat", padding="max_length", max_length=77).input_ids[3:6] == [49407, 0, 0]
    assert sd1.model_max_length == sd2.model_max_length == 77
