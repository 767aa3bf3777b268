"""Random-weight open_clip CLIP models of open_clip's real classes: a tiny one for tests, a full-size
ViT-B/16 for benchmarks. Both use open_clip's own CLIP BPE tokenizer (shipped with open_clip, offline).
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from ..discriminative import ClipScorer

# 64 px input, 16 px patches (a 4 x 4 grid), 2 blocks of width 64 in each tower, 32-d joint space.
# QuickGELU as in OpenAI's CLIP, so a saved tiny state dict reloads with load_clip's file defaults.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
TINY_CLIP_BASE = "ViT-B-16"  # open_clip model name whose tokenizer and defaults the tiny model borrows


def tiny_clip_model(seed: int = 0) -> torch.nn.Module:
    """The bare random-weight tiny open_clip CLIP model (see TINY_CLIP_CONFIG), in eval mode."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(TINY_CLIP_BASE, pretrained=None, **copy.deepcopy(TINY_CLIP_CONFIG))
    return model.eval()


def tiny_clip(seed: int = 0) -> ClipScorer:
    """A ClipScorer on a random-weight tiny CLIP (vision 64 px / patch 16 / width 64 / 2 blocks; text
    width 64 / 2 blocks) with the real CLIP BPE tokenizer: forwards take milliseconds."""
    import open_clip

    return ClipScorer(tiny_clip_model(seed), open_clip.get_tokenizer(TINY_CLIP_BASE))


def full_clip_vit_b16(seed: int = 0) -> ClipScorer:
    """A ClipScorer on open_clip's ViT-B-16 (QuickGELU, as OpenAI's weights) with random weights, for
    benchmarks and full-size shape checks (224 px input, 14 x 14 patch grid, 512-d features)."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True)
    return ClipScorer(model.eval(), open_clip.get_tokenizer("ViT-B-16"))


__all__ = ["TINY_CLIP_CONFIG", "TINY_CLIP_BASE", "tiny_clip_model", "tiny_clip", "full_clip_vit_b16"]
