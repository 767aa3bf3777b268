"""Random-weight SAM 2 models of the sam2 package's real classes: a tiny one for tests (256 px input, 0.8 M
parameters, its architecture carried as hydra overrides) and the official sizes for benchmarks."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..sam2_models import METADATA_KEY, Sam2Arch, build_sam2_model

if TYPE_CHECKING:
    from sam2.modeling.sam2_base import SAM2Base

# Hiera of width 8 with stages (1, 1, 2, 1), a 32-channel neck and prompt space, a 1-layer memory attention.
TINY_SAM2_OVERRIDES: tuple[str, ...] = (
    "++model.image_size=256",
    "++model.image_encoder.trunk.embed_dim=8", "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]", "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
    "++model.image_encoder.trunk.window_spec=[4,4,4,4]",
    "++model.image_encoder.neck.d_model=32", "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]",
    "++model.image_encoder.neck.position_encoding.num_pos_feats=32",
    "++model.memory_attention.d_model=32", "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.d_model=32", "++model.memory_attention.layer.dim_feedforward=64",
    "++model.memory_attention.layer.self_attention.embedding_dim=32",
    "++model.memory_attention.layer.self_attention.feat_sizes=[16,16]",
    "++model.memory_attention.layer.cross_attention.embedding_dim=32",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[16,16]",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=16",
    "++model.memory_encoder.out_dim=16", "++model.memory_encoder.position_encoding.num_pos_feats=16",
    "++model.memory_encoder.fuser.layer.dim=32", "++model.memory_encoder.fuser.num_layers=1",
)
TINY_SAM2_ARCH = Sam2Arch("2.1", "custom", TINY_SAM2_OVERRIDES)


def _randomise(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Random values for parameters initialised to zero, so every saved weight differs between seeds."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def random_sam2(arch: Sam2Arch = TINY_SAM2_ARCH, seed: int = 0) -> "SAM2Base":
    """A random-weight SAM 2 of ``arch`` (default the tiny test model; Sam2Arch("2.1", "large") full size)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_sam2_model(arch)
    _randomise(model, seed)
    model.refdiff_arch = arch
    return model.eval()


def tiny_sam2(seed: int = 0) -> "SAM2Base":
    """The tiny random-weight SAM 2.1 (256 px input): automatic masks of 8 x 8 points in about a second."""
    return random_sam2(TINY_SAM2_ARCH, seed)


def save_sam2_checkpoint(model: "SAM2Base", path: str | Path) -> Path:
    """Write a model's weights as a user has them: .safetensors (with a custom size's overrides in its
    metadata) or an official-style .pt ({"model": state dict})."""
    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    arch = getattr(model, "refdiff_arch", None)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        meta = {METADATA_KEY: json.dumps(list(arch.overrides))} if arch is not None and arch.overrides else None
        save_file(state, str(path), metadata=meta)
    else:
        torch.save({"model": state}, str(path))
    return path


__all__ = ["TINY_SAM2_OVERRIDES", "TINY_SAM2_ARCH", "random_sam2", "tiny_sam2", "save_sam2_checkpoint"]
