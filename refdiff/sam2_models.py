"""SAM 2 / SAM 2.1 as a proposal backend: loading checkpoints safely (architecture read from the weights, built
through the ``sam2`` package's own hydra configs), the automatic mask generator at a preset's settings and an
image predictor (``set_image`` / ``predict``, SamPredictor's interface) for prompted proposals.
"""
from __future__ import annotations

import json
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from .devices import parse_device
from .errors import DependencyError, InputError, ModelLoadError

if TYPE_CHECKING:
    from sam2.modeling.sam2_base import SAM2Base

# Hiera trunk (embedding width, blocks per stage) of each official size: these two are in the weights' shapes.
SAM2_TRUNKS: dict[str, tuple[int, tuple[int, ...]]] = {
    "tiny": (96, (1, 2, 7, 2)), "small": (96, (1, 2, 11, 2)),
    "base_plus": (112, (2, 3, 16, 3)), "large": (144, (2, 6, 36, 4)),
}
_CONFIG_SUFFIX = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}
# Keys only SAM 2.1 has (no_obj_embed_spatial=true, proj_tpos_enc_in_obj_ptrs=true in its configs).
SAM21_KEYS = ("no_obj_embed_spatial", "obj_ptr_tpos_proj.weight")
METADATA_KEY = "refdiff.sam2_overrides"  # safetensors metadata: hydra overrides of a non-official size (JSON)
# What sam2.build_sam.build_sam2 adds by default (apply_postprocessing=True).
POSTPROCESSING = ("++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
                  "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
                  "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98")
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Sam2Arch:
    """A SAM 2 architecture: version ("2" or "2.1"), official size (or "custom") and hydra overrides."""

    version: str
    size: str
    overrides: tuple[str, ...] = ()

    @property
    def config(self) -> str:
        """The sam2 package's config file (a custom size starts from the tiny one of its version)."""
        suffix = _CONFIG_SUFFIX.get(self.size, "t")
        return f"configs/sam{self.version}/sam{self.version}_hiera_{suffix}.yaml"

    @property
    def name(self) -> str:
        return f"sam{self.version}_hiera_{self.size}"


def _sam2():
    try:
        import sam2  # noqa: F401  (initialises hydra with the package's configs)
        from sam2.build_sam import build_sam2
    except ImportError as exc:
        raise DependencyError("SAM 2 checkpoints need the 'sam2' package: SAM2_BUILD_CUDA=0 pip install sam2 "
                              "hydra-core iopath (no GPU toolchain needed)") from exc
    return build_sam2


def is_sam2_state_dict(state: Mapping[str, Any]) -> bool:
    """Whether a state dict has SAM 2's layout (Hiera trunk, sam_mask_decoder)."""
    return "image_encoder.trunk.patch_embed.proj.weight" in state and any(k.startswith("sam_mask_decoder.")
                                                                          for k in state)


def is_sam1_state_dict(state: Mapping[str, Any]) -> bool:
    """Whether a state dict has segment-anything's (SAM v1) layout."""
    return "image_encoder.patch_embed.proj.weight" in state and any(k.startswith("mask_decoder.") for k in state)


def is_sam2_model(model: Any) -> bool:
    """Whether ``model`` is a sam2 SAM2Base (without importing sam2 when it is not installed)."""
    return any(c.__module__.startswith("sam2.") and c.__name__ == "SAM2Base" for c in type(model).__mro__)


def sam2_arch_from_state_dict(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                              source: str = "state dict") -> Sam2Arch:
    """Read version and size from the weights (trunk width, blocks per stage, 2.1-only keys); a non-official
    size needs its hydra overrides in the file's metadata (``METADATA_KEY``). ModelLoadError otherwise."""
    from .sam3_models import SAM3_REFUSAL, is_sam3_state_dict

    if is_sam3_state_dict(state):
        raise ModelLoadError(f"{source} {SAM3_REFUSAL}")
    if not is_sam2_state_dict(state):
        if is_sam1_state_dict(state):
            raise ModelLoadError(f"{source} is a SAM (v1, segment-anything) checkpoint, not SAM 2; load it with "
                                 "refdiff.sam.load_sam (--sam, RefDiff.from_pretrained(sam=...) and the RefDiff SAM "
                                 "Loader node detect either kind)")
        raise ModelLoadError(f"{source} is not a SAM 2 checkpoint (no image_encoder.trunk / sam_mask_decoder "
                             "weights); give a sam2.1_hiera_tiny/small/base_plus/large .pt or .safetensors file")
    width = state["image_encoder.trunk.patch_embed.proj.weight"].shape[0]
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.trunk\.blocks\.(\d+)\.", k))}
    starts = [i for i in sorted(blocks) if f"image_encoder.trunk.blocks.{i}.proj.weight" in state]
    bounds = [0, *starts, max(blocks) + 1]
    stages = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    version = "2.1" if all(k in state for k in SAM21_KEYS) else "2"
    for size, trunk in SAM2_TRUNKS.items():
        if trunk == (width, stages):
            return Sam2Arch(version, size)
    raw = (metadata or {}).get(METADATA_KEY)
    if raw:
        return Sam2Arch(version, "custom", tuple(json.loads(raw)))
    raise ModelLoadError(f"{source}: a SAM 2 Hiera trunk of width {width} with stages {list(stages)} is none of "
                         f"the official sizes {sorted(SAM2_TRUNKS)}; give an official SAM 2 / 2.1 checkpoint")


def build_sam2_model(arch: Sam2Arch) -> "SAM2Base":
    """A randomly initialised SAM 2 of ``arch``, built by sam2.build_sam.build_sam2 from its shipped configs."""
    build = _sam2()
    with torch.random.fork_rng(devices=[]):
        return build(arch.config, None, device="cpu", mode="eval",
                     hydra_overrides_extra=list(arch.overrides)).eval()


def read_weight_file(path: Path, label: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors or torch file (weights_only), unwrapping {"model": ...} and
    "module."; ``label`` ("SAM 2 checkpoint") names the file in the errors."""
    metadata: dict[str, str] = {}
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{label} {str(path)!r} could not be read as weights ({exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{label} {str(path)!r} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}, metadata


def read_sam2_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a SAM 2 .safetensors or torch file (``read_weight_file``)."""
    return read_weight_file(path, "SAM 2 checkpoint")


def load_sam2(checkpoint: str | Path, device: str | torch.device | None = None) -> "SAM2Base":
    """Load a SAM 2 / 2.1 checkpoint (official .pt, or the .safetensors of models/sam2) as a float32 model;
    the architecture is read from the weights and every weight must fit it (strict)."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"SAM 2 checkpoint {str(path)!r} does not exist or is not a file (ComfyUI users: "
                             "put sam2.1_hiera_*.safetensors in ComfyUI/models/sam2)")
    state, metadata = read_sam2_file(path)
    arch = sam2_arch_from_state_dict(state, metadata, f"SAM 2 checkpoint {str(path)!r}")
    model = build_sam2_model(arch)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"SAM 2 checkpoint {str(path)!r}: weights do not fit the {arch.name} architecture "
                             f"they describe ({exc})") from None
    model.refdiff_arch = arch  # what was loaded, for handles and messages
    return model.to(parse_device(device)) if device is not None else model


def network_precision(model: torch.nn.Module) -> AbstractContextManager:
    """Autocast to the model's dtype when its weights are fp16/bf16 (sam2 feeds float32 images and prompts)."""
    param = next(model.parameters())
    if param.dtype not in HALF_DTYPES:
        return nullcontext()
    return torch.autocast(device_type=param.device.type, dtype=param.dtype)


def _fit_feature_sizes(predictor: Any) -> None:
    """SAM2ImagePredictor assumes a 1024 px input (feature grids 256, 128, 64): set them from the model."""
    side = predictor.model.image_size
    predictor._bb_feat_sizes = [(side // 4, side // 4), (side // 8, side // 8), (side // 16, side // 16)]


def make_sam2_predictor(model: "SAM2Base", **kwargs: Any) -> Any:
    """sam2's SAM2ImagePredictor (``set_image(rgb)``, ``predict(point_coords=, point_labels=, box=,
    multimask_output=)``) for this model, running under autocast when the weights are half precision."""
    _sam2()
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    class _Predictor(SAM2ImagePredictor):
        def set_image(self, image: Any) -> None:
            with network_precision(self.model):
                super().set_image(image)

        def predict(self, *args: Any, **kw: Any) -> Any:
            with network_precision(self.model):
                return super().predict(*args, **kw)

    predictor = _Predictor(model, **kwargs)
    _fit_feature_sizes(predictor)
    return predictor


def _has_compiled_extension() -> bool:
    try:
        from sam2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def make_sam2_mask_generator(model: "SAM2Base", points_per_side: int = 32, points_per_batch: int = 64,
                             pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                             box_nms_thresh: float = 0.7, crop_n_layers: int = 0, min_mask_region_area: int = 0,
                             chunk_mb: float = 512, **extra: Any) -> Any:
    """SAM2AutomaticMaskGenerator with the preset's settings (the same names as SAM v1's generator), binary
    masks out; ``extra`` takes SAM 2-only options (use_m2m, multimask_output, mask_threshold, ...). Each batch
    of points is decoded in slices whose full-size candidate masks fit in ``chunk_mb`` megabytes."""
    _sam2()
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    from .amg import chunk_size

    mode = extra.pop("output_mode", "binary_mask")
    if mode != "binary_mask":
        raise InputError(f"output_mode must be 'binary_mask' (proposals are dense masks), got {mode!r}")
    if not chunk_mb > 0:
        raise InputError(f"chunk_mb must be > 0 (megabytes of masks upsampled at once), got {chunk_mb}")
    if min_mask_region_area > 0 and not _has_compiled_extension():
        raise DependencyError("min_mask_region_area > 0 with SAM 2 fills holes and removes specks through sam2's "
                              "compiled extension (sam2._C), which this install lacks; set "
                              "sam_min_mask_region_area to 0 or install sam2 with its CUDA extension")

    class _Generator(SAM2AutomaticMaskGenerator):
        def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
            with network_precision(self.predictor.model):
                return super().generate(image)

        def _process_batch(self, points: np.ndarray, im_size: tuple[int, ...], crop_box: list[int],
                           orig_size: tuple[int, ...], normalize: bool = False) -> Any:
            from sam2.utils.amg import MaskData

            per_point = 3 if self.multimask_output else 1
            step = max(1, chunk_size(chunk_mb, self.predictor.model.image_size, *im_size) // per_point)
            data = MaskData()
            for start in range(0, len(points), step):
                data.cat(super()._process_batch(points[start:start + step], im_size, crop_box, orig_size,
                                                normalize=normalize))
            return data

    generator = _Generator(model, points_per_side=points_per_side, points_per_batch=points_per_batch,
                           pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
                           box_nms_thresh=box_nms_thresh, crop_n_layers=crop_n_layers,
                           min_mask_region_area=min_mask_region_area, output_mode="binary_mask", **extra)
    _fit_feature_sizes(generator.predictor)
    return generator


def load_any_sam(checkpoint: str | Path | None, device: str | torch.device | None = None) -> Any:
    """A SAM v1 or SAM 2 model from a checkpoint file, whichever it holds (None: the default SAM vit_h)."""
    from .sam import load_sam

    if checkpoint is None:
        return load_sam(None, device=device)
    path = Path(checkpoint).expanduser()
    if path.is_file() and _holds_sam2(path):
        return load_sam2(path, device=device)
    return load_sam(path, device=device)


def _holds_sam2(path: Path) -> bool:
    """Whether a file's keys are SAM 2's (safetensors: header only; torch files are read, weights_only)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return is_sam2_state_dict(dict.fromkeys(f.keys()))
        except Exception:
            return False
    try:
        state = torch.load(str(path), map_location="meta", weights_only=True)
    except Exception:
        return False
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    return isinstance(state, dict) and is_sam2_state_dict({k.removeprefix("module."): v for k, v in state.items()})


def sam_model_name(model: Any) -> str:
    """'sam2.1_hiera_large' for a loaded SAM 2, else None-safe 'sam2'."""
    arch = getattr(model, "refdiff_arch", None)
    return arch.name if isinstance(arch, Sam2Arch) else "sam2"


__all__ = ["SAM2_TRUNKS", "read_weight_file", "Sam2Arch", "METADATA_KEY", "is_sam2_state_dict", "is_sam1_state_dict", "is_sam2_model",
           "sam2_arch_from_state_dict", "build_sam2_model", "load_sam2", "make_sam2_predictor",
           "make_sam2_mask_generator", "load_any_sam", "network_precision", "sam_model_name"]
