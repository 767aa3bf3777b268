"""Random-weight Flux.1 parts for tests (no downloads): a toy FluxTransformer2DModel (2 double blocks, 1 single
block, guidance embedding as Flux dev has), a 16-channel AutoencoderKL downsampling by 8 with Flux's shift and
scale, tiny T5 and CLIP-L text encoders, CLIP's real BPE tokenizer and a small T5-style unigram tokenizer built
in code (T5's layout: "▁" word starts, no start token, "</s>" end, "<pad>" id 0), so words can be cut into
known pieces.
"""
from __future__ import annotations

from typing import Any

import torch

from ..dit import FluxComponents, SD3Components
from .sd import (SD15_VAE_CONFIG, TINY_TEXT_CONFIG, _cast, _seeded, text_encoder_from_config,
                 text_encoder_with_projection_from_config, vae_from_config)

# Word pieces of the toy T5 vocabulary (besides single letters): "snowboarder" is cut into
# "▁snow" "board" "er", "dog" is one piece.
T5_PIECES: tuple[str, ...] = ("▁the", "▁dog", "▁cat", "▁snow", "board", "er", "▁on", "▁left", "▁right",
                              "▁beside", "▁and", "▁a", "▁man", "▁red", "▁car", "▁of", ",", "▁")
TINY_FLUX_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels x 2 x 2 packed patch
    "num_layers": 2,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}
TINY_FLUX_VAE_CONFIG: dict[str, Any] = {
    **SD15_VAE_CONFIG,
    "block_out_channels": (32, 32, 32, 32),
    "layers_per_block": 1,
    "latent_channels": 16,
    "sample_size": 128,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
TINY_T5_CONFIG: dict[str, Any] = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
                                  "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu",
                                  "is_encoder_decoder": False, "use_cache": False}


def tiny_t5_tokenizer() -> Any:
    """A transformers T5 tokenizer (fast: character offsets) over a small unigram vocabulary, built as
    transformers builds T5's own (its specials, "▁" pre-tokenisation and "</s>" end)."""
    from transformers import T5TokenizerFast

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0) for p in T5_PIECES] + \
        [(c, -5.0) for c in letters] + [("▁" + c, -6.0) for c in letters]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def tiny_t5_encoder(vocab_size: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    **overrides: Any) -> Any:
    """A random-weight transformers T5EncoderModel of the toy configuration."""
    from transformers import T5Config, T5EncoderModel

    with torch.device(device):
        model = T5EncoderModel(T5Config(vocab_size=int(vocab_size), **{**TINY_T5_CONFIG, **overrides}))
    return _cast(model, dtype)


def tiny_flux_transformer(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                          **overrides: Any) -> Any:
    """A random-weight diffusers FluxTransformer2DModel of the toy configuration."""
    from diffusers import FluxTransformer2DModel

    with torch.device(device):
        model = FluxTransformer2DModel(**{**TINY_FLUX_CONFIG, **overrides})
    return _cast(model, dtype)


def tiny_flux(seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> FluxComponents:
    """Tiny random-weight Flux dev-shaped components (transformer, 16-channel VAE, T5, CLIP-L, tokenizers)."""
    from ..tokenizer import clip_tokenizer

    t5_tok = tiny_t5_tokenizer()
    with _seeded(seed):
        transformer = tiny_flux_transformer(device, dtype)
        vae = vae_from_config(TINY_FLUX_VAE_CONFIG, device, dtype)
        t5 = tiny_t5_encoder(len(t5_tok), device, dtype)
        clip = text_encoder_from_config(TINY_TEXT_CONFIG, device, dtype)
    return FluxComponents(transformer=transformer, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer(),
                          text_encoder_2=t5, tokenizer_2=t5_tok, scaling_factor=0.3611, shift_factor=0.1159,
                          device=torch.device(device), dtype=dtype)


def tiny_flux_pipeline(seed: int = 0) -> Any:
    """A diffusers FluxPipeline of the tiny parts (for save_pretrained in loading tests)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    f = tiny_flux(seed)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=f.vae, text_encoder=f.text_encoder,
                        tokenizer=f.tokenizer, text_encoder_2=f.text_encoder_2, tokenizer_2=f.tokenizer_2,
                        transformer=f.transformer)


TINY_SD3_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,  # T5's width; CLIP-L + CLIP-G (32 + 32) are zero-padded to it
    "caption_projection_dim": 32,
    "pooled_projection_dim": 64,  # CLIP-L's and CLIP-G's pooled projections side by side
    "pos_embed_max_size": 32,
    "qk_norm": "rms_norm",  # SD 3.5's QK-norm
}
TINY_SD3_VAE_CONFIG: dict[str, Any] = {**TINY_FLUX_VAE_CONFIG, "scaling_factor": 1.5305, "shift_factor": 0.0609}


def tiny_sd3(seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> SD3Components:
    """Tiny random-weight SD 3-shaped components (2 joint blocks, CLIP-L, CLIP-G, T5, their tokenizers)."""
    from diffusers import SD3Transformer2DModel

    from ..tokenizer import OPEN_CLIP_PAD_TOKEN, clip_tokenizer

    t5_tok = tiny_t5_tokenizer()
    with _seeded(seed):
        with torch.device(device):
            transformer = _cast(SD3Transformer2DModel(**TINY_SD3_CONFIG), dtype)
        vae = vae_from_config(TINY_SD3_VAE_CONFIG, device, dtype)
        clip_l = text_encoder_with_projection_from_config(TINY_TEXT_CONFIG, device, dtype)
        clip_g = text_encoder_with_projection_from_config(TINY_TEXT_CONFIG, device, dtype)
        t5 = tiny_t5_encoder(len(t5_tok), device, dtype, d_model=64)
    return SD3Components(transformer=transformer, vae=vae, text_encoder=clip_l, tokenizer=clip_tokenizer(),
                         text_encoder_2=clip_g, tokenizer_2=clip_tokenizer(pad_token=OPEN_CLIP_PAD_TOKEN),
                         text_encoder_3=t5, tokenizer_3=t5_tok, scaling_factor=1.5305, shift_factor=0.0609,
                         device=torch.device(device), dtype=dtype)


def tiny_sd3_pipeline(seed: int = 0) -> Any:
    """A diffusers StableDiffusion3Pipeline of the tiny parts (for save_pretrained in loading tests)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    m = tiny_sd3(seed)
    return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=m.vae,
                                    text_encoder=m.text_encoder, tokenizer=m.tokenizer,
                                    text_encoder_2=m.text_encoder_2, tokenizer_2=m.tokenizer_2,
                                    text_encoder_3=m.text_encoder_3, tokenizer_3=m.tokenizer_3,
                                    transformer=m.transformer)


__all__ = ["T5_PIECES", "TINY_FLUX_CONFIG", "TINY_FLUX_VAE_CONFIG", "TINY_T5_CONFIG", "TINY_SD3_CONFIG",
           "TINY_SD3_VAE_CONFIG", "tiny_t5_tokenizer", "tiny_t5_encoder", "tiny_flux_transformer", "tiny_flux",
           "tiny_flux_pipeline", "tiny_sd3", "tiny_sd3_pipeline"]
