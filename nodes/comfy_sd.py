"""ComfyUI backend of the generative stage: runs a loaded MODEL with cross-attention capture.

The UNet runs through ComfyUI's public sampling path (``comfy.sample.sample_custom``), so CONDITIONING,
classifier-free guidance batching, model patches (LoRA, hooks) and memory management behave as in
KSampler. A custom sampler function performs the DDIM steps of ``refdiff.diffusion`` (same schedule, same
noising, same update; only the UNet evaluation goes through ComfyUI). Capture hooks are attn2 "replace"
patches installed on a CLONE of the MODEL, on the selected layers only; each computes the attention
output with ``refdiff.capture.attention_output`` and records ``head_averaged_attention`` beside it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import comfy.supported_models as supported_models
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, UNetModel, Upsample

from refdiff.capture import (AttentionStore, CrossAttentionMaps, LayerSelector, attention_output,
                             downsampled_grid, head_averaged_attention, normalise_block)
from refdiff.diffusion import ddim_step, injection_noise, injection_schedule, noise_latent, step_pairs
from refdiff.errors import InputError

from .payloads import Injection

# Families whose UNet and schedule the method supports, by ComfyUI model-config class.
SUPPORTED_FAMILIES: dict[type, str] = {supported_models.SD15: "SD1.x", supported_models.SD20: "SD2.x"}


@dataclass(frozen=True)
class Attn2Layer:
    """One cross-attention of a ComfyUI UNet: its patch key (block, number, transformer index) and factor."""

    block: str  # "input" | "middle" | "output"
    number: int
    transformer_index: int
    factor: int  # latent side / query grid side

    @property
    def name(self) -> str:
        prefix = {"input": "input_blocks", "middle": "middle_block", "output": "output_blocks"}[self.block]
        number = "" if self.block == "middle" else f".{self.number}"
        return f"{prefix}{number}.transformer_blocks.{self.transformer_index}"


# ---------------------------------------------------------------------------------------------- family
def model_family(model: Any) -> str:
    """"SD1.x" or "SD2.x" for a supported MODEL; InputError naming the family otherwise."""
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    family = SUPPORTED_FAMILIES.get(type(config))
    name = type(config).__name__ if config is not None else type(base).__name__
    if family is None:
        raise InputError(f"model: Ref-Diff runs on Stable Diffusion 1.x and 2.x UNets; this MODEL is {name}. "
                         "Load an SD 1.x/2.x checkpoint (e.g. v1-5-pruned-emaonly) for the capture")
    in_channels = int(config.unet_config.get("in_channels", 4))
    if in_channels != 4:
        raise InputError(f"model: {name} with {in_channels} input channels (an inpainting or image-conditioned "
                         "variant) is not supported; use the plain text-to-image checkpoint of the family")
    if not isinstance(getattr(base, "diffusion_model", None), UNetModel):
        raise InputError(f"model: {name} has no ComfyUI UNetModel to capture from")
    return family


# ---------------------------------------------------------------------------------------------- layers
def _transformer_layers(module: torch.nn.Module, block: str, number: int, factor: int) -> list[Attn2Layer]:
    out = []
    for layer in module:
        if isinstance(layer, SpatialTransformer):
            for j, tb in enumerate(layer.transformer_blocks):
                if getattr(tb, "attn2", None) is not None:
                    out.append(Attn2Layer(block, number, j, factor))
    return out


def attn2_layers(diffusion_model: torch.nn.Module) -> list[Attn2Layer]:
    """Every cross-attention of a ComfyUI UNet in forward order, found by walking its SpatialTransformers.

    The factor of a layer is 2 ** (Downsample layers before it, minus Upsample layers before it).
    """
    layers: list[Attn2Layer] = []
    level = 0
    for i, blk in enumerate(diffusion_model.input_blocks):
        layers += _transformer_layers(blk, "input", i, 2 ** level)
        level += sum(isinstance(layer, Downsample) for layer in blk)
    if getattr(diffusion_model, "middle_block", None) is not None:
        layers += _transformer_layers(diffusion_model.middle_block, "middle", 0, 2 ** level)
    for i, blk in enumerate(diffusion_model.output_blocks):
        layers += _transformer_layers(blk, "output", i, 2 ** level)
        level -= sum(isinstance(layer, Upsample) for layer in blk)
    return layers


def select_layers(model: Any, selector: LayerSelector) -> list[Attn2Layer]:
    """The layers of ``model`` the selector wants; InputError listing what exists when none match."""
    layers = attn2_layers(model.model.diffusion_model)
    chosen = [layer for layer in layers if selector.wants(layer.block, layer.factor)]
    if not chosen:
        have = sorted({(normalise_block(la.block), la.factor) for la in layers}, key=lambda x: (x[1], x[0]))
        raise InputError(f"layers: no cross-attention layer matches factor={selector.factor} and blocks="
                         f"{list(selector.blocks)}; this UNet has (block, factor) {have}")
    return chosen


# ---------------------------------------------------------------------------------------------- patches
def _existing_patch(model: Any, layer: Attn2Layer) -> Callable | None:
    """An attn2 replace patch the MODEL already carries on this layer (another node's), if any."""
    table = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    return table.get((layer.block, layer.number, layer.transformer_index)) or table.get((layer.block, layer.number))


def make_capture_patch(layer: Attn2Layer, store: AttentionStore, kind: str,
                       previous: Callable | None = None) -> Callable:
    """An attn2 replace patch: attention output as usual (or the previous patch's), map recorded beside it."""

    def patch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = int(extra_options["n_heads"])
        grid = tuple(int(s) for s in extra_options["activations_shape"][-2:])
        latent_hw = tuple(int(s) for s in extra_options["original_shape"][-2:])
        if downsampled_grid(latent_hw, layer.factor) != grid:
            raise InputError(f"layer {layer.name}: query grid {grid} is not the latent {latent_hw} downsampled "
                             f"by {layer.factor}")
        out = previous(q, k, v, extra_options) if previous is not None else attention_output(q, k, v, heads)
        attn = head_averaged_attention(q, k, heads, kind=kind)
        store.add(layer.name, layer.block, layer.factor, grid, attn, extra_options.get("cond_or_uncond"))
        return out

    return patch


def patched_clone(model: Any, layers: Sequence[Attn2Layer], store: AttentionStore, kind: str) -> Any:
    """A clone of ``model`` with capture patches on ``layers``; the MODEL passed in is left untouched."""
    clone = model.clone()
    for layer in layers:
        previous = _existing_patch(clone, layer)
        clone.set_model_attn2_replace(make_capture_patch(layer, store, kind, previous), layer.block,
                                      layer.number, layer.transformer_index)
    return clone


# ---------------------------------------------------------------------------------------------- schedule
def make_injection(latent: torch.Tensor, seed: int, strength: float, ddim_steps: int,
                   num_train_timesteps: int = 1000) -> Injection:
    """The seeded noise and the DDIM timesteps of refdiff.diffusion for a latent batch [B, C, h, w].

    Each image gets the noise refdiff.diffusion.run_capture draws for ``seed`` (a CPU generator), so an
    image's maps do not depend on its place in the batch.
    """
    noise_t, step_ts = injection_schedule(strength, ddim_steps, num_train_timesteps)
    shape = (1,) + tuple(latent.shape[1:])
    noise = injection_noise(shape, seed)
    prev_ts = [t_prev for _, t_prev in step_pairs(step_ts)]
    return Injection(noise=noise.expand(latent.shape[0], *shape[1:]).contiguous(), seed=int(seed),
                     strength=float(strength), ddim_steps=int(ddim_steps),
                     num_train_timesteps=int(num_train_timesteps), noise_timestep=int(noise_t),
                     step_timesteps=[int(t) for t in step_ts], prev_timesteps=[int(t) for t in prev_ts])


def alphas_cumprod(model: Any) -> torch.Tensor:
    """The MODEL's own DDPM alphas_cumprod [T] (float64), from its discrete sigma schedule."""
    sampling = model.get_model_object("model_sampling")
    sigmas = getattr(sampling, "sigmas", None)
    if sigmas is None or not hasattr(sampling, "log_sigmas"):
        raise InputError(f"model: its sampling ({type(sampling).__name__}) has no discrete DDPM schedule; "
                         "Ref-Diff needs SD 1.x/2.x's discrete timesteps")
    return 1.0 / (1.0 + sigmas.detach().double().cpu() ** 2)


def _ddim_sampler(injection: Injection, ac: torch.Tensor, store: AttentionStore,
                  on_step: Callable[[], None]) -> Callable:
    """A ComfyUI sampler function running refdiff's DDIM steps on the guided model."""

    def sample(model: Any, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
               callback: Callable | None = None, disable: bool | None = None) -> torch.Tensor:
        extra_args = extra_args or {}
        # Eq. 3 on the model's scaled latent, with the injection's noise (x itself is ignored).
        x_t = noise_latent(model.latent_image.float(), float(ac[injection.noise_timestep]),
                           model.noise.float())
        pred_x0 = x_t
        s_in = x_t.new_ones([x_t.shape[0]])
        for i, (t, t_prev) in enumerate(zip(injection.step_timesteps, injection.prev_timesteps)):
            mm.throw_exception_if_processing_interrupted()
            store.step = i
            sigma = math.sqrt((1.0 - float(ac[t])) / float(ac[t]))
            x_in = x_t * math.sqrt(1.0 + sigma ** 2)  # ComfyUI's EPS input scaling, inverted
            denoised = model(x_in, sigma * s_in, **extra_args).float()
            eps = (x_in - denoised) / sigma
            x_t, pred_x0 = ddim_step(x_t, eps, float(ac[t]), float(ac[t_prev]), "epsilon")
            on_step()
        return pred_x0

    return sample


def run_capture(model: Any, latent: torch.Tensor, injection: Injection, positive: list, negative: list | None,
                guidance_scale: float, use_cfg: bool, kind: str, layers: Sequence[Attn2Layer],
                on_step: Callable[[], None] = lambda: None) -> CrossAttentionMaps:
    """Noise one image's latent [1, 4, h, w] (unscaled, as VAEEncode gives it) and run the DDIM steps with
    capture on a patched clone of ``model``; returns the maps of every captured layer and step.

    ``positive`` / ``negative`` are CONDITIONING lists; without ``use_cfg`` the conditional branch runs
    alone (guidance 1), as the method's speed option.
    """
    if latent.ndim != 4 or latent.shape[0] != 1:
        raise InputError(f"latent must hold one image [1, C, h, w] here, got {tuple(latent.shape)}")
    ac = alphas_cumprod(model)
    if len(ac) != injection.num_train_timesteps:
        raise InputError(f"latent: the noise injection assumes {injection.num_train_timesteps} training steps but "
                         f"the model's schedule has {len(ac)}")
    store = AttentionStore(kind=kind)
    clone = patched_clone(model, layers, store, kind)
    if use_cfg and negative is None:
        raise InputError("negative: classifier-free guidance needs the unconditional CONDITIONING (an empty "
                         "prompt); connect one, or turn use_cfg off")
    cfg = float(guidance_scale) if use_cfg else 1.0
    if use_cfg and math.isclose(cfg, 1.0):
        clone.model_options["disable_cfg1_optimization"] = True  # keep the unconditional branch captured
    sigmas = torch.tensor([math.sqrt((1.0 - float(ac[t])) / float(ac[t]))
                           for t in [injection.noise_timestep] + injection.step_timesteps], dtype=torch.float32)
    sampler = comfy.samplers.KSAMPLER(_ddim_sampler(injection, ac, store, on_step))
    noise = injection.noise[:1].to(latent.dtype)
    comfy.sample.sample_custom(clone, noise, cfg, sampler, sigmas, positive,
                               negative if negative is not None else positive, latent,
                               disable_pbar=True, seed=injection.seed)
    return store.maps()


# ---------------------------------------------------------------------------------------------- text
def sd_tokenizer(clip: Any) -> Any:
    """The SD 1.x/2.x tokenizer inside a ComfyUI CLIP (clip_l for SD1, clip_h for SD2)."""
    outer = getattr(clip, "tokenizer", None)
    name = getattr(outer, "clip", None)
    inner = getattr(outer, name, None) if isinstance(name, str) else None
    if inner is None or not hasattr(inner, "tokenizer"):
        raise InputError(f"clip: {type(outer).__name__} is not the single CLIP text encoder of SD 1.x/2.x; "
                         "connect the CLIP output of the SD 1.x/2.x checkpoint loader")
    return inner


def encode_text(clip: Any, text: str) -> list:
    """CONDITIONING of one prompt, encoded as CLIPTextEncode does."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def token_ids(clip: Any, text: str) -> list[int | None]:
    """The first 77 token ids ComfyUI feeds the text encoder for ``text`` (None for an embedding vector)."""
    tokens = clip.tokenize(text)
    chunks = next(iter(tokens.values()))
    out: list[int | None] = []
    for t in chunks[0]:
        value = t[0] if isinstance(t, (tuple, list)) else t
        out.append(int(value) if isinstance(value, int) or (torch.is_tensor(value) and value.numel() == 1)
                   else None)
    return out


def tokens_agree(clip: Any, prompt: str, plain_prompt: str) -> bool:
    """True when ComfyUI tokenises ``prompt`` into the ids the parse numbered (those of ``plain_prompt``)."""
    hf = sd_tokenizer(clip).tokenizer
    expected = hf(plain_prompt, truncation=True, max_length=77)["input_ids"]
    return token_ids(clip, prompt)[:len(expected)] == list(expected)


def conditioning_item(cond: list, index: int, batch: int) -> list:
    """Image ``index``'s CONDITIONING: the whole list when it is unbatched, its slice when it holds B rows."""
    out = []
    for tensor, extra in cond:
        if tensor.shape[0] == batch and batch > 1:
            extra = {k: (v[index:index + 1] if isinstance(v, torch.Tensor) and v.shape[:1] == (batch,) else v)
                     for k, v in extra.items()}
            tensor = tensor[index:index + 1]
        elif tensor.shape[0] != 1:
            raise InputError(f"conditioning holds {tensor.shape[0]} rows for a batch of {batch} images; give one "
                             "row for all images or one per image")
        out.append([tensor, extra])
    return out


__all__ = ["SUPPORTED_FAMILIES", "Attn2Layer", "model_family", "attn2_layers", "select_layers",
           "make_capture_patch", "patched_clone", "make_injection", "alphas_cumprod", "run_capture",
           "sd_tokenizer", "encode_text", "token_ids", "tokens_agree", "conditioning_item"]
