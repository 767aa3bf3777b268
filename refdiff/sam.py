"""Loading SAM (Segment Anything) checkpoints safely: the architecture is read from the state dict's shapes,
the model is built with segment_anything's own classes and the weights are loaded without unpickling code
(``torch.load(weights_only=True)`` or safetensors).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch

from .downloads import SAM_DIR_ENV
from .devices import parse_device
from .errors import DependencyError, InputError, ModelLoadError

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

SAM_CHECKPOINT_URLS: dict[str, str] = {
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
}
SAM_CHECKPOINT_FILES: dict[str, str] = {name: url.rsplit("/", 1)[1] for name, url in SAM_CHECKPOINT_URLS.items()}
DEFAULT_MODEL_TYPE = "vit_h"
_ALIASES = {"default": "vit_h", "h": "vit_h", "l": "vit_l", "b": "vit_b"}


@dataclass(frozen=True)
class SamConfig:
    """The architecture of a SAM model; the defaults are those of the official checkpoints."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256  # also the image encoder's output channels
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8  # not recorded in the weights' shapes: always assumed 8, SAM's value
    decoder_attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256


SAM_CONFIGS: dict[str, SamConfig] = {
    "vit_b": SamConfig(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamConfig(1280, 32, 16, (7, 15, 23, 31)),
}


def _segment_anything():
    try:
        import segment_anything
    except ImportError as exc:
        raise DependencyError("SAM needs the 'segment-anything' package: pip install segment-anything") from exc
    return segment_anything


def canonical_model_type(model_type: str) -> str:
    """'vit_h' / 'vit_l' / 'vit_b' from a user spelling ('default', 'ViT-H', 'h'); InputError otherwise."""
    key = str(model_type).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in SAM_CONFIGS:
        raise InputError(f"unknown SAM model type {model_type!r}; choose one of {sorted(SAM_CONFIGS)}")
    return key


def model_type_from_name(path: str | Path) -> str | None:
    """The model type named in a checkpoint's file name ('sam_vit_b_01ec64.pth' -> 'vit_b'), or None."""
    found = re.findall(r"vit[_-]?([hlb])(?![a-z])", Path(path).name.lower())
    return f"vit_{found[0]}" if len(set(found)) == 1 else None


def build_sam(config: str | SamConfig = DEFAULT_MODEL_TYPE) -> "Sam":
    """A randomly initialised SAM of the official type named (via sam_model_registry) or of any SamConfig."""
    sa = _segment_anything()
    if isinstance(config, str):
        return sa.sam_model_registry[canonical_model_type(config)](checkpoint=None)
    name = official_model_type(config)
    if name is not None:
        return sa.sam_model_registry[name](checkpoint=None)
    return _build_from_config(config)


def _build_from_config(c: SamConfig) -> "Sam":
    """segment_anything's _build_sam with every size a parameter (it hard-codes 1024 px and 256 channels)."""
    _segment_anything()
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = c.image_size // c.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=c.encoder_depth, embed_dim=c.encoder_embed_dim, img_size=c.image_size, mlp_ratio=c.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=c.encoder_num_heads,
            patch_size=c.patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=c.encoder_global_attn_indexes, window_size=c.window_size,
            out_chans=c.prompt_embed_dim),
        prompt_encoder=PromptEncoder(
            embed_dim=c.prompt_embed_dim, image_embedding_size=(grid, grid),
            input_image_size=(c.image_size, c.image_size), mask_in_chans=c.mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=c.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=c.decoder_depth, embedding_dim=c.prompt_embed_dim, mlp_dim=c.decoder_mlp_dim,
                num_heads=c.decoder_num_heads, attention_downsample_rate=c.decoder_attention_downsample_rate),
            transformer_dim=c.prompt_embed_dim, iou_head_depth=c.iou_head_depth,
            iou_head_hidden_dim=c.iou_head_hidden_dim),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def official_model_type(config: SamConfig) -> str | None:
    """'vit_b' / 'vit_l' / 'vit_h' when ``config`` is one of the official architectures, else None."""
    return next((name for name, known in SAM_CONFIGS.items() if known == config), None)


def _count(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    return max(found) + 1 if found else 0


def sam_config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> SamConfig:
    """Read a SAM architecture from its weights' shapes (works on meta tensors); KeyError if keys are missing.

    Encoder heads come from the relative-position tables (rows 2 * size - 1, one column per head channel);
    blocks whose table spans the whole patch grid are the global-attention ones.
    """
    sd = state_dict
    embed, _, patch, _ = sd["image_encoder.patch_embed.proj.weight"].shape
    grid = sd["image_encoder.pos_embed"].shape[1]
    depth = _count(sd, "image_encoder.blocks.")
    sizes = [(sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] + 1) // 2 for i in range(depth)]
    head_dim = sd["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
    windows = [s for s in sizes if s != grid]
    prompt_dim = sd["prompt_encoder.no_mask_embed.weight"].shape[1]
    cross_dim = sd["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"].shape[0]
    return SamConfig(
        encoder_embed_dim=embed, encoder_depth=depth, encoder_num_heads=embed // head_dim,
        encoder_global_attn_indexes=tuple(i for i, s in enumerate(sizes) if s == grid),
        image_size=grid * patch, patch_size=patch, window_size=windows[0] if windows else 0,
        mlp_ratio=sd["image_encoder.blocks.0.mlp.lin1.weight"].shape[0] / embed,
        prompt_embed_dim=prompt_dim,
        mask_in_chans=sd["prompt_encoder.mask_downscaling.3.weight"].shape[0],
        decoder_depth=_count(sd, "mask_decoder.transformer.layers."),
        decoder_mlp_dim=sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
        decoder_attention_downsample_rate=prompt_dim // cross_dim,
        num_multimask_outputs=sd["mask_decoder.mask_tokens.weight"].shape[0] - 1,
        iou_head_depth=_count(sd, "mask_decoder.iou_prediction_head.layers."),
        iou_head_hidden_dim=sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
    )


def infer_model_type(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """'vit_b' / 'vit_l' / 'vit_h' from a state dict's shapes (embedding 768/1024/1280, depth 12/24/32),
    None for another SAM architecture; ModelLoadError if it is not a SAM state dict."""
    return official_model_type(_config_or_error(state_dict, "state dict"))


def sam_cache_dir() -> Path:
    """Where load_sam(None) keeps downloaded checkpoints: $REFDIFF_SAM_DIR, else torch hub's checkpoints folder
    (downloads.SAM_DOWNLOAD_NOTE, the wording of the help and the docs)."""
    env = os.environ.get(SAM_DIR_ENV)
    return Path(env).expanduser() if env else Path(torch.hub.get_dir()) / "checkpoints"


def checkpoint_urls(model_type: str | None = None) -> str:
    """'vit_h: URL' for the official checkpoint of ``model_type``, or for every type when None."""
    types = [model_type] if model_type else sorted(SAM_CHECKPOINT_URLS)
    return ", ".join(f"{t}: {SAM_CHECKPOINT_URLS[t]}" for t in types)


def _where_to_get(model_type: str | None) -> str:
    return (f"download it from {checkpoint_urls(model_type)} (ComfyUI users: put it in ComfyUI/models/sams; "
            f"refdiff downloads to {sam_cache_dir()} when no checkpoint is given)")


def _download_default(model_type: str) -> Path:
    """The cached official checkpoint of ``model_type``, downloaded first if it is not there."""
    path = sam_cache_dir() / SAM_CHECKPOINT_FILES[model_type]
    if path.is_file():
        return path
    url = SAM_CHECKPOINT_URLS[model_type]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=True)
    except Exception as exc:  # offline, proxy, disk full: all mean the same to the user
        raise ModelLoadError(f"could not download the SAM {model_type} checkpoint ({exc}); download {url} "
                             f"yourself and put it at {path} (or pass its path as the SAM checkpoint; ComfyUI "
                             f"users: put it in ComfyUI/models/sams)") from exc
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors or torch (.pth/.pt/.bin) file, without unpickling arbitrary objects."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"SAM checkpoint {str(path)!r} could not be read as weights ({exc}); it must be a "
                             "state dict saved by torch.save or safetensors; " + _where_to_get(None)) from exc
    for wrapper in ("model", "state_dict"):  # training checkpoints nest the weights
        if isinstance(state, dict) and "image_encoder.pos_embed" not in state and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"SAM checkpoint {str(path)!r} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _config_or_error(state_dict: Mapping[str, torch.Tensor], source: str) -> SamConfig:
    from .sam3_models import SAM3_REFUSAL, is_sam3_state_dict

    if is_sam3_state_dict(state_dict):
        raise ModelLoadError(f"{source} {SAM3_REFUSAL}")
    if "image_encoder.trunk.patch_embed.proj.weight" in state_dict:
        raise ModelLoadError(f"{source}: this is a SAM 2 checkpoint; load it with refdiff.sam2_models.load_sam2 "
                             "(--sam, RefDiff.from_pretrained(sam=...) and the RefDiff SAM Loader node detect "
                             "either kind)")
    try:
        return sam_config_from_state_dict(state_dict)
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as exc:
        raise ModelLoadError(f"{source} is not a SAM (segment-anything) checkpoint: missing or odd key {exc}; "
                             "give a sam_vit_h/l/b checkpoint; " + _where_to_get(None)) from None


def _materialise(config: SamConfig, state_dict: dict[str, torch.Tensor], source: str) -> "Sam":
    """Build the model on the meta device and adopt the checkpoint's tensors (no random init, one copy)."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    with torch.device("meta"):
        sam = build_sam(config)
    try:
        sam.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{source}: weights do not fit the SAM architecture they describe ({exc})") from None
    if any(t.is_meta for t in list(sam.parameters()) + list(sam.buffers())):  # a tensor the file lacks
        sam = build_sam(config)
        sam.load_state_dict(state, strict=True)
    return sam.eval()


def load_sam(checkpoint: str | Path | None = None, model_type: str | None = None,
             device: str | torch.device | None = None) -> "Sam":
    """Load a SAM checkpoint (vit_h/l/b, or any SAM architecture; .pth or .safetensors) as a float32 model.

    The architecture is read from the weights; ``model_type``, when given, must agree with it.
    ``checkpoint=None`` uses the official ``model_type`` (default vit_h) checkpoint from sam_cache_dir(),
    downloading it there once.
    """
    wanted = canonical_model_type(model_type) if model_type is not None else None
    if checkpoint is None:
        path = _download_default(wanted or DEFAULT_MODEL_TYPE)
    else:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            hint = wanted or model_type_from_name(path)
            raise ModelLoadError(f"SAM checkpoint {str(path)!r} does not exist or is not a file; "
                                 + _where_to_get(hint))
    state = _read_state_dict(path)
    config = _config_or_error(state, f"SAM checkpoint {str(path)!r}")
    found = official_model_type(config)
    if wanted is not None and found != wanted:
        raise ModelLoadError(f"SAM checkpoint {str(path)!r} holds a {found or 'non-standard SAM'} model, not the "
                             f"{wanted} that was asked for; pick the matching model type or checkpoint")
    sam = _materialise(config, state, f"SAM checkpoint {str(path)!r}")
    return sam.to(parse_device(device)) if device is not None else sam


__all__ = ["SAM_CHECKPOINT_URLS", "SAM_CHECKPOINT_FILES", "SAM_CONFIGS", "SamConfig", "load_sam", "build_sam",
           "sam_config_from_state_dict", "infer_model_type", "official_model_type", "canonical_model_type",
           "model_type_from_name", "sam_cache_dir", "checkpoint_urls"]
