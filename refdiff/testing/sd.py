"""Random-weight Stable Diffusion parts for tests and benchmarks (no downloads).

``tiny_sd`` mirrors SD 1.5's layout at toy width: four UNet levels (factors 1, 2, 4, 8) with cross-attention
in the first three down blocks, the mid block and the last three up blocks, so factor-4 capture selects
``down_blocks.2.attentions.0`` and ``up_blocks.1.attentions.{0,1}`` (SD 1.5: two and three transformers).
Its VAE downsamples by 8 as SD's does. ``full_sd15_*`` build SD 1.5's real configurations with random
weights (pass device="meta" for the structure alone).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from ..diffusion import SDComponents
from ..schedule import scaled_linear_alphas_cumprod

SD_BETA_START, SD_BETA_END, SD_TRAIN_STEPS = 0.00085, 0.012, 1000

SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,  # diffusers' legacy name: SD 1.x has 8 heads per transformer
}

SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

SD15_TEXT_CONFIG: dict[str, Any] = {  # openai/clip-vit-large-patch14's text tower, as SD 1.5 ships it
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

TINY_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "sample_size": 16,
    "block_out_channels": (32, 32, 64, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,  # 4 heads of 8 or 16 channels
}

TINY_VAE_CONFIG: dict[str, Any] = {
    **SD15_VAE_CONFIG,
    "block_out_channels": (32, 32, 32, 32),
    "layers_per_block": 1,
    "sample_size": 128,
}

TINY_TEXT_CONFIG: dict[str, Any] = {
    **SD15_TEXT_CONFIG,
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}

# SDXL base's UNet: attention at factors 2 (2 transformers per block) and 4 (10 per block), none at factor 1.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),  # diffusers' legacy name: heads of 64 channels
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # pooled CLIP-G 1280 + 6 size/crop ids x 256
}

SDXL_VAE_CONFIG: dict[str, Any] = {**SD15_VAE_CONFIG, "sample_size": 1024, "scaling_factor": 0.13025}

SDXL_TEXT_L_CONFIG: dict[str, Any] = {**SD15_TEXT_CONFIG, "eos_token_id": 49407}  # CLIP ViT-L/14 (penultimate)

SDXL_TEXT_G_CONFIG: dict[str, Any] = {  # OpenCLIP ViT-bigG/14's text tower, as SDXL ships it
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}

# Toy SDXL: SDXL's block layout (attention at factors 2 and 4, 2 and 3 transformers there), added conditioning
# of width 32 + 6 x 8, two 2-layer text encoders of widths 16 and 32 (context 48).
TINY_SDXL_UNET_CONFIG: dict[str, Any] = {
    **SDXL_UNET_CONFIG,
    "sample_size": 16,
    "block_out_channels": (32, 32, 64),
    "layers_per_block": 1,
    "transformer_layers_per_block": (1, 2, 3),
    "cross_attention_dim": 48,
    "attention_head_dim": (2, 4, 4),
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
}

TINY_SDXL_TEXT_L_CONFIG: dict[str, Any] = {**SDXL_TEXT_L_CONFIG, "hidden_size": 16, "intermediate_size": 32,
                                           "projection_dim": 16, "num_hidden_layers": 2, "num_attention_heads": 2}
TINY_SDXL_TEXT_G_CONFIG: dict[str, Any] = {**SDXL_TEXT_G_CONFIG, "hidden_size": 32, "intermediate_size": 64,
                                           "projection_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 4}

# The smallest SDXL that ComfyUI detects as SDXL (model_channels 320, transformer depths 2 and 10 in the down
# blocks, context 2048, added conditioning 2816), with one width for every level and fewer transformers in the
# up blocks; and text encoders of SDXL's widths (768 + 1280) but 3 layers (ComfyUI needs more than the penultimate) and narrow MLPs.
COMFY_SDXL_UNET_CONFIG: dict[str, Any] = {
    **SDXL_UNET_CONFIG,
    "sample_size": 16,
    "block_out_channels": (320, 320, 320),
    "attention_head_dim": (5, 5, 5),
    "reverse_transformer_layers_per_block": ((2, 2, 2), (1, 1, 1), (1, 1, 1)),
}
COMFY_SDXL_TEXT_L_CONFIG: dict[str, Any] = {**SDXL_TEXT_L_CONFIG, "intermediate_size": 256, "num_hidden_layers": 3}
COMFY_SDXL_TEXT_G_CONFIG: dict[str, Any] = {**SDXL_TEXT_G_CONFIG, "intermediate_size": 256, "num_hidden_layers": 3}


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG inside the block without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def _cast(model: Any, dtype: torch.dtype) -> Any:
    """Cast to dtype only when needed (models are built in float32) and switch to eval mode."""
    return (model if dtype == torch.float32 else model.to(dtype=dtype)).eval()


def unet_from_config(config: dict[str, Any], device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> Any:
    """A random-weight diffusers UNet2DConditionModel of a configuration."""
    from diffusers import UNet2DConditionModel
    with torch.device(device):
        model = UNet2DConditionModel(**copy.deepcopy(config))
    return _cast(model, dtype)


def vae_from_config(config: dict[str, Any], device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> Any:
    """A random-weight diffusers AutoencoderKL of a configuration."""
    from diffusers import AutoencoderKL
    with torch.device(device):
        model = AutoencoderKL(**copy.deepcopy(config))
    return _cast(model, dtype)


def text_encoder_from_config(config: dict[str, Any], device: str | torch.device = "cpu",
                             dtype: torch.dtype = torch.float32) -> Any:
    """A random-weight transformers CLIPTextModel of a configuration."""
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device(device):
        model = CLIPTextModel(CLIPTextConfig(**config))
    return _cast(model, dtype)


def text_encoder_with_projection_from_config(config: dict[str, Any], device: str | torch.device = "cpu",
                                             dtype: torch.dtype = torch.float32) -> Any:
    """A random-weight transformers CLIPTextModelWithProjection of a configuration (SDXL's CLIP-G)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    with torch.device(device):
        model = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    return _cast(model, dtype)


def sd_scheduler() -> Any:
    """The DDIM scheduler of SD 1.x (scaled_linear betas 0.00085..0.012 over 1000 steps)."""
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=SD_TRAIN_STEPS, beta_start=SD_BETA_START, beta_end=SD_BETA_END,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _components(unet: Any, vae: Any, text_encoder: Any, device: str | torch.device,
                dtype: torch.dtype) -> SDComponents:
    from ..tokenizer import clip_tokenizer
    return SDComponents(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                        alphas_cumprod=scaled_linear_alphas_cumprod(SD_BETA_START, SD_BETA_END, SD_TRAIN_STEPS),
                        scaling_factor=float(vae.config.scaling_factor), prediction_type="epsilon",
                        device=torch.device(device), dtype=dtype)


def tiny_sd(seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> SDComponents:
    """Tiny random-weight SD 1.x-shaped components (UNet, VAE, 2-layer CLIP text model, real tokenizer)."""
    with _seeded(seed):
        unet = unet_from_config(TINY_UNET_CONFIG, device, dtype)
        vae = vae_from_config(TINY_VAE_CONFIG, device, dtype)
        text = text_encoder_from_config(TINY_TEXT_CONFIG, device, dtype)
    return _components(unet, vae, text, device, dtype)


def sdxl_components(unet: Any, vae: Any, text_l: Any, text_g: Any, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> SDComponents:
    """SDComponents of SDXL parts (``vae`` may be None: scaling 0.13025): the SD schedule, CLIP-L's tokenizer
    and CLIP-G's (padded with id 0)."""
    from ..tokenizer import OPEN_CLIP_PAD_TOKEN, clip_tokenizer
    return SDComponents(unet=unet, vae=vae, text_encoder=text_l, tokenizer=clip_tokenizer(),
                        alphas_cumprod=scaled_linear_alphas_cumprod(SD_BETA_START, SD_BETA_END, SD_TRAIN_STEPS),
                        scaling_factor=float(vae.config.scaling_factor) if vae is not None else 0.13025,
                        prediction_type="epsilon", device=torch.device(device), dtype=dtype, text_encoder_2=text_g,
                        tokenizer_2=clip_tokenizer(pad_token=OPEN_CLIP_PAD_TOKEN))


def tiny_sdxl(seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> SDComponents:
    """Tiny random-weight SDXL-shaped components (UNet with added conditioning, VAE, two 2-layer text encoders)."""
    with _seeded(seed):
        unet = unet_from_config(TINY_SDXL_UNET_CONFIG, device, dtype)
        vae = vae_from_config({**TINY_VAE_CONFIG, "scaling_factor": 0.13025}, device, dtype)
        text_l = text_encoder_from_config(TINY_SDXL_TEXT_L_CONFIG, device, dtype)
        text_g = text_encoder_with_projection_from_config(TINY_SDXL_TEXT_G_CONFIG, device, dtype)
    return sdxl_components(unet, vae, text_l, text_g, device, dtype)


def full_sdxl_unet(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """SDXL base's UNet (2.6 B parameters) with random weights (pass device="meta" for the structure alone)."""
    with _seeded(seed):
        return unet_from_config(SDXL_UNET_CONFIG, device, dtype)


def tiny_sd_pipeline(seed: int = 0) -> Any:
    """A diffusers StableDiffusionPipeline of tiny_sd's parts (DDIM scheduler, no safety checker)."""
    from diffusers import StableDiffusionPipeline
    sd = tiny_sd(seed)
    return StableDiffusionPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                                   scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def full_sd15_unet(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """SD 1.5's UNet (320/640/1280/1280, 8 heads, cross_attention_dim 768) with random weights."""
    with _seeded(seed):
        return unet_from_config(SD15_UNET_CONFIG, device, dtype)


def full_sd15_vae(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """SD 1.5's VAE with random weights."""
    with _seeded(seed):
        return vae_from_config(SD15_VAE_CONFIG, device, dtype)


def full_sd15_text_encoder(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                           seed: int = 0) -> Any:
    """SD 1.5's CLIP text encoder (12 layers, width 768) with random weights."""
    with _seeded(seed):
        return text_encoder_from_config(SD15_TEXT_CONFIG, device, dtype)


def full_sd15(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> SDComponents:
    """Full-size SD 1.5 components with random weights (for benchmarks; several GB in fp32)."""
    return _components(full_sd15_unet(device, dtype, seed), full_sd15_vae(device, dtype, seed + 1),
                       full_sd15_text_encoder(device, dtype, seed + 2), device, dtype)


__all__ = ["SD15_UNET_CONFIG", "SD15_VAE_CONFIG", "SD15_TEXT_CONFIG", "TINY_UNET_CONFIG", "TINY_VAE_CONFIG",
           "TINY_TEXT_CONFIG", "unet_from_config", "vae_from_config", "text_encoder_from_config", "sd_scheduler",
           "tiny_sd", "tiny_sd_pipeline", "full_sd15_unet", "full_sd15_vae", "full_sd15_text_encoder", "full_sd15",
           "SDXL_UNET_CONFIG", "SDXL_VAE_CONFIG", "SDXL_TEXT_L_CONFIG", "SDXL_TEXT_G_CONFIG", "TINY_SDXL_UNET_CONFIG",
           "TINY_SDXL_TEXT_L_CONFIG", "TINY_SDXL_TEXT_G_CONFIG", "COMFY_SDXL_UNET_CONFIG", "COMFY_SDXL_TEXT_L_CONFIG",
           "COMFY_SDXL_TEXT_G_CONFIG", "text_encoder_with_projection_from_config", "sdxl_components", "tiny_sdxl",
           "full_sdxl_unet"]
