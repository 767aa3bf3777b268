"""Per-stage measurements for one image + one sentence: each stage of the method timed on its own, with the
library's stage functions and the official preset's values.

Stages that do not depend on S (text encoders, SAM, CLIP) are measured once; the others once per S.
Downstream of SAM every stage scores the same fixed set of ``ModeSettings.proposals`` synthetic proposals,
since random-weight SAM masks are meaningless (and often none pass the preset's quality thresholds).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from refdiff import diffusion
from refdiff.capture import downsampled_grid, finest_self_attention_factor, self_attention_bytes, token_map
from refdiff.config import Preset, sam_generator_kwargs
from refdiff.discriminative import positional_bias, proposal_scores
from refdiff.image import PreparedImage, prepare_image
from refdiff.maps import generative_map
from refdiff.refine import diffsegmenter_map
from refdiff.proposals import make_mask_generator, sam_post_filter, sam_proposals, threshold_proposals
from refdiff.scoring import Choice, fuse_and_select, generative_scores
from refdiff.text import ParsedText, parse_text, root_token_position

from .harness import Measurement, Timer
from .workload import SEED, ModeSettings, Models


@dataclass(frozen=True)
class StageInfo:
    """One row of the stage table."""

    key: str
    label: str
    per_size: bool  # measured once per S (else once, independent of S)


def stage_infos(sam_types: tuple[str, ...]) -> list[StageInfo]:
    """The rows of the stage table, in pipeline order."""
    rows = [
        StageInfo("prepare", "prepare (pad to square, Lanczos resize to S)", True),
        StageInfo("vae_encode", "VAE encode", True),
        StageInfo("text_encode", "text encode (SD text encoder, uncond + cond)", False),
        StageInfo("unet_capture", "UNet steps with capture (2 DDIM steps, CFG batch)", True),
        StageInfo("maps", "token map + generative map", True),
        StageInfo("unet_refine", "G-refine: UNet steps with cross- and self-attention capture + refinement", True),
    ]
    rows += [StageInfo(f"sam_{t}", f"SAM automatic masks ({t}) + post-filter", False) for t in sam_types]
    rows += [
        StageInfo("threshold_proposals", "threshold proposals (Eq. 8)", True),
        StageInfo("generative_scores", "generative scores (Eq. 9)", True),
        StageInfo("clip_text", "CLIP text (sentence + root word)", False),
        StageInfo("clip_crop", "CLIP crop branch", False),
        StageInfo("clip_masked", "CLIP masked branch (one pass)", False),
        StageInfo("fusion", "fusion (s_D, Eq. 1/2, rank, select)", True),
    ]
    return rows


@dataclass
class Shared:
    """Inputs and S-independent results every later measurement reuses."""

    rgb: np.ndarray
    text: str
    parsed: ParsedText
    proposals: torch.Tensor  # bool [N, H, W], the fixed benchmark proposals
    bias: torch.Tensor | None  # positional bias of the crop branch (official preset)
    context: torch.Tensor  # SD text-encoder states [2, 77, D] (uncond, cond)
    text_feats: torch.Tensor  # CLIP [2, D]: sentence, root word
    crop_feats: torch.Tensor
    masked_feats: torch.Tensor
    sam_counts: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class SizeInputs:
    """Intermediate results at one S, for the ratio measurements."""

    size: int
    preset: Preset
    prompt: str
    position: int
    prep: PreparedImage
    latent: torch.Tensor
    c: torch.Tensor


@contextmanager
def reuse_prompt_states(context: torch.Tensor, pooled: torch.Tensor | None = None) -> Iterator[None]:
    """Make ``refdiff.diffusion.run_capture`` use precomputed text-encoder states (and SDXL's pooled text), so
    that the UNet stage is timed without the text encoder (measured as its own stage)."""
    original = diffusion.encode_text

    def cached(sd: Any, text: str, use_cfg: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        if use_cfg:
            return context, pooled
        return context[1:], (pooled[1:] if pooled is not None else None)

    diffusion.encode_text = cached  # type: ignore[assignment]
    try:
        yield
    finally:
        diffusion.encode_text = original  # type: ignore[assignment]


def capture_kwargs(p: Preset) -> dict[str, Any]:
    """run_capture's keyword arguments from a preset (the pipeline's values)."""
    return dict(strength=p.strength, ddim_steps=p.ddim_steps, num_train_timesteps=p.num_train_timesteps,
                use_cfg=p.use_cfg, guidance_scale=p.guidance_scale, capture_kind=p.capture_kind,
                capture_factor=p.capture_factor, capture_blocks=p.capture_blocks, seed=SEED)


def sam_and_filter(generator: Any, rgb: np.ndarray, p: Preset) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM automatic masks of ``rgb`` and the preset's post-filter: (raw masks, kept masks)."""
    raw = sam_proposals(generator, rgb)
    kept, _, _ = sam_post_filter(raw, keep_largest=p.sam_keep_largest, min_area=p.sam_min_area,
                                 min_area_reference=p.sam_min_area_reference)
    return raw, kept


def measure_shared(timer: Timer, models: Models, settings: ModeSettings, rgb: np.ndarray, text: str,
                   proposals: torch.Tensor) -> tuple[dict[str, Measurement], Shared]:
    """The S-independent stages: SD text encoder, SAM per model type, CLIP text / crop / masked."""
    p = settings.preset(settings.sizes[0])
    sd, clip = models.sd, models.clip
    parsed = parse_text(text, root_rule=p.root_rule)
    prompt = parsed.text + p.prompt_suffix
    out: dict[str, Measurement] = {}

    out["text_encode"], context = timer.measure(
        "text_encode", lambda: diffusion.encode_prompts(sd, prompt, use_cfg=p.use_cfg))

    counts: dict[str, dict[str, int]] = {}
    for sam_type, sam in models.sams.items():
        generator = make_mask_generator(sam, **sam_generator_kwargs(p))
        key = f"sam_{sam_type}"
        out[key], (raw, kept) = timer.measure(key, lambda g=generator: sam_and_filter(g, rgb, p), slow=True)
        counts[sam_type] = {"raw": int(raw.shape[0]), "kept": int(kept.shape[0])}
        out[key].extra.update(proposals_raw=int(raw.shape[0]), proposals_kept=int(kept.shape[0]))

    out["clip_text"], text_feats = timer.measure("clip_text", lambda: clip.encode_text([parsed.text, parsed.root]))
    h, w = rgb.shape[:2]
    bias = positional_bias(parsed.directions, h, w, extent=p.bias_extent) if parsed.directions else None
    crop_bias = bias if p.bias_branch == "crop" else None
    masked_bias = bias if p.bias_branch == "masked" else None
    image = torch.from_numpy(rgb)
    out["clip_crop"], crop = timer.measure(
        "clip_crop", lambda: clip.crop_features(image, proposals, crop_bias, layer=p.clip_layer))
    out["clip_masked"], masked = timer.measure(
        "clip_masked", lambda: clip.masked_features(image, proposals, masked_bias, layer=p.clip_layer))
    for key in ("clip_crop", "clip_masked"):
        out[key].extra["proposals"] = int(proposals.shape[0])
    shared = Shared(rgb=rgb, text=text, parsed=parsed, proposals=proposals, bias=crop_bias, context=context,
                    text_feats=text_feats, crop_feats=crop, masked_feats=masked, sam_counts=counts)
    return out, shared


def measure_size(timer: Timer, models: Models, settings: ModeSettings, shared: Shared,
                 size: int) -> tuple[dict[str, Measurement], SizeInputs]:
    """The stages that depend on S: prepare, VAE, UNet with capture, maps, thresholds, s_G, fusion."""
    p = settings.preset(size)
    sd, rgb, parsed = models.sd, shared.rgb, shared.parsed
    prompt = parsed.text + p.prompt_suffix
    position = root_token_position(parsed, sd.tokenizer, prompt_suffix=p.prompt_suffix)
    out: dict[str, Measurement] = {}

    out["prepare"], prep = timer.measure("prepare", lambda: prepare_image(rgb, size, p.resize_filter))

    out["vae_encode"], latent = timer.measure(
        "vae_encode", lambda: diffusion.encode_image(sd, prep.pixels, latent_from=p.latent_from, seed=SEED))

    def unet() -> Any:
        with reuse_prompt_states(shared.context):
            return diffusion.run_capture(sd, latent, prompt, **capture_kwargs(p))

    out["unet_capture"], maps = timer.measure("unet_capture", unet)
    out["unet_capture"].extra.update(latent=list(latent.shape), captured_layers=len(maps.layers))

    def refine() -> torch.Tensor:
        kwargs = {k: v for k, v in capture_kwargs(p).items() if k != "capture_factor"}
        with reuse_prompt_states(shared.context):
            return diffsegmenter_map(sd, latent, prompt, position, factor_weights=dict(p.refine_factor_weights),
                                     max_tokens=p.refine_max_tokens, self_factor=p.refine_self_factor,
                                     iterations=p.refine_iterations, eps=p.layer_norm_eps, **kwargs)

    out["unet_refine"], _ = timer.measure("unet_refine", refine)
    grid = downsampled_grid(tuple(latent.shape[-2:]), finest_self_attention_factor(tuple(latent.shape[-2:]),
                                                                                    p.refine_max_tokens))
    out["unet_refine"].extra.update(self_attention_grid=list(grid),
                                    self_attention_mib_per_layer=self_attention_bytes(grid) / 2**20)

    def make_map() -> torch.Tensor:
        small = token_map(maps.combined(p.guidance_scale), position, eps=p.layer_norm_eps)
        return generative_map(small, prep, mode=p.map_resize, eps=p.map_eps)

    out["maps"], c = timer.measure("maps", make_map)
    out["threshold_proposals"], thresholded = timer.measure(
        "threshold_proposals", lambda: threshold_proposals(c, p.thresholds))
    out["threshold_proposals"].extra["proposals"] = int(thresholded.shape[0])
    proposals = shared.proposals
    out["generative_scores"], s_g = timer.measure(
        "generative_scores", lambda: generative_scores(c, proposals, eps=p.score_eps))

    branches = {"crop": shared.crop_feats, "masked": shared.masked_feats}

    def fuse() -> Choice:
        # s_D from the features measured above (the hooks hand them back), then fusion and selection
        s_d = proposal_scores(models.clip, rgb, proposals, parsed.text, parsed.root, parsed.directions, p,
                              features=lambda branch, layer, clues, compute: branches[branch],
                              text_features=lambda texts: shared.text_feats)
        return fuse_and_select(proposals, s_g, s_d, p)

    out["fusion"], _ = timer.measure("fusion", fuse)
    return out, SizeInputs(size=size, preset=p, prompt=prompt, position=position, prep=prep, latent=latent, c=c)


def run_stages(timer: Timer, models: Models, settings: ModeSettings, sizes: tuple[int, ...], rgb: np.ndarray,
               text: str, proposals: torch.Tensor, log: Callable[[str], None]
               ) -> tuple[dict[str, Measurement], dict[int, dict[str, Measurement]], Shared, dict[int, SizeInputs]]:
    """All stage measurements: (S-independent, per-S, shared inputs, per-S inputs)."""
    log("stages independent of S")
    once, shared = measure_shared(timer, models, settings, rgb, text, proposals)
    per_size: dict[int, dict[str, Measurement]] = {}
    inputs: dict[int, SizeInputs] = {}
    for size in sizes:
        log(f"stages at S = {size}")
        per_size[size], inputs[size] = measure_size(timer, models, settings, shared, size)
    return once, per_size, shared, inputs


__all__ = ["StageInfo", "stage_infos", "Shared", "SizeInputs", "reuse_prompt_states", "capture_kwargs", "sam_and_filter",
           "measure_shared", "measure_size", "run_stages"]
