"""SAM 3 (Segment Anything with Concepts) as a proposal source: every instance of a short noun phrase, for
``proposal_mode="concept"`` (docs/METHOD.md section 17).

The model is built from the ``sam3`` package's own classes (PyPI ``sam3``, Meta's, SAM License) with every size a
parameter (``Sam3Config``; ``SAM3_IMAGE`` is the released image model), on the CPU: sam3's own builder
(``sam3.model_builder.build_sam3_image_model``) precomputes two position caches on ``"cuda"`` and fails without
a GPU, so refdiff builds the same modules without those caches (they are not weights: they are computed on first
use). A checkpoint is read without unpickling code (safetensors, or ``torch.load(weights_only=True)``), its
image-model weights (the official ``sam3.pt`` nests them under ``detector.``) loaded strictly. SAM v1 / SAM 2
files are refused by name, and ``refdiff.sam`` / ``refdiff.sam2_models`` refuse a SAM 3 file by name.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from .devices import parse_device
from .errors import DependencyError, InputError, ModelLoadError

# A key every SAM 3 image model has (the Perception Encoder ViT of the vision backbone).
SAM3_MARKER = "backbone.vision_backbone.trunk.patch_embed.proj.weight"
DETECTOR_PREFIX = "detector."  # the official sam3.pt: detector.* (the image model) and tracker.* (video)
TRACKER_PREFIX = "tracker."
METADATA_KEY = "refdiff.sam3_config"  # safetensors metadata: the Sam3Config of a non-released size (JSON)
SAM3_INSTALL = ("pip install --no-deps sam3==0.1.4 && pip install 'einops>=0.8,<0.9' psutil "
                "(its other needs, timm, ftfy, regex, iopath, huggingface-hub, pycocotools, come with refdiff's "
                "requirements; no GPU toolchain needed)")


@dataclass(frozen=True)
class Sam3Config:
    """The sizes of a SAM 3 image model; the defaults are the released model's (sam3.model_builder)."""

    image_size: int = 1008
    patch_size: int = 14
    vit_dim: int = 1024
    vit_depth: int = 32
    vit_heads: int = 16
    vit_mlp_ratio: float = 4.625
    vit_window: int = 24
    vit_global_blocks: tuple[int, ...] = (7, 15, 23, 31)
    vit_pretrain_size: int = 336
    d_model: int = 256
    heads: int = 8
    ffn_dim: int = 2048
    text_width: int = 1024
    text_heads: int = 16
    text_layers: int = 24
    text_context: int = 32
    encoder_layers: int = 6
    decoder_layers: int = 6
    queries: int = 200
    geometry_layers: int = 3

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> "Sam3Config":
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        bad = sorted(set(data) - known)
        if bad:
            raise ModelLoadError(f"{METADATA_KEY}: unknown SAM 3 size field(s) {bad}")
        if "vit_global_blocks" in data:
            data["vit_global_blocks"] = tuple(data["vit_global_blocks"])
        return cls(**data)


SAM3_IMAGE = Sam3Config()


def _sam3() -> Any:
    try:
        import sam3  # noqa: F401
        from sam3.model import decoder, encoder, geometry_encoders, maskformer_segmentation, memory, model_misc
        from sam3.model import necks, position_encoding, sam3_image, text_encoder_ve, tokenizer_ve, vitdet
        from sam3.model import vl_combiner
    except ImportError as exc:
        raise DependencyError(f"SAM 3 concept proposals need the 'sam3' package: {SAM3_INSTALL} "
                              f"(import failed: {exc})") from exc
    return type("sam3_modules", (), dict(
        decoder=decoder, encoder=encoder, geometry=geometry_encoders, seg=maskformer_segmentation, memory=memory,
        misc=model_misc, necks=necks, pe=position_encoding, image=sam3_image, text=text_encoder_ve,
        tokenizer=tokenizer_ve, vit=vitdet, vl=vl_combiner))


def bpe_path() -> str:
    """CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) as open_clip ships it: SAM 3's tokenizer reads it
    (the sam3 wheel does not carry its own copy)."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise DependencyError(f"open_clip's BPE vocabulary is missing ({path}); reinstall open_clip_torch")
    return str(path)


def build_sam3_model(config: Sam3Config = SAM3_IMAGE) -> torch.nn.Module:
    """A randomly initialised SAM 3 image model (detector: vision-language backbone, fusion encoder, DETR-style
    decoder with presence token, segmentation head, geometry encoder) of ``config``'s sizes, in eval mode on the
    CPU, from the sam3 package's classes."""
    m = _sam3()
    c = config
    mha = m.misc.MultiheadAttentionWrapper

    def attention(dropout: float = 0.1, batch_first: bool | None = None) -> Any:
        kw = {} if batch_first is None else {"batch_first": batch_first}
        return mha(num_heads=c.heads, dropout=dropout, embed_dim=c.d_model, **kw)

    trunk = m.vit.ViT(
        img_size=c.image_size, pretrain_img_size=c.vit_pretrain_size, patch_size=c.patch_size, embed_dim=c.vit_dim,
        depth=c.vit_depth, num_heads=c.vit_heads, mlp_ratio=c.vit_mlp_ratio, norm_layer="LayerNorm",
        drop_path_rate=0.1, qkv_bias=True, use_abs_pos=True, tile_abs_pos=True,
        global_att_blocks=tuple(c.vit_global_blocks), rel_pos_blocks=(), use_rope=True, use_interp_rope=True,
        window_size=c.vit_window, pretrain_use_cls_token=True, retain_cls_token=False, ln_pre=True, ln_post=False,
        return_interm_layers=False, bias_patch_embed=False, compile_mode=None)
    # no precompute_resolution: sam3 precomputes that cache on "cuda"; it is filled on first use instead
    neck = m.necks.Sam3DualViTDetNeck(
        position_encoding=m.pe.PositionEmbeddingSine(num_pos_feats=c.d_model, normalize=True, temperature=10000),
        d_model=c.d_model, scale_factors=[4.0, 2.0, 1.0, 0.5], trunk=trunk, add_sam2_neck=False)
    text = m.text.VETextEncoder(tokenizer=m.tokenizer.SimpleTokenizer(bpe_path=bpe_path()), d_model=c.d_model,
                                width=c.text_width, heads=c.text_heads, layers=c.text_layers,
                                context_length=c.text_context)
    backbone = m.vl.SAM3VLBackbone(visual=neck, text=text, scalp=1)
    enc_layer = m.encoder.TransformerEncoderLayer(
        activation="relu", d_model=c.d_model, dim_feedforward=c.ffn_dim, dropout=0.1, pos_enc_at_attn=True,
        pos_enc_at_cross_attn_keys=False, pos_enc_at_cross_attn_queries=False, pre_norm=True,
        self_attention=attention(batch_first=True), cross_attention=attention(batch_first=True))
    enc = m.encoder.TransformerEncoderFusion(
        layer=enc_layer, num_layers=c.encoder_layers, d_model=c.d_model, num_feature_levels=1, frozen=False,
        use_act_checkpoint=True, add_pooled_text_to_img_feat=False, pool_text_with_mask=True)
    dec_layer = m.decoder.TransformerDecoderLayer(
        activation="relu", d_model=c.d_model, dim_feedforward=c.ffn_dim, dropout=0.1, cross_attention=attention(),
        n_heads=c.heads, use_text_cross_attention=True)
    # resolution=None: sam3 precomputes the box-bias coordinates on "cuda"; they are computed on first use
    dec = m.decoder.TransformerDecoder(
        layer=dec_layer, num_layers=c.decoder_layers, num_queries=c.queries, return_intermediate=True,
        box_refine=True, num_o2m_queries=0, dac=True, boxRPB="log", d_model=c.d_model, frozen=False,
        interaction_layer=None, dac_use_selfatt_ln=True, resolution=None, stride=c.patch_size,
        use_act_checkpoint=True, presence_token=True)
    transformer = m.misc.TransformerWrapper(encoder=enc, decoder=dec, d_model=c.d_model)
    scoring = m.misc.DotProductScoring(
        d_model=c.d_model, d_proj=c.d_model,
        prompt_mlp=m.misc.MLP(input_dim=c.d_model, hidden_dim=c.ffn_dim, output_dim=c.d_model, num_layers=2,
                              dropout=0.1, residual=True, out_norm=torch.nn.LayerNorm(c.d_model)))
    seg = m.seg.UniversalSegmentationHead(
        hidden_dim=c.d_model, upsampling_stages=3, aux_masks=False, presence_head=False, dot_product_scorer=None,
        act_ckpt=True, cross_attend_prompt=attention(dropout=0),
        pixel_decoder=m.seg.PixelDecoder(num_upsampling_stages=3, interpolation_mode="nearest",
                                         hidden_dim=c.d_model, compile_mode=None))
    geo_layer = m.encoder.TransformerEncoderLayer(
        activation="relu", d_model=c.d_model, dim_feedforward=c.ffn_dim, dropout=0.1, pos_enc_at_attn=False,
        pre_norm=True, self_attention=attention(batch_first=False), pos_enc_at_cross_attn_queries=False,
        pos_enc_at_cross_attn_keys=True, cross_attention=attention(batch_first=False))
    geometry = m.geometry.SequenceGeometryEncoder(
        pos_enc=m.pe.PositionEmbeddingSine(num_pos_feats=c.d_model, normalize=True, temperature=10000),
        encode_boxes_as_points=False, points_direct_project=True, points_pool=True, points_pos_enc=True,
        boxes_direct_project=True, boxes_pool=True, boxes_pos_enc=True, d_model=c.d_model,
        num_layers=c.geometry_layers, layer=geo_layer, use_act_ckpt=True, add_cls=True, add_post_encode_proj=True)
    model = m.image.Sam3Image(
        backbone=backbone, transformer=transformer, input_geometry_encoder=geometry, segmentation_head=seg,
        num_feature_levels=1, o2m_mask_predict=True, dot_prod_scoring=scoring, use_instance_query=False,
        multimask_output=True, inst_interactive_predictor=None, matcher=None)
    _initialise_empty(model)
    model.refdiff_config = c
    return model.eval()


# Parameters sam3 allocates with torch.empty and never initialises (its checkpoint always overwrites them): a
# random build gives them values, as open_clip initialises CLIP's text tower, so forwards are finite.
_EMPTY_PARAMETERS = {"positional_embedding": 0.01, "text_projection": None, "level_embed": 1.0}


def _initialise_empty(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in _EMPTY_PARAMETERS:
                std = _EMPTY_PARAMETERS[leaf]
                param.normal_(0.0, std if std is not None else param.shape[0] ** -0.5)


# ------------------------------------------------------------------------------------------------ detection
def is_sam3_state_dict(state: Mapping[str, Any]) -> bool:
    """Whether a state dict is a SAM 3 image model's (plain, or nested under ``detector.`` as sam3.pt)."""
    return SAM3_MARKER in state or DETECTOR_PREFIX + SAM3_MARKER in state


def is_sam3_model(model: Any) -> bool:
    """Whether ``model`` is a sam3 Sam3Image (without importing sam3 when it is not installed)."""
    return any(c.__module__.startswith("sam3.") and c.__name__ == "Sam3Image" for c in type(model).__mro__)


SAM3_REFUSAL = ("is a SAM 3 checkpoint (segment every instance of a noun phrase), not a SAM / SAM 2 mask "
                "generator; give it as the SAM 3 model instead: --sam3 FILE, RefDiff.from_pretrained(sam3=...) "
                "(proposal_mode 'concept', docs/METHOD.md section 17)")


def _count(state: Mapping[str, Any], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(mm.group(1)) for k in state if (mm := pattern.match(k))}
    return max(found) + 1 if found else 0


def sam3_config_from_state_dict(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                                source: str = "state dict") -> Sam3Config:
    """The sizes of the SAM 3 image model ``state`` holds: the released model when its shapes are that model's,
    else the Sam3Config in the file's metadata (``METADATA_KEY``). SAM v1 / SAM 2 files are refused by name."""
    from .sam2_models import is_sam1_state_dict, is_sam2_state_dict

    if not is_sam3_state_dict(state):
        if is_sam2_state_dict(state):
            raise ModelLoadError(f"{source} is a SAM 2 checkpoint, not SAM 3; give it as the SAM model (--sam, "
                                 "RefDiff.from_pretrained(sam=...)), and a sam3.pt / .safetensors as the SAM 3 one")
        if is_sam1_state_dict(state):
            raise ModelLoadError(f"{source} is a SAM (v1, segment-anything) checkpoint, not SAM 3; give it as the "
                                 "SAM model (--sam, RefDiff.from_pretrained(sam=...)), and a sam3.pt / .safetensors "
                                 "as the SAM 3 one")
        raise ModelLoadError(f"{source} is not a SAM 3 checkpoint (no {SAM3_MARKER} weights); give Meta's sam3.pt "
                             "or a .safetensors of the SAM 3 image model")
    raw = (metadata or {}).get(METADATA_KEY)
    if raw:
        return Sam3Config.from_json(raw)
    c = SAM3_IMAGE
    found = (state[SAM3_MARKER].shape[0], _count(state, "backbone.vision_backbone.trunk.blocks."),
             _count(state, "backbone.language_backbone.encoder.transformer.resblocks."),
             _count(state, "transformer.encoder.layers."), _count(state, "transformer.decoder.layers."))
    if found != (c.vit_dim, c.vit_depth, c.text_layers, c.encoder_layers, c.decoder_layers):
        raise ModelLoadError(f"{source}: a SAM 3 model of ViT width {found[0]}, {found[1]} ViT blocks, {found[2]} "
                             f"text layers and {found[3]}/{found[4]} encoder/decoder layers is not the released "
                             "image model, and the file carries no sizes; give Meta's sam3.pt")
    return c


def read_sam3_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """The image model's tensors of a .safetensors or torch file (weights_only), its metadata, and notes (the
    video tracker's weights of sam3.pt, left out). ``{"model": ...}`` and ``detector.`` are unwrapped."""
    from .sam2_models import read_weight_file

    state, metadata = read_weight_file(path, "SAM 3 checkpoint")
    notes: list[str] = []
    if DETECTOR_PREFIX + SAM3_MARKER in state:
        tracker = [k for k in state if k.startswith(TRACKER_PREFIX)]
        if tracker:
            notes.append(f"{len(tracker)} video tracker weights (tracker.*) are not used by the image model")
        other = [k for k in state if not k.startswith((DETECTOR_PREFIX, TRACKER_PREFIX))]
        state = {k[len(DETECTOR_PREFIX):]: v for k, v in state.items() if k.startswith(DETECTOR_PREFIX)}
        if other:
            raise ModelLoadError(f"SAM 3 checkpoint {str(path)!r}: keys outside detector.* / tracker.* "
                                 f"({other[:3]}...); give Meta's sam3.pt unchanged")
    return state, metadata, notes


def load_sam3(checkpoint: str | Path, device: str | torch.device | None = None) -> torch.nn.Module:
    """Load a SAM 3 image model from ``sam3.pt`` (Meta's) or a .safetensors of it, strictly, in float32."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"SAM 3 checkpoint {str(path)!r} does not exist or is not a file (Meta's sam3.pt; "
                             "ComfyUI users: put it in ComfyUI/models/sam3)")
    state, metadata, _ = read_sam3_file(path)
    source = f"SAM 3 checkpoint {str(path)!r}"
    config = sam3_config_from_state_dict(state, metadata, source)
    model = build_sam3_model(config)  # sam3's ViT calls .item() while it is built: no meta-device build
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{source}: weights do not fit the SAM 3 image architecture ({exc})") from None
    model.refdiff_config = config
    model.eval()
    return model.to(parse_device(device)) if device is not None else model


def save_sam3(model: torch.nn.Module, path: str | Path) -> Path:
    """Write a SAM 3 image model as .safetensors (with its sizes in the metadata) or a torch file."""
    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    config = getattr(model, "refdiff_config", SAM3_IMAGE)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        shared: dict[int, str] = {}
        for k, v in list(state.items()):  # safetensors refuses tensors that share memory
            if v.data_ptr() in shared:
                state[k] = v.clone()
            shared.setdefault(v.data_ptr(), k)
        save_file(state, str(path), metadata={METADATA_KEY: config.to_json()})
    else:
        torch.save(state, str(path))
    return path


def checkpoint_kind(path: str | Path) -> str | None:
    """"sam3", "sam2" or "sam" (v1) from a checkpoint file's keys (safetensors: its header only; torch files
    are read with weights_only onto the meta device), None for anything else or an unreadable file."""
    from .sam2_models import is_sam1_state_dict, is_sam2_state_dict

    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                state: Any = dict.fromkeys(f.keys())
        else:
            state = torch.load(str(path), map_location="meta", weights_only=True)
    except Exception:
        return None
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        return None
    state = {str(k).removeprefix("module."): v for k, v in state.items()}
    if is_sam3_state_dict(state):
        return "sam3"
    if is_sam2_state_dict(state):
        return "sam2"
    return "sam" if is_sam1_state_dict(state) else None


def holds_sam3(path: str | Path) -> bool:
    """Whether a checkpoint file holds a SAM 3 model."""
    return checkpoint_kind(path) == "sam3"


# ------------------------------------------------------------------------------------------------ instances
@contextmanager
def _without_pinned_memory() -> Iterator[None]:
    """sam3 0.1.4 pins a host tensor in every box-prompted or dummy-prompted call (geometry_encoders:
    ``scale.pin_memory()``), which needs a CUDA driver; without one, pinning is skipped (a no-op for the copy)."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.pin_memory
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.pin_memory = original  # type: ignore[method-assign]


@dataclass
class ConceptInstances:
    """SAM 3's instances of one noun phrase on one image: masks bool [N, H, W] (CPU, best score first),
    scores [N] (SAM 3's detection probability x presence), boxes [N, 4] (x0, y0, x1, y1 in pixels)."""

    prompt: str
    masks: torch.Tensor
    scores: torch.Tensor
    boxes: torch.Tensor
    found: int = 0  # instances above the threshold before concept_max and empty masks were left out


def concept_processor(model: torch.nn.Module, threshold: float = 0.0) -> Any:
    """sam3's Sam3Processor for ``model`` at its own input size and device."""
    _sam3()
    from sam3.model.sam3_image_processor import Sam3Processor

    device = next(model.parameters()).device
    size = getattr(model, "refdiff_config", SAM3_IMAGE).image_size
    return Sam3Processor(model, resolution=size, device=str(device), confidence_threshold=float(threshold))


def image_state(processor: Any, rgb: np.ndarray) -> dict[str, Any]:
    """SAM 3's image features of ``rgb`` (uint8 [H, W, 3]); one image pass, reusable for every prompt."""
    from PIL import Image

    with torch.inference_mode():
        return processor.set_image(Image.fromarray(np.ascontiguousarray(rgb)))


def concept_instances(processor: Any, state: dict[str, Any], prompt: str, threshold: float = 0.1,
                      max_instances: int | None = 16) -> ConceptInstances:
    """SAM 3's instance masks of ``prompt`` on the image of ``state`` with a score above ``threshold``, the best
    ``max_instances`` of them (None: all), empty masks left out."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("SAM 3 needs a noun phrase to look for; got an empty prompt")
    if not 0.0 <= threshold < 1.0:
        raise InputError(f"concept_threshold must be in [0, 1), got {threshold}")
    processor.confidence_threshold = float(threshold)
    with torch.inference_mode(), _without_pinned_memory():
        out = processor.set_text_prompt(prompt.strip(), state)
    masks = out["masks"].detach().to("cpu").bool().reshape(-1, *out["masks"].shape[-2:])
    scores = out["scores"].detach().to("cpu").float().reshape(-1)
    boxes = out["boxes"].detach().to("cpu").float().reshape(-1, 4)
    found = int(scores.numel())
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[masks[order].flatten(1).any(1)]
    if max_instances is not None:
        order = order[:max_instances]
    return ConceptInstances(prompt.strip(), masks[order], scores[order], boxes[order], found)


def select_instances(prompt: str, masks: Any, scores: Any = None, threshold: float = 0.1,
                     max_instances: int | None = 16, height: int | None = None, width: int | None = None
                     ) -> ConceptInstances:
    """Instances given by any concept segmenter (SAM 3 run elsewhere, ComfyUI's SAM3_Detect, a drawing) in the
    form ``concept_instances`` returns: masks [N, H, W] (refdiff.external's rules; empty ones left out), scores
    [N] (None: all 1), kept above ``threshold``, best first, at most ``max_instances``."""
    from .external import external_proposals

    n = len(masks) if masks is not None else 0
    values = torch.ones(n) if scores is None else torch.as_tensor(np.asarray(scores), dtype=torch.float32).reshape(-1)
    if values.numel() != n:
        raise InputError(f"concept instances: {n} masks but {values.numel()} scores; give one score per mask")
    if n == 0:
        empty = torch.zeros(0, height or 0, width or 0, dtype=torch.bool)
        return ConceptInstances(prompt, empty, values, torch.zeros(0, 4), 0)
    arr = torch.as_tensor(np.asarray(masks)) if not isinstance(masks, torch.Tensor) else masks
    h, w = (arr.shape[-2], arr.shape[-1]) if height is None else (height, width)
    given = external_proposals(arr, h, w, name="concept instances")
    kept_scores = values[given.kept]
    order = torch.argsort(kept_scores, descending=True, stable=True)
    order = order[kept_scores[order] > threshold]
    if max_instances is not None:
        order = order[:max_instances]
    out = given.masks[order]
    ys, xs = out.any(2), out.any(1)
    boxes = torch.stack([torch.tensor([x.nonzero().min(), y.nonzero().min(), x.nonzero().max() + 1,
                                       y.nonzero().max() + 1], dtype=torch.float32)
                         for x, y in zip(xs, ys)]) if len(out) else torch.zeros(0, 4)
    return ConceptInstances(prompt, out, kept_scores[order], boxes, int((values > threshold).sum()))


def concept_prompt(expr: Any, kind: str = "noun") -> str | None:
    """The text SAM 3 is prompted with, from a parsed expression (refdiff.expression.Expression): "noun" the
    target noun alone; "phrase" the target noun phrase (with its attributes: "red car"). None for an open target
    (no noun: "the one on the left"), which SAM 3 cannot look for."""
    if kind not in ("noun", "phrase"):
        raise InputError(f"concept_prompt must be 'noun' or 'phrase', got {kind!r}")
    if expr.open or not expr.target.strip():
        return None
    if kind == "phrase":
        return " ".join([*expr.attributes, expr.target]).strip()
    return expr.target.strip()


@dataclass
class ConceptProposals:
    """What ``concept_proposals`` gives for one image and text: SAM 3's instances of the target noun (masks bool
    [N, H, W], scores [N], boxes [N, 4], best first) or, when there is none, ``masks`` None and ``reason`` (the
    text names no object; SAM 3 found no instance above the threshold) with ``fix`` (what to change)."""

    prompt: str | None
    masks: torch.Tensor | None
    scores: torch.Tensor | None
    boxes: torch.Tensor | None
    found: int = 0
    reason: str | None = None
    fix: str | None = None


def concept_proposals(model: Any, rgb: np.ndarray, expr: Any, preset: Any, processor: Any = None,
                      features: Any = None, remember: Any = None) -> ConceptProposals:
    """The concept proposals of ``proposal_mode="concept"`` (docs/METHOD.md section 17) for one image: SAM 3
    prompted with ``expr``'s target (``preset.concept_prompt``: the noun or its phrase), its instances above
    ``preset.concept_threshold``, at most ``preset.concept_max``, best first. ``model`` is a SAM 3 image model or
    any concept segmenter ``(rgb, prompt) -> masks`` or ``(masks, scores)``. Optional hooks of a caller with
    caches: ``processor`` (``concept_processor(model)``), ``features()`` (the image's SAM 3 state, on the model's
    device), ``remember(prompt, find)`` (returns ``find()``'s instances, cached). Used by ``refdiff.RefDiff`` and
    the ComfyUI nodes alike."""
    prompt = concept_prompt(expr, preset.concept_prompt)
    if prompt is None:
        return ConceptProposals(None, None, None, None, 0,
                                f"{expr.text!r} names no object for SAM 3 to look for (an open target)",
                                "name the object in the text ('the car on the left')")
    threshold, most = preset.concept_threshold, preset.concept_max
    if callable(model) and not isinstance(model, torch.nn.Module):
        def find() -> ConceptInstances:
            out = model(rgb, prompt)
            masks, scores = out if isinstance(out, tuple) else (out, None)
            return select_instances(prompt, masks, scores, threshold=threshold, max_instances=most,
                                    height=rgb.shape[0], width=rgb.shape[1])
    else:
        use = processor if processor is not None else concept_processor(model)

        def find() -> ConceptInstances:
            state = features() if features is not None else image_state(use, rgb)
            return concept_instances(use, state, prompt, threshold=threshold, max_instances=most)
    inst = remember(prompt, find) if remember is not None else find()
    if inst.masks.shape[0] == 0:
        return ConceptProposals(prompt, None, None, None, inst.found,
                                f"SAM 3 found no instance of {prompt!r} above concept_threshold {threshold}",
                                "lower concept_threshold, or set concept_prompt to 'noun'")
    return ConceptProposals(prompt, inst.masks, inst.scores, inst.boxes, inst.found)


def sam3_model_name(model: Any) -> str:
    """'sam3' for the released size, 'sam3 (custom size)' otherwise."""
    return "sam3" if getattr(model, "refdiff_config", SAM3_IMAGE) == SAM3_IMAGE else "sam3 (custom size)"


__all__ = ["Sam3Config", "SAM3_IMAGE", "SAM3_MARKER", "METADATA_KEY", "SAM3_INSTALL", "SAM3_REFUSAL",
           "build_sam3_model", "is_sam3_state_dict", "is_sam3_model", "sam3_config_from_state_dict",
           "read_sam3_file", "load_sam3", "save_sam3", "holds_sam3", "checkpoint_kind", "ConceptInstances", "concept_processor",
           "image_state", "concept_instances", "ConceptProposals", "concept_proposals", "select_instances", "concept_prompt", "sam3_model_name", "bpe_path"]
