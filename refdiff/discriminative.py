"""Discriminative matching of Ref-Diff (docs/METHOD.md section 8): positional bias (Eq. 6), the CLIP crop branch,
the masked-attention branch with one mask token per proposal in a single encoder pass (Eq. 7), text
features, the discriminative score s_D (Eq. 10), and ``proposal_scores``, their one assembly per preset (and
the SAM-CLIP baseline).

Conventions and the choices made where the method leaves room:

- Images are RGB ``[H, W, 3]``, ``uint8`` (0..255) or float (0..1); masks are ``bool [N, H, W]``.
- Crop branch: pixels outside the mask are set to black (and multiplied by the positional bias when one is
  given), the box ``[y0, y1) x [x0, x1)`` bounding the mask is cut out, pasted centred on a black square
  (so no part of the mask is cropped away, whatever the box's shape), resized (bicubic, antialiased) to
  CLIP's input size, clamped to 0..1 and normalised with CLIP's mean/std.
- Masked-attention branch: the whole image (times the bias when given) is pasted centred on a black
  square, resized (bicubic, antialiased) to CLIP's input size and encoded once. Proposals are reduced to
  the patch grid by nearest sampling at each patch centre; a non-empty proposal that covers no patch
  centre falls back to the patch(es) holding the largest share of its pixels, so no mask token is left
  with nothing but itself to attend to.
- Mask token i attends only itself and the patches inside M_i (not the class token, not other mask
  tokens); the class token and the patches attend the class token and all patches, never a mask token,
  so they compute exactly what the unmodified ViT computes.
- An empty proposal (no pixel set) gets a zero feature vector in both branches: it scores 0 against any
  text; callers should drop empty proposals before scoring.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import ClipLayer, Preset
from .errors import InputError, ModelLoadError

OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# canonical direction -> accepted spellings (whole words, lower case)
_DIRECTION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("left", "leftmost", "left-most"),
    "right": ("right", "rightmost", "right-most"),
    "top": ("top", "topmost", "upper", "uppermost"),
    "bottom": ("bottom", "bottommost", "lower", "lowermost", "lowest"),
}
_DIRECTION_OF: dict[str, str] = {w: d for d, words in _DIRECTION_WORDS.items() for w in words}
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


# --------------------------------------------------------------------------------------------------------
# positional bias (Eq. 6)
# --------------------------------------------------------------------------------------------------------
def canonical_direction(word: str) -> str:
    """Map a direction clue ("left", "Leftmost", "upper", ...) to left/right/top/bottom; else InputError."""
    key = str(word).strip().lower()
    if key not in _DIRECTION_OF:
        raise InputError(f"unknown direction clue {word!r}; use one of {sorted(_DIRECTION_OF)}")
    return _DIRECTION_OF[key]


def _falling_ramp(length: int, extent: float) -> torch.Tensor:
    """Weights 1 - i / (extent * length) for i = 0..length-1, clipped to [0, 1] (float32 [length])."""
    index = torch.arange(length, dtype=torch.float64)
    return (1.0 - index / (extent * length)).clamp(0.0, 1.0).to(torch.float32)


def positional_bias(directions: Sequence[str], height: int, width: int, extent: float = 2.0 / 3.0
                    ) -> torch.Tensor:
    """Positional bias P (Eq. 6) as float32 [H, W]: a linear ramp per direction clue, clues multiplied.

    "left": column c gets max(0, 1 - c / (extent * width)), i.e. 1 at column 0, falling linearly to 0 at
    column extent * width and 0 from there on (width 6, extent 2/3: 1, .75, .5, .25, 0, 0). "right" is its
    mirror image (column c gets the "left" weight of column width - 1 - c); "top"/"bottom" do the same
    along rows. Repeated clues count once, and of two opposite clues only the first counts (a ramp and its
    mirror image would black out the whole image); no clue gives ones. A single string counts as one clue.
    """
    if isinstance(directions, str):
        directions = [directions]
    if int(height) < 1 or int(width) < 1:
        raise InputError(f"positional_bias needs height and width >= 1, got {height} x {width}")
    if not 0.0 < float(extent) <= 1.0:
        raise InputError(f"positional_bias extent must be in (0, 1], got {extent}")
    height, width = int(height), int(width)
    clues: list[str] = []
    for d in directions:  # of two opposite clues ("left ... right") only the first one counts
        clue = canonical_direction(d)
        if clue not in clues and _OPPOSITE[clue] not in clues:
            clues.append(clue)
    bias = torch.ones(height, width, dtype=torch.float32)
    columns, rows = _falling_ramp(width, extent), _falling_ramp(height, extent)
    profiles = {
        "left": columns[None, :],
        "right": columns.flip(0)[None, :],
        "top": rows[:, None],
        "bottom": rows.flip(0)[:, None],
    }
    for clue in sorted(clues):
        bias = bias * profiles[clue]
    return bias


# --------------------------------------------------------------------------------------------------------
# input checks and image preparation
# --------------------------------------------------------------------------------------------------------
def as_float_image(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """An RGB image [H, W, 3] (uint8 0..255 or float 0..1) as a float32 tensor in 0..1 (device kept)."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        raise InputError(f"image must be a torch.Tensor or numpy array [H, W, 3], got {type(image).__name__}")
    if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise InputError(f"image must be RGB [H, W, 3], got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.to(torch.float32) / 255.0
    if not image.is_floating_point():
        raise InputError(f"image must be uint8 (0..255) or float (0..1), got dtype {image.dtype}")
    image = image.to(torch.float32)
    if not torch.isfinite(image).all():
        raise InputError("image holds NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if low < -1e-3 or high > 1.0 + 1e-3:
        raise InputError(f"a float image must lie in 0..1 (got {low:.3g}..{high:.3g}); pass uint8 for 0..255")
    return image.clamp(0.0, 1.0)


def _check_masks(masks: torch.Tensor | np.ndarray, height: int, width: int) -> torch.Tensor:
    """Proposals as bool [N, H, W] matching the image size; InputError otherwise."""
    if isinstance(masks, np.ndarray):
        masks = torch.from_numpy(np.ascontiguousarray(masks))
    if not isinstance(masks, torch.Tensor) or masks.ndim != 3:
        raise InputError(f"masks must be a bool tensor [N, H, W], got {getattr(masks, 'shape', type(masks))}")
    if tuple(masks.shape[1:]) != (height, width):
        raise InputError(f"masks are {tuple(masks.shape[1:])} but the image is {(height, width)}; "
                         "proposals must be at the image's own resolution")
    return masks if masks.dtype == torch.bool else masks != 0


def _check_bias(bias: torch.Tensor | None, height: int, width: int) -> torch.Tensor | None:
    """The positional bias as float32 [H, W] (or None)."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (height, width):
        raise InputError(f"bias must be a float tensor [H, W] = {(height, width)}, got "
                         f"{tuple(getattr(bias, 'shape', ()))}; build it with positional_bias(clues, H, W)")
    return bias.to(torch.float32)


def _check_layer(layer: str, num_blocks: int) -> int:
    """Number of residual blocks to run for ``layer`` ("final" or "penultimate")."""
    if layer == "final":
        return num_blocks
    if layer == "penultimate":
        if num_blocks < 2:
            raise InputError("layer='penultimate' needs a vision transformer with at least 2 blocks")
        return num_blocks - 1
    raise InputError(f"layer must be 'final' or 'penultimate', got {layer!r}")


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Bounding boxes of bool masks [N, H, W] as long [N, 4] = (y0, x0, y1, x1), end exclusive; 0s if empty."""
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    height, width = masks.shape[1], masks.shape[2]
    y0 = rows.to(torch.uint8).argmax(dim=1)
    x0 = cols.to(torch.uint8).argmax(dim=1)
    y1 = height - rows.flip(1).to(torch.uint8).argmax(dim=1)
    x1 = width - cols.flip(1).to(torch.uint8).argmax(dim=1)
    boxes = torch.stack([y0, x0, y1, x1], dim=1).long()
    return torch.where(rows.any(dim=1)[:, None], boxes, torch.zeros_like(boxes))


def crop_inputs(image: torch.Tensor, masks: torch.Tensor, bias: torch.Tensor | None, size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop-branch inputs before CLIP normalisation: float [N, 3, size, size] in 0..1 and nonempty bool [N].

    ``image`` float [H, W, 3] in 0..1, ``masks`` bool [N, H, W], ``bias`` float [H, W] or None. Pixels
    outside each mask are black, the rest times the bias; each mask's bounding box is pasted centred on a
    black square and resized to ``size``, so every pixel of the mask reaches CLIP whatever the box's shape
    (a centre crop would cut off the ends of long thin objects). Empty masks give an all-black input and
    nonempty False.
    """
    chw = image.permute(2, 0, 1)
    if bias is not None:
        chw = chw * bias[None]
    boxes = mask_boxes(masks).tolist()
    nonempty = masks.flatten(1).any(dim=1)
    out = torch.zeros(masks.shape[0], 3, size, size, dtype=torch.float32, device=image.device)
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        if y1 <= y0 or x1 <= x0:
            continue
        region = chw[:, y0:y1, x0:x1] * masks[i, y0:y1, x0:x1][None]
        out[i] = pad_square_resize(region.permute(1, 2, 0), size)
    return out, nonempty


def pad_square_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """Paste an [H, W, 3] float image centred on a black square, resize to [3, size, size] (bicubic)."""
    height, width = image.shape[:2]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    square = image.new_zeros(3, side, side)
    square[:, top:top + height, left:left + width] = image.permute(2, 0, 1)
    if side == size:
        return square
    return F.interpolate(square[None], size=(size, size), mode="bicubic", align_corners=False,
                         antialias=True)[0].clamp(0.0, 1.0)


def masks_to_grid(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """Proposals [N, H, W] -> patch-grid masks bool [N, grid, grid] on the padded square (as
    ``pad_square_resize``): nearest sampling at each patch centre; a non-empty mask that covers no patch
    centre gets the patch(es) holding the largest number of its pixels. Empty masks stay empty."""
    n, height, width = masks.shape
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    centres = torch.floor((torch.arange(grid, dtype=torch.float64) + 0.5) * side / grid).long()
    ys, xs = centres - top, centres - left
    valid_y, valid_x = (ys >= 0) & (ys < height), (xs >= 0) & (xs < width)
    ys, xs = ys.clamp(0, height - 1).to(masks.device), xs.clamp(0, width - 1).to(masks.device)
    sampled = masks[:, ys][:, :, xs]
    valid = (valid_y[:, None] & valid_x[None, :]).to(masks.device)
    cells = sampled & valid[None]
    fallback = (~cells.flatten(1).any(dim=1)) & masks.flatten(1).any(dim=1)
    if bool(fallback.any()):
        cells = cells.clone()
        cells[fallback] = _largest_share_cells(masks[fallback], grid, top, left, side)
    return cells


def _largest_share_cells(masks: torch.Tensor, grid: int, top: int, left: int, side: int) -> torch.Tensor:
    """For non-empty masks [M, H, W]: bool [M, grid, grid] marking the cell(s) with the most mask pixels."""
    idx, ys, xs = masks.nonzero(as_tuple=True)
    cy = torch.div((ys + top) * grid, side, rounding_mode="floor").clamp(0, grid - 1)
    cx = torch.div((xs + left) * grid, side, rounding_mode="floor").clamp(0, grid - 1)
    counts = torch.zeros(masks.shape[0], grid * grid, dtype=torch.long, device=masks.device)
    counts.index_put_((idx, cy * grid + cx), torch.ones_like(idx), accumulate=True)
    best = counts.max(dim=1, keepdim=True).values
    return (counts == best).view(-1, grid, grid)


def mask_attention_bias(grid_masks: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention mask [T, T] (T = 1 + L + N) for [class, L patches, N mask tokens]: 0 = may attend.

    Class token and patches attend the class token and all patches, no mask token; mask token i attends
    itself and the patches of grid_masks[i] (bool [N, g, g]) only.
    """
    n = grid_masks.shape[0]
    patches = grid_masks.shape[1] * grid_masks.shape[2]
    total = 1 + patches + n
    allowed = torch.zeros(total, total, dtype=torch.bool, device=grid_masks.device)
    allowed[: 1 + patches, : 1 + patches] = True
    allowed[1 + patches:, 1:1 + patches] = grid_masks.flatten(1)
    token = torch.arange(1 + patches, total, device=grid_masks.device)
    allowed[token, token] = True
    bias = torch.zeros(total, total, dtype=dtype, device=grid_masks.device)
    return bias.masked_fill_(~allowed, float("-inf"))


# --------------------------------------------------------------------------------------------------------
# the CLIP wrapper
# --------------------------------------------------------------------------------------------------------
def _square_size(value: object, what: str) -> int:
    """An int from an int or a square (h, w) pair."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or int(value[0]) != int(value[1]):
            raise ModelLoadError(f"CLIP {what} must be square, got {value}")
        return int(value[0])
    return int(value)  # type: ignore[arg-type]


class ClipScorer:
    """An open_clip CLIP ViT with its tokenizer and preprocessing constants: text features, the crop branch
    and the masked-attention branch of Ref-Diff. All methods run under torch.inference_mode()."""

    _VISUAL_PARTS = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post",
                     "proj")

    def __init__(self, model: torch.nn.Module, tokenizer: object, *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, image_size: int | None = None) -> None:
        visual = getattr(model, "visual", None)
        missing = [p for p in self._VISUAL_PARTS if not hasattr(visual, p)]
        if visual is None or missing:
            raise ModelLoadError(f"the CLIP model needs an open_clip VisionTransformer image tower "
                                 f"(missing {missing or ['visual']}); ResNet/timm towers are not supported")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise ModelLoadError("the CLIP image tower must pool its class token (pool_type 'tok', no "
                                 "attentional pooler) for the crop and mask-token branches")
        if visual.proj is None:
            raise ModelLoadError("the CLIP image tower has no projection (visual.proj is None)")
        cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.mean = tuple(float(v) for v in (mean or cfg.get("mean") or getattr(visual, "image_mean", None)
                                             or OPENAI_MEAN))
        self.std = tuple(float(v) for v in (std or cfg.get("std") or getattr(visual, "image_std", None)
                                            or OPENAI_STD))
        self.image_size = _square_size(image_size or visual.image_size, "image size")
        self.patch_size = _square_size(visual.patch_size, "patch size")
        if self.image_size != _square_size(visual.image_size, "image size"):
            raise ModelLoadError(f"image_size {self.image_size} differs from the model's input "
                                 f"{visual.image_size}")
        self.grid_size = self.image_size // self.patch_size

    # ---- placement ----------------------------------------------------------------------------------
    @property
    def visual(self) -> torch.nn.Module:
        return self.model.visual

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def embed_dim(self) -> int:
        return int(self.visual.proj.shape[1])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "ClipScorer":
        """Move (and optionally cast) the model; returns self."""
        self.model.to(device=device, dtype=dtype)
        return self

    # ---- text ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings float32 [n, D] of ``texts`` (one batch)."""
        if isinstance(texts, str):
            raise InputError("encode_text takes a sequence of strings, e.g. [sentence, root_word]")
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InputError(f"encode_text needs a non-empty list of strings, got {texts!r}")
        tokens = self.tokenizer(texts).to(self.device)
        features = self.model.encode_text(tokens)
        return F.normalize(features.float(), dim=-1)

    # ---- image tower internals ----------------------------------------------------------------------
    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in 0..1 -> CLIP-normalised, on the model's device and dtype."""
        mean = torch.tensor(self.mean, device=pixels.device, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device, dtype=torch.float32).view(1, 3, 1, 1)
        return ((pixels - mean) / std).to(device=self.device, dtype=self.dtype)

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, 1 + L, W] after ln_pre: class token, then the patches row by row."""
        visual = self.visual
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        return visual.ln_pre(x)

    def _blocks(self, x: torch.Tensor, attn_mask: torch.Tensor | None, layer: str) -> torch.Tensor:
        """Run the residual blocks up to ``layer`` on batch-first tokens [B, T, W]."""
        transformer = self.visual.transformer
        count = _check_layer(layer, len(transformer.resblocks))
        batch_first = getattr(transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for block in list(transformer.resblocks)[:count]:
            x = block(x, attn_mask=attn_mask)
        return x if batch_first else x.transpose(0, 1)

    def _project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [..., W] -> ln_post -> proj -> L2, as float32 [..., D]."""
        x = self.visual.ln_post(tokens) @ self.visual.proj
        return F.normalize(x.float(), dim=-1)

    def _prepare(self, image: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray,
                 bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Validated float image, bool masks and bias, all on the model's device."""
        img = as_float_image(image).to(self.device)
        masks_t = _check_masks(masks, img.shape[0], img.shape[1]).to(self.device)
        bias_t = _check_bias(bias, img.shape[0], img.shape[1])
        return img, masks_t, (bias_t.to(self.device) if bias_t is not None else None)

    # ---- crop branch --------------------------------------------------------------------------------
    @torch.inference_mode()
    def crop_features(self, image: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray,
                      bias: torch.Tensor | None = None, layer: ClipLayer = "final",
                      chunk_size: int = 32) -> torch.Tensor:
        """Crop branch f(x ⊙ P ⊙ M_i): float32 [N, D], L2-normalised (zero rows for empty masks).

        Each proposal's masked, bias-weighted pixels are cut to its bounding box and preprocessed like
        CLIP's preprocess (see the module notes); all crops run in batches of ``chunk_size``.
        """
        img, masks_t, bias_t = self._prepare(image, masks, bias)
        _check_layer(layer, len(self.visual.transformer.resblocks))
        out = torch.zeros(masks_t.shape[0], self.embed_dim, dtype=torch.float32, device=self.device)
        pixels, nonempty = crop_inputs(img, masks_t, bias_t, self.image_size)
        keep = nonempty.nonzero().flatten()
        for start in range(0, keep.numel(), max(1, int(chunk_size))):
            rows = keep[start:start + max(1, int(chunk_size))]
            tokens = self._blocks(self._embed(self._normalise(pixels[rows])), None, layer)
            out[rows] = self._project(tokens[:, 0])
        return out

    # ---- masked-attention branch --------------------------------------------------------------------
    @torch.inference_mode()
    def masked_features(self, image: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray,
                        bias: torch.Tensor | None = None, layer: ClipLayer = "final",
                        max_masks_per_pass: int = 256) -> torch.Tensor:
        """Masked-attention branch f_{M_i}(x ⊙ P) (Eq. 7): float32 [N, D], L2-normalised, zero rows for
        empty masks. The whole image is encoded ONCE with N mask tokens appended (chunks of
        ``max_masks_per_pass`` tokens bound memory for very many proposals)."""
        img, masks_t, bias_t = self._prepare(image, masks, bias)
        _check_layer(layer, len(self.visual.transformer.resblocks))
        if bias_t is not None:
            img = img * bias_t[..., None]
        pixels = self._normalise(pad_square_resize(img, self.image_size)[None])
        grid = masks_to_grid(masks_t, self.grid_size)
        out = torch.zeros(masks_t.shape[0], self.embed_dim, dtype=torch.float32, device=self.device)
        keep = grid.flatten(1).any(dim=1).nonzero().flatten()
        if keep.numel() == 0:
            return out
        base = self._embed(pixels)
        step = max(1, int(max_masks_per_pass))
        for start in range(0, keep.numel(), step):
            rows = keep[start:start + step]
            tokens = torch.cat([base, base[:, :1].expand(1, rows.numel(), -1)], dim=1)
            attn = mask_attention_bias(grid[rows], dtype=self.dtype)
            x = self._blocks(tokens, attn, layer)
            out[rows] = self._project(x[0, base.shape[1]:])
        return out


# --------------------------------------------------------------------------------------------------------
# s_D (Eq. 10)
# --------------------------------------------------------------------------------------------------------
def _as_vector(value: torch.Tensor, name: str) -> torch.Tensor:
    """A text feature [D] or [1, D] as float32 [D]."""
    if not isinstance(value, torch.Tensor) or value.numel() == 0 or (value.ndim == 2 and value.shape[0] != 1) \
            or value.ndim not in (1, 2):
        raise InputError(f"{name} must be a text feature [D] (or [1, D]), got {getattr(value, 'shape', value)}")
    return value.reshape(-1).to(torch.float32)


def discriminative_scores(crop_feats: torch.Tensor | None, mask_feats: torch.Tensor | None,
                          r_sent: torch.Tensor, r_root: torch.Tensor, crop_weight: float = 0.7,
                          mask_weight: float = 0.3, crop_root_weight: float = 0.0,
                          mask_root_weight: float = 0.5, normalize_text: bool = True) -> torch.Tensor:
    """s_D [N] (Eq. 10): crop_weight <f_crop, t_crop> + mask_weight <f_mask, t_mask> with
    t = (1-w) r_sent + w r_root per branch; a None branch adds 0. With ``normalize_text`` each mixed t is
    L2-normalised, so every term is a cosine (``official``: 0.7 cos(f_crop, r_sent) + 0.3 cos(f_M, mix));
    without it t is used as is (``paper``: v_i . r with r the mean of r_sent and r_root)."""
    if crop_feats is None and mask_feats is None:
        raise InputError("discriminative_scores needs crop_feats, mask_feats or both")
    sent, root = _as_vector(r_sent, "r_sent"), _as_vector(r_root, "r_root")
    if sent.shape != root.shape:
        raise InputError(f"r_sent {tuple(sent.shape)} and r_root {tuple(root.shape)} differ in size")
    total: torch.Tensor | None = None
    for feats, weight, root_weight, name in ((crop_feats, crop_weight, crop_root_weight, "crop_feats"),
                                             (mask_feats, mask_weight, mask_root_weight, "mask_feats")):
        if feats is None:
            continue
        if feats.ndim != 2 or feats.shape[1] != sent.shape[0]:
            raise InputError(f"{name} must be [N, {sent.shape[0]}], got {tuple(feats.shape)}")
        text = (1.0 - root_weight) * sent.to(feats.device) + root_weight * root.to(feats.device)
        if normalize_text:
            text = text / text.norm().clamp_min(1e-12)
        part = float(weight) * (feats.to(torch.float32) @ text)
        if total is not None and total.shape != part.shape:
            raise InputError(f"crop_feats and mask_feats hold different numbers of proposals "
                             f"({total.shape[0]} vs {part.shape[0]})")
        total = part if total is None else total + part
    assert total is not None
    return total


# --------------------------------------------------------------------------------------------------------
# the per-preset score of a set of proposals (Eq. 6, 7, 10; the SAM-CLIP baseline)
# --------------------------------------------------------------------------------------------------------
SCORE_MODES: tuple[str, ...] = ("ref-diff", "sam-clip")
SAM_CLIP_LAYER: ClipLayer = "final"  # the baseline is plain CLIP: its final layer, whatever the preset's

# features(branch, layer, clues, compute) -> [N, D]: a caller's cache around compute() (branch "crop" or
# "masked"; clues: the direction clues of the positional bias that branch sees, () for none)
FeatureHook = Callable[[str, str, tuple[str, ...], Callable[[], torch.Tensor]], torch.Tensor]
# text_features((sentence, root)) -> [2, D] L2-normalised text features (r_sent, r_root)
TextHook = Callable[[tuple[str, str]], torch.Tensor]


def proposal_scores(scorer: ClipScorer, image: torch.Tensor | np.ndarray, masks: torch.Tensor, text: str,
                    root: str, directions: Sequence[str], preset: Preset, mode: str = "ref-diff",
                    use_bias: bool = True, crop_weight: float | None = None, mask_weight: float | None = None,
                    features: FeatureHook | None = None, text_features: TextHook | None = None) -> torch.Tensor:
    """s_D [N] of proposals ``masks`` [N, H, W] of an RGB ``image`` [H, W, 3] against (text, root), as the
    preset defines it: the one assembly of Eq. 6, 7 and 10 that every caller uses.

    ``mode="ref-diff"``: the positional bias of ``directions`` (unless ``use_bias`` is False) on the preset's
    ``bias_branch``, both branches at the preset's ``clip_layer``, mixed text features and ``normalize_text``
    as the preset says, branches weighted by ``crop_weight`` / ``mask_weight`` (None: the preset's).
    ``mode="sam-clip"``: the baseline: crop branch only, FINAL layer, no positional bias, sentence feature.
    ``features`` / ``text_features`` let a caller cache (and place CLIP on demand); by default both are computed.
    """
    if mode not in SCORE_MODES:
        raise InputError(f"mode must be one of {SCORE_MODES}, got {mode!r}")
    if isinstance(directions, str):
        directions = [directions]
    height, width = int(image.shape[0]), int(image.shape[1])
    masks = _check_masks(masks, height, width)
    if masks.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float32)
    encode = text_features or (lambda texts: scorer.encode_text(list(texts)))
    r_sent, r_root = encode((text, root)).unbind(0)
    fetch = features or (lambda branch, layer, clues, compute: compute())

    if mode == "sam-clip":
        crop = fetch("crop", SAM_CLIP_LAYER, (),
                     lambda: scorer.crop_features(image, masks, None, layer=SAM_CLIP_LAYER))
        return discriminative_scores(crop, None, r_sent, r_root, crop_weight=1.0, mask_weight=0.0,
                                     crop_root_weight=0.0, mask_root_weight=0.0)

    clues = tuple(directions) if use_bias else ()
    bias = positional_bias(clues, height, width, extent=preset.bias_extent) if clues else None
    layer = preset.clip_layer

    def branch(name: str, encoder: Callable[..., torch.Tensor]) -> torch.Tensor:
        seen = clues if preset.bias_branch == name else ()
        return fetch(name, layer, seen, lambda: encoder(image, masks, bias if seen else None, layer=layer))

    crop = branch("crop", scorer.crop_features)
    masked = branch("masked", scorer.masked_features)
    return discriminative_scores(crop, masked, r_sent, r_root,
                                 crop_weight=preset.crop_weight if crop_weight is None else float(crop_weight),
                                 mask_weight=preset.mask_weight if mask_weight is None else float(mask_weight),
                                 crop_root_weight=preset.crop_root_weight, mask_root_weight=preset.mask_root_weight,
                                 normalize_text=preset.normalize_text)


__all__ = ["ClipScorer", "ClipLayer", "positional_bias", "canonical_direction", "discriminative_scores",
           "SCORE_MODES", "SAM_CLIP_LAYER", "FeatureHook", "TextHook", "proposal_scores",
           "crop_inputs", "mask_boxes", "masks_to_grid", "mask_attention_bias", "pad_square_resize",
           "as_float_image", "OPENAI_MEAN", "OPENAI_STD"]
