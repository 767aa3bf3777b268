"""The capture stage for a Flux / SD 3 MODEL: every image of a noised LATENT through ``dit_backend`` (joint
attention), into the REFDIFF_ATTENTION payload the map, score and fuse nodes read as a UNet's. Also the DiT
widgets the capture and segment nodes share."""
from __future__ import annotations

from typing import Any

import torch
from comfy_api.latest import io

from refdiff.errors import InputError
from refdiff.flow import DEFAULT_FLOW_T, flow_ts
from refdiff.joint_attention import MAP_KINDS, parse_block_list
from refdiff.text import DEFAULT_NO_NOUN

from . import comfy_backend, dit_backend, runtime
from .dit_options import (DEFAULT_BACKGROUND, DEFAULT_BLOCKS, DEFAULT_MAP_KIND, DitOptions, check_parse_context,
                          concept_positions, concept_words)
from .wire_types import Injection, JointAttentionBatch, ParsedBatch, ParsedItem


# ------------------------------------------------------------------------------------------ widgets
def dit_inputs(with_steps: bool = True) -> list[Any]:
    """The optional DiT widgets (used only for a Flux / SD 3 MODEL), defaults of docs/METHOD.md section 15."""
    inputs = [
        io.Combo.Input("map_kind", options=list(MAP_KINDS), default=DEFAULT_MAP_KIND, optional=True,
                       tooltip="Flux / SD 3 only: 'attention' = the image tokens' attention probabilities on the "
                               "root word's text tokens (the Ref-Diff analogue); 'concept' = ConceptAttention's "
                               "output-space map, the root word competing with the other nouns and the background "
                               "words (beyond the paper)."),
        io.String.Input("dit_blocks", default=DEFAULT_BLOCKS, optional=True,
                        tooltip="Flux / SD 3 only: double blocks to read: 'last4' (default: Flux 15-18 of 19, SD 3 "
                                "medium 20-23), 'all', or indices such as '15,16,17,18' (negative from the end)."),
        io.Float.Input("flow_t", default=DEFAULT_FLOW_T, min=0.01, max=1.0, step=0.01, optional=True,
                       tooltip="Flux / SD 3 only: noise fraction t of the flow injection x_t = (1 - t) x0 + t noise "
                               "(0.25: the signal-to-noise ratio of Ref-Diff's t = 101 of 1000). The seed is the "
                               "noise injection's; its DDIM schedule is not used."),
    ]
    if with_steps:
        inputs.append(io.Int.Input("flow_steps", default=1, min=1, max=50, optional=True,
                                   tooltip="Flux / SD 3 only: Euler steps from t towards 0, each one recorded "
                                           "(1 = one model evaluation, the default)."))
    inputs.append(io.String.Input("background", default=DEFAULT_BACKGROUND, optional=True,
                                  tooltip="Flux / SD 3, map_kind 'concept' only: comma-separated background words "
                                          "competing with the expression's nouns."))
    return inputs


# ------------------------------------------------------------------------------------------ stage function
def conditioning_width_problem(model: Any, conditioning: list, name: str) -> str:
    """Why a CONDITIONING cannot drive this Flux / SD 3 MODEL ('' when it can): its text width."""
    dm = model.model.diffusion_model
    embed = getattr(dm, "txt_in", None) or getattr(dm, "context_embedder", None)
    want = getattr(embed, "in_features", None)
    for tensor, _ in conditioning:
        if want is not None and int(tensor.shape[-1]) != int(want):
            return (f"{name}: the text conditioning is {int(tensor.shape[-1])} wide but this MODEL's text embedder "
                    f"takes {want}; connect the text encoders of the same family as the MODEL")
    return ""


def dit_items(batch: int, family: str, parse: ParsedBatch | None, clip: Any, text: str, prompt_suffix: str,
              root_rule: str) -> list[ParsedItem] | None:
    """The parse of each image's text in the model's context: the connected parse (checked to be of this
    family's tokenizer), else the text parsed with the CLIP's T5; None when neither is given."""
    if parse is not None:
        check_parse_context(family, parse.context)
        return parse.for_batch(batch, "parse")
    if clip is None or not str(text or "").strip():
        return None
    from .text_nodes import parse_texts

    parsed, _ = parse_texts(text, clip, root_rule, prompt_suffix, no_noun=DEFAULT_NO_NOUN)
    return parsed.for_batch(batch, "text")


def capture_joint_attention(model: Any, samples: torch.Tensor, plan: Injection, options: DitOptions, *,
                            positive: list | None = None, negative: list | None = None, clip: Any = None,
                            parse: ParsedBatch | None = None, text: str = "", prompt_suffix: str = ", ",
                            root_rule: str = "root_or_subj", guidance_scale: float = 4.5,
                            use_cfg: bool = True) -> tuple[JointAttentionBatch, str]:
    """Run every image of a latent batch [B, C, h, w] through a Flux / SD 3 MODEL at the flow times of
    ``options`` and capture its joint attention. Conditioning: ``positive``/``negative`` when given, else the
    prompts encoded with ``clip``. Flux runs one conditional batch (its distilled guidance is the
    CONDITIONING's); SD 3 runs its CFG batch when ``use_cfg``. Returns the maps and a summary."""
    family = dit_backend.check_dit_family(model)
    batch = int(samples.shape[0])
    depth = len(dit_backend.double_blocks(model))
    blocks = parse_block_list(options.blocks, depth)
    ts = flow_ts(options.flow_t, options.flow_steps)
    cfg = bool(use_cfg) and family == "SD3"
    if clip is not None:
        clip_family = dit_backend.clip_family(clip)
        if clip_family != family:
            raise InputError(f"clip: this is {'a ' + clip_family if clip_family else 'not a Flux / SD 3'} CLIP "
                             f"but the MODEL is {family}; connect the {family} text encoders")
    items = dit_items(batch, family, parse, clip, text, prompt_suffix, root_rule)
    if options.map_kind == "concept" and (items is None or clip is None):
        raise InputError("map_kind: 'concept' encodes the expression's nouns as concepts; connect clip and the "
                         "text (or a parse), or choose map_kind 'attention'")
    if positive is None:
        if clip is None or items is None:
            raise InputError("clip: connect the Flux / SD 3 CLIP (with text or a parse), or give positive "
                             "CONDITIONING")
        cache: dict[str, list] = {}

        def encoded(p: str) -> list:
            if p not in cache:
                cache[p] = comfy_backend.encode_text(clip, p)
            return cache[p]

        positives = [encoded(item.prompt) for item in items]
        negatives = [encoded("") for _ in items] if cfg else [None] * batch
    else:
        positives = [comfy_backend.conditioning_item(positive, i, batch) for i in range(batch)]
        negatives = ([comfy_backend.conditioning_item(negative, i, batch) for i in range(batch)]
                     if negative is not None and cfg else [None] * batch)
    for name, conds in (("positive" if positive is not None else "clip", positives[:1]),
                        ("negative", negatives[:1])):
        for cond in conds:
            problem = conditioning_width_problem(model, cond, name) if cond is not None else ""
            if problem:
                raise InputError(problem)
    progress = runtime.Progress(batch * len(ts))
    maps, concepts = [], []
    for i in range(batch):
        runtime.check_interrupt()
        embeddings, positions, words = None, (), []
        if options.map_kind == "concept":
            words = concept_words(items[i], options.background)
            embeddings = dit_backend.concept_embeddings(clip, words, family)
            positions = concept_positions(items[i], words)
        maps.append(dit_backend.run_joint_capture(
            model, samples[i:i + 1], plan.noise[i:i + 1].to(samples.dtype), ts, positives[i], negatives[i],
            guidance_scale, cfg, options.map_kind, blocks, embeddings, positions, seed=plan.seed,
            on_step=progress.step))
        concepts.append(words)
    prompts = [item.prompt for item in items] if items is not None else [None] * batch
    tokens = [list(item.tokens) for item in items] if items is not None else [None] * batch
    latent_hw = (int(samples.shape[-2]), int(samples.shape[-1]))
    result = JointAttentionBatch(maps=maps, prompts=prompts, tokens=tokens, latent_hw=latent_hw,
                                 guidance_scale=float(guidance_scale), kind=options.map_kind, model_family=family,
                                 layers=[f"double_blocks.{b}" for b in blocks], blocks=blocks, flow_ts=ts,
                                 concepts=concepts)
    guidance = (f"CFG {guidance_scale}" if cfg else "conditional branch only" +
                (" (distilled guidance from the CONDITIONING)" if family == "Flux" else ""))
    summary = (f"{family}: captured the joint-attention map '{options.map_kind}' of double blocks {blocks} of "
               f"{depth} x {len(ts)} flow step(s) at t={[round(t, 4) for t in ts]} (seed {plan.seed}) on a "
               f"{latent_hw[0]}x{latent_hw[1]} latent for {batch} image(s); grid {maps[0].grid}; {guidance}")
    if options.map_kind == "concept":
        summary += f"; concepts {concepts[0]}"
    return result, summary


__all__ = ["dit_inputs", "conditioning_width_problem", "dit_items", "capture_joint_attention"]
