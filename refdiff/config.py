"""The presets (``paper`` and ``official`` of Ref-Diff; ``plus``, beyond the paper) and the variants.

Every constant of the method lives here as a named field with the default of docs/METHOD.md; stage functions take
these values as arguments, so a preset is only a bundle of defaults and any field can be overridden.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

from .errors import InputError

CaptureKind = Literal["probs", "logits"]
ResizeMode = Literal["bilinear", "lanczos"]
RootRule = Literal["root", "root_or_subj"]
ClipLayer = Literal["final", "penultimate"]
BiasBranch = Literal["masked", "crop", "none"]
ProposalMode = Literal["automatic", "prompted", "concept"]
ConceptPrompt = Literal["noun", "phrase"]
PromptKind = Literal["points", "boxes", "points+boxes"]

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))


@dataclass(frozen=True)
class Preset:
    """All constants of the method. Field names match the stage functions' keyword arguments."""

    name: str
    # 1. image preparation
    image_size: int = 1024  # S: side of the padded square fed to the VAE
    resize_filter: ResizeMode = "lanczos"
    # 2. noise injection
    latent_from: Literal["sample", "mean"] = "sample"  # posterior sample (seeded) or its mean
    ddim_steps: int = 20  # uniform DDIM schedule over the training steps
    num_train_timesteps: int = 1000
    strength: float = 0.1  # t_enc = int(strength * ddim_steps)
    use_cfg: bool = True  # classifier-free guidance batch (uncond "" + cond); False is a speed option
    max_steps: int | None = None  # run at most this many of the DDIM steps (speed option: 1); None = all
    guidance_scale: float = 9.0
    prompt_suffix: str = ", "
    # 3. cross-attention capture
    capture_kind: CaptureKind = "logits"
    capture_factor: int = 4  # capture the layers whose query grid is the latent downsampled by this
    capture_blocks: tuple[str, ...] = ("down", "mid", "up")
    layer_norm_eps: float = 1e-8  # per-layer min-max epsilon
    # 4. root token
    root_rule: RootRule = "root_or_subj"
    # 5. generative map
    map_resize: ResizeMode = "lanczos"
    map_eps: float = 1e-8
    # 6. proposals
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    sam_points_per_side: int = 32
    sam_points_per_batch: int = 64
    sam_pred_iou_thresh: float = 0.88
    sam_stability_score_thresh: float = 0.95
    sam_box_nms_thresh: float = 0.7
    sam_crop_n_layers: int = 0
    sam_min_mask_region_area: int = 0
    sam_keep_largest: int | None = 10  # keep only the N largest SAM masks (None: all)
    sam_min_area: int = 10000  # drop masks of area <= this many pixels at the reference area (0: keep all)
    # The image area at which sam_min_area holds as given; the threshold scales with the image area (10000 px
    # is ~3% of a 640 x 480 COCO image, at any size). None: sam_min_area in absolute pixels (the released code).
    sam_min_area_reference: int | None = 640 * 480
    # Where SAM is prompted (beyond the paper; docs/METHOD.md section 6, "Prompted proposals"): "automatic" = the
    # automatic mask generator's point grid (both presets); "prompted" = SAM's predictor at the peaks and regions of
    # the generative map c (refdiff.prompted). The sam_* filter fields above apply to both.
    proposal_mode: ProposalMode = "automatic"
    prompt_threshold: float = 0.5  # peaks and their regions are where c >= this
    prompt_max: int = 4  # at most this many peaks (the highest first)
    prompt_min_distance: float = 0.1  # two peaks at least this far apart (fraction of the image's longer side)
    prompt_grid: int = 64  # c is searched for peaks on a grid of this many cells along its longer side
    prompt_kind: PromptKind = "points+boxes"  # per peak: its point, its region's box (with the point), or both
    prompt_multimask: bool = True  # SAM's three masks per prompt (whole, part, subpart)
    prompt_nms_iou: float = 0.8  # drop a mask whose IoU with a better-scored kept one is above this
    prompt_min_score: float = 0.0  # drop masks whose predicted IoU is below this (0: keep all)
    # "concept" (beyond the paper; docs/METHOD.md section 17): SAM 3's instances of the target noun are the proposals
    concept_prompt: ConceptPrompt = "noun"  # SAM 3's text: the target noun, or its phrase with the attributes
    concept_threshold: float = 0.1  # keep instances whose SAM 3 score (detection x presence) is above this
    concept_max: int = 16  # at most this many instances, the best scored first
    concept_score_weight: float = 0.0  # fused += this x SAM 3's score (0: off; Ref-Diff's scores alone choose)
    concept_with_sam3: bool = False  # use "concept" whenever a SAM 3 model is given (plus), else proposal_mode
    # 7. generative matching
    score_eps: float = 1e-6
    # 8. discriminative matching
    clip_layer: ClipLayer = "final"
    bias_branch: BiasBranch = "crop"  # which branch sees the positional bias P
    bias_extent: float = 2.0 / 3.0  # P falls from 1 to 0 over this fraction of the width/height
    crop_weight: float = 0.7  # weight of the crop branch in s_D
    mask_weight: float = 0.3  # weight of the masked-attention branch in s_D (beta in the paper)
    crop_root_weight: float = 0.0  # crop text feature = (1-w) r_sent + w r_root
    mask_root_weight: float = 0.5  # mask-token text feature = (1-w) r_sent + w r_root
    normalize_text: bool = True  # L2-normalise each mixed text feature: every s_D term is a cosine
    # 9. fusion: s = gen_weight * s_G + disc_weight * s_D
    gen_weight: float = 0.05
    disc_weight: float = 1.0
    top_k: int = 5
    # DiffSegmenter self-attention refinement of the map (variant "G-refine"; docs/SIBLING_METHODS.md)
    refine_iterations: int = 1  # times the map is multiplied by the fused self-attention
    refine_max_tokens: int = 4096  # capture self-attention only on grids of at most this many tokens
    refine_factor_weights: tuple[tuple[int, float], ...] = ((8, 0.3), (4, 0.5), (2, 0.1), (1, 0.1))
    refine_self_factor: int | None = None  # None: the UNet's finest attention grid within refine_max_tokens
    # FreeSeg-Diff feature-cluster proposals (variant "cluster"; docs/SIBLING_METHODS.md)
    cluster_k: int = 4
    cluster_feature_factor: int = 4  # attn2 query features at this downsampling factor
    cluster_factor: int = 2  # grid the features are clustered on
    cluster_timestep: int = 0  # DDPM timestep of the single UNet pass
    cluster_normalize: bool = True  # L2-normalise each block's features before concatenating
    cluster_split: bool = True  # split clusters into connected components
    cluster_min_area: int = 0  # drop cluster proposals smaller than this many pixels
    # Spatial language, beyond the paper (docs/METHOD.md section 13): terms added to the fused score between
    # scoring and selection. Each is off in `paper` and `official` and can be switched on alone.
    spatial_position: bool = False  # left/right/top/bottom: order of box centres among the pool
    spatial_middle: bool = False  # middle/center: the pool member nearest the middle of the pool's span
    spatial_ordinals: bool = False  # "second from the left", "leftmost": the n-th of the pool from a side
    spatial_size: bool = False  # "biggest", "smaller", "tallest": the extreme of the pool by area/height/width
    spatial_relations: bool = False  # "next to", "behind", "on", "holding" X: a rule against X's own map
    spatial_negatives: bool = False  # the other nouns of the sentence subtracted in the CLIP score
    # the pool: whole instances of the target the frame and relation terms rank (docs/METHOD.md section 13)
    spatial_pool: int = 12  # at most this many instances, best first
    spatial_pool_margin: float = 0.05  # instances score within this of the best one (units of a CLIP-fused score)
    spatial_pool_margin_generative: float = 0.3  # the same for a score without s_D (G, GS: s_G alone)
    spatial_pool_overlap: float = 0.8  # a mask this much inside another is its part, or (similar area) its duplicate
    spatial_pool_group_cover: float = 0.6  # a mask whose parts (>= 2, apart) cover this share of it is a group
    spatial_pool_band: float = 0.95  # a mask whose box spans this share of the image width is a band (sky, road)
    # term weights, in units of the pool margin: above 1 a one-hot term decides among the pool's instances
    spatial_position_weight: float = 3.0
    spatial_middle_weight: float = 2.0
    spatial_ordinal_weight: float = 2.0
    spatial_size_weight: float = 2.0
    spatial_relation_weight: float = 2.0
    spatial_negative_weight: float = 0.5  # in units of the score itself: -weight * cosine with the other nouns
    spatial_relation_threshold: float = 0.5  # the other object's region: its map >= this (maps are in [0, 1])
    spatial_near_scale: float = 0.1  # "near": exp(-gap / scale), the box gap as a share of the image diagonal
    spatial_order_margin: float = 0.05  # above/below/left/right: a difference of this share of the side is sure

    def with_(self, **overrides: object) -> "Preset":
        """A copy with some fields changed; unknown names raise InputError."""
        known = {f.name for f in fields(self)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise InputError(f"unknown preset field(s) {bad}; known fields: {sorted(known)}")
        return replace(self, **overrides)


OFFICIAL = Preset(name="official")

PAPER = Preset(
    name="paper",
    capture_kind="probs",
    root_rule="root",
    map_resize="bilinear",
    sam_keep_largest=None,
    sam_min_area=0,
    clip_layer="penultimate",
    bias_branch="masked",
    crop_weight=0.7,  # 1 - beta
    mask_weight=0.3,  # beta
    crop_root_weight=0.5,  # r = mean(r_sent, r_root) for both branches
    mask_root_weight=0.5,
    normalize_text=False,  # v_i . r with r the plain mean of r_sent and r_root
    gen_weight=0.1,  # alpha
    disc_weight=0.9,  # 1 - alpha
)

SPATIAL_TERMS: tuple[str, ...] = ("position", "middle", "ordinals", "size", "relations", "negatives")

# Beyond the paper: the `official` stages with every spatial term on and the paper's head-noun root rule, under
# which a side word before its noun never becomes the root (docs/METHOD.md section 13).
PLUS = OFFICIAL.with_(name="plus", proposal_mode="prompted", root_rule="root", concept_with_sam3=True,
                      **{f"spatial_{t}": True for t in SPATIAL_TERMS})

# Beyond the paper: the speed options together (README "Speed options"; benchmarks/README.md measures them end to
# end): S = 512, one conditional-only UNet step, SAM prompted at the peaks of c instead of its 1024-point grid.
# The SAM model is the caller's; the fastest measured is SAM 2.1 hiera tiny (--sam sam2.1_hiera_tiny.pt).
FAST = OFFICIAL.with_(name="fast", image_size=512, use_cfg=False, max_steps=1, proposal_mode="prompted")

PRESETS: dict[str, Preset] = {"official": OFFICIAL, "paper": PAPER, "plus": PLUS, "fast": FAST}


def spatial_terms_of(preset: Preset, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The spatial terms a preset switches on, plus ``extra`` (a variant's), in SPATIAL_TERMS order."""
    on = {t for t in SPATIAL_TERMS if getattr(preset, f"spatial_{t}")} | set(extra)
    return tuple(t for t in SPATIAL_TERMS if t in on)


def get_preset(preset: str | Preset) -> Preset:
    """Return a Preset by name ("official", "paper", "plus", "fast") or pass one through."""
    if isinstance(preset, Preset):
        return preset
    key = str(preset).strip().lower()
    if key not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[key]


@dataclass(frozen=True)
class Variant:
    """Which stages a variant uses (docs/METHOD.md section 10)."""

    name: str
    proposals: Literal["threshold", "sam", "cluster", "prompted"]
    generative: bool
    discriminative: bool
    sam_clip: bool = False  # crop branch only, no positional bias, sentence feature
    refine: bool = False  # the map c is refined with the UNet's self-attention (DiffSegmenter)
    spatial: tuple[str, ...] = ()  # spatial terms switched on for this variant on top of the preset's

    @property
    def needs_diffusion(self) -> bool:
        return self.generative or self.refine or self.proposals in ("threshold", "cluster", "prompted")


VARIANTS: dict[str, Variant] = {
    "full": Variant("full", "sam", generative=True, discriminative=True),
    "g": Variant("G", "threshold", generative=True, discriminative=False),
    "gs": Variant("GS", "sam", generative=True, discriminative=False),
    "ds": Variant("DS", "sam", generative=False, discriminative=True),
    "sam-clip": Variant("sam-clip", "sam", generative=False, discriminative=True, sam_clip=True),
    # Sibling methods on the same UNet internals (docs/SIBLING_METHODS.md):
    "g-refine": Variant("G-refine", "threshold", generative=True, discriminative=False, refine=True),
    "cluster": Variant("cluster", "cluster", generative=True, discriminative=True),
    # Ref-Diff with SAM prompted at the generative map's peaks, whatever the preset's proposal_mode (beyond the paper)
    "prompted": Variant("prompted", "prompted", generative=True, discriminative=True),
}
_ALIASES = {"ref-diff": "full", "refdiff": "full", "ref-diff/g": "g", "ref-diff/gs": "gs",
            "ref-diff/ds": "ds", "samclip": "sam-clip", "sam_clip": "sam-clip", "diffsegmenter": "g-refine",
            "g_refine": "g-refine", "freeseg": "cluster", "freeseg-diff": "cluster", "full-prompted": "prompted",
            "ref-diff-prompted": "prompted"}
VARIANT_HELP = ("full (Ref-Diff), G (threshold proposals + generative), GS (SAM + generative), DS (SAM + CLIP), "
                "sam-clip (baseline), G-refine (G on the self-attention-refined map), cluster (feature-cluster "
                "proposals + generative + CLIP), prompted (Ref-Diff with SAM prompted at the peaks of the generative "
                "map)")


def get_variant(name: str | Variant) -> Variant:
    """Return a Variant by (case-insensitive) name: full, G, GS, DS, sam-clip, ...; a name may add spatial terms
    after "+" ("full+ordinals", "full+size+middle"; "full+spatial": all of SPATIAL_TERMS)."""
    if isinstance(name, Variant):
        return name
    base, *extra = str(name).strip().lower().split("+")
    if extra:
        return _with_spatial(get_variant(base), extra, str(name))
    key = base
    key = _ALIASES.get(key, key)
    if key not in VARIANTS:
        raise InputError(f"unknown variant {name!r}; choose one of {', '.join(v.name for v in VARIANTS.values())}")
    return VARIANTS[key]


def proposal_source(variant: str | Variant, preset: Preset, sam3: bool = False) -> str:
    """Where a variant's proposals come from under a preset: "threshold", "cluster", "sam" (the automatic
    generator), "prompted" (SAM prompted at c's peaks: the prompted variant, or a SAM variant under
    proposal_mode="prompted") or "concept" (SAM 3's instances of the target noun: a SAM variant under
    proposal_mode="concept", or under a preset with concept_with_sam3 when a SAM 3 model is given, ``sam3``)."""
    v = get_variant(variant)
    if preset.proposal_mode not in ("automatic", "prompted", "concept"):
        raise InputError(f"proposal_mode must be 'automatic', 'prompted' or 'concept', got {preset.proposal_mode!r}")
    if v.proposals == "sam" and (preset.proposal_mode == "concept" or (preset.concept_with_sam3 and sam3)):
        return "concept"
    if v.proposals == "sam" and preset.proposal_mode == "prompted":
        return "prompted"
    return v.proposals


def needs_map(variant: str | Variant, preset: Preset, sam3: bool = False) -> bool:
    """Whether a variant needs the generative map c under a preset: for its scores or proposals, and for the
    prompts of the prompted mode (so DS and sam-clip run the diffusion pass under proposal_mode="prompted")."""
    return get_variant(variant).needs_diffusion or proposal_source(variant, preset, sam3) == "prompted"


def prompt_kwargs(preset: Preset) -> dict[str, object]:
    """refdiff.prompted.prompted_proposals keyword arguments of a preset."""
    return dict(threshold=preset.prompt_threshold, max_prompts=preset.prompt_max,
                min_distance=preset.prompt_min_distance, grid=preset.prompt_grid, kind=preset.prompt_kind,
                multimask=preset.prompt_multimask, nms_iou=preset.prompt_nms_iou, min_score=preset.prompt_min_score)


def _with_spatial(base: Variant, extra: list[str], name: str) -> Variant:
    """A variant with spatial terms on, named "<base>+<term>+..."."""
    terms: list[str] = []
    for word in (w.strip() for w in extra):
        for t in (SPATIAL_TERMS if word == "spatial" else (word,)):
            if t not in SPATIAL_TERMS:
                raise InputError(f"unknown spatial term {word!r} in variant {name!r}; choose among "
                                 f"{', '.join(SPATIAL_TERMS)} or 'spatial' (all)")
            if t not in terms:
                terms.append(t)
    ordered = tuple(t for t in SPATIAL_TERMS if t in terms)
    label = "spatial" if ordered == SPATIAL_TERMS else "+".join(ordered)
    return replace(base, name=f"{base.name}+{label}", spatial=tuple(sorted(set(base.spatial) | set(ordered),
                                                                        key=SPATIAL_TERMS.index)))


def spatial_rows(base: str = "full") -> list[str]:
    """Eval rows of the spatial terms: the base variant, each term alone on it, and all of them."""
    name = get_variant(base).name
    return [name, *(f"{name}+{t}" for t in SPATIAL_TERMS), f"{name}+spatial"]


def sam_generator_kwargs(preset: Preset) -> dict[str, object]:
    """SamAutomaticMaskGenerator keyword arguments of a preset."""
    return dict(
        points_per_side=preset.sam_points_per_side,
        points_per_batch=preset.sam_points_per_batch,
        pred_iou_thresh=preset.sam_pred_iou_thresh,
        stability_score_thresh=preset.sam_stability_score_thresh,
        box_nms_thresh=preset.sam_box_nms_thresh,
        crop_n_layers=preset.sam_crop_n_layers,
        min_mask_region_area=preset.sam_min_mask_region_area,
    )


__all__ = ["Preset", "OFFICIAL", "PAPER", "PLUS", "FAST", "PRESETS", "SPATIAL_TERMS", "spatial_terms_of", "spatial_rows",
           "get_preset", "Variant", "VARIANTS", "get_variant", "sam_generator_kwargs", "DEFAULT_THRESHOLDS",
           "VARIANT_HELP", "proposal_source", "needs_map", "prompt_kwargs", "ProposalMode", "PromptKind", "ConceptPrompt"]
