"""Joint-attention maps of diffusion transformers and flow-matching noise (refdiff.joint_attention, refdiff.flow)."""
from __future__ import annotations

import pytest
import torch

from refdiff.capture import token_map
from refdiff.errors import InputError
from refdiff.flow import flow_loop, flow_noise, flow_ts
from refdiff.joint_attention import (concept_list, joint_text_probs, output_space_map, parse_block_list,
                                     spread_concepts)
from refdiff.proposals import threshold_proposals


def planted_qk(grid=(6, 8), txt_len=5, token=3, heads=2, dh=8):
    """q, k of a joint sequence [text; image] where the image tokens inside a box look at text token ``token``."""
    h, w = grid
    region = torch.zeros(h, w, dtype=torch.bool)
    region[1:4, 2:6] = True
    q = torch.zeros(1, heads, txt_len + h * w, dh)
    k = torch.zeros_like(q)
    k[:, :, token, 0] = 1.0
    q[:, :, txt_len:, 0] = region.flatten().float() * 40.0
    return q, k, region


def test_planted_text_image_attention_gives_its_mask():
    q, k, region = planted_qk()
    probs = joint_text_probs(q, k, 5, 48)
    assert probs.shape == (1, 48, 5)
    maps = probs[0].reshape(1, 6, 8, 5)
    c = token_map(maps, 3)
    masks = threshold_proposals(c, [0.5])
    assert torch.equal(masks[0], region)


def test_probs_softmax_over_all_joint_keys_and_chunking():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4 + 12, 8, generator=gen)
    k = torch.randn(2, 3, 4 + 12, 8, generator=gen)
    full = (q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1)[:, :, 4:, :4].mean(1)
    assert torch.allclose(joint_text_probs(q, k, 4, 12, chunk=5), full, atol=1e-6)
    assert (full.sum(-1) < 1).all()  # the image keys take the rest
    flipped = torch.cat((q[:, :, 4:], q[:, :, :4]), 2), torch.cat((k[:, :, 4:], k[:, :, :4]), 2)
    assert torch.allclose(joint_text_probs(*flipped, 4, 12, txt_first=False), full, atol=1e-6)


def test_output_space_map_and_spread():
    img = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    concepts = torch.tensor([[[5.0, 0.0], [0.0, 5.0]]])
    m = output_space_map(img, concepts)
    assert m.shape == (1, 2, 2) and torch.allclose(m.sum(-1), torch.ones(1, 2))
    assert m[0, 0, 0] > 0.99 and m[0, 1, 1] > 0.99
    spread = spread_concepts(m, [[1, 2], []], 4)
    assert torch.equal(spread[..., 1], m[..., 0]) and torch.equal(spread[..., 2], m[..., 0])
    assert spread[..., [0, 3]].abs().sum() == 0
    with pytest.raises(InputError, match="outside"):
        spread_concepts(m, [[7], []], 4)


def test_concepts_blocks_and_flow():
    assert concept_list("Horse", ["horse", "rider"], ("background", "sky")) == ["Horse", "rider", "background",
                                                                                 "sky"]
    assert parse_block_list("last4", 19) == [15, 16, 17, 18]
    assert parse_block_list("0,-1", 19) == [0, 18]
    with pytest.raises(InputError, match="0..18"):
        parse_block_list("19", 19)
    x0, noise = torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    assert torch.allclose(flow_noise(x0, noise, 0.25), torch.full_like(x0, 0.75))
    assert flow_ts(0.5, 2) == [0.5, 0.25]
    seen = []
    pred = flow_loop(x0, noise, [0.5, 0.25], lambda x, t, i: seen.append((t, float(x.mean()))) or x0)
    assert seen == [(0.5, 0.5), (0.25, 0.75)] and torch.equal(pred, x0)  # exact x0 predictions: Euler lands on x0
    with pytest.raises(InputError):
        flow_ts(0.0)
