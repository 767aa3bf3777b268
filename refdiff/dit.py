"""diffusers backend of the generative stage for Flux.1 (docs/METHOD.md section 15, "library path"): VAE
encoding with Flux's shift and scale, T5 + CLIP-L text encoding, the flow noise injection and Euler steps of
``refdiff.flow`` on a diffusers FluxTransformer2DModel, and the capture of its joint attention.

The capture mirrors the ComfyUI backend (nodes/dit_backend.py): an attention processor on the chosen double
blocks (``transformer_blocks[i].attn``) calls the block's own processor unchanged, so the transformer computes
what it computes without it, and beside it recomputes the joint q and k with diffusers' own projection and
rotary functions; ``refdiff.joint_attention.joint_text_probs`` makes the image tokens' attention on the text
tokens from them. The original processors are restored on exit. The maps come back as ``CrossAttentionMaps``
[L, h, w, T] over the T5 positions, so the generative map c and every stage after it are unchanged.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from .capture import COND, CrossAttentionMaps, downsampled_grid
from .devices import module_device
from .diffusion import encode_latent
from .errors import InputError
from .flow import DEFAULT_FLOW_T, flow_loop, flow_ts
from .joint_attention import joint_text_probs, last_blocks
from .schedule import injection_noise
from .stores import AttentionStore

PATCH_FACTOR = 2  # Flux packs 2 x 2 latent patches into one image token
FLUX_T5_TOKENS = 256  # T5 context length: ComfyUI's Flux tokenizer pads to 256 (min_length), as the nodes see it
CLIP_TOKENS = 77
DEFAULT_FLUX_GUIDANCE = 3.5  # Flux dev's distilled guidance when none is given (ComfyUI's default)


@dataclass
class FluxComponents:
    """The parts of a Flux.1 model (dev or schnell) the generative stage needs, named as in diffusers'
    FluxPipeline: CLIP-L (text_encoder, tokenizer) gives the pooled vector, T5 (text_encoder_2, tokenizer_2)
    the context whose positions index the maps."""

    transformer: Any  # diffusers FluxTransformer2DModel
    vae: Any  # diffusers AutoencoderKL, 16 latent channels
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer
    text_encoder_2: Any  # transformers T5EncoderModel
    tokenizer_2: Any  # transformers T5TokenizerFast (character offsets)
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    guidance: float = DEFAULT_FLUX_GUIDANCE  # used when the transformer has a guidance embedding (dev)
    t5_tokens: int = FLUX_T5_TOKENS
    upcast_vae: bool = False

    @property
    def family(self) -> str:
        return "Flux"

    @property
    def map_tokenizer(self) -> Any:
        """The tokenizer whose positions index the maps: T5's."""
        return self.tokenizer_2

    @property
    def has_guidance(self) -> bool:
        return bool(getattr(self.transformer.config, "guidance_embeds", False))

    @classmethod
    def from_pipeline(cls, pipe: Any) -> "FluxComponents":
        """Take the parts of a diffusers FluxPipeline (or any object with its attribute names)."""
        param = next(pipe.transformer.parameters())
        cfg = pipe.vae.config
        return cls(transformer=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder,
                   tokenizer=pipe.tokenizer, text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
                   scaling_factor=float(cfg.get("scaling_factor", 0.3611)),
                   shift_factor=float(cfg.get("shift_factor", None) or 0.0), device=param.device, dtype=param.dtype)


def is_dit(sd: Any) -> bool:
    """Whether ``sd`` is a diffusion transformer's components (FluxComponents) rather than SD's."""
    return isinstance(sd, FluxComponents)


# ---------------------------------------------------------------------------------------------- latents
def encode_image(flux: FluxComponents, pixels: torch.Tensor, latent_from: str = "sample",
                 seed: int = 0) -> torch.Tensor:
    """Flux's latent of pixels [1, 3, S, S] in [-1, 1]: (VAE posterior sample or mean - shift) * scale, float32
    [1, 16, S/8, S/8]; the sample is drawn with seed + 1 as for SD."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed) + 1)
    raw = encode_latent(flux.vae, pixels, latent_from=latent_from, generator=gen, scaling_factor=1.0,
                        upcast=flux.upcast_vae)
    return (raw - flux.shift_factor) * flux.scaling_factor


def pad_to_patches(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] padded (circular, as ComfyUI pads to the patch size) to even h and w."""
    ph, pw = (-int(x.shape[-2])) % PATCH_FACTOR, (-int(x.shape[-1])) % PATCH_FACTOR
    return F.pad(x, (0, pw, 0, ph), mode="circular") if ph or pw else x


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] (even h, w) -> the image tokens [B, h/2 * w/2, 4C] (diffusers FluxPipeline's packing)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """The inverse of pack_latents: [B, h/2 * w/2, 4C] -> [B, C, h, w]."""
    b, _, d = tokens.shape
    h, w = int(hw[0]), int(hw[1])
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(grid: tuple[int, int], device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RoPE position ids [h*w, 3] of the image tokens: (0, row, column), as FluxPipeline makes them."""
    h, w = int(grid[0]), int(grid[1])
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- text
def t5_ids(tokenizer: Any, prompt: str, min_length: int = FLUX_T5_TOKENS) -> torch.Tensor:
    """T5 token ids [1, max(min_length, n)] of the prompt: its pieces from position 0 (no start token), the end
    token, then padding; never truncated."""
    n = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    return tokenizer(prompt, padding="max_length", max_length=max(int(min_length), n), truncation=False,
                     return_tensors="pt").input_ids


def encode_flux_text(flux: FluxComponents, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 last hidden states [1, T, 4096], CLIP-L pooled output [1, 768]) of the prompt, as FluxPipeline
    encodes it, on the transformer's device and dtype."""
    with torch.no_grad():
        ids = t5_ids(flux.tokenizer_2, prompt, flux.t5_tokens)
        context = flux.text_encoder_2(ids.to(module_device(flux.text_encoder_2)))[0]
        limit = min(int(flux.tokenizer.model_max_length), CLIP_TOKENS)
        clip_ids = flux.tokenizer([prompt], padding="max_length", max_length=limit, truncation=True,
                                  return_tensors="pt").input_ids
        pooled = flux.text_encoder(clip_ids.to(module_device(flux.text_encoder))).pooler_output
    return context.to(device=flux.device, dtype=flux.dtype), pooled.to(device=flux.device, dtype=flux.dtype)


# ---------------------------------------------------------------------------------------------- capture
def joint_qk(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
             image_rotary_emb: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint q and k [B, heads, T + N, dh] of a Flux double block's attention (text first), after QK-norm
    and RoPE, computed with diffusers' own projection and rotary functions as its processor computes them."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    q, k, _v, eq, ek, _ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    q = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim)))
    k = attn.norm_k(k.unflatten(-1, (-1, attn.head_dim)))
    eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
    ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
    q, k = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1)
    if image_rotary_emb is not None:
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
    return q.transpose(1, 2), k.transpose(1, 2)


class JointCaptureProcessor:
    """Runs a double block's own attention processor unchanged and records the image tokens' head-averaged
    attention on the text tokens (``joint_text_probs``) of its first ``grid`` image tokens."""

    def __init__(self, original: Any, name: str, store: AttentionStore, grid: tuple[int, int]) -> None:
        self.original, self.name, self.store, self.grid = original, name, store, (int(grid[0]), int(grid[1]))

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, **kwargs: Any) -> Any:
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask=attention_mask,
                            image_rotary_emb=image_rotary_emb, **kwargs)
        if encoder_hidden_states is None:
            raise InputError(f"{self.name}: a joint (double) block was expected, it received no text tokens")
        with torch.no_grad():
            q, k = joint_qk(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
            txt_len, img_len = int(encoder_hidden_states.shape[1]), int(hidden_states.shape[1])
            probs = joint_text_probs(q, k, txt_len, img_len, True, mask=attention_mask)
            n_grid = self.grid[0] * self.grid[1]
            self.store.add(self.name, "mid", PATCH_FACTOR, self.grid, probs[:, :n_grid],
                           [COND] * int(q.shape[0]))
        return out


@contextmanager
def capture_joint_attention(transformer: Any, blocks: Sequence[int], store: AttentionStore,
                            grid: tuple[int, int]) -> Iterator[AttentionStore]:
    """JointCaptureProcessor on ``transformer_blocks[i].attn`` for each i of ``blocks`` (maps filed as
    "double_blocks.{i}"); the original processors are put back on exit."""
    depth = len(transformer.transformer_blocks)
    if not blocks or any(not 0 <= int(b) < depth for b in blocks):
        raise InputError(f"blocks {list(blocks)}: this transformer has double blocks 0..{depth - 1}")
    saved: list[tuple[Any, Any]] = []
    try:
        for i in sorted({int(b) for b in blocks}):
            attn = transformer.transformer_blocks[i].attn
            saved.append((attn, attn.processor))
            attn.processor = JointCaptureProcessor(attn.processor, f"double_blocks.{i}", store, grid)
        yield store
    finally:
        for attn, processor in reversed(saved):
            attn.processor = processor


def flux_predictor(flux: FluxComponents, context: torch.Tensor, pooled: torch.Tensor,
                   latent_hw: tuple[int, int]) -> Callable[[torch.Tensor, float, int], torch.Tensor]:
    """The transformer as ``flow_loop``'s ``denoise``: latent x_t [1, C, h, w] (even h, w) at noise fraction t ->
    x0 prediction x_t - t v (its velocity v = noise - x0). One conditional batch; Flux dev's guidance embedding
    at ``flux.guidance``."""
    grid = (int(latent_hw[0]) // PATCH_FACTOR, int(latent_hw[1]) // PATCH_FACTOR)
    img = image_ids(grid, flux.device, flux.dtype)
    txt = torch.zeros(context.shape[1], 3, device=flux.device, dtype=flux.dtype)

    def denoise(x: torch.Tensor, t: float, _step: int) -> torch.Tensor:
        batch = int(x.shape[0])
        guidance = (torch.full((batch,), float(flux.guidance), device=flux.device, dtype=torch.float32)
                    if flux.has_guidance else None)
        tokens = pack_latents(x).to(device=flux.device, dtype=flux.dtype)
        v = flux.transformer(hidden_states=tokens, encoder_hidden_states=context.expand(batch, -1, -1),
                             pooled_projections=pooled.expand(batch, -1),
                             timestep=torch.full((batch,), float(t), device=flux.device, dtype=flux.dtype),
                             img_ids=img, txt_ids=txt, guidance=guidance, return_dict=False)[0]
        v = unpack_latents(v.float(), (int(x.shape[-2]), int(x.shape[-1]))).to(x.device)
        return x - float(t) * v

    return denoise


def run_flux_capture(flux: FluxComponents, latent: torch.Tensor, prompt: str, *, flow_t: float = DEFAULT_FLOW_T,
                     steps: int = 1, blocks: Sequence[int] | None = None, seed: int = 0,
                     progress: Callable[[int, int], None] | None = None,
                     should_stop: Callable[[], None] | None = None) -> CrossAttentionMaps:
    """Noise Flux's latent [1, 16, h, w] to ``flow_t`` with the seeded noise and run ``steps`` Euler steps
    (refdiff.flow), capturing the joint attention of ``blocks`` (default: the last 4 double blocks). Returns
    the conditional maps [L, h', w', T] over the T5 positions (h', w' = latent / 2, rounded up)."""
    if latent.ndim != 4 or latent.shape[0] != 1:
        raise InputError(f"latent must have shape [1, C, h, w] (one image at a time), got {tuple(latent.shape)}")
    depth = len(flux.transformer.transformer_blocks)
    chosen = last_blocks(depth) if blocks is None else [int(b) for b in blocks]
    ts = flow_ts(flow_t, steps)
    padded = pad_to_patches(latent.float())
    grid = downsampled_grid((int(latent.shape[-2]), int(latent.shape[-1])), PATCH_FACTOR)
    store = AttentionStore(kind="probs")
    context, pooled = encode_flux_text(flux, prompt)
    denoise = flux_predictor(flux, context, pooled, (int(padded.shape[-2]), int(padded.shape[-1])))
    noise = pad_to_patches(injection_noise(latent.shape, seed))

    def before(i: int) -> None:
        if should_stop is not None:
            should_stop()
        store.step = i
        if progress is not None and i:
            progress(i, len(ts))

    with torch.no_grad(), capture_joint_attention(flux.transformer, chosen, store, grid):
        flow_loop(padded, noise, ts, denoise, before_step=before)
    if progress is not None:
        progress(len(ts), len(ts))
    return store.maps()




# ---------------------------------------------------------------------------------------------- loading
FLUX_PIPELINES: tuple[str, ...] = ("FluxPipeline",)
FLUX_COMPONENTS: tuple[str, ...] = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                    "tokenizer_2")
SUPPORTED_DIT_NOTE = ("diffusion transformers load from a diffusers Flux.1 folder (dev or schnell, FluxPipeline: "
                      "transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/); other "
                      "transformer models (SD 3, PixArt, Sana, Flux Fill / Kontext / ControlNet, ...) are not "
                      "supported by the library, and SD 1.x / 2.x / SDXL load as before")


def is_flux_listing(listing: dict) -> bool:
    """Whether a model_index.json describes a plain Flux.1 text-to-image pipeline."""
    return str(listing.get("_class_name", "")) in FLUX_PIPELINES


def check_dit_listing(listing: dict, name: str) -> None:
    """Refuse a transformer-based diffusers folder that is not plain Flux, naming its class and what works."""
    from .errors import ModelLoadError

    cls = str(listing.get("_class_name", "?"))
    if not is_flux_listing(listing):
        raise ModelLoadError(f"{name} holds a {cls} model; {SUPPORTED_DIT_NOTE}")
    missing = [c for c in FLUX_COMPONENTS if not isinstance(listing.get(c), (list, tuple))
               or all(e is None for e in listing[c])]
    if missing:
        raise ModelLoadError(f"{name} ({cls}) lacks the components {missing}; {SUPPORTED_DIT_NOTE}")


def _strict(cls: Any, folder: Any, sub: str, dtype: torch.dtype) -> Any:
    """``cls.from_pretrained(folder/sub)`` offline; a weight missing from the files is an error."""
    from .errors import ModelLoadError

    path = folder / sub
    try:
        model, info = cls.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True,
                                          output_loading_info=True)
    except Exception as exc:  # missing or broken files
        raise ModelLoadError(f"cannot load {sub}/ of the Flux folder {folder} ({type(exc).__name__}: {exc}); "
                             f"{SUPPORTED_DIT_NOTE}") from exc
    missing = list(info.get("missing_keys", []) or []) + list(info.get("mismatched_keys", []) or [])
    if missing:
        raise ModelLoadError(f"{sub}/ of {folder} lacks {len(missing)} weight(s) (e.g. {missing[0]}); every "
                             "weight must come from the files, none is left random")
    return model.eval().requires_grad_(False)


def load_flux_folder(folder: Any, *, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> FluxComponents:
    """Load a diffusers Flux.1 folder offline and strictly as FluxComponents on ``device`` / ``dtype``."""
    import json
    from pathlib import Path

    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    from .errors import ModelLoadError

    folder = Path(folder)
    listing = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    check_dit_listing(listing, str(folder))
    parts = {"transformer": _strict(FluxTransformer2DModel, folder, "transformer", dtype),
             "vae": _strict(AutoencoderKL, folder, "vae", dtype),
             "text_encoder": _strict(CLIPTextModel, folder, "text_encoder", dtype),
             "text_encoder_2": _strict(T5EncoderModel, folder, "text_encoder_2", dtype)}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
        tokenizer_2 = T5TokenizerFast.from_pretrained(str(folder / "tokenizer_2"), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizers (tokenizer/, tokenizer_2/) of {folder}: {exc}") from exc
    if int(parts["vae"].config.latent_channels) * 4 != int(parts["transformer"].config.in_channels):
        raise ModelLoadError(f"{folder}: the VAE's {parts['vae'].config.latent_channels} latent channels do not "
                             f"pack into the transformer's {parts['transformer'].config.in_channels} inputs; "
                             f"{SUPPORTED_DIT_NOTE}")
    for model in parts.values():
        model.to(device=device)
    flux = FluxComponents.from_pipeline(SimpleNamespace(**parts, tokenizer=tokenizer, tokenizer_2=tokenizer_2))
    flux.upcast_vae = True  # Flux's VAE, like SDXL's, is encoded in float32 when the models are fp16
    return flux


__all__ = ["PATCH_FACTOR", "FLUX_T5_TOKENS", "CLIP_TOKENS", "DEFAULT_FLUX_GUIDANCE", "FluxComponents", "is_dit",
           "encode_image", "pad_to_patches", "pack_latents", "unpack_latents", "image_ids", "t5_ids",
           "encode_flux_text", "joint_qk", "JointCaptureProcessor", "capture_joint_attention", "flux_predictor",
           "run_flux_capture", "FLUX_PIPELINES", "SUPPORTED_DIT_NOTE", "is_flux_listing", "check_dit_listing",
           "load_flux_folder"]
