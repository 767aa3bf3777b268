"""Random-weight SAM models of segment_anything's real classes: a tiny one for tests, full-size ones for
benchmarks. Random weights give few, arbitrary masks, and usually none at the AMG default quality
thresholds; set pred_iou_thresh and stability_score_thresh to 0 to get proposals from them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..sam import SamConfig, build_sam

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

# 256 px input, 16 x 16 patch grid, 32-channel encoder and prompt space: about 0.1 M parameters.
TINY_SAM_CONFIG = SamConfig(
    encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,),
    image_size=256, patch_size=16, window_size=4, prompt_embed_dim=32, mask_in_chans=8,
    decoder_depth=1, decoder_mlp_dim=64, decoder_num_heads=8, iou_head_depth=2, iou_head_hidden_dim=32,
)


def _fill_zeros(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Give random values to the parameters SAM initialises to zero (position tables), so that every weight
    of a saved checkpoint differs between seeds."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def tiny_sam(seed: int = 0) -> "Sam":
    """A random-weight SAM with a tiny image encoder (256 px input): mask generation takes about a second."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_sam(TINY_SAM_CONFIG)
    _fill_zeros(sam, seed)
    return sam.eval()


def tiny_sam_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of tiny_sam(seed), e.g. to write a checkpoint file for loading tests."""
    return {k: v.clone() for k, v in tiny_sam(seed).state_dict().items()}


def random_sam(model_type: str = "vit_b", seed: int = 0) -> "Sam":
    """A full-size random-weight SAM of an official type (vit_b/l/h), for timing the real architecture."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_sam(model_type).eval()


__all__ = ["TINY_SAM_CONFIG", "tiny_sam", "tiny_sam_state_dict", "random_sam"]
