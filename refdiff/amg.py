"""SAM's automatic mask generator with the same output in bounded memory.

segment_anything's generator upsamples every candidate of a point batch (points_per_batch x 3 masks) to 1024 x 1024
and then to the image's own size, in float32, before it filters them: 800 MB per batch of 64 points at any image
size, plus 9 GB for a 12-megapixel photo. ``MemoryBoundedMaskGenerator`` filters by predicted IoU on the 256 x 256
logits first (that score does not depend on the upsampling) and upsamples the survivors a chunk at a time, so the
candidates that would be dropped are never upsampled and a batch holds at most ``chunk_mb`` of full-size masks.
Every step after the mask decoder is segment_anything's own function, applied per mask, so the records are the
stock generator's (tests/test_amg.py compares them).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch

from .errors import DependencyError, InputError

try:
    from segment_anything import SamAutomaticMaskGenerator
    from segment_anything.utils.amg import (MaskData, batched_mask_to_box, calculate_stability_score,
                                            is_box_near_crop_edge, mask_to_rle_pytorch, uncrop_masks)
except ImportError as exc:  # pragma: no cover - exercised only without segment-anything
    raise DependencyError("SAM proposals need the 'segment-anything' package: pip install segment-anything") from exc

DEFAULT_CHUNK_MB = 512
HALF_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)


def postprocess_bytes_per_mask(input_side: int, height: int, width: int) -> int:
    """Peak bytes one candidate needs while it is upsampled and scored: float32 logits at the model's input side
    and at the image size, plus the boolean masks thresholded from them."""
    return 4 * input_side * input_side + 4 * height * width + 3 * height * width


def chunk_size(chunk_mb: float, input_side: int, height: int, width: int) -> int:
    """How many candidates fit in ``chunk_mb`` megabytes of post-processing (at least one)."""
    return max(1, int(chunk_mb * 2 ** 20) // postprocess_bytes_per_mask(input_side, height, width))


class MemoryBoundedMaskGenerator(SamAutomaticMaskGenerator):
    """``SamAutomaticMaskGenerator`` (same arguments, same records) whose per-batch post-processing filters by
    predicted IoU before upsampling and upsamples at most ``chunk_mb`` megabytes of candidates at a time."""

    def __init__(self, *args: Any, chunk_mb: float = DEFAULT_CHUNK_MB, **kwargs: Any) -> None:
        if not chunk_mb > 0:
            raise InputError(f"chunk_mb must be > 0 (megabytes of masks upsampled at once), got {chunk_mb}")
        super().__init__(*args, **kwargs)
        self.chunk_mb = float(chunk_mb)

    def _network_precision(self) -> AbstractContextManager:
        """Autocast to the model's dtype when SAM's weights are fp16/bf16: segment_anything feeds float32 point
        coordinates (its prompt encoder casts them to float) into layers that then hold half weights."""
        param = next(self.predictor.model.parameters())
        if param.dtype not in HALF_DTYPES:
            return nullcontext()
        return torch.autocast(device_type=param.device.type, dtype=param.dtype)

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """The stock generator's records; a half-precision SAM runs its networks under autocast, every step
        after the mask decoder in float32 (logits and predicted IoU are cast up first)."""
        with self._network_precision():
            return super().generate(image)

    @torch.no_grad()
    def _decode(self, points: np.ndarray, im_size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask decoder on one point batch: low-resolution logits [P, 3, 256, 256] and predicted IoU [P, 3]
        (SamPredictor.predict_torch without its upsampling)."""
        predictor, model = self.predictor, self.predictor.model
        coords = torch.as_tensor(predictor.transform.apply_coords(points, im_size), device=predictor.device)
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=coords.device)
        sparse, dense = model.prompt_encoder(points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None)
        low_res, iou_preds = model.mask_decoder(
            image_embeddings=predictor.features, image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True)
        return low_res.float(), iou_preds.float()

    @torch.no_grad()
    def _postprocess_chunk(self, low_res: torch.Tensor, crop_box: list[int], orig_size: tuple[int, ...]) -> MaskData:
        """Upsample candidates [n, 256, 256], keep the stable ones, and return their boxes and RLEs (the stock
        ``_process_batch`` steps after its IoU filter, on a chunk)."""
        predictor, threshold = self.predictor, self.predictor.model.mask_threshold
        orig_h, orig_w = orig_size
        with torch.autocast(device_type=low_res.device.type, enabled=False):  # upsample in float32
            masks = predictor.model.postprocess_masks(low_res[:, None], predictor.input_size,
                                                      predictor.original_size)[:, 0]
        data = MaskData(masks=masks, keep_index=torch.arange(masks.shape[0], device=masks.device))
        data["stability_score"] = calculate_stability_score(masks, threshold, self.stability_score_offset)
        if self.stability_score_thresh > 0.0:
            data.filter(data["stability_score"] >= self.stability_score_thresh)
        data["masks"] = data["masks"] > threshold
        data["boxes"] = batched_mask_to_box(data["masks"])
        keep = ~is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, orig_w, orig_h])
        if not torch.all(keep):
            data.filter(keep)
        data["rles"] = mask_to_rle_pytorch(uncrop_masks(data["masks"], crop_box, orig_h, orig_w))
        del data["masks"]
        return data

    def _process_batch(self, points: np.ndarray, im_size: tuple[int, ...], crop_box: list[int],
                       orig_size: tuple[int, ...]) -> MaskData:
        low_res, iou_preds = self._decode(points, im_size)
        low_res, iou_preds = low_res.flatten(0, 1), iou_preds.flatten(0, 1)
        point_rows = torch.as_tensor(points.repeat(iou_preds.shape[0] // len(points), axis=0))
        if self.pred_iou_thresh > 0.0:
            keep = iou_preds > self.pred_iou_thresh
            low_res, iou_preds, point_rows = low_res[keep], iou_preds[keep], point_rows[keep.cpu()]
        step = chunk_size(self.chunk_mb, self.predictor.model.image_encoder.img_size, *im_size)
        data = MaskData()
        for start in range(0, max(1, low_res.shape[0]), step):
            chunk = self._postprocess_chunk(low_res[start:start + step], crop_box, orig_size)
            index = chunk["keep_index"] + start
            del chunk["keep_index"]
            chunk["iou_preds"] = iou_preds[index]
            chunk["points"] = point_rows[index.cpu()]
            data.cat(chunk)
        return data


__all__ = ["MemoryBoundedMaskGenerator", "DEFAULT_CHUNK_MB", "chunk_size", "postprocess_bytes_per_mask"]
