"""diffusers backend of the generative stage for Flux.1 and SD 3 (docs/METHOD.md section 15, "library path"): VAE
encoding with the model's shift and scale, T5 + CLIP text encoding, the flow noise injection and Euler steps of
``refdiff.flow`` on a diffusers FluxTransformer2DModel / SD3Transformer2DModel, and the capture of its joint
attention.

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


@dataclass
class SD3Components:
    """The parts of an SD 3 / 3.5 model, named as in diffusers' StableDiffusion3Pipeline: CLIP-L and CLIP-G
    (text_encoder, text_encoder_2: penultimate hidden states and pooled projections) and T5 (text_encoder_3)."""

    transformer: Any  # diffusers SD3Transformer2DModel
    vae: Any  # diffusers AutoencoderKL, 16 latent channels
    text_encoder: Any  # transformers CLIPTextModelWithProjection (CLIP-L)
    tokenizer: Any  # transformers CLIPTokenizer
    text_encoder_2: Any  # transformers CLIPTextModelWithProjection (CLIP-G)
    tokenizer_2: Any
    text_encoder_3: Any  # transformers T5EncoderModel
    tokenizer_3: Any  # transformers T5TokenizerFast
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    t5_tokens: int = 77  # ComfyUI's SD 3 T5 tokenizer pads to 77 (min_length)
    upcast_vae: bool = False

    @property
    def family(self) -> str:
        return "SD3"

    @property
    def map_tokenizer(self) -> Any:
        """T5's tokenizer (its pieces sit after the 77 CLIP positions of the context)."""
        return self.tokenizer_3

    @classmethod
    def from_pipeline(cls, pipe: Any) -> "SD3Components":
        """Take the parts of a diffusers StableDiffusion3Pipeline (or any object with its attribute names)."""
        param = next(pipe.transformer.parameters())
        cfg = pipe.vae.config
        return cls(transformer=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder,
                   tokenizer=pipe.tokenizer, text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
                   text_encoder_3=pipe.text_encoder_3, tokenizer_3=pipe.tokenizer_3,
                   scaling_factor=float(cfg.get("scaling_factor", 1.5305)),
                   shift_factor=float(cfg.get("shift_factor", None) or 0.0), device=param.device, dtype=param.dtype)


def is_dit(sd: Any) -> bool:
    """Whether ``sd`` is a diffusion transformer's components (Flux or SD 3) rather than SD's."""
    return isinstance(sd, (FluxComponents, SD3Components))


def word_positions(model: Any, prompt: str, span: tuple[int, int]) -> list[int]:
    """A word's positions in the model's context by character offsets: Flux, its T5 pieces (the first is 0);
    SD 3, its CLIP-L pieces (start token 0) then 77 + its T5 pieces (nodes/dit_backend.sd3_positions)."""
    from .text import word_token_positions

    t5 = word_token_positions(prompt, span, model.map_tokenizer)
    if model.family == "Flux":
        return t5
    clip = [p for p in word_token_positions(prompt, span, model.tokenizer) if 0 < p < CLIP_TOKENS - 1]
    return clip + [CLIP_TOKENS + p for p in t5]


def root_position(model: Any, parsed: Any, prompt_suffix: str = ", ") -> int:
    """The position c is read from: the root word's last piece in the context (its last T5 piece)."""
    positions = word_positions(model, parsed.text + prompt_suffix, parsed.root_span)
    if not positions:
        raise InputError(f"root word {parsed.root!r} of {parsed.text!r} has no token in the tokenisation")
    return positions[-1]


# ---------------------------------------------------------------------------------------------- latents
def encode_image(flux: Any, pixels: torch.Tensor, latent_from: str = "sample", seed: int = 0) -> torch.Tensor:
    """Flux's / SD 3's latent of pixels [1, 3, S, S] in [-1, 1]: (VAE posterior sample or mean - shift) * scale,
    float32 [1, 16, S/8, S/8]; the sample is drawn with seed + 1 as for SD."""
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
def t5_ids(tokenizer: Any, prompt: str | Sequence[str], min_length: int = FLUX_T5_TOKENS) -> torch.Tensor:
    """T5 token ids [n, max(min_length, longest)] of the prompt(s): pieces from position 0 (no start token), the
    end token, then padding; never truncated."""
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    n = max(len(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts)
    return tokenizer(texts, padding="max_length", max_length=max(int(min_length), n), truncation=False,
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


def _clip_states(encoder: Any, tokenizer: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states [n, 77, D], projected pooled output [n, P]) of a CLIP text encoder."""
    ids = tokenizer(texts, padding="max_length", max_length=CLIP_TOKENS, truncation=True, return_tensors="pt").input_ids
    out = encoder(ids.to(module_device(encoder)), output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def encode_sd3_text(model: SD3Components, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [n, 77 + T, D], pooled [n, P_l + P_g]) as StableDiffusion3Pipeline encodes: CLIP-L and CLIP-G
    penultimate states side by side, zero-padded to T5's width, then T5's states; the pooled projections joined."""
    with torch.no_grad():
        l_states, l_pooled = _clip_states(model.text_encoder, model.tokenizer, texts)
        g_states, g_pooled = _clip_states(model.text_encoder_2, model.tokenizer_2, texts)
        ids = t5_ids(model.tokenizer_3, texts, model.t5_tokens)
        t5 = model.text_encoder_3(ids.to(module_device(model.text_encoder_3)))[0]
        clip = torch.cat([l_states.to(t5.device), g_states.to(t5.device)], dim=-1)
        clip = F.pad(clip, (0, int(t5.shape[-1]) - int(clip.shape[-1])))
        context = torch.cat([clip.to(t5.dtype), t5], dim=-2)
        pooled = torch.cat([l_pooled.to(t5.device), g_pooled.to(t5.device)], dim=-1)
    return context.to(device=model.device, dtype=model.dtype), pooled.to(device=model.device, dtype=model.dtype)


# ---------------------------------------------------------------------------------------------- capture
def sd3_joint_qk(attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint q and k [B, heads, N + T, dh] of an SD 3 joint block (image first), after QK-norm, computed
    with the block's projections and norms as diffusers' JointAttnProcessor2_0 computes them."""
    heads = int(attn.heads)

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)

    q, k = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states))
    eq, ek = split(attn.add_q_proj(encoder_hidden_states)), split(attn.add_k_proj(encoder_hidden_states))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if attn.norm_added_q is not None:
        eq = attn.norm_added_q(eq)
    if attn.norm_added_k is not None:
        ek = attn.norm_added_k(ek)
    return torch.cat([q, eq], dim=2), torch.cat([k, ek], dim=2)


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

    def __init__(self, original: Any, name: str, store: AttentionStore, grid: tuple[int, int],
                 family: str = "Flux", rows: slice = slice(None)) -> None:
        self.original, self.name, self.store, self.grid = original, name, store, (int(grid[0]), int(grid[1]))
        self.family, self.rows = family, rows  # rows: the conditional rows of the batch

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, **kwargs: Any) -> Any:
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask=attention_mask,
                            image_rotary_emb=image_rotary_emb, **kwargs)
        if encoder_hidden_states is None:
            raise InputError(f"{self.name}: a joint (double) block was expected, it received no text tokens")
        with torch.no_grad():
            hidden, context = hidden_states[self.rows], encoder_hidden_states[self.rows]
            if self.family == "Flux":
                q, k = joint_qk(attn, hidden, context, image_rotary_emb)
            else:
                q, k = sd3_joint_qk(attn, hidden, context)
            mask = attention_mask[self.rows] if attention_mask is not None and attention_mask.ndim == 4 \
                else attention_mask
            txt_len, img_len = int(context.shape[1]), int(hidden.shape[1])
            probs = joint_text_probs(q, k, txt_len, img_len, self.family == "Flux", mask=mask)
            n_grid = self.grid[0] * self.grid[1]
            self.store.add(self.name, "mid", PATCH_FACTOR, self.grid, probs[:, :n_grid],
                           [COND] * int(q.shape[0]))
        return out


@contextmanager
def capture_joint_attention(transformer: Any, blocks: Sequence[int], store: AttentionStore,
                            grid: tuple[int, int], family: str = "Flux",
                            rows: slice = slice(None)) -> Iterator[AttentionStore]:
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
            attn.processor = JointCaptureProcessor(attn.processor, f"double_blocks.{i}", store, grid, family, rows)
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


def _flow_capture(transformer: Any, latent: torch.Tensor,
                  make_denoise: Callable[[tuple[int, int]], Callable[[torch.Tensor, float, int], torch.Tensor]],
                  flow_t: float, steps: int, blocks: Sequence[int] | None, seed: int,
                  progress: Callable[[int, int], None] | None, should_stop: Callable[[], None] | None,
                  family: str = "Flux", rows: slice = slice(None)) -> CrossAttentionMaps:
    """The flow capture both families share: noise the latent [1, C, h, w] (padded to whole patches) to
    ``flow_t`` with the seeded noise and run ``steps`` Euler steps of ``make_denoise(padded h, w)``, capturing
    the joint attention of ``blocks`` (default: the last 4 double blocks). ``make_denoise`` encodes the text: it
    is called once the latent has passed its check."""
    if latent.ndim != 4 or latent.shape[0] != 1:
        raise InputError(f"latent must have shape [1, C, h, w] (one image at a time), got {tuple(latent.shape)}")
    depth = len(transformer.transformer_blocks)
    chosen = last_blocks(depth) if blocks is None else [int(b) for b in blocks]
    ts = flow_ts(flow_t, steps)
    padded = pad_to_patches(latent.float())
    grid = downsampled_grid((int(latent.shape[-2]), int(latent.shape[-1])), PATCH_FACTOR)
    store = AttentionStore(kind="probs")
    denoise = make_denoise((int(padded.shape[-2]), int(padded.shape[-1])))
    noise = pad_to_patches(injection_noise(latent.shape, seed))

    def before(i: int) -> None:
        if should_stop is not None:
            should_stop()
        store.step = i
        if progress is not None and i:
            progress(i, len(ts))

    with torch.no_grad(), capture_joint_attention(transformer, chosen, store, grid, family, rows):
        flow_loop(padded, noise, ts, denoise, before_step=before)
    if progress is not None:
        progress(len(ts), len(ts))
    return store.maps()


def run_flux_capture(flux: FluxComponents, latent: torch.Tensor, prompt: str, *, flow_t: float = DEFAULT_FLOW_T,
                     steps: int = 1, blocks: Sequence[int] | None = None, seed: int = 0,
                     progress: Callable[[int, int], None] | None = None,
                     should_stop: Callable[[], None] | None = None) -> CrossAttentionMaps:
    """Noise Flux's latent [1, 16, h, w] to ``flow_t`` with the seeded noise and run ``steps`` Euler steps
    (refdiff.flow), capturing the joint attention of ``blocks`` (default: the last 4 double blocks). Returns
    the conditional maps [L, h', w', T] over the T5 positions (h', w' = latent / 2, rounded up)."""
    return _flow_capture(flux.transformer, latent, lambda hw: flux_predictor(flux, *encode_flux_text(flux, prompt), hw),
                         flow_t, steps, blocks, seed, progress, should_stop)


def sd3_predictor(model: SD3Components, context: torch.Tensor, pooled: torch.Tensor, use_cfg: bool,
                  guidance_scale: float) -> Callable[[torch.Tensor, float, int], torch.Tensor]:
    """The SD 3 transformer as ``flow_loop``'s ``denoise``: x0 = x_t - t v; with ``use_cfg`` one batch
    [uncond, cond] (context and pooled of ["", prompt]) guided as u + g (c - u)."""
    from .schedule import classifier_free_guidance

    def denoise(x: torch.Tensor, t: float, _step: int) -> torch.Tensor:
        x_in = torch.cat([x, x]) if use_cfg else x
        batch = int(x_in.shape[0])
        v = model.transformer(hidden_states=x_in.to(device=model.device, dtype=model.dtype),
                              encoder_hidden_states=context, pooled_projections=pooled,
                              timestep=torch.full((batch,), float(t) * 1000.0, device=model.device,
                                                  dtype=model.dtype), return_dict=False)[0].float().to(x.device)
        if use_cfg:
            uncond, cond = v.chunk(2)
            v = classifier_free_guidance(uncond, cond, guidance_scale)
        return x - float(t) * v

    return denoise


def run_sd3_capture(model: SD3Components, latent: torch.Tensor, prompt: str, *, flow_t: float = DEFAULT_FLOW_T,
                    steps: int = 1, blocks: Sequence[int] | None = None, seed: int = 0, use_cfg: bool = True,
                    guidance_scale: float = 9.0, progress: Callable[[int, int], None] | None = None,
                    should_stop: Callable[[], None] | None = None) -> CrossAttentionMaps:
    """run_flux_capture's SD 3 counterpart: maps of the conditional rows over the 77 CLIP + T positions."""
    texts = ["", prompt] if use_cfg else [prompt]
    return _flow_capture(model.transformer, latent,
                         lambda _hw: sd3_predictor(model, *encode_sd3_text(model, texts), use_cfg, guidance_scale),
                         flow_t, steps, blocks, seed, progress, should_stop, "SD3",
                         slice(1, 2) if use_cfg else slice(None))


def run_dit_capture(model: Any, latent: torch.Tensor, prompt: str, *, seed: int = 0, use_cfg: bool = True,
                    guidance_scale: float = 9.0, **kwargs: Any) -> CrossAttentionMaps:
    """The capture of the model's family with the nodes' defaults (t 0.25, one step, last 4 double blocks):
    Flux runs its conditional batch alone (guidance embedding), SD 3 uses ``use_cfg`` / ``guidance_scale``."""
    if model.family == "Flux":
        return run_flux_capture(model, latent, prompt, seed=seed, **kwargs)
    return run_sd3_capture(model, latent, prompt, seed=seed, use_cfg=use_cfg, guidance_scale=guidance_scale,
                           **kwargs)


# ---------------------------------------------------------------------------------------------- loading
# Pipeline class in model_index.json -> (family, the components it must list).
DIT_PIPELINES: dict[str, tuple[str, tuple[str, ...]]] = {
    "FluxPipeline": ("Flux", ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")),
    "StableDiffusion3Pipeline": ("SD3", ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                                         "tokenizer", "tokenizer_2", "tokenizer_3")),
}
SUPPORTED_DIT_NOTE = ("diffusion transformers load from a diffusers Flux.1 folder (dev or schnell, FluxPipeline: "
                      "transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/) or an SD 3 / 3.5 "
                      "folder (StableDiffusion3Pipeline, with its T5 text_encoder_3/ and tokenizer_3/); other "
                      "transformer models (PixArt, Sana, Flux Fill / Kontext / ControlNet, ...) are not supported, "
                      "and SD 1.x / 2.x / SDXL load as before")


def dit_listing_family(listing: dict, name: str) -> str:
    """"Flux" or "SD3" for a supported transformer folder's model_index.json; ModelLoadError naming its class
    and what works otherwise."""
    from .errors import ModelLoadError

    cls = str(listing.get("_class_name", "?"))
    if cls not in DIT_PIPELINES:
        raise ModelLoadError(f"{name} holds a {cls} model; {SUPPORTED_DIT_NOTE}")
    family, needed = DIT_PIPELINES[cls]
    missing = [c for c in needed if not isinstance(listing.get(c), (list, tuple))
               or all(e is None for e in listing[c])]
    if missing:
        raise ModelLoadError(f"{name} ({cls}) lacks the components {missing}; {SUPPORTED_DIT_NOTE}")
    return family


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


def load_dit_folder(folder: Any, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> FluxComponents | SD3Components:
    """Load a diffusers Flux.1 or SD 3 folder offline and strictly on ``device`` / ``dtype``."""
    import json
    from pathlib import Path

    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import (CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel,
                              T5TokenizerFast)

    from .errors import ModelLoadError

    folder = Path(folder)
    listing = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    family = dit_listing_family(listing, str(folder))
    if family == "Flux":
        models = {"transformer": FluxTransformer2DModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
                  "text_encoder_2": T5EncoderModel}
        tokenizers = {"tokenizer": CLIPTokenizer, "tokenizer_2": T5TokenizerFast}
    else:
        models = {"transformer": SD3Transformer2DModel, "vae": AutoencoderKL,
                  "text_encoder": CLIPTextModelWithProjection, "text_encoder_2": CLIPTextModelWithProjection,
                  "text_encoder_3": T5EncoderModel}
        tokenizers = {"tokenizer": CLIPTokenizer, "tokenizer_2": CLIPTokenizer, "tokenizer_3": T5TokenizerFast}
    parts: dict[str, Any] = {name: _strict(cls, folder, name, dtype) for name, cls in models.items()}
    try:
        for name, cls in tokenizers.items():
            parts[name] = cls.from_pretrained(str(folder / name), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizers ({', '.join(tokenizers)}) of {folder}: {exc}") from exc
    channels = int(parts["vae"].config.latent_channels) * (4 if family == "Flux" else 1)
    if channels != int(parts["transformer"].config.in_channels):
        raise ModelLoadError(f"{folder}: the VAE's {parts['vae'].config.latent_channels} latent channels do not "
                             f"match the transformer's {parts['transformer'].config.in_channels} inputs; "
                             f"{SUPPORTED_DIT_NOTE}")
    for name in models:
        parts[name].to(device=device)
    kind = FluxComponents if family == "Flux" else SD3Components
    model = kind.from_pipeline(SimpleNamespace(**parts))
    model.upcast_vae = True  # these VAEs, like SDXL's, are encoded in float32 when the models are fp16
    return model


def load_flux_folder(folder: Any, *, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> FluxComponents:
    """Load a diffusers Flux.1 folder (load_dit_folder, refusing any other family)."""
    from .errors import ModelLoadError

    model = load_dit_folder(folder, device=device, dtype=dtype)
    if not isinstance(model, FluxComponents):
        raise ModelLoadError(f"{folder} holds an {model.family} model, not Flux")
    return model


__all__ = ["PATCH_FACTOR", "FLUX_T5_TOKENS", "CLIP_TOKENS", "DEFAULT_FLUX_GUIDANCE", "FluxComponents",
           "SD3Components", "is_dit", "word_positions", "root_position", "encode_image", "pad_to_patches",
           "pack_latents", "unpack_latents", "image_ids", "t5_ids", "encode_flux_text", "encode_sd3_text",
           "sd3_joint_qk", "joint_qk", "JointCaptureProcessor", "capture_joint_attention", "flux_predictor",
           "run_flux_capture", "sd3_predictor", "run_sd3_capture", "run_dit_capture", "DIT_PIPELINES",
           "SUPPORTED_DIT_NOTE", "dit_listing_family", "load_dit_folder", "load_flux_folder"]
