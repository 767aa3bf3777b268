"""Generative stage nodes: image preparation, noise injection (Eq. 3) and cross-attention capture (Eq. 4)."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from comfy_api.latest import io

from refdiff.capture import COND, SELF_ATTENTION_MAX_TOKENS, LayerSelector
from refdiff.errors import InputError
from refdiff.flow import DEFAULT_FLOW_T
from refdiff.stores import SelfAttentionStore
from refdiff.text import strip_prompt_weights

from . import comfy_backend, dit_backend, dit_capture, runtime, sockets, tensors, text_inputs, token_positions
from .dit_options import (DEFAULT_BACKGROUND, DEFAULT_BLOCKS, DEFAULT_MAP_KIND, DitOptions, check_parse_context,
                          dit_inputs_on_unet, dit_options, dit_options_problem, unused_unet_inputs)
from .wire_types import INJECTION_KEY, AttentionBatch, Injection, InternalsAttentionBatch, ParsedBatch

KIND_OPTIONS = ["preset", "probs", "logits"]


# ------------------------------------------------------------------------------------------ stage functions
def prepare_images(image: torch.Tensor, size: int, resize_filter: str) -> torch.Tensor:
    """IMAGE batch -> the padded, resized squares the VAE encodes (docs/METHOD.md section 1)."""
    return runtime.intermediate(tensors.prepared_squares(image, size=size, resize_filter=resize_filter))


def inject_noise(latent: dict, seed: int, strength: float, ddim_steps: int,
                 num_train_timesteps: int = 1000) -> dict:
    """A copy of a LATENT dict carrying the injection plan (seeded noise + DDIM timesteps) under INJECTION_KEY."""
    samples = tensors.latent_samples(latent)
    out = dict(latent)
    out[INJECTION_KEY] = comfy_backend.make_injection(samples, seed, strength, ddim_steps, num_train_timesteps)
    return out


def injection_of(latent: dict) -> Injection:
    """The plan RefDiffNoiseInjection stored in a LATENT; InputError naming the missing node otherwise."""
    plan = latent.get(INJECTION_KEY) if isinstance(latent, dict) else None
    if not isinstance(plan, Injection):
        raise InputError("latent: this LATENT carries no noise injection plan; connect VAEEncode -> "
                         "RefDiffNoiseInjection -> the latent input")
    return plan


def prompts_for_batch(batch: int, parse: ParsedBatch | None, text: str, prompt_suffix: str) -> list[str]:
    """The prompt of each image: from the parse when connected, else the text lines plus the suffix."""
    if parse is not None:
        return [item.prompt for item in parse.for_batch(batch, "parse")]
    return [t + prompt_suffix for t in text_inputs.texts_for_batch(text, batch, "text")]


def capture_attention(model: Any, latent: dict, *, positive: list | None = None, negative: list | None = None,
                      clip: Any = None, parse: ParsedBatch | None = None, text: str = "",
                      prompt_suffix: str = ", ", guidance_scale: float = 9.0, use_cfg: bool = True,
                      kind: str = "logits", factor: int | None = 4,
                      blocks: tuple[str, ...] = ("down", "mid", "up"), steps: int = 0, self_attention: bool = False,
                      self_max_tokens: int = SELF_ATTENTION_MAX_TOKENS, dit: DitOptions | None = None,
                      root_rule: str = "root_or_subj") -> tuple[AttentionBatch, str]:
    """Run the UNet steps on every image of a noised LATENT and capture cross-attention (Eq. 4); a Flux / SD 3
    MODEL goes to ``dit_capture.capture_joint_attention`` with ``dit`` (defaults when None) instead.

    ``factor`` 0 or None captures every level. Conditioning comes from ``positive``/``negative`` when given,
    else each prompt is encoded with ``clip`` (the unconditional branch is the empty prompt). With
    ``self_attention`` the same run also records the conditional branch's self-attention on every level of at
    most ``self_max_tokens`` tokens (layers and steps averaged per level). Returns the maps and a summary.
    """
    joint = dit_backend.dit_family(model) is not None
    family = dit_backend.check_dit_family(model) if joint else comfy_backend.model_family(model)
    plan = injection_of(latent)
    samples = latent["samples"]
    batch = int(samples.shape[0])
    if plan.noise.shape[0] != batch:
        raise InputError(f"latent: the injection plan is for {plan.noise.shape[0]} images but the latent holds "
                         f"{batch}; re-run RefDiffNoiseInjection on this latent")
    if joint:
        problem = unused_unet_inputs(kind, steps, self_attention)
        if problem:
            raise InputError(problem)
        return dit_capture.capture_joint_attention(
            model, samples, plan, dit or DitOptions(), positive=positive, negative=negative, clip=clip,
            parse=parse, text=text, prompt_suffix=prompt_suffix, root_rule=root_rule,
            guidance_scale=guidance_scale, use_cfg=use_cfg)
    problem = dit_inputs_on_unet(dit, family)
    if problem:
        raise InputError(problem)
    if parse is not None:
        check_parse_context(family, parse.context)
    if steps:
        plan = dataclasses.replace(plan, step_timesteps=plan.step_timesteps[:steps],
                                   prev_timesteps=plan.prev_timesteps[:steps])
    layers = comfy_backend.select_layers(model, LayerSelector(factor or None, tuple(blocks)))
    latent_hw = (int(samples.shape[-2]), int(samples.shape[-1]))
    self_layers = (comfy_backend.select_self_attention_layers(model, latent_hw, self_max_tokens, tuple(blocks))
                   if self_attention else [])

    prompts: list[str | None] = [None] * batch
    tokens: list[list[str] | None] = [None] * batch
    if positive is None:
        if clip is None:
            raise InputError("clip: connect the checkpoint's CLIP (with text or a parse), or give positive and "
                             "negative CONDITIONING")
        prompts = prompts_for_batch(batch, parse, text, prompt_suffix)
        tokenizer = comfy_backend.sd_tokenizer(clip)
        plain = [strip_prompt_weights(p) + prompt_suffix for p in prompts]
        tokens = [token_positions.token_strings(p, tokenizer) for p in plain]
        for prompt, plain_prompt in dict(zip(prompts, plain)).items():
            if not comfy_backend.tokens_agree(clip, prompt, plain_prompt):
                runtime.LOG.warning("[RefDiff] ComfyUI tokenises %r differently from the plain text %r (embedding "
                                    "or unusual syntax?): the root word's token position may be off", prompt,
                                    plain_prompt)
        cache: dict[str, list] = {}

        def encoded(p: str) -> list:
            if p not in cache:
                cache[p] = comfy_backend.encode_text(clip, p)
            return cache[p]

        positives = [encoded(p) for p in prompts]
        negatives = [encoded("") for _ in prompts] if use_cfg else [None] * batch
    else:
        positives = [comfy_backend.conditioning_item(positive, i, batch) for i in range(batch)]
        negatives = ([comfy_backend.conditioning_item(negative, i, batch) for i in range(batch)]
                     if negative is not None else [None] * batch)

    for name, conds in (("positive", positives), ("negative", negatives)):
        for cond in conds[:1] if positive is None else conds:  # encoded prompts: one check covers the CLIP
            if cond is not None:
                comfy_backend.check_conditioning(model, cond, name if positive is not None else "clip")
    progress = runtime.Progress(batch * len(plan.step_timesteps))
    maps = []
    affinities = []
    for i in range(batch):
        runtime.check_interrupt()
        store = SelfAttentionStore(per_layer=False)
        maps.append(comfy_backend.run_capture(model, samples[i:i + 1], plan, positives[i], negatives[i],
                                              guidance_scale, use_cfg, kind, layers, on_step=progress.step,
                                              self_layers=self_layers, self_store=store))
        if self_layers:
            affinities.append(store.affinities(COND))
    selector = LayerSelector(None, tuple(blocks))
    unet_factors = sorted({la.factor for la in comfy_backend.attn2_layers(model.model.diffusion_model)
                           if selector.wants(la.block, la.factor)})
    result = InternalsAttentionBatch(maps=maps, prompts=prompts, tokens=tokens, latent_hw=latent_hw,
                                     guidance_scale=float(guidance_scale), kind=kind, model_family=family,
                                     layers=[la.name for la in layers],
                                     layer_factors={la.name: la.factor for la in layers},
                                     unet_factors=tuple(unet_factors),
                                     self_attention=affinities if self_layers else None,
                                     self_max_tokens=int(self_max_tokens) if self_layers else 0)
    summary = (f"{family}: captured {kind} of {len(layers)} layer(s) {result.layers} x {len(plan.step_timesteps)} "
               f"step(s) on a {samples.shape[-2]}x{samples.shape[-1]} latent for {batch} image(s); "
               f"grid {maps[0].grid}; {plan.describe()}; guidance {guidance_scale if use_cfg else 'off'}")
    if self_layers:
        levels = ", ".join(f"factor {a.factor} ({a.grid[0]}x{a.grid[1]}, {len(a.layers)} layer(s))"
                           for a in affinities[0])
        summary += f"; self-attention (conditional branch, layers and steps averaged): {levels}"
    return result, summary


# ------------------------------------------------------------------------------------------ nodes
class RefDiffPrepareImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefDiffPrepareImage",
            display_name="RefDiff Prepare Image",
            category=sockets.CATEGORY,
            description="Pad each image centred on a black square and resize it to size x size (Ref-Diff's "
                        "input to the VAE). Feed the result to VAEEncode.",
            inputs=[
                io.Image.Input("image", tooltip="Images to segment (a batch of equal-size images)."),
                io.Int.Input("size", default=1024, min=64, max=4096, step=64,
                             tooltip="Side S of the square in pixels (1024 in both presets; smaller is faster)."),
                io.Combo.Input("resize_filter", options=["lanczos", "bicubic", "bilinear"], default="lanczos",
                               tooltip="Resampling filter of the resize (the method uses Lanczos)."),
            ],
            outputs=[io.Image.Output(display_name="square", tooltip="The padded squares [B, S, S, 3] for VAEEncode.")],
        )

    @classmethod
    def execute(cls, image, size, resize_filter) -> io.NodeOutput:
        return io.NodeOutput(prepare_images(image, size, resize_filter))


class RefDiffNoiseInjection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefDiffNoiseInjection",
            display_name="RefDiff Noise Injection",
            category=sockets.CATEGORY,
            description="Plan Eq. 3: seeded noise and the DDIM timesteps (strength 0.1 of 20 steps: noise to "
                        "t=101, then UNet steps at t=51 and t=1). The capture node applies it in the model's "
                        "latent scale.",
            inputs=[
                io.Latent.Input("latent", tooltip="The VAEEncode latent of the prepared squares."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the injected noise; every image of the batch uses it."),
                io.Combo.Input("schedule", options=["preset", "custom"], default="preset",
                               tooltip="'preset' takes strength and steps from the preset; 'custom' uses the "
                                       "two widgets below."),
                sockets.preset_input(),
                io.Float.Input("strength", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="custom schedule: fraction of the DDIM steps to noise back "
                                       "(t_enc = int(strength * steps))."),
                io.Int.Input("ddim_steps", default=20, min=1, max=1000,
                             tooltip="custom schedule: number of uniform DDIM steps over the 1000 training steps."),
            ],
            outputs=[
                io.Latent.Output(display_name="noised latent",
                                 tooltip="The same latent plus the injection plan (for RefDiffCaptureAttention)."),
                io.String.Output(display_name="schedule", tooltip="The timesteps that will run."),
            ],
        )

    @classmethod
    def execute(cls, latent, seed, schedule, preset, strength, ddim_steps) -> io.NodeOutput:
        p = sockets.preset(preset)
        if schedule == "preset":
            strength, ddim_steps = p.strength, p.ddim_steps
        out = inject_noise(latent, seed, strength, ddim_steps, p.num_train_timesteps)
        return io.NodeOutput(out, out[INJECTION_KEY].describe())


class RefDiffCaptureAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefDiffCaptureAttention",
            display_name="RefDiff Capture Attention",
            category=sockets.CATEGORY,
            description="Run the noised latent through the UNet (DDIM steps with classifier-free guidance) and "
                        "record the head-averaged cross-attention of the chosen layers (Eq. 4); optionally the "
                        "self-attention too (for RefDiff Self-Attention Refine). A Flux / SD 3 MODEL runs flow "
                        "steps instead and its joint attention is recorded (map_kind, dit_blocks, flow_t). The "
                        "MODEL is cloned; the one you connect is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="An SD 1.x, 2.x or SDXL MODEL (SDXL fine-tunes such as Pony and "
                                                     "Illustrious included; not the SDXL refiner), or a Flux.1 "
                                                     "(dev / schnell) or SD 3 / 3.5 MODEL: its joint attention, "
                                                     "read with the Flux / SD 3 inputs below."),
                io.Latent.Input("latent", tooltip="The noised latent from RefDiffNoiseInjection."),
                sockets.preset_input("Preset for 'kind: preset' and the prompt suffix (', ' in both)."),
                io.Combo.Input("kind", options=KIND_OPTIONS, default="preset",
                               tooltip="'probs' = softmax probabilities of the conditional branch (paper); "
                                       "'logits' = pre-softmax logits, guidance-combined (official). Flux / SD 3: "
                                       "'preset' or 'probs' (the map is chosen by map_kind)."),
                io.Float.Input("guidance", default=9.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Classifier-free guidance scale of the UNet steps and of the logits (SD 3: "
                                       "of its CFG batch; Flux: not used, its distilled guidance is the "
                                       "CONDITIONING's, 3.5 unless FluxGuidance sets it)."),
                io.Boolean.Input("use_cfg", default=True,
                                 tooltip="Run the unconditional branch too (off: conditional only, faster). Flux "
                                         "always runs the conditional branch alone (guidance-distilled)."),
                io.Int.Input("factor", default=4, min=0, max=64,
                             tooltip="Capture the layers whose query grid is the latent downsampled by this "
                                     "factor (4: 32x32 for a 1024 image); 0 = every level (needed by RefDiff "
                                     "Self-Attention Refine, which fuses the levels). UNet only (Flux / SD 3: "
                                     "dit_blocks)."),
                io.String.Input("blocks", default="down,mid,up",
                                tooltip="UNet parts to capture from: any of down (input), mid (middle), up (output). "
                                        "UNet only (Flux / SD 3: dit_blocks)."),
                io.Int.Input("steps", default=0, min=0, max=1000,
                             tooltip="Run only the first N UNet steps of the schedule (0 = all; 1 = speed option). "
                                     "Flux / SD 3: leave at 0 and set flow_steps."),
                io.String.Input("text", default="", multiline=True, optional=True,
                                tooltip="Referring expression(s), one line for all images or one per image; used "
                                        "with clip when no parse and no conditioning is connected."),
                io.Clip.Input("clip", optional=True, tooltip="The checkpoint's CLIP, to encode the prompts (Flux / "
                                                           "SD 3: their text encoders, e.g. DualCLIPLoader)."),
                sockets.Parse.Input("parse", optional=True,
                                    tooltip="Parsed text from RefDiffParseText: its prompts are encoded with clip "
                                            "(keeps the text and the token positions in step)."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="Instead of text + clip: the conditional CONDITIONING."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="With positive: the unconditional CONDITIONING (an empty prompt)."),
                io.Boolean.Input("self_attention", default=False, optional=True,
                                 tooltip="Also record the UNet's self-attention (conditional branch, heads, layers "
                                         "and steps averaged per level) for RefDiff Self-Attention Refine. Costs "
                                         "tokens^2 x 4 bytes per level: 64 MiB for the 64x64 level."),
                io.Int.Input("self_max_tokens", default=SELF_ATTENTION_MAX_TOKENS, min=1, max=65536, optional=True,
                             tooltip="With self_attention: record only levels whose grid has at most this many "
                                     "tokens (4096 = 64x64: factor 2 of a 1024 image; the 128x128 level would "
                                     "need 1 GiB)."),
                *dit_capture.dit_inputs(),
            ],
            outputs=[
                sockets.Attention.Output(display_name="attention",
                                         tooltip="Captured maps per image (REFDIFF_ATTENTION)."),
                io.String.Output(display_name="info", tooltip="Which layers, steps and grid were captured."),
            ],
        )

    @classmethod
    def validate_inputs(cls, map_kind=None, dit_blocks=None, flow_t=None, flow_steps=None) -> bool | str:
        # At queue time: the Flux / SD 3 widgets' form (the block indices against the MODEL when it runs).
        return dit_options_problem(map_kind, dit_blocks, flow_t, flow_steps) or True

    @classmethod
    def execute(cls, model, latent, preset, kind, guidance, use_cfg, factor, blocks, steps, text="", clip=None,
                parse=None, positive=None, negative=None, self_attention=False,
                self_max_tokens=SELF_ATTENTION_MAX_TOKENS, map_kind=DEFAULT_MAP_KIND, dit_blocks=DEFAULT_BLOCKS,
                flow_t=DEFAULT_FLOW_T, flow_steps=1, background=DEFAULT_BACKGROUND) -> io.NodeOutput:
        p = sockets.preset(preset)
        dit = dit_options(map_kind, dit_blocks, flow_t, flow_steps, background)
        result, summary = capture_attention(
            model, latent, positive=positive, negative=negative, clip=clip, parse=parse, text=text or "",
            prompt_suffix=p.prompt_suffix, guidance_scale=guidance, use_cfg=use_cfg,
            kind=kind if kind != "preset" else "probs" if dit_backend.dit_family(model) else p.capture_kind,
            factor=factor,
            blocks=text_inputs.parse_blocks(blocks), steps=steps, self_attention=bool(self_attention),
            self_max_tokens=int(self_max_tokens), dit=dit, root_rule=p.root_rule)
        runtime.LOG.info("[RefDiff] %s", summary)
        return io.NodeOutput(result, summary)


NODES = [RefDiffPrepareImage, RefDiffNoiseInjection, RefDiffCaptureAttention]
__all__ = ["prepare_images", "inject_noise", "injection_of", "prompts_for_batch", "capture_attention", "NODES",
           *[n.__name__ for n in NODES]]
