"""Load Stable Diffusion 1.x / 2.x or SDXL (base) for the generative stage as ``SDComponents``.

Sources: a diffusers folder (``model_index.json``), a Hugging Face hub id, or a single checkpoint file
(``.safetensors`` / ``.ckpt`` in the original LDM key layout, as ComfyUI keeps them in
``models/checkpoints``). Single files load fully offline: their architecture comes from the small diffusers
configuration folders bundled in ``refdiff/configs`` (``sd1``: SD 1.x; ``sd2``: SD 2.x base, 512 px,
epsilon; ``sd2-v``: SD 2.x 768-v, v-prediction; ``sdxl``: SDXL base 1.0) or from a folder passed as ``config=``.

The family is read from the weights (cross-attention context dim 768 -> ``sd1``, 1024 -> ``sd2``; CLIP-L plus
OpenCLIP ViT-bigG text encoders and context 2048 -> ``sdxl``). The SDXL refiner (OpenCLIP-G alone, context
1280, aesthetic-score conditioning) is refused: it was not trained to denoise from high noise levels.
Whether an SD 2.x model predicts epsilon or v cannot be read from its weights: ``sd2`` is assumed unless
the file carries a ``v_pred`` marker key (ComfyUI writes one) or ``config="sd2-v"`` is passed.

Checkpoints are read without executing code: ``safetensors`` or ``torch.load(weights_only=True)``; the
weights are converted by diffusers' LDM-to-diffusers key mappings and loaded strictly (a missing weight is
an error, never a silently random layer).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from .devices import resolve_device, resolve_dtype
from .errors import InputError, ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    from .diffusion import SDComponents
    from .dit import FluxComponents

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
BUNDLED_CONFIGS: tuple[str, ...] = ("sd1", "sd2", "sd2-v", "sdxl")
CHECKPOINT_SUFFIXES: tuple[str, ...] = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: OpenAI CLIP ViT-L/14 (transformers layout)
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."  # SDXL: OpenAI CLIP ViT-L/14 (transformers layout)
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."  # SDXL: OpenCLIP ViT-bigG/14
SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."  # SDXL refiner: OpenCLIP ViT-bigG/14 alone
CONTEXT_KEY = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
IN_CONV_KEY = UNET_PREFIX + "input_blocks.0.0.weight"
V_PRED_KEY = "v_pred"  # marker key ComfyUI saves in v-prediction checkpoints
FAMILY_CONTEXT_DIM: dict[str, int] = {"sd1": 768, "sd2": 1024, "sdxl": 2048}
SD2_PAD_TOKEN = "!"  # OpenCLIP pads with id 0 ("!"), and SD 2.x was trained so
HUB_FILES: tuple[str, ...] = (
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors")
_CONFIG_FILES: tuple[str, ...] = ("unet/config.json", "vae/config.json", "text_encoder/config.json",
                                  "scheduler/scheduler_config.json")
# Markers of model families this loader does not support, checked in order: (key substring, family name).
_UNSUPPORTED_MARKERS: tuple[tuple[str, str], ...] = (
    (SDXL_REFINER_PREFIX, "SDXL refiner"),
    ("joint_blocks.", "SD3 / SD3.5"),
    ("double_blocks.", "Flux"),
    ("control_model.", "ControlNet"),
    ("clip_txt_mapper.", "Stable Cascade"),
)
_IN_CHANNEL_FAMILIES: dict[int, str] = {9: "SD inpainting", 8: "InstructPix2Pix", 7: "SD x4 upscaler"}
_FAMILY_NAMES: dict[str, str] = {"sd1": "SD 1.x (CLIP ViT-L/14)", "sd2": "SD 2.x (OpenCLIP ViT-H/14)",
                                 "sdxl": "SDXL (CLIP ViT-L/14 + OpenCLIP ViT-bigG/14)"}
_SUPPORTED_NOTE = ("refdiff supports Stable Diffusion 1.x, 2.x and SDXL base checkpoints (UNet + VAE + text "
                   "encoders); the SDXL refiner is not supported, use the SDXL base model")


# ------------------------------------------------------------------------------------------ entry point
def load_sd(source: str | Path | None = None, *, device: str | torch.device | None = None,
            dtype: str | torch.dtype | None = None, config: str | Path | None = None,
            local_files_only: bool | None = None, vae: str | Path | None = None) -> "SDComponents | FluxComponents":
    """Load SD 1.x/2.x or SDXL from a diffusers folder, a hub id (default: SD 1.5) or a single checkpoint file;
    a local diffusers Flux.1 folder loads as ``refdiff.dit.FluxComponents`` (offline, strict).

    ``config`` (single files only): "sd1", "sd2", "sd2-v", "sdxl" or a diffusers-layout folder describing the
    model; by default the bundled configuration of the detected family. ``vae`` replaces the model's VAE (a
    diffusers VAE folder or a .safetensors file, e.g. an fp16-safe SDXL VAE). Models come back in eval mode,
    frozen. SDXL's own VAE overflows in fp16, so with it fp16 models encode images in float32.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    _check_config_arg(config)
    src = DEFAULT_SOURCE if source is None else source
    if not isinstance(src, (str, os.PathLike)) or not str(src).strip():
        raise InputError(f"source must be a file, a folder or a hub id, got {source!r}")
    path = Path(src).expanduser()
    if path.is_file():
        parts = load_single_file(path, config=config, dtype=dt)
    elif path.is_dir():
        _reject_config(config, path)
        if _is_transformer_folder(path):
            return _load_dit_folder(path, dev, dt, vae)
        parts = load_diffusers_folder(path, dtype=dt)
    elif looks_like_hub_id(str(src)):
        _reject_config(config, str(src))
        parts = load_from_hub(str(src), dtype=dt, local_files_only=local_files_only)
    else:
        raise ModelLoadError(f"Stable Diffusion model {str(path)!r} does not exist: pass an existing "
                             ".safetensors/.ckpt file, a diffusers folder (with model_index.json) or a hub id "
                             "such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'")
    if vae is not None:
        parts.vae = load_vae(vae, like=parts.vae, dtype=dt)
    return _finish(parts, dev, dt, upcast_vae=vae is None)


def _is_transformer_folder(path: Path) -> bool:
    """Whether a diffusers folder's model_index.json lists a transformer (Flux, SD 3, PixArt, ...)."""
    index = path / "model_index.json"
    try:
        return index.is_file() and "transformer" in json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # load_diffusers_folder reports the unreadable file


def _load_dit_folder(path: Path, device: torch.device, dtype: torch.dtype, vae: str | Path | None) -> Any:
    """A diffusers Flux.1 or SD 3 folder (refdiff.dit); any other transformer folder is refused."""
    from .dit import load_dit_folder

    if vae is not None:
        raise InputError(f"vae={str(vae)!r} replaces the VAE of SD 1.x / 2.x / SDXL models; {path} is a diffusion "
                         "transformer folder that carries its own: leave vae unset")
    return load_dit_folder(path, device=device, dtype=dtype)


def looks_like_hub_id(text: str) -> bool:
    """True for "org/name" strings that are not a path (no leading ./ or /, no checkpoint suffix)."""
    text = text.strip()
    if text.lower().endswith(CHECKPOINT_SUFFIXES) or text.startswith((".", "/", "~", "\\")):
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is not None


def _check_config_arg(config: str | Path | None) -> None:
    """Fail fast (before reading a large file) on a config that is neither a bundled name nor a folder."""
    if config is None:
        return
    if not isinstance(config, (str, os.PathLike)):
        raise InputError(f"config must be one of {', '.join(BUNDLED_CONFIGS)} or a folder, got {config!r}")
    if str(config).strip().lower() not in BUNDLED_CONFIGS and not Path(config).expanduser().is_dir():
        raise InputError(f"config {str(config)!r} is neither one of {', '.join(BUNDLED_CONFIGS)} nor an existing "
                         "diffusers-layout configuration folder")


def _reject_config(config: str | Path | None, source: object) -> None:
    if config is not None:
        raise InputError(f"config={config!r} applies to single-file checkpoints only; {source} carries its "
                         "own configuration: leave config unset")


def _finish(parts: Any, device: torch.device, dtype: torch.dtype, upcast_vae: bool = True) -> "SDComponents":
    """Move the models to device/dtype, freeze them, and bundle them as SDComponents (SDXL with its own VAE:
    fp16 images are encoded in float32, ``upcast_vae``)."""
    from .diffusion import SDComponents

    models = [parts.unet, parts.vae, parts.text_encoder] + [m for m in (getattr(parts, "text_encoder_2", None),)
                                                            if m is not None]
    for model in models:
        if any(p.dtype != dtype for p in model.parameters()):
            model.to(dtype=dtype)  # (diffusers warns on every dtype cast, so cast only when needed)
        model.to(device=device)
        model.eval()
        model.requires_grad_(False)
    limit = int(getattr(parts.text_encoder.config, "max_position_embeddings", 77))
    if getattr(parts.tokenizer, "model_max_length", limit) > limit:
        parts.tokenizer.model_max_length = limit  # tokenizers saved without it report 1e30
    tok2 = getattr(parts, "tokenizer_2", None)
    if tok2 is not None and getattr(tok2, "model_max_length", limit) > limit:
        tok2.model_max_length = limit
    sd = SDComponents.from_pipeline(parts)
    if sd.is_sdxl and (sd.text_encoder_2 is None or sd.tokenizer_2 is None):
        raise ModelLoadError(f"the SDXL model lacks its second text encoder or tokenizer; {_SUPPORTED_NOTE}")
    sd.upcast_vae = bool(upcast_vae and sd.is_sdxl)
    return sd


# ---------------------------------------------------------------------------------- folders and hub
def load_diffusers_folder(folder: str | Path, *, dtype: torch.dtype = torch.float32) -> Any:
    """Load the components of a local diffusers Stable Diffusion folder (no network, no safety checker)."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{folder} is not a diffusers model folder (no model_index.json): pass a folder "
                             "saved by diffusers' save_pretrained, or a single .safetensors/.ckpt checkpoint")
    try:
        listing = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {index}: {exc}") from exc
    _check_pipeline_listing(listing, str(folder))
    try:
        return _from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    except ModelLoadError:
        raise
    except Exception as exc:  # missing or broken component files
        raise ModelLoadError(f"cannot load the diffusers folder {folder} ({type(exc).__name__}: {exc}); it "
                             "needs unet/, vae/, text_encoder/, tokenizer/ and scheduler/ with their weights "
                             "and configs") from exc


def load_from_hub(repo_id: str, *, dtype: torch.dtype = torch.float32,
                  local_files_only: bool | None = None) -> Any:
    """Load a Stable Diffusion repository from the Hugging Face hub (downloaded once into its cache)."""
    try:
        return _from_pretrained(repo_id, dtype=dtype, local_files_only=local_files_only)
    except ModelLoadError:
        raise
    except Exception as exc:  # network, cache and repository errors of huggingface_hub / diffusers
        raise ModelLoadError(
            f"cannot load Stable Diffusion {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            f"Without a network here, on a machine with one run `hf download {repo_id} {' '.join(HUB_FILES)} "
            "--local-dir DIR` (older huggingface_hub: `huggingface-cli download`), copy DIR here and pass that "
            "local folder instead; or pass a single checkpoint file such as ComfyUI's "
            "models/checkpoints/v1-5-pruned-emaonly.safetensors") from exc


def _check_pipeline_listing(listing: Mapping[str, Any], name: str) -> None:
    """Refuse diffusers folders of other families (SDXL refiner, SD3, Flux, ...) with a clear message."""
    cls = str(listing.get("_class_name", "?"))
    if "transformer" in listing or "prior" in listing:
        from .dit import SUPPORTED_DIT_NOTE

        raise ModelLoadError(f"{name} holds a {cls} model; {_SUPPORTED_NOTE}; {SUPPORTED_DIT_NOTE} (a local "
                             "folder, not a hub id)")
    if listing.get("requires_aesthetics_score") or ("text_encoder_2" in listing
                                                    and _is_null(listing.get("text_encoder"))):
        raise ModelLoadError(f"{name} holds an SDXL refiner ({cls}: no CLIP-L text encoder, aesthetic-score "
                             f"conditioning); {_SUPPORTED_NOTE}")
    needed = ("unet", "vae", "text_encoder", "tokenizer", "scheduler") + (
        ("text_encoder_2", "tokenizer_2") if _is_sdxl_listing(listing) else ())
    missing = [k for k in needed if k not in listing or _is_null(listing.get(k))]
    if missing:
        raise ModelLoadError(f"{name} ({cls}) lacks the components {missing}; {_SUPPORTED_NOTE}")


def _is_null(entry: Any) -> bool:
    """Whether a model_index.json component entry is absent ([null, null])."""
    return isinstance(entry, (list, tuple)) and all(e is None for e in entry)


def _is_sdxl_listing(listing: Mapping[str, Any]) -> bool:
    """Whether a model_index.json lists SDXL's second text encoder."""
    return "text_encoder_2" in listing and not _is_null(listing.get("text_encoder_2"))


def _pipeline_listing(name: str, local_files_only: bool | None) -> Mapping[str, Any]:
    """The model_index.json of a folder or hub repository (fetched alone for a hub id)."""
    from diffusers import DiffusionPipeline

    kwargs = {} if local_files_only is None else {"local_files_only": bool(local_files_only)}
    return DiffusionPipeline.load_config(name, **kwargs)


def _from_pretrained(name: str, *, dtype: torch.dtype, local_files_only: bool | None) -> Any:
    """StableDiffusionPipeline (or StableDiffusionXLPipeline) .from_pretrained without safety checker,
    feature extractor or watermarker."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    listing = _pipeline_listing(name, local_files_only)
    _check_pipeline_listing(listing, name)
    if _is_sdxl_listing(listing):
        cls: Any = StableDiffusionXLPipeline
        kwargs: dict[str, Any] = {"torch_dtype": dtype, "add_watermarker": False, "image_encoder": None,
                                  "feature_extractor": None}
    else:
        cls = StableDiffusionPipeline
        kwargs = {"torch_dtype": dtype, "safety_checker": None, "feature_extractor": None,
                  "requires_safety_checker": False}
    if local_files_only is not None:
        kwargs["local_files_only"] = bool(local_files_only)
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older ones lack dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = cls.from_pretrained(name, **kwargs)
    if int(pipe.unet.config.in_channels) != 4:
        family = _IN_CHANNEL_FAMILIES.get(int(pipe.unet.config.in_channels), "an unknown family")
        raise ModelLoadError(f"{name} is {family} (UNet input channels {pipe.unet.config.in_channels}); "
                             f"{_SUPPORTED_NOTE}")
    return pipe


# ----------------------------------------------------------------------------------------- single files
def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors / .ckpt state dict without executing code (torch.load(weights_only=True)).

    Nested ``state_dict`` entries (Lightning checkpoints) are unwrapped; non-tensor entries are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise ModelLoadError(f"{path} is not a checkpoint file: expected one of {', '.join(CHECKPOINT_SUFFIXES)} "
                             "(a Stable Diffusion 1.x/2.x checkpoint) or a diffusers folder")
    state = _read_safetensors(path) if suffix == ".safetensors" else _read_torch(path)
    while isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ModelLoadError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelLoadError(f"{path} holds no tensors: expected a Stable Diffusion checkpoint")
    return tensors


def _read_safetensors(path: Path) -> Mapping[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path} is not a readable .safetensors file (corrupted, truncated or of "
                             f"another kind: {exc}); expected a Stable Diffusion checkpoint") from exc


def _read_torch(path: Path) -> Any:
    mmap = zipfile.is_zipfile(path)  # only the zip format (torch >= 1.6) can be memory-mapped
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "unsupported global" not in text.lower() and "unsupported class" not in text.lower():
            found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
            reason = (found.group(1) if found else text.splitlines()[0])[:200]
            raise ModelLoadError(f"{path} is not a readable PyTorch checkpoint (corrupted, truncated or of "
                                 f"another kind: {reason}); expected a Stable Diffusion .ckpt") from exc
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        raise ModelLoadError(
            f"{path} contains Python objects besides tensors{what}, which are refused because loading them "
            "could run code; convert it to .safetensors with a trusted tool, or use the .safetensors release "
            "of the model") from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError, ValueError, ... for foreign bytes
        raise ModelLoadError(f"{path} is not a readable PyTorch checkpoint (corrupted, truncated or of another "
                             f"kind: {type(exc).__name__}: {exc}); expected a Stable Diffusion .ckpt") from exc


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in (value.shape if hasattr(value, "shape") else value))


def context_dim(state: Mapping[str, Any]) -> int | None:
    """Cross-attention context dim of an LDM UNet (key dim of the first attn2.to_k), None without one."""
    if CONTEXT_KEY in state:
        return _shape(state[CONTEXT_KEY])[-1]
    keys = sorted(k for k in state if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"))
    return _shape(state[keys[0]])[-1] if keys else None


def detect_family(state: Mapping[str, Any], *, name: str = "checkpoint") -> str:
    """Family of an LDM-layout state dict: "sd1", "sd2" or "sd2-v" (v_pred marker); others raise ModelLoadError.

    Values may be tensors (meta ones too) or shapes. Context dim 768 means SD 1.x (CLIP ViT-L text encoder),
    1024 SD 2.x (OpenCLIP ViT-H); other dims follow the text encoder's layout (for ``config=`` folders).
    """
    keys = list(state)
    for marker, family in _UNSUPPORTED_MARKERS:
        if any(marker in k for k in keys):
            raise ModelLoadError(f"{name} is a {family} checkpoint; {_SUPPORTED_NOTE}")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        kind = ("a diffusers-layout component (UNet or VAE alone)" if any(k.startswith(("down_blocks.", "encoder."))
                for k in keys) else "not a Stable Diffusion checkpoint")
        raise ModelLoadError(f"{name} is {kind}: no '{UNET_PREFIX}*' weights (first keys: {sorted(keys)[:3]}); "
                             f"{_SUPPORTED_NOTE}")
    in_channels = _shape(state[IN_CONV_KEY])[1] if IN_CONV_KEY in state else 4
    if in_channels != 4:
        family = _IN_CHANNEL_FAMILIES.get(in_channels, f"a UNet with {in_channels} input channels")
        raise ModelLoadError(f"{name} is {family} (UNet input channels {in_channels}); {_SUPPORTED_NOTE}")
    missing = [part for part, prefix in (("VAE", (VAE_PREFIX,)), ("text encoder", ("cond_stage_model.", "conditioner.")))
               if not any(k.startswith(prefix) for k in keys)]
    if missing:
        raise ModelLoadError(f"{name} has no {' and no '.join(missing)} weights (a UNet-only file?): "
                             f"{_SUPPORTED_NOTE}; use the full checkpoint from models/checkpoints")
    dim = context_dim(state)
    layout = "sd2" if any(k.startswith(OPEN_CLIP_PREFIX) for k in keys) else (
        "sd1" if any(k.startswith(CLIP_PREFIX) for k in keys) else None)
    if any(k.startswith(SDXL_CLIP_G_PREFIX) for k in keys):
        if not any(k.startswith(SDXL_CLIP_L_PREFIX) for k in keys):
            raise ModelLoadError(f"{name} has SDXL's OpenCLIP-G text encoder but no CLIP-L "
                                 f"({SDXL_CLIP_L_PREFIX}*): an incomplete SDXL checkpoint; {_SUPPORTED_NOTE}")
        layout = "sdxl"
    by_dim = {v: k for k, v in FAMILY_CONTEXT_DIM.items()}.get(dim) if dim is not None else None
    if layout is None:
        raise ModelLoadError(f"{name}: unknown text encoder layout (neither {CLIP_PREFIX}*, {OPEN_CLIP_PREFIX}* "
                             f"nor {SDXL_CLIP_G_PREFIX}*); {_SUPPORTED_NOTE}")
    if by_dim is not None and by_dim != layout:
        raise ModelLoadError(f"{name} has the text encoder of {_FAMILY_NAMES[layout]} but a UNet of context dim "
                             f"{dim} (that of {_FAMILY_NAMES[by_dim]}): an unknown mix; {_SUPPORTED_NOTE}")
    if layout == "sd2" and V_PRED_KEY in state:
        return "sd2-v"
    return layout


def bundled_config(name: str) -> Path:
    """Folder of a bundled diffusers-layout configuration: "sd1", "sd2", "sd2-v" or "sdxl"."""
    key = str(name).strip().lower()
    if key not in BUNDLED_CONFIGS:
        raise InputError(f"unknown config {name!r}: use one of {', '.join(BUNDLED_CONFIGS)} or a diffusers "
                         "folder describing the model")
    return CONFIG_DIR / key


def resolve_config(state: Mapping[str, Any], config: str | Path | None = None, *,
                   name: str = "checkpoint") -> tuple[Path, str]:
    """(configuration folder, family) for a single-file state dict; bundled by default, checked against it."""
    family = detect_family(state, name=name)
    if config is not None and not isinstance(config, (str, os.PathLike)):
        raise InputError(f"config must be one of {', '.join(BUNDLED_CONFIGS)} or a folder, got {config!r}")
    if config is not None and Path(config).expanduser().is_dir():
        folder = Path(config).expanduser()
        missing = [f for f in _CONFIG_FILES + (("text_encoder_2/config.json",) if family == "sdxl" else ())
                   if not (folder / f).is_file()]
        if missing:
            raise ModelLoadError(f"config folder {folder} lacks {missing}: pass a diffusers-layout folder "
                                 "(model_index.json, unet/, vae/, text_encoder/, scheduler/ configs)")
        return folder, family
    if config is not None:
        key = str(config).strip().lower()
        if key not in BUNDLED_CONFIGS and (os.sep in str(config) or "/" in str(config)):
            raise ModelLoadError(f"config folder {str(config)!r} does not exist")
        folder = bundled_config(key)
        if key.split("-")[0] != family.split("-")[0]:
            fits = "'sd2' or 'sd2-v'" if family.startswith("sd2") else f"'{family}'"
            raise ModelLoadError(f"{name} is a {family} checkpoint but config={config!r} was given; use {fits}")
        family = key
    else:
        folder = bundled_config(family)
        if family == "sd2":
            warnings.warn(f"{name}: SD 2.x checkpoint, assumed epsilon prediction (512 px base model); for a "
                          "768-v model pass config='sd2-v'", stacklevel=3)
    dim, want = context_dim(state), FAMILY_CONTEXT_DIM[family.split("-")[0]]
    if dim != want:
        raise ModelLoadError(f"{name} has cross-attention context dim {dim}, the bundled {family} configuration "
                             f"expects {want}: pass config=<diffusers folder> describing this model")
    return folder, family


def load_single_file(path: str | Path, *, config: str | Path | None = None,
                     dtype: torch.dtype = torch.float32) -> SimpleNamespace:
    """Build UNet, VAE, text encoder, tokenizer and scheduler from one LDM-layout checkpoint, offline.

    Returns a pipeline-like namespace (unet, vae, text_encoder, tokenizer, scheduler; SDXL: text_encoder_2,
    tokenizer_2 too) on the CPU.
    """
    path = Path(path)
    state = read_checkpoint(path)
    folder, family = resolve_config(state, config, name=str(path))
    log.info("loading %s as %s with the configuration in %s", path, family, folder)
    unet = _load_unet(state, folder, dtype, str(path))
    vae = _load_vae(state, folder, dtype, str(path))
    if family == "sdxl":
        text_l = _load_clip_l(state, folder / "text_encoder", SDXL_CLIP_L_PREFIX, dtype, str(path))
        text_g = _load_clip_g(state, folder / "text_encoder_2", dtype, str(path))
        del state
        return SimpleNamespace(unet=unet, vae=vae, text_encoder=text_l, text_encoder_2=text_g,
                               tokenizer=_load_tokenizer(folder, "sd1"),
                               tokenizer_2=_load_tokenizer(folder, "sd2", sub="tokenizer_2"),
                               scheduler=_load_scheduler(folder))
    text_encoder = _load_text_encoder(state, folder, family, dtype, str(path))
    del state  # weights the models do not use (EMA copies, ...) are freed here
    return SimpleNamespace(unet=unet, vae=vae, text_encoder=text_encoder,
                           tokenizer=_load_tokenizer(folder, family), scheduler=_load_scheduler(folder))


def _load_unet(state: Mapping[str, torch.Tensor], folder: Path, dtype: torch.dtype, name: str) -> Any:
    """The UNet of folder/unet, filled from the checkpoint's model.diffusion_model.* weights."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = UNet2DConditionModel.load_config(str(folder / "unet"))
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(cfg)
    weights = convert_ldm_unet_checkpoint(state, model.config)
    return _assign_strict(model, weights, dtype, f"{name} (UNet)", folder / "unet")


def _load_vae(state: Mapping[str, torch.Tensor], folder: Path, dtype: torch.dtype, name: str) -> Any:
    """The VAE of folder/vae, filled from the checkpoint's first_stage_model.* weights."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = AutoencoderKL.load_config(str(folder / "vae"))
    with torch.device("meta"):
        model = AutoencoderKL.from_config(cfg)
    vae_state = {k: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    weights = convert_ldm_vae_checkpoint(vae_state, model.config)
    return _assign_strict(model, weights, dtype, f"{name} (VAE)", folder / "vae")


def load_vae(source: str | Path, *, like: Any = None, dtype: torch.dtype = torch.float32) -> Any:
    """An AutoencoderKL replacing a model's VAE: a diffusers VAE folder (config.json + weights, e.g.
    madebyollin/sdxl-vae-fp16-fix) or a .safetensors file in the diffusers or LDM key layout, built with the
    configuration of ``like`` (the model's own VAE)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"vae folder {path} has no config.json: pass a diffusers VAE folder or a "
                                 ".safetensors VAE file")
        try:
            return AutoencoderKL.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
        except Exception as exc:  # missing or broken weight files
            raise ModelLoadError(f"cannot load the VAE folder {path} ({type(exc).__name__}: {exc})") from exc
    if not path.is_file():
        raise ModelLoadError(f"vae {str(path)!r} does not exist: pass a diffusers VAE folder or a .safetensors file")
    if like is None:
        raise InputError("load_vae of a single file needs like= (the VAE whose configuration it shares)")
    state = read_checkpoint(path)
    state = {k.removeprefix(VAE_PREFIX): v for k, v in state.items()}
    with torch.device("meta"):
        model = AutoencoderKL.from_config(like.config)
    if not any(k.startswith("encoder.down_blocks.") for k in state):  # LDM layout (encoder.down.0.block.0...)
        state = convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in state.items()}, model.config)
    return _assign_strict(model, state, dtype, f"{path} (VAE)", path)


def _check_weights(expected: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], name: str,
                   config_folder: Path) -> None:
    """Every weight the configured model needs must be present with its shape; extra weights are logged."""
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ModelLoadError(f"{name} is missing {len(missing)} weight(s) the configuration in {config_folder} "
                             f"needs, e.g. {missing[:3]}: the file is incomplete or of another architecture")
    wrong = [(k, tuple(weights[k].shape), tuple(v.shape)) for k, v in expected.items()
             if tuple(weights[k].shape) != tuple(v.shape)]
    if wrong:
        key, got, want = wrong[0]
        raise ModelLoadError(f"{name}: weight {key} has shape {got}, the configuration in {config_folder} "
                             f"expects {want} ({len(wrong)} mismatches): pass the config= matching this model")
    unexpected = sorted(k for k in set(weights) - set(expected) if not k.endswith("position_ids"))
    if unexpected:
        log.warning("%s: ignoring %d weights the model does not use, e.g. %s", name, len(unexpected), unexpected[:3])


def _assign_strict(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], dtype: torch.dtype,
                   name: str, config_folder: Path) -> torch.nn.Module:
    """Load converted weights into a meta-device model; any missing weight or shape mismatch is an error."""
    expected = model.state_dict()
    _check_weights(expected, weights, name, config_folder)
    model.load_state_dict({k: weights[k].to(dtype) for k in expected}, strict=True, assign=True)
    return model


def _load_text_encoder(state: Mapping[str, torch.Tensor], folder: Path, family: str, dtype: torch.dtype,
                       name: str) -> Any:
    """The CLIPTextModel of folder/text_encoder, from CLIP (SD 1.x) or OpenCLIP (SD 2.x) checkpoint weights."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig.from_pretrained(str(folder / "text_encoder"), local_files_only=True)
    if family.startswith("sd2"):
        text_state = {k: v for k, v in state.items() if k.startswith(OPEN_CLIP_PREFIX)}
        weights = convert_open_clip_checkpoint(SimpleNamespace(config=cfg), text_state, prefix=OPEN_CLIP_PREFIX)
    else:
        weights = convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(CLIP_PREFIX)})
    with torch.device("meta"):
        probe = CLIPTextModel(cfg)
    prefix = "text_model." if hasattr(probe, "text_model") else ""  # transformers >= 5.6 has no text_model level
    weights = {prefix + k.removeprefix("text_model."): v for k, v in weights.items()}
    expected = probe.state_dict()
    _check_weights(expected, weights, f"{name} (text encoder)", folder / "text_encoder")
    weights = {k: weights[k].to(dtype) for k in expected}
    # from_pretrained (not load_state_dict) so that non-persistent buffers such as position_ids are built
    return CLIPTextModel.from_pretrained(None, config=cfg, state_dict=weights)


def _load_clip_l(state: Mapping[str, torch.Tensor], config_dir: Path, prefix: str, dtype: torch.dtype,
                 name: str) -> Any:
    """A CLIPTextModel of config_dir from transformers-layout weights under prefix (SDXL's CLIP-L)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig.from_pretrained(str(config_dir), local_files_only=True)
    weights = convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(prefix)},
                                          remove_prefix=prefix)
    return _text_model(CLIPTextModel, cfg, weights, dtype, f"{name} (CLIP-L text encoder)", config_dir)


def _load_clip_g(state: Mapping[str, torch.Tensor], config_dir: Path, dtype: torch.dtype, name: str) -> Any:
    """A CLIPTextModelWithProjection of config_dir from SDXL's OpenCLIP ViT-bigG weights (with its projection)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig.from_pretrained(str(config_dir), local_files_only=True)
    text_state = {k: v for k, v in state.items() if k.startswith(SDXL_CLIP_G_PREFIX)}
    weights = convert_open_clip_checkpoint(SimpleNamespace(config=cfg), text_state, prefix=SDXL_CLIP_G_PREFIX)
    return _text_model(CLIPTextModelWithProjection, cfg, weights, dtype, f"{name} (OpenCLIP-G text encoder)",
                       config_dir)


def _text_model(cls: Any, cfg: Any, weights: Mapping[str, torch.Tensor], dtype: torch.dtype, name: str,
                config_dir: Path) -> Any:
    """A transformers text model of cfg from converted weights, checked strictly."""
    with torch.device("meta"):
        probe = cls(cfg)
    wrapped = hasattr(probe, "text_model")  # transformers >= 5.6 has no text_model level
    weights = {(("text_model." + k.removeprefix("text_model.")) if wrapped and not k.startswith("text_projection")
                else k.removeprefix("text_model.")): v for k, v in weights.items()}
    expected = probe.state_dict()
    _check_weights(expected, weights, name, config_dir)
    return cls.from_pretrained(None, config=cfg, state_dict={k: weights[k].to(dtype) for k in expected})


def _load_tokenizer(folder: Path, family: str, sub: str = "tokenizer") -> Any:
    """The config folder's own tokenizer/ if it has one, else the offline CLIP BPE (pad "!" for SD 2.x)."""
    from transformers import CLIPTokenizer

    from .tokenizer import MODEL_MAX_LENGTH, clip_tokenizer, clip_tokenizer_folder

    own = folder / sub
    if (own / "vocab.json").is_file() and (own / "merges.txt").is_file():
        try:
            return CLIPTokenizer.from_pretrained(str(own), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the tokenizer in {own}: {exc}") from exc
    if family.startswith("sd2"):
        return CLIPTokenizer.from_pretrained(str(clip_tokenizer_folder()), model_max_length=MODEL_MAX_LENGTH,
                                             pad_token=SD2_PAD_TOKEN, local_files_only=True)
    return clip_tokenizer(MODEL_MAX_LENGTH)


def _load_scheduler(folder: Path) -> Any:
    """The scheduler named in the folder's scheduler config (its betas and prediction type matter)."""
    import diffusers

    sub = folder / "scheduler"
    cfg = json.loads((sub / "scheduler_config.json").read_text(encoding="utf-8"))
    cls = getattr(diffusers, str(cfg.get("_class_name", "DDIMScheduler")), None) or diffusers.DDIMScheduler
    return cls.from_pretrained(str(sub), local_files_only=True)


__all__ = ["load_sd", "read_checkpoint", "detect_family", "context_dim",
           "bundled_config", "resolve_config", "load_single_file", "load_diffusers_folder", "load_from_hub",
           "looks_like_hub_id", "DEFAULT_SOURCE", "BUNDLED_CONFIGS", "CONFIG_DIR"]
