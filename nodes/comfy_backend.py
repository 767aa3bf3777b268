"""ComfyUI backend of the generative stage: runs a loaded MODEL with cross-attention capture.

The UNet runs through ComfyUI's public sampling path (``comfy.sample.sample_custom``), so CONDITIONING,
classifier-free guidance batching, model patches (LoRA, hooks) and memory management behave as in
KSampler. A custom sampler function runs ``refdiff.schedule.ddim_loop`` (the schedule, noising and DDIM
update every backend shares); only the noise prediction goes through ComfyUI. Capture hooks are attn2 "replace"
patches installed on a CLONE of the MODEL, on the selected layers only; each computes the attention
output with ``refdiff.capture.attention_output`` and records ``head_averaged_attention`` beside it.

The UNet's internals used by the sibling methods (docs/SIBLING_METHODS.md) are captured the same way, on a
clone and only where asked: SELF-attention through attn1 replace patches (head-averaged probabilities,
chunked over queries, only on grids of at most ``max_tokens`` tokens, stored in a
``refdiff.stores.SelfAttentionStore``), and features through attn2 replace patches (the query
projections) or ComfyUI's input/output block patches (whole block outputs), stored in a
``refdiff.stores.FeatureStore``, so ``refdiff.refine`` and ``refdiff.clusters`` run on them unchanged.
These patches compute the layer's output with ComfyUI's own attention function, so the clone's output is
the unpatched model's, bit for bit.
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

from refdiff.capture import (BLOCKS, COND, SELF_ATTENTION_CHUNK, SELF_ATTENTION_MAX_TOKENS, CrossAttentionMaps,
                             LayerSelector, attention_output, downsampled_grid, head_averaged_attention,
                             normalise_block)
from refdiff.errors import InputError
from refdiff.schedule import (InjectionPlan, alphas_cumprod_of, ddim_loop, injection_noise, injection_plan,
                              noise_latent, sigma_of)
from refdiff.stores import AttentionStore, FeatureStore, SelfAttentionStore, split_branches

from .dit_options import SUPPORTED_MODELS
from .wire_types import Injection

# Families whose UNet and schedule the method supports, by ComfyUI model-config class (exact class: an SD 2.x
# unCLIP or upscaler config derives from SD20 but is not supported). SSD-1B, Segmind Vega and KOALA are distilled
# SDXL UNets (fewer transformers, the same conditioning): model_base.SDXL runs them all.
SDXL_CONFIGS: tuple[str, ...] = ("SDXL", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B")
SUPPORTED_FAMILIES: dict[type, str] = {supported_models.SD15: "SD1.x", supported_models.SD20: "SD2.x",
                                       **{getattr(supported_models, n): "SDXL" for n in SDXL_CONFIGS
                                          if hasattr(supported_models, n)}}
# Families refused with a reason of their own (the generic message names what is supported).
REFUSED_FAMILIES: dict[str, str] = {
    "SDXLRefiner": "the SDXL refiner is trained on the last low-noise steps only and conditioned on CLIP-G and an "
                   "aesthetic score; connect the SDXL base checkpoint (or a fine-tune of it such as Pony or "
                   "Illustrious) instead",
}
# The diffusion-transformer configs (nodes/dit_backend.py reads them), refused here by the UNet-only nodes.
JOINT_CONFIGS: tuple[str, ...] = ("Flux", "FluxSchnell", "SD3")
# What the feature-cluster proposals can record: cross-attention query projections or decoder block outputs.
FEATURE_OPTIONS = ["queries", "output blocks"]


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


@dataclass(frozen=True)
class Attn1Layer(Attn2Layer):
    """One self-attention (attn1) of a ComfyUI UNet: same patch key and factor as its block's attn2."""

    @property
    def name(self) -> str:
        return super().name + ".attn1"


# ---------------------------------------------------------------------------------------------- family
def model_family(model: Any) -> str:
    """"SD1.x", "SD2.x" or "SDXL" for a supported MODEL; InputError naming the family otherwise."""
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    family = SUPPORTED_FAMILIES.get(type(config))
    name = type(config).__name__ if config is not None else type(base).__name__
    if family is None:
        reason = REFUSED_FAMILIES.get(name, "")
        if not reason and name in JOINT_CONFIGS:
            reason = (f"{name} is a diffusion transformer without UNet cross-attention, which this node reads; "
                      "RefDiffCaptureAttention and RefDiffSegment take it (joint attention)")
        raise InputError(f"model: the generative map runs on {SUPPORTED_MODELS}; this MODEL is {name}"
                         + (f": {reason}" if reason else
                            ". Load one of those checkpoints (e.g. v1-5-pruned-emaonly, sd_xl_base_1.0, "
                            "flux1-dev, sd3.5_medium)"))
    in_channels = int(config.unet_config.get("in_channels", 4))
    if in_channels != 4:
        raise InputError(f"model: {name} with {in_channels} input channels (an inpainting or image-conditioned "
                         "variant) is not supported; use the plain text-to-image checkpoint of the family")
    if not isinstance(getattr(base, "diffusion_model", None), UNetModel):
        raise InputError(f"model: {name} has no ComfyUI UNetModel to capture from")
    return family


def conditioning_problem(model: Any, conditioning: list, name: str) -> str:
    """Why a CONDITIONING cannot drive this MODEL ('' when it can): text width against the UNet's
    context_dim, and SDXL's pooled text (its added conditioning) present."""
    config = model.model.model_config
    want = config.unet_config.get("context_dim")
    for tensor, extra in conditioning:
        width = int(tensor.shape[-1])
        if want is not None and width != int(want):
            return (f"{name}: the text conditioning is {width} wide but this {type(config).__name__} UNet takes "
                    f"{want} (a CLIP of another family?); connect the CLIP of the same checkpoint as the MODEL")
        if SUPPORTED_FAMILIES.get(type(config)) == "SDXL" and extra.get("pooled_output") is None:
            return (f"{name}: SDXL needs the pooled text (pooled_output) of its CLIP-G for the added conditioning; "
                    "encode with the SDXL checkpoint's CLIP (CLIPTextEncode or CLIPTextEncodeSDXL)")
    return ""


def check_conditioning(model: Any, conditioning: list, name: str) -> None:
    """InputError when ``conditioning_problem`` finds one."""
    problem = conditioning_problem(model, conditioning, name)
    if problem:
        raise InputError(problem)


# ---------------------------------------------------------------------------------------------- layers
def _transformer_layers(module: torch.nn.Module, block: str, number: int, factor: int,
                        self_attention: bool = False) -> list[Attn2Layer]:
    out: list[Attn2Layer] = []
    for layer in module:
        if isinstance(layer, SpatialTransformer):
            for j, tb in enumerate(layer.transformer_blocks):
                if self_attention:
                    if getattr(tb, "attn1", None) is not None and not getattr(tb, "disable_self_attn", False):
                        out.append(Attn1Layer(block, number, j, factor))
                elif getattr(tb, "attn2", None) is not None:
                    out.append(Attn2Layer(block, number, j, factor))
    return out


def _walk(diffusion_model: torch.nn.Module, self_attention: bool) -> list[Attn2Layer]:
    layers: list[Attn2Layer] = []
    level = 0
    for i, blk in enumerate(diffusion_model.input_blocks):
        layers += _transformer_layers(blk, "input", i, 2 ** level, self_attention)
        level += sum(isinstance(layer, Downsample) for layer in blk)
    if getattr(diffusion_model, "middle_block", None) is not None:
        layers += _transformer_layers(diffusion_model.middle_block, "middle", 0, 2 ** level, self_attention)
    for i, blk in enumerate(diffusion_model.output_blocks):
        layers += _transformer_layers(blk, "output", i, 2 ** level, self_attention)
        level -= sum(isinstance(layer, Upsample) for layer in blk)
    return layers


def attn2_layers(diffusion_model: torch.nn.Module) -> list[Attn2Layer]:
    """Every cross-attention of a ComfyUI UNet in forward order, found by walking its SpatialTransformers.

    The factor of a layer is 2 ** (Downsample layers before it, minus Upsample layers before it).
    """
    return _walk(diffusion_model, self_attention=False)


def attn1_layers(diffusion_model: torch.nn.Module) -> list[Attn1Layer]:
    """Every self-attention (attn1 that attends to its own tokens) of a ComfyUI UNet, in forward order."""
    return _walk(diffusion_model, self_attention=True)  # type: ignore[return-value]


def output_block_levels(diffusion_model: torch.nn.Module) -> list[int]:
    """The downsampling factor each output block of a ComfyUI UNet runs at (before its own Upsample)."""
    level = sum(isinstance(layer, Downsample) for blk in diffusion_model.input_blocks for layer in blk)
    out = []
    for blk in diffusion_model.output_blocks:
        out.append(2 ** level)
        level -= sum(isinstance(layer, Upsample) for layer in blk)
    return out


def select_layers(model: Any, selector: LayerSelector) -> list[Attn2Layer]:
    """The layers of ``model`` the selector wants; InputError listing what exists when none match."""
    layers = attn2_layers(model.model.diffusion_model)
    chosen = [layer for layer in layers if selector.wants(layer.block, layer.factor)]
    if not layers:
        raise InputError("model: this MODEL's UNet has no cross-attention layer, so there is no attention to "
                         "capture; connect an SD 1.x/2.x or SDXL checkpoint's MODEL")
    if not chosen:
        have = sorted({(normalise_block(la.block), la.factor) for la in layers}, key=lambda x: (x[1], x[0]))
        factors = sorted({la.factor for la in layers if normalise_block(la.block) in selector.blocks})
        fix = (f"set factor to one of {factors}" if factors else
               f"add blocks that hold cross-attention (this UNet has it in {sorted({b for b, _ in have})})")
        raise InputError(f"factor: no cross-attention layer matches factor={selector.factor} and blocks="
                         f"{list(selector.blocks)}; this MODEL has cross-attention at factor(s) "
                         f"{sorted({f for _, f in have})} ((block, factor): {have}); {fix}")
    return chosen


def select_self_attention_layers(model: Any, latent_hw: tuple[int, int],
                                 max_tokens: int = SELF_ATTENTION_MAX_TOKENS,
                                 blocks: Sequence[str] = BLOCKS) -> list[Attn1Layer]:
    """The attn1 layers in ``blocks`` whose query grid for this latent has at most ``max_tokens`` tokens.

    InputError listing the grids this UNet has when none qualifies (self-attention costs Q^2 per layer).
    """
    if int(max_tokens) < 1:
        raise InputError(f"self_max_tokens must be positive, got {max_tokens}")
    selector = LayerSelector(None, tuple(blocks))
    layers = [la for la in attn1_layers(model.model.diffusion_model) if selector.wants(la.block, la.factor)]
    chosen = [la for la in layers if math.prod(downsampled_grid(latent_hw, la.factor)) <= int(max_tokens)]
    if not chosen:
        grids = sorted({downsampled_grid(latent_hw, la.factor) for la in layers}, key=math.prod)
        raise InputError(f"self_max_tokens: no self-attention layer in blocks {list(selector.blocks)} has a grid of at "
                         f"most {max_tokens} tokens for the latent {tuple(latent_hw)}; its grids are {grids}. "
                         "Raise self_max_tokens (memory: tokens^2 x 4 bytes per level) or use a smaller image")
    return chosen


# ---------------------------------------------------------------------------------------------- patches
def _existing_patch(model: Any, layer: Attn2Layer, which: str = "attn2") -> Callable | None:
    """An attn1/attn2 replace patch the MODEL already carries on this layer (another node's), if any."""
    table = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get(which, {})
    return table.get((layer.block, layer.number, layer.transformer_index)) or table.get((layer.block, layer.number))


def comfy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """The attention output exactly as the unpatched layer computes it: ComfyUI's current attention function."""
    from comfy.ldm.modules import attention as comfy_attention_module

    return comfy_attention_module.optimized_attention(q, k, v, int(extra_options["n_heads"]),
                                                      attn_precision=extra_options.get("attn_precision"),
                                                      transformer_options=extra_options)


def _checked_grid(layer: Attn2Layer, extra_options: dict) -> tuple[int, int]:
    """The layer's query grid; InputError when it is not the latent downsampled by the layer's factor."""
    grid = tuple(int(s) for s in extra_options["activations_shape"][-2:])
    latent_hw = tuple(int(s) for s in extra_options["original_shape"][-2:])
    if downsampled_grid(latent_hw, layer.factor) != grid:
        raise InputError(f"layer {layer.name}: query grid {grid} is not the latent {latent_hw} downsampled by "
                         f"{layer.factor}")
    return grid  # type: ignore[return-value]


def kept_branches(x: torch.Tensor, cond_or_uncond: Sequence[int] | None,
                  keep: Sequence[int] = (COND,)) -> list[tuple[int, torch.Tensor]]:
    """(label, chunk) for the CFG chunks of a batch [B, ...] whose label is in ``keep`` (0 cond, 1 uncond)."""
    return split_branches(x, cond_or_uncond or None, keep)


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


def make_self_attention_patch(layer: Attn1Layer, store: SelfAttentionStore, keep: Sequence[int] = (COND,),
                              chunk: int = SELF_ATTENTION_CHUNK, previous: Callable | None = None) -> Callable:
    """An attn1 replace patch: output as the unpatched layer's (or the previous patch's); head-averaged
    softmax probabilities [n, Q, Q] of the kept CFG branches added to ``store``, ``chunk`` queries at a time."""

    def patch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        grid = _checked_grid(layer, extra_options)
        out = previous(q, k, v, extra_options) if previous is not None else comfy_attention(q, k, v, extra_options)
        heads = int(extra_options["n_heads"])
        labels = extra_options.get("cond_or_uncond")
        for (label, qc), (_, kc) in zip(kept_branches(q, labels, keep), kept_branches(k, labels, keep)):
            store.add(layer.name, layer.factor, grid, head_averaged_attention(qc, kc, heads, "probs", chunk=chunk),
                      label)
        return out

    return patch


def add_self_attention_patches(clone: Any, layers: Sequence[Attn1Layer], store: SelfAttentionStore,
                               keep: Sequence[int] = (COND,), chunk: int = SELF_ATTENTION_CHUNK) -> Any:
    """Put self-attention capture patches on ``layers`` of a CLONE (chained after attn1 patches it carries)."""
    for layer in layers:
        previous = _existing_patch(clone, layer, "attn1")
        clone.set_model_attn1_replace(make_self_attention_patch(layer, store, keep, chunk, previous), layer.block,
                                      layer.number, layer.transformer_index)
    return clone


def make_query_feature_patch(layer: Attn2Layer, store: FeatureStore, keep: Sequence[int] = (COND,),
                             previous: Callable | None = None) -> Callable:
    """An attn2 replace patch recording the layer's query projection (attn2.to_q) as features [n, C, h, w]."""

    def patch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        grid = _checked_grid(layer, extra_options)
        for label, qc in kept_branches(q, extra_options.get("cond_or_uncond"), keep):
            store.add(query_feature_name(layer), grid, qc.transpose(1, 2).reshape(qc.shape[0], qc.shape[2], *grid),
                      label)
        return previous(q, k, v, extra_options) if previous is not None else comfy_attention(q, k, v, extra_options)

    return patch


def query_feature_name(layer: Attn2Layer) -> str:
    """Name under which a layer's query features are stored."""
    return layer.name + ".attn2.to_q"


def block_feature_names(diffusion_model: torch.nn.Module) -> list[str]:
    """Blocks whose output the block patches can record: input_blocks.i, middle_block, output_blocks.j
    (every output block but the last, whose output goes straight to the UNet's final layers)."""
    names = [f"input_blocks.{i}" for i in range(len(diffusion_model.input_blocks))]
    if getattr(diffusion_model, "middle_block", None) is not None:
        names.append("middle_block")
    return names + [f"output_blocks.{j}" for j in range(len(diffusion_model.output_blocks) - 1)]


def add_block_feature_patches(clone: Any, names: Sequence[str], store: FeatureStore,
                              keep: Sequence[int] = (COND,)) -> Any:
    """Record the outputs of whole UNet blocks on a CLONE with ComfyUI's input/output block patches.

    ``input_blocks.i``: h after input block i; ``middle_block`` / ``output_blocks.j``: the h that output block
    0 / j + 1 receives (before the skip connection is concatenated). The patches return h unchanged.
    """
    known = block_feature_names(clone.model.diffusion_model)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise InputError(f"feature blocks {list(unknown) or list(names)} are not recordable blocks of this UNet; "
                         f"choose from {known}")
    wanted_in = {int(n.split(".")[1]): n for n in names if n.startswith("input_blocks.")}
    wanted_out = {0 if n == "middle_block" else int(n.split(".")[1]) + 1: n for n in names
                  if n == "middle_block" or n.startswith("output_blocks.")}

    def record(name: str, h: torch.Tensor, options: dict) -> None:
        for label, part in kept_branches(h, options.get("cond_or_uncond"), keep):
            store.add(name, (int(h.shape[-2]), int(h.shape[-1])), part, label)

    def input_patch(h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        block = transformer_options.get("block")
        if block and block[0] == "input" and int(block[1]) in wanted_in:
            record(wanted_in[int(block[1])], h, transformer_options)
        return h

    def output_patch(h: torch.Tensor, hsp: torch.Tensor,
                     transformer_options: dict) -> tuple[torch.Tensor, torch.Tensor]:
        block = transformer_options.get("block")
        if block and block[0] == "output" and int(block[1]) in wanted_out:
            record(wanted_out[int(block[1])], h, transformer_options)
        return h, hsp

    if wanted_in:
        clone.set_model_input_block_patch(input_patch)
    if wanted_out:
        clone.set_model_output_block_patch(output_patch)
    return clone


def select_feature_sources(model: Any, features: str, feature_factor: int) -> tuple[list[Attn2Layer], list[str]]:
    """(query layers, block names) to record for ``features`` (one of FEATURE_OPTIONS) at ``feature_factor``;
    InputError listing what this UNet has when nothing matches."""
    dm = model.model.diffusion_model
    if features == "queries":
        layers = [la for la in attn2_layers(dm) if la.factor == int(feature_factor)]
        if not layers:
            have = sorted({la.factor for la in attn2_layers(dm)})
            raise InputError(f"feature_factor: this UNet has no cross-attention at factor {feature_factor} (it has "
                             f"{have}); choose one of those")
        return layers, []
    if features == "output blocks":
        levels = output_block_levels(dm)
        names = set(block_feature_names(dm))
        blocks = [f"output_blocks.{j}" for j, lvl in enumerate(levels)
                  if lvl == int(feature_factor) and f"output_blocks.{j}" in names]
        if not blocks:
            raise InputError(f"feature_factor: no recordable output block runs at factor {feature_factor}; this UNet's "
                             f"output blocks run at {sorted(set(levels[:-1]))}")
        return [], blocks
    raise InputError(f"features must be one of {FEATURE_OPTIONS}, got {features!r}")


# ---------------------------------------------------------------------------------------------- schedule
def make_injection(latent: torch.Tensor, seed: int, strength: float, ddim_steps: int,
                   num_train_timesteps: int = 1000) -> Injection:
    """The seeded noise and the DDIM timesteps of refdiff.schedule for a latent batch [B, C, h, w].

    Each image gets the noise refdiff.diffusion.run_capture draws for ``seed`` (a CPU generator), so an
    image's maps do not depend on its place in the batch.
    """
    plan = injection_plan(strength, ddim_steps, num_train_timesteps)
    shape = (1,) + tuple(latent.shape[1:])
    noise = injection_noise(shape, seed)
    return Injection(noise=noise.expand(latent.shape[0], *shape[1:]).contiguous(), seed=int(seed),
                     strength=float(strength), ddim_steps=int(ddim_steps),
                     num_train_timesteps=int(num_train_timesteps), noise_timestep=plan.noise_timestep,
                     step_timesteps=plan.step_timesteps, prev_timesteps=plan.prev_timesteps)


def alphas_cumprod(model: Any) -> torch.Tensor:
    """The MODEL's own DDPM alphas_cumprod [T] (float64), from its discrete sigma schedule."""
    sampling = model.get_model_object("model_sampling")
    sigmas = getattr(sampling, "sigmas", None)
    if sigmas is None or not hasattr(sampling, "log_sigmas"):
        raise InputError(f"model: its sampling ({type(sampling).__name__}) has no discrete DDPM schedule; "
                         "Ref-Diff needs the discrete timesteps of SD 1.x/2.x and SDXL")
    return alphas_cumprod_of(sigmas)


def _ddim_sampler(injection: Injection, ac: torch.Tensor, store: AttentionStore,
                  on_step: Callable[[], None]) -> Callable:
    """A ComfyUI sampler function running refdiff.schedule.ddim_loop; the noise prediction is the guided
    model's, called at the step's sigma and turned into epsilon."""
    plan = InjectionPlan(injection.noise_timestep, tuple(zip(injection.step_timesteps, injection.prev_timesteps)))

    def sample(model: Any, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
               callback: Callable | None = None, disable: bool | None = None) -> torch.Tensor:
        extra_args = extra_args or {}

        def predict(x_t: torch.Tensor, t: int, _step: int) -> torch.Tensor:
            sigma = sigma_of(float(ac[t]))
            x_in = x_t * math.sqrt(1.0 + sigma ** 2)  # ComfyUI's EPS input scaling, inverted
            denoised = model(x_in, sigma * x_in.new_ones([x_in.shape[0]]), **extra_args).float()
            return (x_in - denoised) / sigma

        def before(i: int) -> None:
            mm.throw_exception_if_processing_interrupted()
            store.step = i

        # Eq. 3 on the model's scaled latent, with the injection's noise (x itself is ignored).
        _, pred_x0 = ddim_loop(model.latent_image, model.noise, ac, plan, predict, "epsilon",
                               before_step=before, after_step=lambda i: on_step())
        return pred_x0

    return sample


def run_capture(model: Any, latent: torch.Tensor, injection: Injection, positive: list, negative: list | None,
                guidance_scale: float, use_cfg: bool, kind: str, layers: Sequence[Attn2Layer],
                on_step: Callable[[], None] = lambda: None, self_layers: Sequence[Attn1Layer] = (),
                self_store: SelfAttentionStore | None = None,
                self_chunk: int = SELF_ATTENTION_CHUNK) -> CrossAttentionMaps:
    """Noise one image's latent [1, 4, h, w] (unscaled, as VAEEncode gives it) and run the DDIM steps with
    capture on a patched clone of ``model``; returns the maps of every captured layer and step.

    ``positive`` / ``negative`` are CONDITIONING lists; without ``use_cfg`` the conditional branch runs
    alone (guidance 1), as the method's speed option. With ``self_layers`` the conditional branch's
    self-attention of those layers is added to ``self_store`` in the same run.
    """
    if latent.ndim != 4 or latent.shape[0] != 1:
        raise InputError(f"latent must hold one image [1, C, h, w] here, got {tuple(latent.shape)}")
    ac = alphas_cumprod(model)
    if len(ac) != injection.num_train_timesteps:
        raise InputError(f"latent: the noise injection assumes {injection.num_train_timesteps} training steps but "
                         f"the model's schedule has {len(ac)}")
    store = AttentionStore(kind=kind)
    clone = patched_clone(model, layers, store, kind)
    if self_layers:
        if self_store is None:
            raise InputError("self_store: give a SelfAttentionStore to capture self-attention into")
        add_self_attention_patches(clone, self_layers, self_store, keep=(COND,), chunk=self_chunk)
    if use_cfg and negative is None:
        raise InputError("negative: classifier-free guidance needs the unconditional CONDITIONING (an empty "
                         "prompt); connect one, or turn use_cfg off")
    cfg = float(guidance_scale) if use_cfg else 1.0
    if use_cfg and math.isclose(cfg, 1.0):
        clone.model_options["disable_cfg1_optimization"] = True  # keep the unconditional branch captured
    sigmas = torch.tensor([sigma_of(float(ac[t])) for t in [injection.noise_timestep] + injection.step_timesteps],
                          dtype=torch.float32)
    sampler = comfy.samplers.KSAMPLER(_ddim_sampler(injection, ac, store, on_step))
    noise = injection.noise[:1].to(latent.dtype)
    comfy.sample.sample_custom(clone, noise, cfg, sampler, sigmas, positive,
                               negative if negative is not None else positive, latent,
                               disable_pbar=True, seed=injection.seed)
    return store.maps()


def _one_evaluation(alpha_bar: float, on_step: Callable[[], None]) -> Callable:
    """A ComfyUI sampler function that noises the latent to ``alpha_bar`` and evaluates the model once."""

    def sample(model: Any, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
               callback: Callable | None = None, disable: bool | None = None) -> torch.Tensor:
        mm.throw_exception_if_processing_interrupted()
        x_t = noise_latent(model.latent_image.float(), alpha_bar, model.noise.float())
        sigma = sigma_of(alpha_bar)
        x_in = x_t * math.sqrt(1.0 + sigma ** 2)  # ComfyUI's EPS input scaling, inverted
        denoised = model(x_in, sigma * x_in.new_ones([x_in.shape[0]]), **(extra_args or {})).float()
        on_step()
        return denoised

    return sample


def run_features(model: Any, latent: torch.Tensor, noise: torch.Tensor, timestep: int, positive: list,
                 query_layers: Sequence[Attn2Layer] = (), blocks: Sequence[str] = (), seed: int = 0,
                 on_step: Callable[[], None] = lambda: None) -> FeatureStore:
    """One UNet evaluation of a latent batch [B, 4, h, w] (unscaled) noised to DDPM ``timestep`` with ``noise``
    [B, 4, h, w], conditioned on ``positive`` (no guidance), on a clone recording features: the query
    projections of ``query_layers`` and the outputs of ``blocks``. Returns the store (conditional branch)."""
    if latent.ndim != 4 or noise.shape != latent.shape:
        raise InputError(f"latent {tuple(latent.shape)} and noise {tuple(noise.shape)} must be equal [B, C, h, w]")
    if not query_layers and not blocks:
        raise InputError("features: name some query layers or blocks to record")
    ac = alphas_cumprod(model)
    if not 0 <= int(timestep) < len(ac):
        raise InputError(f"timestep must be within 0..{len(ac) - 1} (the model's training steps), got {timestep}")
    store = FeatureStore()
    clone = model.clone()
    for layer in query_layers:
        previous = _existing_patch(clone, layer, "attn2")
        clone.set_model_attn2_replace(make_query_feature_patch(layer, store, (COND,), previous), layer.block,
                                      layer.number, layer.transformer_index)
    if blocks:
        add_block_feature_patches(clone, blocks, store, (COND,))
    alpha_bar = float(ac[int(timestep)])
    sigmas = torch.tensor([sigma_of(alpha_bar), 0.0], dtype=torch.float32)
    sampler = comfy.samplers.KSAMPLER(_one_evaluation(alpha_bar, on_step))
    comfy.sample.sample_custom(clone, noise.to(latent.dtype), 1.0, sampler, sigmas, positive, positive, latent,
                               disable_pbar=True, seed=int(seed))
    return store


# ---------------------------------------------------------------------------------------------- text
def sd_tokenizer(clip: Any) -> Any:
    """The CLIP-L/H tokenizer inside a ComfyUI CLIP (clip_l for SD1, clip_h for SD2, clip_l for SDXL: CLIP-L and
    CLIP-G use the same BPE vocabulary and share the 77 positions, only their padding differs)."""
    outer = getattr(clip, "tokenizer", None)
    name = getattr(outer, "clip", None)
    if not isinstance(name, str) and hasattr(outer, "clip_l") and hasattr(outer, "clip_g"):
        name = "clip_l"  # SDXL's two tokenizers
    inner = getattr(outer, name, None) if isinstance(name, str) else None
    if inner is None or not hasattr(inner, "tokenizer"):
        raise InputError(f"clip: {type(outer).__name__} is not the CLIP text encoder of SD 1.x/2.x or SDXL; "
                         "connect the CLIP output of the SD 1.x/2.x or SDXL checkpoint loader")
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


__all__ = ["SUPPORTED_FAMILIES", "REFUSED_FAMILIES", "Attn2Layer", "Attn1Layer", "model_family",
           "conditioning_problem", "check_conditioning", "attn2_layers", "attn1_layers",
           "output_block_levels", "select_layers", "select_self_attention_layers", "comfy_attention",
           "kept_branches", "make_capture_patch", "patched_clone", "make_self_attention_patch",
           "add_self_attention_patches", "make_query_feature_patch", "query_feature_name", "block_feature_names",
           "add_block_feature_patches", "FEATURE_OPTIONS", "select_feature_sources", "make_injection",
           "alphas_cumprod", "run_capture", "run_features",
           "sd_tokenizer", "encode_text", "token_ids", "tokens_agree", "conditioning_item"]
