"""The public API: ``RefDiff`` runs the stages of the method for (image, text) pairs and caches image-only work.

One instance segments many pairs. Work that depends on the image alone (the prepared square, the VAE
latent, SAM proposals, SAM's image embedding, CLIP image features) is cached per image content, so several expressions on one
image, or several variants of one expression, pay for it once.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from collections import OrderedDict
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import numpy as np
import torch

from . import offload as _offload
from .devices import resolve_device
from .config import (VARIANTS, Preset, Variant, get_preset, get_variant, needs_map, prompt_kwargs, proposal_source,
                     sam_generator_kwargs, spatial_terms_of)
from .errors import InputError, RefDiffWarning
from .image import PreparedImage, image_key, load_image, prepare_image
from .text import (DEFAULT_NO_NOUN, NO_NOUN_POLICIES, ParsedText, check_root, parse_text, root_token_position,
                   truncation_warning)

ProgressFn = Callable[[str], None]
# SAM and cluster proposals are bool [N, H, W] at the image's own size (100 masks of a 12 MP photo: 1.2 GB);
# their cache keeps at most this many bytes (always at least the newest entry).
PROPOSAL_CACHE_BYTES: int = 2 << 30


@dataclass
class Result:
    """What one (image, text, variant) run produced, at the image's own size."""

    mask: np.ndarray  # bool [H, W]; all False when no proposal qualifies
    proposals: np.ndarray  # bool [N, H, W]
    scores: dict[str, np.ndarray | None]  # "generative", "discriminative", "fused": [N] each, None if unused
    index: int  # chosen proposal, -1 when there is none
    top_k: list[int]  # best proposals first
    root_token: str
    root_position: int | None  # position of the root word's last BPE piece in the 77-token sequence
    direction: tuple[str, ...]
    attention: np.ndarray | None  # generative map c, float32 [H, W] in [0, 1]; None when not computed
    variant: str
    preset: str
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (cache hits cost ~0)
    warnings: list[str] = field(default_factory=list)  # why the result may mean little (also warned)


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors and arrays in a value (inside tuples, lists, dicts and dataclasses)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(_tensor_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0


def _on_host(x: torch.Tensor) -> torch.Tensor:
    """A cached result's copy on the CPU: caches hold no compute-device memory between runs."""
    return x.detach().to("cpu")


class _LRU:
    """A small least-recently-used cache of at most ``size`` entries and, with ``max_bytes``, at most that many
    bytes of tensors (the newest entry always stays, whatever its size)."""

    def __init__(self, size: int, max_bytes: int | None = None) -> None:
        self.size, self.max_bytes = size, max_bytes
        self.data: OrderedDict[Hashable, Any] = OrderedDict()
        self._bytes: dict[Hashable, int] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held."""
        return sum(self._bytes.values())

    def _over(self) -> bool:
        return len(self.data) > self.size or (self.max_bytes is not None and len(self.data) > 1
                                              and self.nbytes > self.max_bytes)

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        if key in self.data:
            self.data.move_to_end(key)
            return self.data[key]
        value = make()
        self.data[key], self._bytes[key] = value, _tensor_bytes(value)
        while self._over():
            old, _ = self.data.popitem(last=False)
            del self._bytes[old]
        return value

    def clear(self) -> None:
        self.data.clear()
        self._bytes.clear()


LRUCache = _LRU  # the same bounded cache for callers outside RefDiff (the nodes' SAM embeddings)


class _Lazy:
    """A model loaded on first use, so a variant that needs no diffusion never loads Stable Diffusion.

    ``finish`` (optional) runs once on the model before its first use, e.g. to place it for offloading."""

    def __init__(self, value: Any = None, loader: Callable[[], Any] | None = None) -> None:
        self._value, self._loader = value, loader
        self.finish: Callable[[Any], Any] | None = None

    @property
    def available(self) -> bool:
        return self._value is not None or self._loader is not None

    def settle(self) -> None:
        """Run ``finish`` now on a model that is already here (loaders wait for first use)."""
        if self._value is not None:
            self.get("")

    def get(self, what: str) -> Any:
        if self._value is None:
            if self._loader is None:
                raise InputError(f"this RefDiff has no {what} model; pass one to RefDiff(...) or from_pretrained(...)")
            self._value = self._loader()
            self._loader = None
        if self.finish is not None:
            finish, self.finish = self.finish, None
            self._value = finish(self._value)
        return self._value


class RefDiff:
    """Zero-shot referring segmentation: (image, text) -> the mask of the object the text refers to."""

    def __init__(self, sd: Any = None, sam: Any = None, clip: Any = None, preset: str | Preset = "official",
                 nlp: Any = None, cache_size: int = 8, progress: ProgressFn | None = None,
                 offload: bool = False, device: str | torch.device | None = None, no_noun: str = DEFAULT_NO_NOUN,
                 sam3: Any = None, **preset_overrides: Any) -> None:
        """sd: ``SDComponents``; sam: a segment-anything ``Sam``; clip: a ``ClipScorer`` (each optional, or a
        zero-argument loader). Preset fields may be overridden by keyword (e.g. ``image_size=512``).

        ``offload=True`` keeps every model on the CPU and moves each one to ``device`` (default: cuda if
        available, else cpu) only while its stage runs: peak GPU memory is one stage's model instead of all of
        them (6-8 GB GPUs), at the price of a host-to-device copy of that model per stage that is not cached.
        Results are the same as without offloading on the same device. Without offload the models compute
        where they are, and ``device`` must be left unset.

        ``no_noun`` is what to do with a text whose root word names no object ("on the left", "the one on the
        right"): "warn" (the default: keep the preset's root, warn, and note it in ``Result.warnings``) or "error"
        (raise InputError); see ``refdiff.text.check_root``. An empty or punctuation-only text is refused.

        ``sam3``: a SAM 3 image model (``refdiff.sam3_models``), or any concept segmenter as a function
        ``(rgb, noun phrase) -> masks [N, H, W]`` or ``(masks, scores)``, for ``proposal_mode="concept"``: its
        instances of the target noun are the proposals (docs/METHOD.md section 17). Under ``plus``
        (``concept_with_sam3``) giving one switches the SAM variants to it; overriding ``proposal_mode`` keeps the
        mode asked for."""
        if no_noun not in NO_NOUN_POLICIES:
            raise InputError(f"no_noun must be one of {list(NO_NOUN_POLICIES)}, got {no_noun!r}")
        self.no_noun = no_noun
        if "proposal_mode" in preset_overrides and "concept_with_sam3" not in preset_overrides:
            preset_overrides["concept_with_sam3"] = False  # the mode asked for is the mode used
        self.preset = get_preset(preset).with_(**preset_overrides) if preset_overrides else get_preset(preset)
        self._sd = sd if isinstance(sd, _Lazy) else _Lazy(sd)
        self._sam = sam if isinstance(sam, _Lazy) else _Lazy(sam)
        self._clip = clip if isinstance(clip, _Lazy) else _Lazy(clip)
        self._sam3 = sam3 if isinstance(sam3, _Lazy) else _Lazy(sam3)
        self.offload = bool(offload)
        self._offload_to = _offload.OFFLOAD_DEVICE
        if not self.offload and device is not None:
            raise InputError(f"device={device!r} names the compute device of offload=True; without offload the "
                             "models compute where they are (load them there, or use from_pretrained(device=...))")
        self.device: torch.device | None = resolve_device(device) if self.offload else None
        if self.offload:  # models given ready are parked now; loaded ones when they load
            self._sd.finish = lambda m: _offload.offload_sd(m, self.device, self._offload_to)
            self._sam.finish = self._clip.finish = self._park
            self._sam3.finish = lambda m: self._park(m) if isinstance(m, torch.nn.Module) else m
            for lazy in (self._sd, self._sam, self._clip, self._sam3):
                lazy.settle()
        self._nlp = nlp
        self._progress = progress
        self._generator = None
        self._predictor: tuple[int, Any] | None = None  # (id of the SAM, its prompt predictor)
        self._prepared = _LRU(cache_size)
        self._latents = _LRU(cache_size)
        self._attention = _LRU(cache_size * 4)
        self._sam_masks = _LRU(cache_size, max_bytes=PROPOSAL_CACHE_BYTES)
        self._sam_embeddings = _LRU(cache_size)  # SAM image embeddings of the prompted mode (vit_h: 4 MB each)
        self._sam3_processor: tuple[int, Any] | None = None  # (id of the SAM 3 model, its processor)
        self._sam3_images = _LRU(2)  # SAM 3 image features (the released model: ~110 MB each)
        self._concepts = _LRU(cache_size * 4)  # SAM 3 instances per (image, prompt, threshold, max)
        self._clip_image = _LRU(cache_size * 4)
        self._clip_text = _LRU(256)

    @classmethod
    def from_pretrained(cls, sd: Any = None, sam: Any = None, clip: Any = None, preset: str | Preset = "official",
                        device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                        sd_config: str | None = None, offload: bool = False, sd_vae: str | None = None,
                        sam3: Any = None, **kwargs: Any) -> "RefDiff":
        """Build from weights: ``sd`` a diffusers folder, hub id or single .safetensors/.ckpt file; ``sam`` a SAM
        (.pth) or SAM 2 / 2.1 (.pt, .safetensors) checkpoint, detected from its keys; ``clip`` an open_clip "MODEL/TAG" or a local file. None means the published weights
        (SD 1.5, SAM vit_h, CLIP ViT-B/16 openai), downloaded by the libraries' own caches. Models load on
        first use. ``sd`` may be SD 1.x/2.x or SDXL base (detected); ``sd_vae`` replaces its VAE (a diffusers
        VAE folder or .safetensors file, e.g. an fp16-safe SDXL VAE). ``sd_config`` names the configuration of a
        single-file checkpoint (sd1, sd2, sd2-v, sdxl or a diffusers-layout folder) when it cannot be detected. ``offload=True`` loads the models on the CPU and
        moves each to ``device`` only for its stage (see ``RefDiff``); dtype defaults follow ``device``.
        ``sam3``: a SAM 3 checkpoint (Meta's sam3.pt or a .safetensors) for ``proposal_mode="concept"``; loaded
        in float32 on first use (None: no SAM 3)."""
        from .clip import load_clip
        from .sam2_models import load_any_sam
        from .devices import resolve_dtype
        from .sd import load_sd

        compute = resolve_device(device) if offload else None
        if compute is not None:  # load on the CPU, in the compute device's default dtype
            sd_dtype, load_to = resolve_dtype(dtype, compute), _offload.OFFLOAD_DEVICE
        else:
            sd_dtype, load_to = dtype, device
        sam3_model = None
        if sam3 is not None and not isinstance(sam3, (str, Path)):
            sam3_model = sam3
        elif sam3 is not None:
            from .sam3_models import load_sam3

            sam3_model = _Lazy(loader=lambda: load_sam3(sam3, device=load_to))
        return cls(sd=_Lazy(loader=lambda: load_sd(sd, device=load_to, dtype=sd_dtype, config=sd_config,
                                                            vae=sd_vae)), sam3=sam3_model,
                   sam=_Lazy(loader=lambda: load_any_sam(sam, device=load_to)),
                   clip=_Lazy(loader=lambda: load_clip(clip, device=load_to, dtype=dtype)),
                   preset=preset, offload=offload, device=compute, **kwargs)

    # -- models ---------------------------------------------------------------------------------------------
    @property
    def sd(self) -> Any:
        return self._sd.get("Stable Diffusion (sd)")

    @property
    def sam(self) -> Any:
        return self._sam.get("SAM (sam)")

    @property
    def clip(self) -> Any:
        return self._clip.get("CLIP (clip)")

    @property
    def sam3(self) -> Any:
        return self._sam3.get("SAM 3 (sam3)")

    def _park(self, model: Any) -> Any:
        """Put a model on the offload device before its first use (offload mode)."""
        _offload.move_to(model, self._offload_to)
        _offload.release_cache(self.device)
        return model

    def _using(self, *models: Any) -> AbstractContextManager:
        """The models on the compute device for a block (offload mode); a no-op otherwise."""
        if not self.offload:
            return nullcontext()
        return _offload.all_on_device(models, self.device, self._offload_to)

    def _using_sd(self, *parts: str) -> AbstractContextManager:
        """Parts of Stable Diffusion (unet, vae, text_encoder) on the compute device for a block (offload mode)."""
        return _offload.sd_on_device(self.sd, parts, self._offload_to) if self.offload else nullcontext()

    def _on_demand(self, model: Any) -> AbstractContextManager[Callable[[], None]]:
        """A block in which ``need()`` brings the model to the compute device (once); back at the block's end."""
        if not self.offload:
            return nullcontext(lambda: None)
        return _offload.OnDemand(model, self.device, self._offload_to)

    def _mask_generator(self) -> Any:
        """SAM's automatic mask generator at the preset's settings (rebuilt if they change)."""
        from .proposals import make_mask_generator

        kwargs = sam_generator_kwargs(self.preset)
        if self._generator is None or self._generator[0] != kwargs:
            self._generator = (kwargs, make_mask_generator(self.sam, **kwargs))
        return self._generator[1]

    def clear_cache(self) -> None:
        """Forget every per-image result (prepared squares, latents, attention, SAM masks and embeddings, CLIP
        features)."""
        for cache in (self._prepared, self._latents, self._attention, self._sam_masks, self._sam_embeddings,
                      self._clip_image, self._clip_text, self._sam3_images, self._concepts):
            cache.clear()

    # -- public entry points --------------------------------------------------------------------------------
    def __call__(self, image: Any, text: str, variant: str | Variant = "full", seed: int = 0,
                 proposals: Any = None, proposals_resize: str = "error", proposals_post_filter: bool = False) -> Result:
        """Segment the object ``text`` refers to in ``image`` with one variant (full, G, GS, DS, sam-clip).

        ``proposals``: masks of this image from elsewhere (bool/float tensor or array [N, H, W]; rules in
        ``refdiff.external``) that replace SAM's proposals; see ``segment_variants``."""
        v = get_variant(variant)
        return self.segment_variants(image, text, [v], seed=seed, proposals=proposals,
                                     proposals_resize=proposals_resize,
                                     proposals_post_filter=proposals_post_filter)[v.name]

    def segment_variants(self, image: Any, text: str, variants: Sequence[str | Variant] = ("full",),
                         seed: int = 0, proposals: Any = None, proposals_resize: str = "error",
                         proposals_post_filter: bool = False) -> dict[str, Result]:
        """Run several variants on one (image, text); stages they share run once. Keys are variant names.

        ``proposals`` (optional) are masks of this image made elsewhere: they replace the SAM proposals of the
        variants that use them (full, GS, DS, sam-clip; SAM is then never run nor loaded), and s_G, s_D, fusion and
        selection run on them as on SAM's. A variant with its own proposals (G, G-refine, cluster) is refused.
        ``proposals_resize`` "nearest" resizes masks of another size (same aspect ratio); "error" refuses them.
        The preset's SAM post-filter is not applied to them unless ``proposals_post_filter``. Empty masks are
        left out, and no mask left gives index -1 and an empty mask; each such fact is in ``Result.warnings``."""
        chosen = [get_variant(v) for v in variants]
        if not chosen:
            raise InputError("variants is empty; choose at least one of " + ", ".join(VARIANTS))
        if proposals is not None:
            own = [v.name for v in chosen if v.proposals != "sam"]
            if own:
                raise InputError(f"proposals: variant(s) {', '.join(own)} make their own proposals, so external "
                                 "masks have no place there; use full, GS, DS or sam-clip (GS scores the given masks "
                                 "with the generative map alone)")
        rgb = load_image(image)
        parsed = self._parse(text)
        root_note = check_root(parsed, self.no_noun)  # raises under "error" when the text names no object
        notes = [root_note] if root_note else []
        key = image_key(rgb)
        timings: dict[str, float] = {}
        maps: dict[bool, tuple[torch.Tensor, int]] = {}  # refined? -> (generative map c, root position)

        def generative(refine: bool) -> tuple[torch.Tensor, int]:
            if refine not in maps:
                maps[refine] = self._generative_map(rgb, key, parsed, seed, timings, refine=refine)
            return maps[refine]

        has_sam3 = self._sam3.available
        sources = {v.name: proposal_source(v, self.preset, has_sam3) for v in chosen}
        sam_masks, sam_notes = None, []
        concept_scores: torch.Tensor | None = None
        concept_masks, concept_notes = None, []
        if proposals is not None:  # the caller's masks stand in for SAM's, automatic, prompted or concept
            sam_masks, sam_notes = self._timed(timings, "external", lambda: self._external_proposals(
                proposals, rgb, proposals_resize, proposals_post_filter))
            sources = {name: ("sam" if src in ("prompted", "concept") else src) for name, src in sources.items()}
        elif "concept" in sources.values():
            concept_masks, concept_scores, concept_notes = self._timed(
                timings, "sam3", lambda: self._concept_proposals(rgb, key, parsed))
            if concept_masks is None:  # nothing found: the preset's automatic proposals, said in the warnings
                sources = {name: ("sam" if src == "concept" else src) for name, src in sources.items()}
        if proposals is None and "sam" in sources.values():
            sam_masks, sam_note = self._timed(timings, "sam", lambda: self._sam_proposals(rgb, key))
            sam_notes = [sam_note] if sam_note else []
        prompted: list[tuple[torch.Tensor, str | None]] = []  # computed once, from the unrefined map

        def prompted_masks() -> tuple[torch.Tensor, str | None]:
            if not prompted:
                c_plain = generative(False)[0]
                prompted.append(self._timed(timings, "sam_prompted",
                                            lambda: self._prompted_proposals(rgb, key, c_plain)))
            return prompted[0]

        results = {}
        for v in chosen:
            source = sources[v.name]
            # the caller's masks need no c for their own sake: DS and sam-clip skip the diffusion pass with them
            with_map = v.needs_diffusion if proposals is not None else needs_map(v, self.preset, has_sam3)
            c, root_position = generative(v.refine) if with_map else (None, None)
            extra: list[str] = []
            if concept_notes and v.proposals == "sam":
                extra = list(concept_notes)
            scores_of_sam3 = None
            if source == "concept":
                masks, scores_of_sam3 = concept_masks, concept_scores
            elif source == "sam":
                masks, extra = sam_masks, extra + sam_notes
            elif source == "prompted":
                masks, note = prompted_masks()
                extra = [note] if note else []
            elif source == "cluster":
                masks = self._timed(timings, "cluster", lambda: self._cluster_proposals(rgb, key, seed))
            else:
                masks = self._timed(timings, "threshold", lambda: self._threshold(c))
            s_g = s_d = None
            if v.generative and masks.shape[0]:
                s_g = self._timed(timings, "generative_score", lambda: self._generative_scores(c, masks))
            if v.discriminative and masks.shape[0]:
                s_d = self._timed(timings, f"clip_{v.name}", lambda: self._discriminative(rgb, key, parsed, masks, v))
            spatial = None
            terms = spatial_terms_of(self.preset, v.spatial)
            if terms and masks.shape[0]:
                spatial = self._timed(timings, "spatial", lambda: self._spatial_inputs(
                    rgb, key, parsed, masks, v, terms, seed, timings))
            results[v.name] = self._select(v, masks, s_g, s_d, parsed, root_position, c, dict(timings), spatial,
                                           concept=scores_of_sam3)
            results[v.name].warnings = notes + extra + results[v.name].warnings
        return results

    # -- stages ---------------------------------------------------------------------------------------------
    def _parse(self, text: str) -> ParsedText:
        if not isinstance(text, str):
            raise InputError(f"text must be a string, got {type(text).__name__}")
        return parse_text(text, root_rule=self.preset.root_rule, nlp=self._nlp)

    def _report(self, stage: str) -> None:
        if self._progress is not None:
            self._progress(stage)

    def _timed(self, timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
        self._report(name)
        start = time.perf_counter()
        out = fn()
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        return out

    def _prepare(self, rgb: np.ndarray, key: str, timings: dict[str, float]) -> PreparedImage:
        p = self.preset
        return self._timed(timings, "prepare", lambda: self._prepared.get(
            (key, p.image_size, p.resize_filter), lambda: prepare_image(rgb, p.image_size, p.resize_filter)))

    def _latent(self, prep: PreparedImage, key: str, seed: int, timings: dict[str, float]) -> torch.Tensor:
        """The scaled VAE latent of the prepared square (cached per image and seed)."""
        from . import diffusion, dit

        p, sd = self.preset, self.sd
        encode_image = dit.encode_image if dit.is_dit(sd) else diffusion.encode_image

        def encode() -> torch.Tensor:
            with self._using_sd("vae"):
                return _on_host(encode_image(sd, prep.pixels, latent_from=p.latent_from, seed=seed))

        return self._timed(timings, "vae", lambda: self._latents.get(
            (key, p.image_size, p.resize_filter, p.latent_from, seed), encode))

    def _generative_map(self, rgb: np.ndarray, key: str, parsed: ParsedText, seed: int,
                        timings: dict[str, float], refine: bool = False) -> tuple[torch.Tensor, int]:
        """Eq. 3-5: latent, noised UNet steps with capture, root-token map resized to the image frame.

        With ``refine`` the low-resolution map is DiffSegmenter's: cross-attention fused over resolutions and
        propagated through the UNet's self-attention (refdiff.refine)."""
        from .capture import token_map
        from .maps import generative_map

        from . import dit

        p, sd = self.preset, self.sd
        prompt = parsed.text + p.prompt_suffix
        if dit.is_dit(sd):  # T5's context is not truncated; c is read from the root word's last T5 piece
            if refine:
                raise InputError("the refined map (DiffSegmenter: UNet cross- and self-attention) needs an SD UNet; "
                                 f"this {sd.family} model gives the joint-attention map: use a variant without "
                                 "refine_map")
            position = dit.root_position(sd, parsed, prompt_suffix=p.prompt_suffix)
        else:
            warning = truncation_warning(prompt, sd.tokenizer)
            if warning:
                warnings.warn(warning, stacklevel=3)
            position = root_token_position(parsed, sd.tokenizer, prompt_suffix=p.prompt_suffix)
        prep = self._prepare(rgb, key, timings)
        latent = self._latent(prep, key, seed, timings)
        schedule = self._schedule(seed)
        base_key = (key, p.image_size, p.resize_filter, p.latent_from, prompt, *sorted(schedule.items()))
        if refine:
            from .refine import diffsegmenter_map

            def refined() -> torch.Tensor:
                with self._using_sd("unet", "text_encoder"):
                    return diffsegmenter_map(sd, latent, prompt, position, factor_weights=dict(p.refine_factor_weights),
                                             max_tokens=p.refine_max_tokens, self_factor=p.refine_self_factor,
                                             iterations=p.refine_iterations, eps=p.layer_norm_eps, **schedule)

            small = self._timed(timings, "unet_refine", lambda: self._attention.get(
                ("refine", *base_key, position, p.layer_norm_eps, p.refine_iterations, p.refine_max_tokens,
                 p.refine_factor_weights, p.refine_self_factor), refined))
        else:
            captured = self._captured(rgb, key, prompt, seed, timings)
            small = token_map(captured.combined(p.guidance_scale), position, eps=p.layer_norm_eps)
        c = self._timed(timings, "map", lambda: generative_map(small, prep, mode=p.map_resize, eps=p.map_eps))
        return c, position

    def _schedule(self, seed: int) -> dict[str, Any]:
        p = self.preset
        return dict(strength=p.strength, ddim_steps=p.ddim_steps, num_train_timesteps=p.num_train_timesteps,
                    use_cfg=p.use_cfg, guidance_scale=p.guidance_scale, capture_kind=p.capture_kind,
                    capture_blocks=p.capture_blocks, seed=seed, max_steps=p.max_steps)

    def _captured(self, rgb: np.ndarray, key: str, prompt: str, seed: int, timings: dict[str, float]) -> Any:
        """The cross-attention captured on the noised latent for ``prompt`` (cached: one UNet call per image,
        prompt and schedule, shared by the root word's map and the other objects' maps)."""
        from .diffusion import run_capture
        from . import dit

        p, sd = self.preset, self.sd
        prep = self._prepare(rgb, key, timings)
        latent = self._latent(prep, key, seed, timings)
        schedule = self._schedule(seed)
        base_key = (key, p.image_size, p.resize_filter, p.latent_from, prompt, *sorted(schedule.items()))

        def capture() -> Any:
            with self._using_sd("unet", "text_encoder"):
                if dit.is_dit(sd):  # docs/METHOD.md section 15: flow t 0.25, one step, last 4 double blocks
                    return dit.run_dit_capture(sd, latent, prompt, seed=seed, use_cfg=p.use_cfg,
                                               guidance_scale=p.guidance_scale)
                return run_capture(sd, latent, prompt, capture_factor=p.capture_factor, **schedule)

        return self._timed(timings, "unet", lambda: self._attention.get(("capture", *base_key, p.capture_factor),
                                                                       capture))

    def _other_maps(self, rgb: np.ndarray, key: str, expr: Any, seed: int, timings: dict[str, float]
                    ) -> dict[str, torch.Tensor]:
        """The map of each related object's noun at the image's size, from the same capture as the root word's
        (its last BPE piece, per-layer min-max, Eq. 4-5 as for the root): refdiff.spatial.relation_maps."""
        from .spatial import relation_maps
        from .text import word_token_positions

        p, sd = self.preset, self.sd
        prompt = expr.text + p.prompt_suffix
        captured = self._captured(rgb, key, prompt, seed, timings)
        combined = captured.combined(p.guidance_scale)
        prep = self._prepare(rgb, key, timings)
        from . import dit

        if dit.is_dit(sd):  # positions in the transformer's context (T5; SD 3: CLIP-L then T5)
            return relation_maps(expr, combined, lambda rel: dit.word_positions(sd, prompt, rel.other_span), prep, p)
        return relation_maps(expr, combined, lambda rel: word_token_positions(prompt, rel.other_span, sd.tokenizer),
                             prep, p)

    def _spatial_inputs(self, rgb: np.ndarray, key: str, parsed: ParsedText, masks: torch.Tensor, v: Variant,
                        terms: tuple[str, ...], seed: int, timings: dict[str, float]) -> tuple[Any, ...]:
        """What the spatial terms need: the structured parse, the other objects' maps (relations) and the
        candidates' similarity to the other nouns (negatives: refdiff.spatial.spatial_negatives)."""
        from .expression import parse_expression
        from .spatial import needs_maps, spatial_negatives

        expr = parse_expression(parsed.text, nlp=self._nlp, parsed=parsed)
        maps = self._other_maps(rgb, key, expr, seed, timings) if needs_maps(expr, terms) else None
        negatives = spatial_negatives(expr, terms, v.discriminative, lambda: self._negatives(rgb, key, expr, masks))
        return expr, terms, maps, negatives

    def _negatives(self, rgb: np.ndarray, key: str, expr: Any, masks: torch.Tensor) -> torch.Tensor:
        """negative_similarity of the candidates' unbiased CLIP crop features with the other nouns."""
        from .spatial import negative_prompts, negative_similarity

        p = self.preset
        masks_key = image_key(masks.numpy().view(np.uint8))
        with self._on_demand(self.clip) as need:
            def crop() -> torch.Tensor:
                need()
                return _on_host(self.clip.crop_features(torch.from_numpy(rgb), masks, None, layer=p.clip_layer))

            feats = self._clip_image.get((key, masks_key, "crop", p.clip_layer, (), p.bias_extent), crop)
            texts = self._text_features(negative_prompts(expr), need)
        return negative_similarity(feats, texts)

    def _cluster_proposals(self, rgb: np.ndarray, key: str, seed: int) -> torch.Tensor:
        """FreeSeg-Diff proposals: UNet features of the image clustered (cached per image and seed)."""
        from .clusters import feature_cluster_proposals

        p = self.preset
        timings: dict[str, float] = {}
        prep = self._prepare(rgb, key, timings)
        latent = self._latent(prep, key, seed, timings)
        cache_key = ("cluster", key, p.image_size, p.resize_filter, p.latent_from, seed, p.cluster_k,
                     p.cluster_feature_factor, p.cluster_factor, p.cluster_timestep, p.cluster_normalize,
                     p.cluster_split, p.cluster_min_area)

        def cluster() -> torch.Tensor:
            from .dit import is_dit

            if is_dit(self.sd):
                raise InputError("cluster proposals (FreeSeg-Diff) cluster SD UNet features; this "
                                 f"{self.sd.family} model has none: use SAM proposals")
            with self._using_sd("unet", "text_encoder"):
                return feature_cluster_proposals(
                    self.sd, latent, "", prep, feature_factor=p.cluster_feature_factor, timestep=p.cluster_timestep,
                    n_clusters=p.cluster_k, cluster_factor=p.cluster_factor, normalize=p.cluster_normalize,
                    split_components=p.cluster_split, min_area=p.cluster_min_area, seed=seed)

        return self._sam_masks.get(cache_key, cluster)

    def _sam_proposals(self, rgb: np.ndarray, key: str) -> tuple[torch.Tensor, str | None]:
        """SAM automatic masks (cached per image), then the preset's post-filter at the image's size; with the
        filter's message (also warned) when it removed every mask."""
        from .proposals import sam_post_filter, sam_proposals

        p = self.preset

        def generate() -> torch.Tensor:
            generator = self._mask_generator()
            with self._using(self.sam):  # the generator's predictor reads its device from the SAM model
                return sam_proposals(generator, rgb)

        raw = self._sam_masks.get((key, tuple(sorted(sam_generator_kwargs(p).items()))), generate)
        masks, _, note = sam_post_filter(raw, keep_largest=p.sam_keep_largest, min_area=p.sam_min_area,
                                         min_area_reference=p.sam_min_area_reference)
        if note:
            warnings.warn(note, RefDiffWarning, stacklevel=2)
        return masks, note

    def _prompt_predictor(self) -> Any:
        """SAM's predictor for the prompted mode (one per SAM model; refdiff.prompted.make_predictor)."""
        from .prompted import make_predictor

        sam = self.sam
        if self._predictor is None or self._predictor[0] != id(sam):
            self._predictor = (id(sam), make_predictor(sam))
        return self._predictor[1]

    def _prompted_proposals(self, rgb: np.ndarray, key: str, c: torch.Tensor) -> tuple[torch.Tensor, str | None]:
        """SAM prompted at the peaks of c (refdiff.prompted; the image embedding cached per image), then the
        preset's post-filter as for the automatic masks; with the reason (also warned) when no mask is left."""
        from .prompted import image_prompted_proposals, no_prompt_message
        from .proposals import sam_post_filter

        p = self.preset
        with self._using(self.sam):  # the predictor reads its device from the SAM model
            raw, prompts = image_prompted_proposals(self._prompt_predictor(), rgb, c, self._sam_embeddings, key,
                                                    **prompt_kwargs(p))
        if raw.shape[0] == 0:
            note = no_prompt_message(prompts, p.prompt_threshold, p.prompt_min_score)
            warnings.warn(note, RefDiffWarning, stacklevel=2)
            return raw, note
        masks, _, note = sam_post_filter(raw, keep_largest=p.sam_keep_largest, min_area=p.sam_min_area,
                                         min_area_reference=p.sam_min_area_reference)
        if note:
            warnings.warn(note, RefDiffWarning, stacklevel=2)
        return masks, note

    def _concept_proposals(self, rgb: np.ndarray, key: str, parsed: ParsedText
                           ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str]]:
        """SAM 3's instances of the target noun (docs/METHOD.md section 17): masks and SAM 3's scores, best first,
        at most ``concept_max`` above ``concept_threshold``; (None, None, [why]) when there is none or the target
        names no object, and the caller falls back to the automatic proposals (the reason is also warned)."""
        from .expression import parse_expression
        from .sam3_models import concept_processor, concept_proposals, image_state

        p = self.preset
        if not self._sam3.available:
            raise InputError("proposal_mode 'concept' needs a SAM 3 model: pass sam3= (a sam3.pt / .safetensors "
                             "checkpoint, --sam3 FILE on the command line) or choose proposal_mode 'automatic' or "
                             "'prompted'")
        expr = parse_expression(parsed.text, nlp=self._nlp, parsed=parsed)
        model = self.sam3
        if callable(model) and not isinstance(model, torch.nn.Module):  # any concept segmenter: (rgb, prompt) ->
            got = concept_proposals(model, rgb, expr, p, remember=lambda prompt, find: self._concepts.get(
                (key, id(model), prompt, p.concept_threshold, p.concept_max), find))  # masks, or (masks, scores)
        else:
            with self._using(model):
                if self._sam3_processor is None or self._sam3_processor[0] != id(model):
                    self._sam3_processor = (id(model), concept_processor(model))
                processor = self._sam3_processor[1]

                def features() -> Any:  # the image's features wait on the host between runs, as every cache
                    state = self._sam3_images.get((key, id(model)),
                                                  lambda: _state_to(image_state(processor, rgb), "cpu"))
                    return _state_to(state, next(model.parameters()).device)

                got = concept_proposals(model, rgb, expr, p, processor=processor, features=features,
                                        remember=lambda prompt, find: self._concepts.get(
                                            (key, id(model), prompt, p.concept_threshold, p.concept_max), find))
        if got.masks is None:  # nothing to look for, or nothing found
            note = (f"concept proposals: {got.reason}, so the preset's automatic SAM proposals are used instead"
                    + (f" ({got.fix})" if got.prompt is not None else ""))
            warnings.warn(note, RefDiffWarning, stacklevel=3)
            return None, None, [note]
        return got.masks, got.scores, []

    def _external_proposals(self, masks: Any, rgb: np.ndarray, resize: str, post_filter: bool
                            ) -> tuple[torch.Tensor, list[str]]:
        """Masks given by the caller as proposals (refdiff.external), optionally through the preset's SAM
        post-filter; with the notes of what was left out or resized (also warned)."""
        from .external import external_proposals
        from .proposals import sam_post_filter

        p = self.preset
        given = external_proposals(masks, rgb.shape[0], rgb.shape[1], resize=resize)
        out, notes = given.masks, list(given.notes)
        if post_filter and out.shape[0]:
            out, keep, note = sam_post_filter(out, keep_largest=p.sam_keep_largest, min_area=p.sam_min_area,
                                              min_area_reference=p.sam_min_area_reference,
                                              advice="lower sam_min_area or pass proposals_post_filter=False to "
                                                     "keep every external mask")
            if note:
                notes.append(note)
            elif keep.numel() < given.masks.shape[0]:
                notes.append(f"the preset's post-filter kept {keep.numel()} of the {given.masks.shape[0]} external "
                             f"masks: the given masks {[given.kept[int(i)] for i in keep]}")
        for note in notes:
            warnings.warn(note, RefDiffWarning, stacklevel=3)
        return out, notes

    def _threshold(self, c: torch.Tensor) -> torch.Tensor:
        from .proposals import threshold_proposals

        return threshold_proposals(c, self.preset.thresholds)

    def _generative_scores(self, c: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        from .scoring import generative_scores

        return generative_scores(c, masks, eps=self.preset.score_eps)

    def _text_features(self, texts: tuple[str, ...], need: Callable[[], None] | None = None) -> torch.Tensor:
        """CLIP text features of ``texts`` (cached); ``need`` brings CLIP to the compute device on a miss."""
        def encode() -> torch.Tensor:
            if need is None:
                with self._using(self.clip):
                    return _on_host(self.clip.encode_text(list(texts)))
            need()
            return _on_host(self.clip.encode_text(list(texts)))

        return self._clip_text.get(texts, encode)

    def _discriminative(self, rgb: np.ndarray, key: str, parsed: ParsedText, masks: torch.Tensor,
                        v: Variant) -> torch.Tensor:
        """Eq. 6, 7, 10: CLIP crop and masked-attention features of the proposals against the text."""
        with self._on_demand(self.clip) as need:  # CLIP visits the compute device only on a cache miss
            return self._discriminative_on(rgb, key, parsed, masks, v, need)

    def _discriminative_on(self, rgb: np.ndarray, key: str, parsed: ParsedText, masks: torch.Tensor, v: Variant,
                           need: Callable[[], None]) -> torch.Tensor:
        """discriminative.proposal_scores with this instance's caches: CLIP image features per (image, proposals,
        branch, layer, bias clues), text features per text; ``need`` brings CLIP over on a cache miss."""
        from .discriminative import proposal_scores

        p = self.preset
        masks_key = image_key(masks.numpy().view(np.uint8)) if masks.numel() else "empty"

        def features(branch: str, layer: str, clues: tuple[str, ...], compute: Callable[[], torch.Tensor]
                     ) -> torch.Tensor:
            def fresh() -> torch.Tensor:
                need()
                return _on_host(compute())

            return self._clip_image.get((key, masks_key, branch, layer, clues, p.bias_extent), fresh)

        return proposal_scores(self.clip, torch.from_numpy(rgb), masks, parsed.text, parsed.root, parsed.directions,
                               p, mode="sam-clip" if v.sam_clip else "ref-diff", features=features,
                               text_features=lambda texts: self._text_features(texts, need))

    def _select(self, v: Variant, masks: torch.Tensor, s_g: torch.Tensor | None, s_d: torch.Tensor | None,
                parsed: ParsedText, root_position: int | None, c: torch.Tensor | None,
                timings: dict[str, float], spatial: tuple[Any, ...] | None = None,
                concept: torch.Tensor | None = None) -> Result:
        """Eq. 1, 2: fuse the variant's scores, pick the best proposal (an empty mask when there is none). With
        ``spatial`` (from _spatial_inputs) the spatial terms adjust the fused score before the choice; with
        ``concept`` (SAM 3's scores of concept proposals) ``concept_score_weight`` x them is added first."""
        from .scoring import fuse_and_select
        from .spatial import spatial_adjuster

        p = self.preset
        adjust, applied = None, []
        if spatial is not None:
            expr, terms, maps, negatives = spatial
            adjust, applied = spatial_adjuster(expr, masks, p, terms, maps, negatives, uses_clip=s_d is not None)
        if concept is not None and p.concept_score_weight and masks.shape[0]:
            adjust = _with_concept_term(adjust, concept, p.concept_score_weight)
        choice = fuse_and_select(masks, s_g, s_d, p, adjust=adjust)

        def arr(x: torch.Tensor | None) -> np.ndarray | None:
            return None if x is None else x.detach().float().cpu().numpy()

        extra: dict[str, np.ndarray | None] = {}
        said: list[str] = []
        if applied:
            extra["fused_base"] = arr(applied[0].base)
            extra.update({f"spatial_{k}": arr(t) for k, t in applied[0].contributions.items()})
            said = list(applied[0].notes)
            for note in said:
                warnings.warn(note, RefDiffWarning, stacklevel=3)
        if concept is not None:
            extra["concept"] = arr(concept)
        return Result(mask=choice.mask.cpu().numpy().astype(bool), proposals=masks.cpu().numpy().astype(bool),
                      scores={"generative": arr(s_g), "discriminative": arr(s_d), "fused": arr(choice.fused),
                              **extra},
                      index=choice.index, top_k=list(choice.top_k), root_token=parsed.root,
                      root_position=root_position, direction=parsed.directions,
                      attention=arr(c), variant=v.name, preset=p.name, timings=timings, warnings=said)


def _state_to(value: Any, device: Any) -> Any:
    """SAM 3's image state (dicts and lists of tensors) with its tensors on ``device``; a copy of the containers."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _state_to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_state_to(v, device) for v in value)
    return value


def _with_concept_term(adjust: Callable[[torch.Tensor], torch.Tensor] | None, concept: torch.Tensor, weight: float
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
    """fused -> fused + weight x SAM 3's score, then ``adjust`` (the spatial terms) when there is one."""
    def adjusted(fused: torch.Tensor) -> torch.Tensor:
        out = fused + weight * concept.to(fused.device, fused.dtype)
        return adjust(out) if adjust is not None else out

    return adjusted


__all__ = ["RefDiff", "Result"]
