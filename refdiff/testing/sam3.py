"""Random-weight SAM 3 image models of the sam3 package's real classes: a tiny one for tests (224 px input,
1.8 M parameters, its sizes carried in safetensors metadata) and the released size (840 M) for benchmarks."""
from __future__ import annotations

from pathlib import Path

import torch

from ..sam3_models import DETECTOR_PREFIX, SAM3_IMAGE, Sam3Config, build_sam3_model, save_sam3

# A 2-block ViT of width 32 on a 16 x 16 patch grid, a 1-layer text tower of width 32, one encoder and one
# decoder layer of width 32 with 20 queries.
TINY_SAM3 = Sam3Config(image_size=224, vit_dim=32, vit_depth=2, vit_heads=2, vit_mlp_ratio=2.0, vit_window=8,
                       vit_global_blocks=(1,), vit_pretrain_size=112, d_model=32, heads=2, ffn_dim=64,
                       text_width=32, text_heads=2, text_layers=1, encoder_layers=1, decoder_layers=1, queries=20,
                       geometry_layers=1)


def random_sam3(config: Sam3Config = TINY_SAM3, seed: int = 0) -> torch.nn.Module:
    """A random-weight SAM 3 image model of ``config`` (default the tiny test model; SAM3_IMAGE full size)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_sam3_model(config)


def tiny_sam3(seed: int = 0) -> torch.nn.Module:
    """The tiny random-weight SAM 3 (224 px input): one image pass and one prompt in about a second."""
    return random_sam3(TINY_SAM3, seed)


def full_sam3(seed: int = 0) -> torch.nn.Module:
    """The released SAM 3 image architecture with random weights (3.4 GB in float32; ~70 s per image here)."""
    return random_sam3(SAM3_IMAGE, seed)


def save_sam3_checkpoint(model: torch.nn.Module, path: str | Path, official: bool = False) -> Path:
    """Write a model as a user has it: .safetensors (sizes in the metadata) or a .pt; ``official`` nests the
    weights as Meta's sam3.pt does ({"model": {"detector.<key>": ...}})."""
    path = Path(path)
    if not official:
        return save_sam3(model, path)
    state = {DETECTOR_PREFIX + k: v.detach().contiguous() for k, v in model.state_dict().items()}
    torch.save({"model": state}, str(path))
    return path


__all__ = ["TINY_SAM3", "random_sam3", "tiny_sam3", "full_sam3", "save_sam3_checkpoint"]
