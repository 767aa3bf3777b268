"""diffusers backend of the generative stage (docs/METHOD.md sections 2 and 3): VAE encoding, the text
encoder, and the UNet run through ``schedule.ddim_loop`` (Eq. 3) with capture hooks on a diffusers UNet.

Captures never change what the UNet computes. Cross-attention (attn2) of the selected layers runs through
``CaptureAttnProcessor`` (SDPA output as AttnProcessor2_0, head-averaged map recorded beside it); every other
layer keeps its own processor. Self-attention (attn1) and block features are captured with forward hooks
only: a pre-hook on each attn1 module recomputes its query/key projections on the side (the module's own
processor is left in place, so its output is bit-identical whatever processor is installed, and it composes
with ``capture_processors`` on attn2), and forward hooks on the named blocks copy their outputs. Every hook
is removed on exit. What they record goes to the stores of ``stores.py``.

Self-attention is O(Q^2) per layer: a 64 x 64 grid (Q = 4096) costs 64 MiB per captured layer and CFG chunk
in float32, a 128 x 128 grid (the finest level at S = 1024) 1 GiB. Layers whose query grid has more than
``max_tokens`` tokens are therefore skipped, and probabilities are computed ``chunk`` queries at a time, so
[heads, Q, Q] is never materialised.

Batch chunks follow ``capture.py``'s convention: label 0 (COND) is the conditional branch, 1 (UNCOND) the
unconditional one; a diffusers CFG batch [uncond, cond] is ``cond_or_uncond=[1, 0]``.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .capture import (BLOCKS, COND, SELF_ATTENTION_CHUNK, SELF_ATTENTION_MAX_TOKENS, CrossAttentionMaps,
                      LayerSelector, attention_output, downsampled_grid, head_averaged_attention, query_grid)
from .devices import module_device
from .errors import InputError
from .schedule import (classifier_free_guidance, ddim_loop, injection_noise, injection_plan,
                       scaled_linear_alphas_cumprod)
from .stores import AttentionStore, FeatureStore, SelfAttentionStore, check_branches, split_branches

DEFAULT_FEATURE_BLOCKS: tuple[str, ...] = ("up_blocks.1", "up_blocks.2")

@dataclass
class SDComponents:
    """The parts of a Stable Diffusion 1.x/2.x or SDXL model the generative stage needs (SDXL: two text encoders
    and the added conditioning of its UNet, see ``is_sdxl``)."""

    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel (or compatible: returns last_hidden_state first)
    tokenizer: Any  # transformers CLIPTokenizer with model_max_length 77
    alphas_cumprod: torch.Tensor  # [num_train_timesteps] float32, DDPM cumulative alphas
    scaling_factor: float = 0.18215  # vae.config.scaling_factor
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction"
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    text_encoder_2: Any = None  # SDXL: transformers CLIPTextModelWithProjection (CLIP-G: hidden states + pooled)
    tokenizer_2: Any = None  # SDXL: CLIP-G's tokenizer (the same BPE, padded with "!" = id 0)
    upcast_vae: bool = False  # encode in float32 when the VAE is fp16 (SDXL's own VAE overflows fp16)

    @property
    def is_sdxl(self) -> bool:
        """Whether the UNet takes SDXL's added conditioning (pooled text + size/crop ids)."""
        return getattr(getattr(self.unet, "config", None), "addition_embed_type", None) == "text_time"

    @classmethod
    def from_pipeline(cls, pipe: Any) -> "SDComponents":
        """Take the parts of a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline (alphas_cumprod
        from its scheduler)."""
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
                   device=param.device, dtype=param.dtype, text_encoder_2=getattr(pipe, "text_encoder_2", None),
                   tokenizer_2=getattr(pipe, "tokenizer_2", None))


def encode_latent(vae: Any, pixels: torch.Tensor, latent_from: str = "sample",
                  generator: torch.Generator | None = None, scaling_factor: float = 0.18215,
                  upcast: bool = False) -> torch.Tensor:
    """VAE latent of pixels [B, 3, S, S] in [-1, 1]: posterior sample or mean, times scaling_factor, float32.

    The VAE computes in its weights' dtype; an fp16 encode that overflows (a non-finite posterior: SD's VAE
    can exceed fp16's range on some images) is computed again with the encoder in float32; ``upcast`` encodes
    fp16 VAEs in float32 from the start (SDXL's VAE overflows on most images). The sample's
    noise is drawn on the generator's device (CPU generators: same numbers on every device).
    """
    if latent_from not in ("sample", "mean"):
        raise InputError(f"latent_from must be 'sample' or 'mean', got {latent_from!r}")
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise InputError(f"pixels must have shape [B, 3, S, S], got {tuple(pixels.shape)}")
    half = next(vae.parameters()).dtype == torch.float16
    if half and upcast:
        with _encoder_in_float32(vae):
            dist = _posterior(vae, pixels)
    else:
        dist = _posterior(vae, pixels)
    if half and not upcast and not _finite_posterior(dist):
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


def _head_norm(norm: Any, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention.norm_q / norm_k on head views of [B, N, heads*dh], as diffusers applies them."""
    if norm is None:
        return x
    b, n, c = x.shape
    return norm(x.view(b, n, heads, c // heads).transpose(1, 2)).transpose(1, 2).reshape(b, n, c)


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


def _latent_hook(unet: Any, latent_hw: dict[str, tuple[int, int]]) -> Any:
    def remember(_module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample")
        if isinstance(sample, torch.Tensor) and sample.ndim == 4:
            latent_hw["hw"] = (int(sample.shape[-2]), int(sample.shape[-1]))

    return unet.register_forward_pre_hook(remember, with_kwargs=True)


def _grid_of(num_tokens: int, latent_hw: dict[str, tuple[int, int]]) -> tuple[tuple[int, int], int]:
    return query_grid(num_tokens, latent_hw.get("hw"))


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
    originals: list[tuple[Any, Any]] = []
    hook = _latent_hook(unet, latent_hw)
    try:
        for layer in chosen:
            originals.append((layer.module, layer.module.processor))
            layer.module.set_processor(CaptureAttnProcessor(layer, store, kind, cond_or_uncond, latent_hw))
        yield [layer.name for layer in chosen]
    finally:
        for module, processor in reversed(originals):
            module.set_processor(processor)
        hook.remove()


@dataclass(frozen=True)
class SelfAttentionLayer:
    """One self-attention (attn1) module of a UNet with its dotted name and block (down/mid/up)."""

    name: str
    block: str
    module: Any  # diffusers Attention


def _block_of(name: str) -> str:
    head = name.split(".", 1)[0]
    return {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(head, "")


def self_attention_layers(unet: Any) -> list[SelfAttentionLayer]:
    """Every attn1 module of a diffusers UNet's transformer blocks, in forward order (down, mid, up)."""
    order = {"down": 0, "mid": 1, "up": 2}
    found = [SelfAttentionLayer(name, _block_of(name), module) for name, module in unet.named_modules()
             if name.endswith(".attn1") and _block_of(name)]
    return sorted(found, key=lambda layer: order[layer.block])  # stable: keeps the order inside a block


@contextmanager
def capture_self_attention(unet: Any, max_tokens: int = SELF_ATTENTION_MAX_TOKENS, factor: int | None = None,
                           blocks: Sequence[str] = BLOCKS, cond_or_uncond: Sequence[int] | None = None,
                           keep: Sequence[int] = (COND,), device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32, chunk: int = SELF_ATTENTION_CHUNK,
                           per_layer: bool = True) -> Iterator[SelfAttentionStore]:
    """Record head-averaged self-attention probabilities of a diffusers UNet's attn1 layers while inside.

    Only layers with at most ``max_tokens`` queries, at downsampling ``factor`` (None: any) and in ``blocks``
    are captured, and only the CFG branches in ``keep``. Probabilities are fp32, computed ``chunk`` queries at
    a time on the UNet's device, then stored on ``device`` in ``dtype`` (summed over steps; per layer, or
    merged per level with ``per_layer=False``). The UNet's output is unchanged; hooks are removed on exit.
    """
    if max_tokens < 1 or chunk < 1:
        raise InputError(f"max_tokens ({max_tokens}) and chunk ({chunk}) must be positive")
    selector = LayerSelector(factor, tuple(blocks))
    check_branches(cond_or_uncond, keep)
    layers = self_attention_layers(unet)
    if not layers:
        raise InputError("this UNet has no self-attention (attn1) layer in its down/mid/up blocks")
    store = SelfAttentionStore(device=device, dtype=dtype, per_layer=per_layer)
    latent_hw: dict[str, tuple[int, int]] = {}

    def make_hook(layer: SelfAttentionLayer) -> Any:
        def hook(attn: Any, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if kwargs.get("encoder_hidden_states") is not None or (len(args) > 1 and args[1] is not None):
                return  # attn1 used as cross-attention (only_cross_attention models): not self-attention
            if not isinstance(hidden, torch.Tensor):
                return
            if hidden.ndim == 4:
                hidden = hidden.flatten(2).transpose(1, 2)
            num = int(hidden.shape[1])
            if num > max_tokens:
                return
            grid, fac = _grid_of(num, latent_hw)
            if not selector.wants(layer.block, fac):
                return
            if kwargs.get("attention_mask") is not None or getattr(attn, "spatial_norm", None) is not None:
                raise InputError(f"{layer.name}: self-attention capture does not support attention masks or spatial "
                                 f"norms; leave this layer out (factor / blocks)")
            with torch.no_grad():
                x = hidden
                if getattr(attn, "group_norm", None) is not None:
                    x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
                for label, part in split_branches(x, cond_or_uncond, keep):
                    q = _head_norm(getattr(attn, "norm_q", None), attn.to_q(part), attn.heads)
                    k = _head_norm(getattr(attn, "norm_k", None), attn.to_k(part), attn.heads)
                    probs = head_averaged_attention(q, k, attn.heads, kind="probs", chunk=chunk)
                    store.add(layer.name, fac, grid, probs, label)

        return hook

    handles = [_latent_hook(unet, latent_hw)]
    try:
        for layer in layers:
            handles.append(layer.module.register_forward_pre_hook(make_hook(layer), with_kwargs=True))
        yield store
    finally:
        for handle in reversed(handles):
            handle.remove()


def resolve_modules(unet: Any, names: Sequence[str]) -> list[tuple[str, Any]]:
    """(name, module) for dotted module names of the UNet (e.g. "up_blocks.1"); unknown names raise InputError."""
    if isinstance(names, str):
        raise InputError(f"blocks must be a sequence of module names, got the string {names!r}")
    modules = dict(unet.named_modules())
    missing = [n for n in names if not n or n not in modules]
    if missing:
        blocks = [n for n in modules if re.fullmatch(r"(down_blocks|up_blocks)\.\d+|mid_block", n)]
        raise InputError(f"unknown UNet module(s) {missing}; this UNet's blocks are {blocks}")
    if not names:
        raise InputError("blocks is empty: name at least one UNet module (e.g. 'up_blocks.1')")
    return [(n, modules[n]) for n in dict.fromkeys(names)]


def _as_feature_map(output: Any, latent_hw: dict[str, tuple[int, int]], name: str) -> torch.Tensor:
    """A module output as [B, C, h, w]: first element of a tuple; token layouts [B, N, C] put on their grid."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if hasattr(output, "sample") and not isinstance(output, torch.Tensor):
        output = output.sample
    if not isinstance(output, torch.Tensor):
        raise InputError(f"{name} returned {type(output).__name__}, not a tensor: choose another module")
    if output.ndim == 4:
        return output
    if output.ndim == 3:
        (h, w), _ = _grid_of(int(output.shape[1]), latent_hw)
        return output.transpose(1, 2).reshape(output.shape[0], output.shape[2], h, w)
    raise InputError(f"{name} returned a tensor of shape {tuple(output.shape)}; expected [B, C, h, w] or [B, N, C]")


@contextmanager
def capture_block_features(unet: Any, blocks: Sequence[str] = DEFAULT_FEATURE_BLOCKS,
                           cond_or_uncond: Sequence[int] | None = None, keep: Sequence[int] = (COND,),
                           device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32) -> Iterator[FeatureStore]:
    """Record the outputs of named UNet modules (default up_blocks.1 and up_blocks.2) while inside.

    Any dotted module name works: a block returns [B, C, h, w] (down blocks: their first output), a token
    layout [B, N, C] (e.g. "...attn2.to_q") is put back on its grid. Kept CFG branches only; stored on
    ``device`` in ``dtype``, summed over steps. The UNet's output is unchanged; hooks are removed on exit.
    """
    chosen = resolve_modules(unet, blocks)
    check_branches(cond_or_uncond, keep)
    store = FeatureStore(device=device, dtype=dtype)
    latent_hw: dict[str, tuple[int, int]] = {}

    def make_hook(name: str) -> Any:
        def hook(_module: Any, _args: tuple, output: Any) -> None:
            with torch.no_grad():
                fmap = _as_feature_map(output, latent_hw, name)
                for label, part in split_branches(fmap, cond_or_uncond, keep):
                    store.add(name, (int(fmap.shape[-2]), int(fmap.shape[-1])), part, label)

        return hook

    handles = [_latent_hook(unet, latent_hw)]
    try:
        for name, module in chosen:
            handles.append(module.register_forward_hook(make_hook(name)))
        yield store
    finally:
        for handle in reversed(handles):
            handle.remove()


def _token_ids(tokenizer: Any, encoder: Any, texts: list[str]) -> torch.Tensor:
    """Token ids [n, 77] of texts, padded to the encoder's positions."""
    max_len = int(tokenizer.model_max_length)
    limit = getattr(getattr(encoder, "config", None), "max_position_embeddings", None)
    if limit is not None:
        max_len = min(max_len, int(limit))
    return tokenizer(texts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt").input_ids


def encode_text(sd: SDComponents, text: str, use_cfg: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states [1 or 2, 77, D], pooled text [1 or 2, P] or None) of ["", text] (with CFG) or [text].

    SD 1.x/2.x: the text encoder's last hidden state, no pooled text. SDXL: the penultimate hidden states of
    CLIP-L and CLIP-G (no final layer norm) concatenated along D, and CLIP-G's projected pooled output, as
    ComfyUI's SDXL CLIP and diffusers' SDXL pipeline compute them. The unconditional branch is the encoded
    empty prompt (as ComfyUI's CLIPTextEncode gives it), not zeros."""
    texts = ["", text] if use_cfg else [text]
    with torch.no_grad():
        ids = _token_ids(sd.tokenizer, sd.text_encoder, texts)
        if not sd.is_sdxl:
            hidden = sd.text_encoder(ids.to(module_device(sd.text_encoder)))[0]
            return hidden.to(device=sd.device, dtype=sd.dtype), None
        if sd.text_encoder_2 is None or sd.tokenizer_2 is None:
            raise InputError("an SDXL UNet needs its second text encoder and tokenizer (text_encoder_2, "
                             "tokenizer_2: CLIP-G); load the whole SDXL model")
        out_l = sd.text_encoder(ids.to(module_device(sd.text_encoder)), output_hidden_states=True)
        ids_g = _token_ids(sd.tokenizer_2, sd.text_encoder_2, texts)
        out_g = sd.text_encoder_2(ids_g.to(module_device(sd.text_encoder_2)), output_hidden_states=True)
        hidden = torch.cat([out_l.hidden_states[-2].to(sd.device), out_g.hidden_states[-2].to(sd.device)], dim=-1)
        pooled = out_g.text_embeds.to(device=sd.device, dtype=sd.dtype)
    return hidden.to(device=sd.device, dtype=sd.dtype), pooled


def encode_prompts(sd: SDComponents, text: str, use_cfg: bool = True) -> torch.Tensor:
    """Text-encoder hidden states [1 or 2, 77, D] ([uncond "", cond] with CFG) on the UNet's device/dtype."""
    return encode_text(sd, text, use_cfg)[0]


def added_conditioning(sd: SDComponents, pooled: torch.Tensor | None, batch: int,
                       latent_hw: tuple[int, int]) -> dict[str, torch.Tensor] | None:
    """SDXL's added_cond_kwargs for a UNet batch: the pooled text and the time ids (original size, crop (0, 0),
    target size, all the image size h x w = latent x 8), as ComfyUI's SDXL model and diffusers' SDXL pipeline
    set them by default; None for SD 1.x/2.x."""
    if not sd.is_sdxl:
        return None
    if pooled is None:
        raise InputError("an SDXL UNet needs the pooled text of CLIP-G; encode the prompt with encode_text")
    h, w = (int(v) * 8 for v in latent_hw)
    ids = torch.tensor([[h, w, 0, 0, h, w]], device=sd.device, dtype=sd.dtype)
    if pooled.shape[0] != batch:
        pooled = pooled.expand(batch, -1) if pooled.shape[0] == 1 else pooled
    return {"text_embeds": pooled.to(device=sd.device, dtype=sd.dtype), "time_ids": ids.expand(batch, -1)}


def unet_output(sd: SDComponents, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                pooled: torch.Tensor | None = None) -> torch.Tensor:
    """One call of the diffusers UNet on a batch (SDXL's added conditioning built here); its prediction."""
    added = added_conditioning(sd, pooled, int(x.shape[0]), (int(x.shape[-2]), int(x.shape[-1])))
    kwargs = {"added_cond_kwargs": added} if added is not None else {}
    return sd.unet(x, t, encoder_hidden_states=context, **kwargs).sample


def encode_image(sd: SDComponents, pixels: torch.Tensor, latent_from: str = "sample", seed: int = 0) -> torch.Tensor:
    """Scaled VAE latent of pixels [1, 3, S, S] in [-1, 1]; a posterior sample is drawn with seed + 1.

    (seed + 1 keeps the posterior noise independent of the injection noise, which run_capture draws with seed.)
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed) + 1)
    return encode_latent(sd.vae, pixels, latent_from=latent_from, generator=gen, scaling_factor=sd.scaling_factor,
                         upcast=sd.upcast_vae)


def unet_predictor(sd: SDComponents, context: torch.Tensor, use_cfg: bool = True,
                   guidance_scale: float = 9.0,
                   pooled: torch.Tensor | None = None) -> Callable[[torch.Tensor, int, int], torch.Tensor]:
    """The diffusers UNet as ``schedule.ddim_loop``'s ``predict``: one call on the batch [uncond, cond] (with
    ``use_cfg``; ``context`` and SDXL's ``pooled`` from encode_text) guided as u + g (c - u), or on the
    conditional branch alone."""

    def predict(x: torch.Tensor, t: int, _step: int) -> torch.Tensor:
        x_in = torch.cat([x, x]) if use_cfg else x
        t_in = torch.full((x_in.shape[0],), int(t), device=sd.device, dtype=torch.long)
        out = unet_output(sd, x_in.to(sd.dtype), t_in, context, pooled).float()
        if not use_cfg:
            return out
        uncond, cond = out.chunk(2)
        return classifier_free_guidance(uncond, cond, guidance_scale)

    return predict


def run_capture(sd: SDComponents, latent: torch.Tensor, prompt: str, *, strength: float = 0.1,
                ddim_steps: int = 20, num_train_timesteps: int = 1000, use_cfg: bool = True,
                guidance_scale: float = 9.0, capture_kind: str = "logits", capture_factor: int = 4,
                capture_blocks: tuple[str, ...] = ("down", "mid", "up"), seed: int = 0,
                max_steps: int | None = None, progress: Callable[[int, int], None] | None = None,
                should_stop: Callable[[], None] | None = None) -> CrossAttentionMaps:
    """Noise a scaled latent [1, 4, h, w] (Eq. 3) and run the DDIM steps (schedule.ddim_loop with
    unet_predictor), capturing cross-attention (Eq. 4).

    With use_cfg the batch is ["", prompt] (the caller appends the prompt suffix). max_steps caps the number
    of UNet steps (speed option). progress(done, total) is called after each step; should_stop() before each
    (it raises to interrupt). Returns the maps of every captured layer of every step.
    """
    if latent.ndim != 4 or latent.shape[0] != 1:
        raise InputError(f"latent must have shape [1, C, h, w] (one image at a time), got {tuple(latent.shape)}")
    if len(sd.alphas_cumprod) != num_train_timesteps:
        raise InputError(f"num_train_timesteps={num_train_timesteps} but the model's schedule has "
                         f"{len(sd.alphas_cumprod)} steps")
    plan = injection_plan(strength, ddim_steps, num_train_timesteps, max_steps)
    selector = LayerSelector(capture_factor, tuple(capture_blocks))
    store = AttentionStore(kind=capture_kind)
    context, pooled = encode_text(sd, prompt, use_cfg)
    predict = unet_predictor(sd, context, use_cfg, guidance_scale, pooled)
    layout = [1, 0] if use_cfg else [0]
    total = len(plan.steps)

    def before(i: int) -> None:
        if should_stop is not None:
            should_stop()
        store.step = i

    def after(i: int) -> None:
        if progress is not None:
            progress(i + 1, total)

    with torch.no_grad(), capture_processors(sd.unet, selector, store, capture_kind, layout):
        ddim_loop(latent, injection_noise(latent.shape, seed), sd.alphas_cumprod, plan, predict, sd.prediction_type,
                  device=sd.device, before_step=before, after_step=after)
    return store.maps()


__all__ = ["SDComponents", "DEFAULT_FEATURE_BLOCKS", "encode_latent", "CrossAttentionLayer", "cross_attention_layers",
           "CaptureAttnProcessor", "capture_processors", "SelfAttentionLayer", "self_attention_layers",
           "capture_self_attention", "resolve_modules", "capture_block_features", "encode_text", "encode_prompts",
           "added_conditioning", "unet_output", "encode_image",
           "unet_predictor", "run_capture"]
