"""The library's SDXL path on a tiny random SDXL (refdiff.testing.sd.tiny_sdxl)."""
from __future__ import annotations

import torch

from refdiff.diffusion import added_conditioning, encode_text, run_capture
from refdiff.testing.sd import tiny_sdxl


def test_sdxl_text_is_two_encoders_and_pooled():
    sd = tiny_sdxl(0)
    hidden, pooled = encode_text(sd, "a red car, ")
    assert hidden.shape == (2, 77, 48) and pooled.shape == (2, 32)
    ids = sd.tokenizer_2(["a"], padding="max_length", max_length=77).input_ids[0]
    assert ids[3:] == [0] * 74  # CLIP-G pads with id 0, CLIP-L with the end token
    assert sd.tokenizer(["a"], padding="max_length", max_length=77).input_ids[0][3:] == [49407] * 74


def test_sdxl_time_ids_follow_the_latent():
    sd = tiny_sdxl(0)
    added = added_conditioning(sd, torch.zeros(1, 32), 2, (16, 12))
    assert added["time_ids"].tolist() == [[128, 96, 0, 0, 128, 96]] * 2


def test_sdxl_capture_is_finite_and_uses_the_pooled_text():
    sd = tiny_sdxl(0)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    maps = run_capture(sd, latent, "the dog on the left, ", capture_factor=4, capture_kind="logits")
    assert maps.cond.shape == (24, 4, 4, 77) and torch.isfinite(maps.cond).all()
    with torch.no_grad():
        sd.unet.add_embedding.linear_1.weight.mul_(3.0)  # the added conditioning reaches the second step's maps
    other = run_capture(sd, latent, "the dog on the left, ", capture_factor=4, capture_kind="logits")
    assert (other.cond[12:] - maps.cond[12:]).abs().max() > 1e-6
