"""Proposals from outside the pack (docs/METHOD.md, "External proposals"): masks made by any segmenter (SAM 2,
SAM 3, GroundingDINO + SAM, a user's drawing) normalised into the bool [N, H, W] proposals the scoring stages take.

One function, ``external_proposals``, reads them for the library (``RefDiff(..., proposals=masks)``), the command
line (``--proposals``, through ``load_proposal_files``) and the nodes (MASK batches and SEGS). The rules:

- bool masks are used as they are; floats (a ComfyUI MASK, probabilities) are inside where ``>= threshold``
  (0.5) and must lie in [0, 1]; integers must be 0/1 or 0/255 (an 8-bit PNG); NaN is refused.
- shapes: [N, H, W], one mask [H, W], or [N, 1, H, W] / [N, H, W, 1] (a singleton channel is dropped).
- size: masks of another size than the image are refused with both shapes named (``resize="error"``), or
  resized with nearest-neighbour interpolation (``resize="nearest"``, with a note) when the aspect ratio
  agrees within 2 %; a mask of another aspect ratio is always refused (it would not line up with the image).
- empty masks (detectors emit an all-zero mask for "nothing found") are left out, with a note naming them;
  ``kept`` maps the proposals back to the caller's indices. No mask left: N = 0 and a note saying why.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .errors import InputError

RESIZE_MODES = ("error", "nearest")
MASK_FILE_SUFFIXES = (".png",)  # the images read from a folder of masks
ARRAY_FILE_SUFFIXES = (".npz", ".npy")
ASPECT_TOLERANCE = 0.02


@dataclass
class ExternalProposals:
    """Normalised external masks: ``masks`` bool [N, H, W] (CPU), ``kept`` the caller's index of each, and the
    notes a run should report (masks left out, masks resized, nothing left)."""

    masks: torch.Tensor
    kept: list[int]
    given: int  # how many masks the caller gave
    notes: list[str] = field(default_factory=list)

    @property
    def empty_reason(self) -> str | None:
        """Why there is no proposal, when there is none."""
        if self.masks.shape[0]:
            return None
        if self.given == 0:
            return "no external proposal was given (an empty mask list), so the mask is empty"
        return (f"all {self.given} external masks are empty, so there is nothing to select and the mask is empty"
                if self.given > 1 else "the only external mask is empty, so the mask is empty")


def _describe(masks: Any) -> str:
    if isinstance(masks, (torch.Tensor, np.ndarray)):
        return f"{str(masks.dtype).replace('torch.', '')} {tuple(masks.shape)}"
    return type(masks).__name__


def _as_tensor(masks: Any, name: str) -> torch.Tensor:
    """A tensor of the masks given as a tensor, an array or a sequence of 2-D masks."""
    if isinstance(masks, torch.Tensor):
        return masks.detach().cpu()
    if isinstance(masks, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(masks))
    if isinstance(masks, (list, tuple)):
        if not masks:
            return torch.zeros(0, 0, 0, dtype=torch.bool)
        parts = [_as_tensor(m, f"{name}[{i}]") for i, m in enumerate(masks)]
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) > 1:
            raise InputError(f"{name}: the masks have different shapes {sorted(shapes)}; give masks of one size "
                             "(the image's)")
        return torch.stack(parts)
    raise InputError(f"{name}: expected masks as a tensor or numpy array [N, H, W] (or a list of [H, W] masks), "
                     f"got {type(masks).__name__}")


def _as_3d(masks: torch.Tensor, name: str) -> torch.Tensor:
    if masks.dim() == 2:
        return masks[None]
    if masks.dim() == 4 and masks.shape[1] == 1:
        return masks[:, 0]
    if masks.dim() == 4 and masks.shape[3] == 1:
        return masks[..., 0]
    if masks.dim() != 3:
        raise InputError(f"{name}: expected masks [N, H, W] (or one mask [H, W]), got {_describe(masks)}")
    return masks


def binarize(masks: torch.Tensor, threshold: float = 0.5, name: str = "proposals") -> torch.Tensor:
    """bool masks of bool, float (``>= threshold``, values in [0, 1]) or 0/1 / 0/255 integer masks."""
    if masks.dtype == torch.bool:
        return masks
    if masks.is_floating_point():
        x = masks.float()
        if torch.isnan(x).any():
            raise InputError(f"{name}: the masks contain NaN; give masks with values in [0, 1]")
        if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
            raise InputError(f"{name}: float masks must lie in [0, 1] (inside where >= {threshold:g}), got values "
                             f"{float(x.min()):g}..{float(x.max()):g}; threshold logits yourself (e.g. > 0) and pass "
                             "bool masks")
        return x >= threshold
    if masks.dtype.is_complex:
        raise InputError(f"{name}: complex masks ({_describe(masks)}) are not masks")
    values = sorted(int(v) for v in torch.unique(masks))
    if not (set(values) <= {0, 1} or (masks.dtype == torch.uint8 and set(values) <= {0, 255})):
        shown = ", ".join(map(str, values[:8])) + (" ..." if len(values) > 8 else "")
        raise InputError(f"{name}: integer masks must hold 0 and 1 (or 0 and 255 for uint8), got values {shown}; "
                         f"give bool masks or floats in [0, 1] (inside where >= {threshold:g})")
    return masks > 0


def _resize(masks: torch.Tensor, height: int, width: int, resize: str, name: str) -> tuple[torch.Tensor, str | None]:
    n, h, w = masks.shape
    if (h, w) == (height, width):
        return masks, None
    shape = f"{name}: the masks are {w} x {h} (W x H, shape {tuple(masks.shape)}) but the image is {width} x {height}"
    if h == 0 or w == 0 or abs((h / w) / (height / width) - 1) > ASPECT_TOLERANCE:
        raise InputError(f"{shape}, another aspect ratio: they do not line up with this image; give the masks "
                         f"of this image at its size [N, {height}, {width}]")
    if resize == "error":
        raise InputError(f"{shape}; give masks [N, {height}, {width}], or allow nearest-neighbour resizing "
                         "(resize='nearest', --proposals-resize nearest, the node's resize input)")
    if n == 0:
        return torch.zeros(0, height, width, dtype=torch.bool), None
    out = torch.nn.functional.interpolate(masks[None].float(), size=(height, width), mode="nearest")[0] > 0.5
    return out, f"the {n} external masks were resized from {w} x {h} to {width} x {height} (nearest)"


def external_proposals(masks: Any, height: int, width: int, resize: str = "error", threshold: float = 0.5,
                       name: str = "proposals") -> ExternalProposals:
    """Normalise masks from outside the pack into proposals of a ``height`` x ``width`` image (see the module's
    rules): bool [N, H, W] on the CPU, empty masks left out (named in ``notes``), caller's indices in ``kept``."""
    if resize not in RESIZE_MODES:
        raise InputError(f"{name}: resize must be one of {list(RESIZE_MODES)}, got {resize!r}")
    if not 0 < float(threshold) <= 1:
        raise InputError(f"{name}: threshold must be in (0, 1], got {threshold!r}")
    x = _as_tensor(masks, name)
    if x.numel() == 0 and x.dim() <= 1 or (x.dim() == 3 and x.shape[0] == 0):
        out = ExternalProposals(torch.zeros(0, height, width, dtype=torch.bool), [], 0)
        out.notes.append(str(out.empty_reason))
        return out
    x = binarize(_as_3d(x, name), threshold, name)
    x, resized = _resize(x, height, width, resize, name)
    notes = [resized] if resized else []
    nonempty = x.flatten(1).any(dim=1)
    kept = [int(i) for i in torch.nonzero(nonempty).flatten()]
    given = int(x.shape[0])
    if len(kept) < given and kept:
        dropped = [i for i in range(given) if i not in set(kept)]
        notes.append(f"left out {len(dropped)} empty external mask(s) {dropped} of {given}; the proposal indices "
                     f"count the {len(kept)} kept masks, which are the given masks {kept}")
    out = ExternalProposals(x[nonempty].contiguous(), kept, given, notes)
    if out.empty_reason:
        out.notes.append(out.empty_reason)
    return out


def split_counts(counts: Any, total: int, images: int, name: str = "counts") -> list[int]:
    """How many of ``total`` masks belong to each of ``images`` images: ``counts`` as given ("3, 2" or a list),
    or empty / None for every mask to the one image. InputError unless there is one count per image, each >= 0,
    summing to ``total``."""
    if counts is None or (isinstance(counts, str) and not counts.strip()):
        if images != 1:
            raise InputError(f"{name}: {images} images but no counts; give the number of masks of each image, "
                             f"e.g. '{', '.join(['1'] * images)}' (summing to the {total} masks), or one image")
        return [total]
    if isinstance(counts, str):
        try:
            values = [int(v) for v in counts.replace(";", ",").replace(" ", ",").split(",") if v.strip()]
        except ValueError:
            raise InputError(f"{name}: {counts!r} is not a list of whole numbers; write e.g. '3, 2'") from None
    else:
        values = [int(v) for v in counts]
    if any(v < 0 for v in values):
        raise InputError(f"{name}: counts must be >= 0, got {values}")
    if len(values) != images:
        raise InputError(f"{name}: {len(values)} count(s) {values} for {images} image(s); give one count per image")
    if sum(values) != total:
        raise InputError(f"{name}: the counts {values} sum to {sum(values)}, but there are {total} masks; they must "
                         "sum to the number of masks (image by image, in batch order)")
    return values


def _natural_key(path: Path) -> list[Any]:
    import re

    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def proposal_files(path: str | Path, option: str = "--proposals") -> list[Path]:
    """The files a proposals path names (an .npz/.npy file, or a folder's PNGs in natural order: mask_2 before
    mask_10); InputError when it names nothing usable. Checks files only, reads no pixels."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted((f for f in p.iterdir() if f.suffix.lower() in MASK_FILE_SUFFIXES and f.is_file()),
                       key=_natural_key)
        if not files:
            raise InputError(f"{option} {path}: the folder holds no .png masks; put one PNG per mask there "
                             "(white = inside), or give an .npz file")
        return files
    if not p.is_file():
        raise InputError(f"{option} {path}: no such file or folder; give an .npz/.npy file of masks [N, H, W] or a "
                         "folder of PNG masks")
    if p.suffix.lower() not in ARRAY_FILE_SUFFIXES:
        raise InputError(f"{option} {path}: cannot read masks from a {p.suffix or 'suffix-less'} file; give an "
                         ".npz/.npy file of masks [N, H, W] or a folder of PNG masks")
    return [p]


def _load_array(file: Path, path: str | Path, option: str) -> np.ndarray:
    """The masks of one .npy, or of an .npz (its only array, or the one named 'masks')."""
    if file.suffix.lower() == ".npy":
        return np.load(file, allow_pickle=False)
    with np.load(file, allow_pickle=False) as data:
        keys = list(data.keys())
        if len(keys) == 1:
            return data[keys[0]]
        if "masks" in keys:
            return data["masks"]
    raise InputError(f"{option} {path}: the .npz holds {keys}; store the masks alone or under the name "
                     "'masks' (np.savez(file, masks=masks))")


def load_proposal_files(path: str | Path, option: str = "--proposals") -> np.ndarray:
    """The masks of an .npz (its only array, or the one named 'masks'), an .npy, or a folder of PNGs (each read
    as grayscale, or its alpha channel when it has one, scaled to [0, 1]): an array [N, H, W] for
    ``external_proposals``. Loads no pickled objects."""
    from PIL import Image

    files = proposal_files(path, option)
    if files[0].suffix.lower() in ARRAY_FILE_SUFFIXES:
        try:
            return _load_array(files[0], path, option)
        except (ValueError, OSError, zipfile.BadZipFile) as exc:  # a pickled or damaged file
            raise InputError(f"{option} {path}: cannot read masks from it ({exc}); save a plain array of masks "
                             "with np.save / np.savez (pickled objects are never loaded)") from None
    masks = []
    for f in files:
        try:
            with Image.open(f) as im:
                if "A" in im.getbands():
                    im = im.getchannel("A")
                elif im.mode not in ("L", "1"):
                    im = im.convert("L")
                arr = np.asarray(im)
        except OSError as exc:
            raise InputError(f"{option} {path}: {f.name} is not a readable image ({exc}); give PNG masks") from None
        masks.append(arr.astype(np.float32) / (1.0 if arr.dtype == bool else float(np.iinfo(arr.dtype).max)))
    shapes = sorted({m.shape for m in masks})
    if len(shapes) > 1:
        raise InputError(f"{option} {path}: the PNG masks have different sizes {shapes}; give masks of one size")
    return np.stack(masks)


__all__ = ["ExternalProposals", "external_proposals", "binarize", "split_counts", "proposal_files",
           "load_proposal_files", "RESIZE_MODES"]
