"""Attention-guided SAM prompts (docs/METHOD.md section 6, "Prompted proposals"; beyond the paper): SAM's
predictor is prompted at the few places the generative map c points to, instead of decoding a 32 x 32 grid.

Prompts come from c alone: its local maxima above ``threshold`` (points, the highest first, at least
``min_distance`` apart, at most ``max_prompts``) and the bounding box of the connected region of
{c >= threshold} around each maximum. The predictor side is written against segment_anything's
``SamPredictor`` interface (``set_image(rgb)``, ``predict(point_coords=, point_labels=, box=,
multimask_output=)`` returning masks, scores and logits), which SAM 2's ``SAM2ImagePredictor`` shares.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, get_args

import numpy as np
import torch
import torch.nn.functional as F

from .config import PromptKind
from .errors import InputError

PROMPT_KINDS: tuple[str, ...] = get_args(PromptKind)
FLAT_EPS = 1e-6  # a map whose range is below this is flat: it points nowhere


class Predictor(Protocol):
    """What the prompted mode needs of a SAM predictor (segment_anything.SamPredictor, SAM2ImagePredictor)."""

    def set_image(self, image: np.ndarray) -> None: ...

    def predict(self, point_coords: np.ndarray | None = None, point_labels: np.ndarray | None = None,
                box: np.ndarray | None = None, multimask_output: bool = True) -> tuple[Any, Any, Any]: ...


@dataclass(frozen=True)
class Prompts:
    """Prompts of one image, in image pixels: ``points`` float32 [K, 2] (x, y), the highest peak first;
    ``boxes`` float32 [K, 4] (x0, y0, x1, y1), the box of each point's region of {c >= threshold};
    ``peaks`` the value of c at each point; ``reason`` why there is no prompt (None when K > 0)."""

    points: torch.Tensor
    boxes: torch.Tensor
    peaks: torch.Tensor
    reason: str | None = None

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def describe(self) -> str:
        """One line for reports: the points and the value of c there, or why there is none."""
        if not len(self):
            return f"no prompt ({self.reason})"
        pts = ", ".join(f"({x:.0f}, {y:.0f}) c={v:.2f}" for (x, y), v in zip(self.points.tolist(), self.peaks.tolist()))
        return f"{len(self)} prompt(s) at {pts}"


def _empty_prompts(reason: str) -> Prompts:
    return Prompts(torch.zeros(0, 2), torch.zeros(0, 4), torch.zeros(0), reason)


def _check_settings(threshold: float, max_prompts: int, min_distance: float, grid: int) -> None:
    if not 0.0 < float(threshold) <= 1.0:
        raise InputError(f"prompt_threshold must be in (0, 1] (c is normalised to [0, 1]), got {threshold}")
    if isinstance(max_prompts, bool) or int(max_prompts) != max_prompts or max_prompts < 1:
        raise InputError(f"prompt_max must be a whole number >= 1, got {max_prompts!r}")
    if not 0.0 <= float(min_distance) < 1.0:
        raise InputError(f"prompt_min_distance must be in [0, 1) (a fraction of the image's longer side), got "
                         f"{min_distance}")
    if isinstance(grid, bool) or int(grid) != grid or grid < 8:
        raise InputError(f"prompt_grid must be a whole number >= 8, got {grid!r}")


def map_prompts(c: torch.Tensor, threshold: float = 0.5, max_prompts: int = 4, min_distance: float = 0.1,
                grid: int = 64) -> Prompts:
    """The prompts the generative map c [H, W] points to (see the module docstring).

    c is searched on a grid whose longer side has ``grid`` cells (area-averaged; c comes from a 16-64 cell
    attention grid, so nothing finer is lost); a point is the centre of its cell. A flat map, or one whose
    maximum is below ``threshold``, gives no prompt and a ``reason``."""
    from scipy import ndimage

    if not isinstance(c, torch.Tensor) or c.dim() != 2 or c.numel() == 0:
        raise InputError(f"generative map: expected a 2-D tensor [H, W], got "
                         f"{tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}")
    if not torch.isfinite(c).all():
        raise InputError("generative map: contains NaN or inf; recompute it from a finite attention map")
    _check_settings(threshold, max_prompts, min_distance, grid)
    height, width = c.shape
    c = c.detach().float().cpu()
    low, high = float(c.min()), float(c.max())
    if high - low < FLAT_EPS:
        return _empty_prompts(f"the generative map is flat (every value {high:.3g}), so it points to no object")
    scale = min(1.0, grid / max(height, width))
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    small = F.adaptive_avg_pool2d(c[None, None], (h, w))[0, 0] if (h, w) != (height, width) else c
    arr = small.numpy().astype(np.float64)
    if arr.max() < threshold:
        return _empty_prompts(f"the generative map's maximum {arr.max():.3f} is below prompt_threshold="
                              f"{threshold:g}, so it points to no object")
    region = arr >= threshold
    labels, _ = ndimage.label(region, structure=np.ones((3, 3), dtype=bool))
    local_max = (arr == ndimage.maximum_filter(arr, size=3, mode="nearest")) & region
    ys, xs = np.nonzero(local_max)
    order = np.argsort(-arr[ys, xs], kind="stable")
    cell_y, cell_x = height / h, width / w
    radius = float(min_distance) * max(height, width)
    chosen: list[tuple[float, float, float, int]] = []
    for k in order:
        x, y = (xs[k] + 0.5) * cell_x, (ys[k] + 0.5) * cell_y
        if any((x - px) ** 2 + (y - py) ** 2 < radius ** 2 for px, py, _, _ in chosen):
            continue
        chosen.append((x, y, float(arr[ys[k], xs[k]]), int(labels[ys[k], xs[k]])))
        if len(chosen) == max_prompts:
            break
    boxes = []
    slices = ndimage.find_objects(labels)
    for _, _, _, label in chosen:
        sy, sx = slices[label - 1]
        boxes.append((sx.start * cell_x, sy.start * cell_y, sx.stop * cell_x, sy.stop * cell_y))
    return Prompts(points=torch.tensor([(x, y) for x, y, _, _ in chosen], dtype=torch.float32),
                   boxes=torch.tensor(boxes, dtype=torch.float32),
                   peaks=torch.tensor([v for _, _, v, _ in chosen], dtype=torch.float32))


def prompt_queries(prompts: Prompts, kind: str = "points+boxes") -> list[dict[str, np.ndarray | None]]:
    """The predictor calls of ``prompts``: per point a positive point alone ("points"), its region's box with
    the point ("boxes"), or both ("points+boxes"); boxes that repeat (two peaks of one region) run once."""
    if kind not in PROMPT_KINDS:
        raise InputError(f"prompt_kind must be one of {list(PROMPT_KINDS)}, got {kind!r}")
    queries: list[dict[str, np.ndarray | None]] = []
    seen_boxes: set[tuple[float, ...]] = set()
    for point, box in zip(prompts.points.numpy(), prompts.boxes.numpy()):
        coords, labels = point[None].astype(np.float32), np.ones(1, dtype=np.int64)
        if kind in ("points", "points+boxes"):
            queries.append({"point_coords": coords, "point_labels": labels, "box": None})
        if kind in ("boxes", "points+boxes"):
            key = tuple(float(v) for v in box)
            if key in seen_boxes:
                continue
            seen_boxes.add(key)
            queries.append({"point_coords": coords if kind == "points+boxes" else None,
                            "point_labels": labels if kind == "points+boxes" else None,
                            "box": box.astype(np.float32)})
    return queries


def mask_nms(masks: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.8
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy non-maximum suppression on masks [N, H, W] (bool) by mask IoU: the highest score first, a mask
    dropped when its IoU with a kept one is above ``iou_threshold``; empty masks are dropped. Returns (kept
    indices in score order, their scores)."""
    if masks.dim() != 3 or masks.dtype != torch.bool or scores.shape != (masks.shape[0],):
        raise InputError(f"mask_nms: expected bool masks [N, H, W] and scores [N], got {masks.dtype} "
                         f"{tuple(masks.shape)} and {tuple(scores.shape)}")
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise InputError(f"prompt_nms_iou must be in [0, 1], got {iou_threshold}")
    flat = masks.flatten(1).float()
    areas = flat.sum(dim=1)
    order = [int(i) for i in torch.sort(scores, descending=True, stable=True).indices if areas[i] > 0]
    if not order:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    inter = flat[order] @ flat[order].T
    union = areas[order][:, None] + areas[order][None, :] - inter
    iou = inter / union.clamp_min(1.0)
    kept: list[int] = []
    for a in range(len(order)):
        if all(float(iou[a, b]) <= iou_threshold for b in kept):
            kept.append(a)
    idx = torch.tensor([order[a] for a in kept], dtype=torch.long)
    return idx, scores[idx]


def predict_prompts(predictor: Predictor, queries: list[dict[str, np.ndarray | None]], height: int, width: int,
                    multimask: bool = True, check: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query through ``predictor.predict`` (its image already set): bool masks [N, H, W] and their
    predicted IoU [N] (3 masks per query with ``multimask``). ``check`` runs before each call (interrupt)."""
    masks, scores = [], []
    for query in queries:
        if check is not None:
            check()
        m, s, _ = predictor.predict(**query, multimask_output=bool(multimask))
        m = torch.as_tensor(np.asarray(m) if not isinstance(m, torch.Tensor) else m).detach().cpu()
        s = torch.as_tensor(np.asarray(s) if not isinstance(s, torch.Tensor) else s).detach().cpu().float()
        if m.dim() == 2:
            m, s = m[None], s.reshape(1)
        if tuple(m.shape[-2:]) != (height, width):
            raise InputError(f"SAM predictor returned masks of size {tuple(m.shape[-2:])} for a {width} x {height} "
                             "image; set_image must be given the image itself")
        masks.append(m > 0.5 if m.dtype != torch.bool else m)  # predictors return bool or thresholded floats
        scores.append(s.reshape(-1))
    if not masks:
        return torch.zeros(0, height, width, dtype=torch.bool), torch.zeros(0)
    return torch.cat(masks), torch.cat(scores)


def prompted_proposals(predictor: Predictor, c: torch.Tensor, height: int, width: int, threshold: float = 0.5,
                       max_prompts: int = 4, min_distance: float = 0.1, grid: int = 64,
                       kind: str = "points+boxes", multimask: bool = True, nms_iou: float = 0.8,
                       min_score: float = 0.0, check: Any = None) -> tuple[torch.Tensor, Prompts]:
    """SAM masks at the prompts c points to: bool [N, H, W] (N may be 0), the best predicted IoU first, masks
    of predicted IoU below ``min_score`` dropped and near-duplicates (mask IoU > ``nms_iou``) suppressed; and
    the prompts (their ``reason`` says why there are none). The predictor's image must already be set."""
    if tuple(c.shape) != (height, width):
        raise InputError(f"generative map: {tuple(c.shape)} does not match the {width} x {height} image; compute c "
                         "at the image's own size (refdiff.maps.generative_map)")
    prompts = map_prompts(c, threshold, max_prompts, min_distance, grid)
    if not len(prompts):
        return torch.zeros(0, height, width, dtype=torch.bool), prompts
    masks, scores = predict_prompts(predictor, prompt_queries(prompts, kind), height, width, multimask, check)
    good = scores >= float(min_score)
    masks, scores = masks[good], scores[good]
    keep, _ = mask_nms(masks, scores, nms_iou)
    return masks[keep], prompts


# -- the thin SAM-specific part ---------------------------------------------------------------------------------
# The attributes set_image fills (segment_anything's SamPredictor, then SAM 2's SAM2ImagePredictor): an image's
# embedding is saved from them and put back, so that the image encoder runs once per image.
_IMAGE_STATE = ("features", "original_size", "input_size", "is_image_set", "orig_h", "orig_w", "input_h",
                "input_w", "_features", "_orig_hw", "_is_image_set", "_is_batch")


def make_predictor(model: Any) -> Predictor:
    """A predictor for ``model``: a segment_anything ``Sam`` gets a ``SamPredictor``; anything that already
    has ``set_image`` and ``predict`` (e.g. SAM 2's ``SAM2ImagePredictor``) is used as it is."""
    if hasattr(model, "set_image") and hasattr(model, "predict"):
        return model
    from .sam2_models import is_sam2_model, make_sam2_predictor

    if is_sam2_model(model):
        return make_sam2_predictor(model)
    if hasattr(model, "image_encoder") and hasattr(model, "mask_decoder") and hasattr(model, "prompt_encoder"):
        from segment_anything import SamPredictor

        return SamPredictor(model)
    raise InputError(f"the prompted proposal mode needs a SAM model or a SAM predictor (set_image / predict), got "
                     f"{type(model).__name__}")


def image_state(predictor: Any) -> dict[str, Any]:
    """What ``set_image`` computed (the image embedding and sizes), on the CPU, to restore with ``restore_image``."""
    def host(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().to("cpu")
        if isinstance(value, dict):
            return {k: host(v) for k, v in value.items()}
        if isinstance(value, list):
            return [host(v) for v in value]
        return value

    return {k: host(v) for k, v in vars(predictor).items() if k in _IMAGE_STATE}


def restore_image(predictor: Any, state: dict[str, Any], device: torch.device | str) -> None:
    """Put a saved image state back into ``predictor``, tensors on ``device`` (the model's)."""
    def there(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, dict):
            return {k: there(v) for k, v in value.items()}
        if isinstance(value, list):
            return [there(v) for v in value]
        return value

    for key, value in state.items():
        setattr(predictor, key, there(value))


def predictor_device(predictor: Any) -> torch.device:
    """The device of the predictor's model."""
    model = getattr(predictor, "model", predictor)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def set_image_cached(predictor: Any, rgb: np.ndarray, cache: Any = None, key: Any = None) -> bool:
    """``predictor.set_image(rgb)``, or, when ``cache`` (anything with ``get(key, make)``) holds ``key``, the
    saved embedding put back instead. Returns True when the image encoder ran."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        desc = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise InputError(f"image: SAM needs an RGB uint8 array [H, W, 3] (refdiff.image.load_image), got {desc}")
    ran = []

    def encode() -> dict[str, Any]:
        ran.append(True)
        with torch.no_grad():
            predictor.set_image(np.ascontiguousarray(rgb))
        return image_state(predictor)

    if cache is None:
        encode()
        return True
    state = cache.get(key, encode)
    if not ran:
        restore_image(predictor, state, predictor_device(predictor))
    return bool(ran)


def image_prompted_proposals(predictor: Predictor, rgb: np.ndarray, c: torch.Tensor, cache: Any = None,
                             key: Any = None, check: Any = None, **settings: Any) -> tuple[torch.Tensor, Prompts]:
    """One image's prompted proposals before the post-filter: its embedding (``set_image_cached``), then
    ``prompted_proposals`` at the image's size with ``settings`` (``config.prompt_kwargs`` of a preset)."""
    set_image_cached(predictor, rgb, cache, key)
    height, width = rgb.shape[:2]
    return prompted_proposals(predictor, c, height, width, check=check, **settings)


def no_prompt_message(prompts: Prompts, threshold: float, min_score: float = 0.0, advice: str | None = None) -> str:
    """Why an image is left without a prompted proposal, and what to change (``advice`` replaces the default,
    which names the Preset fields)."""
    if len(prompts):
        fix = advice or (f"lower prompt_min_score (now {min_score:g}), or use proposal_mode='automatic'")
        return f"SAM returned no usable mask at the {prompts.describe()}, so the mask is empty: {fix}"
    fix = advice or f"lower prompt_threshold (now {threshold:g}), or use proposal_mode='automatic'"
    return f"{prompts.reason}; no SAM prompt, so the mask is empty: {fix}"


__all__ = ["PromptKind", "PROMPT_KINDS", "Predictor", "Prompts", "map_prompts", "prompt_queries", "mask_nms",
           "predict_prompts", "prompted_proposals", "make_predictor", "image_state", "restore_image",
           "set_image_cached", "predictor_device", "image_prompted_proposals", "no_prompt_message", "FLAT_EPS"]
