"""diffusers backend of the generative stage: VAE encoding, seeded DDIM noising and UNet steps with
cross-attention capture (docs/METHOD.md sections 2 and 3).

The schedule reproduces the released (LDM img2img) code: a uniform DDIM schedule of ``ddim_steps`` steps
over the training steps (timesteps 1, 51, 101, ... for 20 steps); strength 0.1 gives t_enc = 2, the latent is
noised with alpha_bar at DDPM t = 101, then the UNet runs DDIM steps at t = 51 and t = 1 (eta = 0), the last
one stepping to alphas_cumprod[0]. Random numbers come from CPU generators, so CPU and GPU runs share them.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .capture import (AttentionStore, CrossAttentionMaps, LayerSelector, attention_output, downsampled_grid,
                      head_averaged_attention, query_grid)
from .errors import InputError
from .offload import module_device

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion 1.x/2.x model the generative stage needs."""

    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel (or compatible: returns last_hidden_state first)
    tokenizer: Any  # transformers CLIPTokenizer with model_max_length 77
    alphas_cumprod: torch.Tensor  # [num_train_timesteps] float32, DDPM cumulative alphas
    scaling_factor: float = 0.18215  # vae.config.scaling_factor
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction"
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_pipeline(cls, pipe: Any) -> "SDComponents":
        """Take the parts of a diffusers StableDiffusionPipeline (alphas_cumprod from its scheduler)."""
        sched = pipe.scheduler
        if getattr(sched, "alphas_cumprod", None) is not None:
            ac = torch.as_tensor(sched.alphas_cumprod, dtype=torch.float32).cpu()
        else:
            cfg = sched.config
            ac = scaled_linear_alphas_cumprod(cfg.get("beta_start", 0.00085), cfg.get("beta_end", 0.012),
                                              cfg.get("num_train_timesteps", 1000))
        param = next(pipe.unet.parameters())
        return cls(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                   alphas_cumprod=ac, scaling_factor=float(pipe.vae.config.get("scaling_factor", 0.18215)),
                   prediction_type=str(sched.config.get("prediction_type", "epsilon")),
                   device=param.device, dtype=param.dtype)


def scaled_linear_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                                 num_train_timesteps: int = 1000) -> torch.Tensor:
    """alphas_cumprod [T] of SD's "scaled_linear" betas (linear in sqrt(beta)), float32."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def ddim_timesteps(ddim_steps: int = 20, num_train_timesteps: int = 1000) -> list[int]:
    """Uniform DDIM timesteps as LDM makes them: range(0, T, T // ddim_steps) + 1 -> [1, 51, ..., 951]."""
    if not 1 <= int(ddim_steps) <= int(num_train_timesteps):
        raise InputError(f"ddim_steps must be within 1..num_train_timesteps ({num_train_timesteps}), got {ddim_steps}")
    stride = int(num_train_timesteps) // int(ddim_steps)
    return [t + 1 for t in range(0, int(num_train_timesteps), stride)]


def injection_schedule(strength: float = 0.1, ddim_steps: int = 20,
                       num_train_timesteps: int = 1000) -> tuple[int, list[int]]:
    """(noise_t, step_ts): noise the latent at ddim_timesteps[t_enc], then step at reversed(ddim_timesteps[:t_enc]).

    t_enc = int(strength * ddim_steps); the defaults give (101, [51, 1]) as LDM's img2img script.
    """
    ts = ddim_timesteps(ddim_steps, num_train_timesteps)
    t_enc = int(strength * ddim_steps)
    if t_enc < 1:
        raise InputError(f"strength={strength} with ddim_steps={ddim_steps} gives t_enc = int(strength * ddim_steps)"
                         f" = {t_enc}: raise strength or ddim_steps so that at least one step runs")
    if t_enc >= len(ts):
        raise InputError(f"strength={strength} with ddim_steps={ddim_steps} gives t_enc = {t_enc}, beyond the "
                         f"{len(ts)} DDIM timesteps: use strength < 1")
    return ts[t_enc], ts[:t_enc][::-1]


def step_pairs(step_ts: Sequence[int]) -> list[tuple[int, int]]:
    """(t, t_prev) of each DDIM step; the last step goes to alphas_cumprod[0], as LDM's ddim_alphas_prev."""
    return list(zip(step_ts, list(step_ts[1:]) + [0]))


def injection_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """The seeded Gaussian noise of Eq. 3, drawn on the CPU so that CPU and GPU runs share it."""
    return torch.randn(tuple(shape), generator=torch.Generator(device="cpu").manual_seed(int(seed)),
                       dtype=torch.float32)


def encode_latent(vae: Any, pixels: torch.Tensor, latent_from: str = "sample",
                  generator: torch.Generator | None = None, scaling_factor: float = 0.18215) -> torch.Tensor:
    """VAE latent of pixels [B, 3, S, S] in [-1, 1]: posterior sample or mean, times scaling_factor, float32.

    The VAE computes in its weights' dtype; an fp16 encode that overflows (a non-finite posterior: SD's VAE
    can exceed fp16's range on some images) is computed again with the encoder in float32. The sample's
    noise is drawn on the generator's device (CPU generators: same numbers on every device).
    """
    if latent_from not in ("sample", "mean"):
        raise InputError(f"latent_from must be 'sample' or 'mean', got {latent_from!r}")
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise InputError(f"pixels must have shape [B, 3, S, S], got {tuple(pixels.shape)}")
    dist = _posterior(vae, pixels)
    if next(vae.parameters()).dtype == torch.float16 and not _finite_posterior(dist):
        with _encoder_in_float32(vae):  # fp16 overflowed: this image is encoded again in float32
            dist = _posterior(vae, pixels)
    mean = dist.mean.float()
    latent = mean
    if latent_from == "sample":
        gen_device = generator.device if generator is not None else torch.device("cpu")
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device=gen_device)
        latent = mean + dist.std.float() * eps.to(mean.device)
    latent = latent * scaling_factor
    if not torch.isfinite(latent).all():
        raise InputError("the VAE produced non-finite latents (also in float32, or in bf16): check the VAE weights "
                         "and the image, or load the VAE in float32")
    return latent


def _posterior(vae: Any, pixels: torch.Tensor) -> Any:
    """The VAE's posterior of pixels, computed in the dtype of its weights."""
    param = next(vae.parameters())
    with torch.no_grad():
        return vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist


def _finite_posterior(dist: Any) -> bool:
    """Whether a posterior's mean and log-variance are finite (fp16 overflows to inf, then NaN)."""
    return bool(torch.isfinite(dist.mean).all()) and bool(torch.isfinite(dist.logvar).all())


@contextmanager
def _encoder_in_float32(vae: Any) -> Iterator[None]:
    """The VAE's encoder (and quant_conv) cast to float32 for the block, back to their dtype afterwards.

    fp16 -> fp32 -> fp16 is exact, so the model is unchanged after the block; the decoder is never touched."""
    parts = [m for m in (getattr(vae, "encoder", None), getattr(vae, "quant_conv", None)) if m is not None]
    dtypes = [next(m.parameters()).dtype for m in parts]
    for m in parts:
        m.to(dtype=torch.float32)
    try:
        yield
    finally:
        for m, dtype in zip(parts, dtypes):
            m.to(dtype=dtype)


def noise_latent(latent: torch.Tensor, alpha_bar: float, noise: torch.Tensor) -> torch.Tensor:
    """Forward diffusion (Eq. 3): sqrt(alpha_bar) * latent + sqrt(1 - alpha_bar) * noise."""
    return math.sqrt(alpha_bar) * latent + math.sqrt(1.0 - alpha_bar) * noise


def ddim_step(x_t: torch.Tensor, model_output: torch.Tensor, alpha_t: float, alpha_prev: float,
              prediction_type: str = "epsilon") -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM step (eta = 0): (x_prev, pred_x0) from the model's epsilon or v prediction."""
    a, ap = float(alpha_t), float(alpha_prev)
    if prediction_type == "epsilon":
        eps = model_output
        pred_x0 = (x_t - math.sqrt(1.0 - a) * eps) / math.sqrt(a)
    elif prediction_type == "v_prediction":
        pred_x0 = math.sqrt(a) * x_t - math.sqrt(1.0 - a) * model_output
        eps = math.sqrt(a) * model_output + math.sqrt(1.0 - a) * x_t
    else:
        raise InputError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return math.sqrt(ap) * pred_x0 + math.sqrt(1.0 - ap) * eps, pred_x0


@dataclass(frozen=True)
class CrossAttentionLayer:
    """One attn2 module of a UNet with its name, block (down/mid/up) and downsampling factor."""

    name: str
    block: str
    factor: int
    module: Any  # diffusers Attention


def _block_layers(block: Any, prefix: str, kind: str, factor: int) -> list[CrossAttentionLayer]:
    out: list[CrossAttentionLayer] = []
    for j, transformer in enumerate(getattr(block, "attentions", None) or []):
        tblocks = list(getattr(transformer, "transformer_blocks", None) or [])
        for k, tb in enumerate(tblocks):
            attn = getattr(tb, "attn2", None)
            if attn is None:
                continue
            name = f"{prefix}.attentions.{j}" + (f".transformer_blocks.{k}" if len(tblocks) > 1 else "")
            out.append(CrossAttentionLayer(name, kind, factor, attn))
    return out


def cross_attention_layers(unet: Any) -> list[CrossAttentionLayer]:
    """Every cross-attention (attn2) module of a diffusers UNet, in forward order, with its factor.

    A level's factor is 2 ** (number of downsamplers before it): down block i sits below the downsamplers of
    blocks < i, the mid block below all of them, and each up block one level up after an upsampler.
    """
    layers: list[CrossAttentionLayer] = []
    level = 0
    for i, block in enumerate(unet.down_blocks):
        layers += _block_layers(block, f"down_blocks.{i}", "down", 2 ** level)
        level += getattr(block, "downsamplers", None) is not None
    if getattr(unet, "mid_block", None) is not None:
        layers += _block_layers(unet.mid_block, "mid_block", "mid", 2 ** level)
    for i, block in enumerate(unet.up_blocks):
        layers += _block_layers(block, f"up_blocks.{i}", "up", 2 ** level)
        level -= getattr(block, "upsamplers", None) is not None
    return layers


class CaptureAttnProcessor:
    """AttnProcessor2_0's computation (SDPA output) that also records the head-averaged attention map."""

    def __init__(self, layer: CrossAttentionLayer, store: AttentionStore, kind: str,
                 cond_or_uncond: Sequence[int] | None, latent_hw: dict[str, tuple[int, int]]) -> None:
        self.layer, self.store, self.kind = layer, store, kind
        self.cond_or_uncond = None if cond_or_uncond is None else list(cond_or_uncond)
        self.latent_hw = latent_hw  # filled by a UNet forward pre-hook

    def _grid(self, num_queries: int, spatial: tuple[int, int] | None) -> tuple[int, int]:
        if spatial is not None:
            return spatial
        hw = self.latent_hw.get("hw")
        if hw is not None:
            grid = downsampled_grid(hw, self.layer.factor)
            if grid[0] * grid[1] == num_queries:
                return grid
        return query_grid(num_queries, hw)[0]

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if getattr(attn, "spatial_norm", None) is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        spatial = None
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            spatial = (height, width)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if getattr(attn, "group_norm", None) is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = _head_norm(getattr(attn, "norm_q", None), query, attn.heads)
        key = _head_norm(getattr(attn, "norm_k", None), key, attn.heads)

        out = attention_output(query, key, value, attn.heads, attn_mask=attention_mask)
        grid = self._grid(query.shape[1], spatial)
        maps = head_averaged_attention(query, key, attn.heads, kind=self.kind)
        self.store.add(self.layer.name, self.layer.block, self.layer.factor, grid, maps, self.cond_or_uncond)

        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _head_norm(norm: Any, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Apply a per-head norm (Attention.norm_q / norm_k) to [B, N, heads*dh], as diffusers does on head views."""
    if norm is None:
        return x
    b, n, c = x.shape
    y = norm(x.view(b, n, heads, c // heads).transpose(1, 2))
    return y.transpose(1, 2).reshape(b, n, c)


@contextmanager
def capture_processors(unet: Any, selector: LayerSelector, store: AttentionStore, kind: str | None = None,
                       cond_or_uncond: Sequence[int] | None = None) -> Iterator[list[str]]:
    """Install capturing processors on the selected attn2 modules only; restore the originals on exit.

    Yields the names of the captured layers. ``cond_or_uncond`` labels the batch chunks (diffusers CFG
    batch [uncond, cond] -> [1, 0]; None: all conditional). ``kind`` defaults to ``store.kind``.
    """
    kind = store.kind if kind is None else kind
    if kind != store.kind:
        raise InputError(f"capture kind {kind!r} differs from the store's kind {store.kind!r}")
    chosen = [layer for layer in cross_attention_layers(unet) if selector.wants(layer.block, layer.factor)]
    if not chosen:
        raise InputError(f"no cross-attention layer of this UNet matches capture_factor={selector.factor} and "
                         f"capture_blocks={selector.blocks}")
    latent_hw: dict[str, tuple[int, int]] = {}

    def remember_size(_module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample")
        if isinstance(sample, torch.Tensor) and sample.ndim == 4:
            latent_hw["hw"] = (int(sample.shape[-2]), int(sample.shape[-1]))

    originals: list[tuple[Any, Any]] = []
    hook = unet.register_forward_pre_hook(remember_size, with_kwargs=True)
    try:
        for layer in chosen:
            originals.append((layer.module, layer.module.processor))
            layer.module.set_processor(CaptureAttnProcessor(layer, store, kind, cond_or_uncond, latent_hw))
        yield [layer.name for layer in chosen]
    finally:
        for module, processor in reversed(originals):
            module.set_processor(processor)
        hook.remove()


def encode_prompts(sd: SDComponents, text: str, use_cfg: bool = True) -> torch.Tensor:
    """Text-encoder hidden states [1 or 2, 77, D] ([uncond "", cond] with CFG) on the UNet's device/dtype."""
    texts = ["", text] if use_cfg else [text]
    max_len = int(sd.tokenizer.model_max_length)
    limit = getattr(getattr(sd.text_encoder, "config", None), "max_position_embeddings", None)
    if limit is not None:
        max_len = min(max_len, int(limit))
    ids = sd.tokenizer(texts, padding="max_length", max_length=max_len, truncation=True,
                       return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = sd.text_encoder(ids.to(module_device(sd.text_encoder)))[0]
    return hidden.to(device=sd.device, dtype=sd.dtype)


def encode_image(sd: SDComponents, pixels: torch.Tensor, latent_from: str = "sample", seed: int = 0) -> torch.Tensor:
    """Scaled VAE latent of pixels [1, 3, S, S] in [-1, 1]; a posterior sample is drawn with seed + 1.

    (seed + 1 keeps the posterior noise independent of the injection noise, which run_capture draws with seed.)
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed) + 1)
    return encode_latent(sd.vae, pixels, latent_from=latent_from, generator=gen, scaling_factor=sd.scaling_factor)


def run_capture(sd: SDComponents, latent: torch.Tensor, prompt: str, *, strength: float = 0.1,
                ddim_steps: int = 20, num_train_timesteps: int = 1000, use_cfg: bool = True,
                guidance_scale: float = 9.0, capture_kind: str = "logits", capture_factor: int = 4,
                capture_blocks: tuple[str, ...] = ("down", "mid", "up"), seed: int = 0,
                max_steps: int | None = None, progress: Callable[[int, int], None] | None = None,
                should_stop: Callable[[], None] | None = None) -> CrossAttentionMaps:
    """Noise a scaled latent [1, 4, h, w] (Eq. 3) and run the DDIM steps, capturing cross-attention (Eq. 4).

    With use_cfg the batch is ["", prompt] (the caller appends the prompt suffix). max_steps caps the number
    of UNet steps (speed option). progress(done, total) is called after each step; should_stop() before each
    (it raises to interrupt). Returns the maps of every captured layer of every step.
    """
    if latent.ndim != 4 or latent.shape[0] != 1:
        raise InputError(f"latent must have shape [1, C, h, w] (one image at a time), got {tuple(latent.shape)}")
    if max_steps is not None and max_steps < 1:
        raise InputError(f"max_steps must be >= 1 or None, got {max_steps}")
    if len(sd.alphas_cumprod) != num_train_timesteps:
        raise InputError(f"num_train_timesteps={num_train_timesteps} but the model's schedule has "
                         f"{len(sd.alphas_cumprod)} steps")
    noise_t, step_ts = injection_schedule(strength, ddim_steps, num_train_timesteps)
    steps = step_pairs(step_ts)[:max_steps]
    ac = sd.alphas_cumprod.double().cpu()
    selector = LayerSelector(capture_factor, tuple(capture_blocks))
    store = AttentionStore(kind=capture_kind)

    noise = injection_noise(latent.shape, seed)
    x = noise_latent(latent.float(), float(ac[noise_t]), noise.to(latent.device)).to(sd.device)
    context = encode_prompts(sd, prompt, use_cfg)
    layout = [1, 0] if use_cfg else [0]
    total = len(steps)
    with torch.no_grad(), capture_processors(sd.unet, selector, store, capture_kind, layout):
        for i, (t, t_prev) in enumerate(steps):
            if should_stop is not None:
                should_stop()
            store.step = i
            x_in = torch.cat([x, x]) if use_cfg else x
            t_in = torch.full((x_in.shape[0],), t, device=sd.device, dtype=torch.long)
            out = sd.unet(x_in.to(sd.dtype), t_in, encoder_hidden_states=context).sample.float()
            if use_cfg:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            x, _ = ddim_step(x, out, float(ac[t]), float(ac[t_prev]), sd.prediction_type)
            if progress is not None:
                progress(i + 1, total)
    return store.maps()


__all__ = ["SDComponents", "PREDICTION_TYPES", "scaled_linear_alphas_cumprod", "ddim_timesteps",
           "injection_schedule", "encode_latent", "noise_latent", "ddim_step", "CrossAttentionLayer",
           "cross_attention_layers", "CaptureAttnProcessor", "capture_processors", "encode_prompts",
           "encode_image", "run_capture"]
