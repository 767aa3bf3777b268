"""Attention math, layer selection and map aggregation (refdiff.capture), and the attention store (refdiff.stores)."""
from __future__ import annotations

import pytest
import torch

from refdiff.capture import (CrossAttentionMaps, LayerSelector, all_token_maps, attention_output, combine_guidance,
                             downsampled_grid, head_averaged_attention, normalise_block, query_grid, token_map)
from refdiff.errors import InputError
from refdiff.stores import AttentionStore, FeatureStore, split_branches


def _qkv(b: int = 2, n: int = 12, k: int = 7, heads: int = 3, dh: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, heads * dh, generator=g)
    kk = torch.randn(b, k, heads * dh, generator=g)
    v = torch.randn(b, k, heads * dh, generator=g)
    return q, kk, v


def _per_head_scores(q, k, heads):
    """Reference: explicit per-head QK^T / sqrt(dh), [B, heads, Q, K], with plain loops over heads."""
    dh = q.shape[-1] // heads
    out = []
    for h in range(heads):
        qh = q[..., h * dh:(h + 1) * dh].double()
        kh = k[..., h * dh:(h + 1) * dh].double()
        out.append(qh @ kh.transpose(1, 2) / dh ** 0.5)
    return torch.stack(out, dim=1)


def test_attention_output_is_softmax_qk_v_per_head():
    q, k, v = _qkv()
    heads, dh = 3, 4
    probs = _per_head_scores(q, k, heads).softmax(-1)
    expected = torch.cat([probs[:, h] @ v[..., h * dh:(h + 1) * dh].double() for h in range(heads)], dim=-1)
    out = attention_output(q, k, v, heads)
    assert out.shape == (2, 12, 12)
    assert torch.allclose(out.double(), expected, atol=1e-5)


def test_attention_output_keeps_input_dtype():
    q, k, v = (t.to(torch.bfloat16) for t in _qkv())
    assert attention_output(q, k, v, 3).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["probs", "logits"])
def test_head_averaged_attention_matches_reference(kind):
    q, k, _ = _qkv()
    scores = _per_head_scores(q, k, 3)
    ref = (scores.softmax(-1) if kind == "probs" else scores).mean(dim=1)
    got = head_averaged_attention(q, k, 3, kind=kind)
    assert got.dtype == torch.float32 and got.shape == (2, 12, 7)
    assert torch.allclose(got.double(), ref, atol=1e-5)
    if kind == "probs":
        assert torch.allclose(got.sum(-1), torch.ones(2, 12), atol=1e-5)


def test_head_averaging_is_the_mean_of_the_heads():
    # Planted: head 0 attends key 0 only, head 1 key 1 only (large logits) -> average 0.5 / 0.5.
    q = torch.zeros(1, 1, 4)
    k = torch.zeros(1, 3, 4)
    q[0, 0, 0] = q[0, 0, 2] = 100.0
    k[0, 0, 0] = 1.0  # head 0 (channels 0,1) sees key 0
    k[0, 1, 2] = 1.0  # head 1 (channels 2,3) sees key 1
    probs = head_averaged_attention(q, k, heads=2, kind="probs")
    assert torch.allclose(probs[0, 0], torch.tensor([0.5, 0.5, 0.0]), atol=1e-6)
    logits = head_averaged_attention(q, k, heads=2, kind="logits")
    # head 0 logits [100, 0, 0]/sqrt(2), head 1 [0, 100, 0]/sqrt(2); mean = [50, 50, 0]/sqrt(2)
    assert torch.allclose(logits[0, 0], torch.tensor([50.0, 50.0, 0.0]) / 2 ** 0.5, atol=1e-4)


def test_head_averaged_attention_chunking_and_scale_and_fp16():
    q, k, _ = _qkv(n=10)
    full = head_averaged_attention(q, k, 3, kind="logits")
    assert torch.allclose(head_averaged_attention(q, k, 3, kind="logits", chunk=3), full, atol=1e-6)
    assert torch.allclose(head_averaged_attention(q, k, 3, kind="logits", scale=1.0), full * 2.0, atol=1e-5)
    half = head_averaged_attention(q.half(), k.half(), 3, kind="logits")
    assert half.dtype == torch.float32
    assert torch.allclose(half, full, atol=2e-2)


def test_head_averaged_attention_rejects_bad_input():
    q, k, _ = _qkv()
    with pytest.raises(InputError, match="capture_kind"):
        head_averaged_attention(q, k, 3, kind="softmax")
    with pytest.raises(InputError, match="heads=5"):
        head_averaged_attention(q, k, 5)


def test_grids():
    assert downsampled_grid((128, 128), 4) == (32, 32)
    assert downsampled_grid((9, 13), 4) == (3, 4)  # each stride-2 conv rounds up: 9->5->3, 13->7->4
    assert query_grid(32 * 32, (128, 128)) == ((32, 32), 4)
    assert query_grid(12, (9, 13)) == ((3, 4), 4)
    assert query_grid(64) == ((8, 8), 1)
    with pytest.raises(InputError):
        query_grid(50, (16, 16))
    with pytest.raises(InputError):
        downsampled_grid((8, 8), 3)


def test_layer_selector():
    sel = LayerSelector()
    assert sel.factor == 4 and sel.blocks == ("down", "mid", "up")
    assert sel.wants("down", 4) and sel.wants("up", 4) and sel.wants("mid", 4)
    assert not sel.wants("down", 2) and not sel.wants("up", 8)
    up_only = LayerSelector(4, ("output",))
    assert up_only.blocks == ("up",)
    assert up_only.wants("up", 4) and up_only.wants("output", 4) and not up_only.wants("input", 4)
    assert LayerSelector(None).wants("mid", 8)
    assert normalise_block("Middle") == "mid"
    with pytest.raises(InputError):
        LayerSelector(3)
    with pytest.raises(InputError):
        LayerSelector(4, ("sideways",))
    with pytest.raises(InputError):
        LayerSelector(4, "up")


def test_store_splits_cfg_batch_by_cond_or_uncond():
    store = AttentionStore(kind="logits")
    uncond = torch.full((1, 6, 5), 1.0)
    cond = torch.arange(30, dtype=torch.float32).reshape(1, 6, 5)
    store.add("up_blocks.1.attentions.0", "up", 4, (2, 3), torch.cat([uncond, cond]), [1, 0])
    store.next_step()
    store.add("up_blocks.1.attentions.0", "output", 4, (2, 3), torch.cat([uncond, cond]) * 2, [1, 0])
    maps = store.maps()
    assert maps.layers == ("step0/up_blocks.1.attentions.0", "step1/up_blocks.1.attentions.0")
    assert maps.kind == "logits" and maps.grid == (2, 3) and maps.num_tokens == 5
    assert maps.cond.shape == (2, 2, 3, 5) and maps.uncond.shape == (2, 2, 3, 5)
    assert torch.equal(maps.cond[0], cond.reshape(2, 3, 5))
    assert torch.equal(maps.cond[1], 2 * cond.reshape(2, 3, 5))
    assert torch.equal(maps.uncond[0], torch.ones(2, 3, 5))
    assert maps.cond.device.type == "cpu" and maps.cond.dtype == torch.float32


def test_store_merges_separate_cond_and_uncond_calls_and_fills_missing_uncond():
    store = AttentionStore(kind="logits")
    c, u = torch.full((1, 4, 3), 5.0), torch.full((1, 4, 3), 2.0)
    store.add("a", "down", 4, (2, 2), c, [0])
    store.add("a", "down", 4, (2, 2), u, [1])
    store.add("b", "up", 4, (2, 2), c * 3, None)  # conditional only
    maps = store.maps()
    assert maps.layers == ("step0/a", "step0/b")
    assert torch.equal(maps.uncond[0], u[0].reshape(2, 2, 3))
    assert torch.equal(maps.uncond[1], maps.cond[1])  # no uncond: its cond stands in, so u + g(c-u) = c
    assert torch.allclose(maps.combined(9.0)[1], maps.cond[1])


def test_store_keeps_image_dimension_and_resizes_grids():
    store = AttentionStore(kind="probs")
    attn = torch.stack([torch.full((4, 2), 1.0), torch.full((4, 2), 3.0)])  # two images, cond only
    store.add("small", "down", 8, (2, 2), attn, [0])
    store.add("big", "up", 4, (4, 4), torch.full((2, 16, 2), 7.0), [0])
    assert torch.equal(store.maps(image=1).cond[0], torch.full((4, 4, 2), 3.0))  # constant map resized
    first = store.maps()
    assert first.cond.shape == (2, 4, 4, 2) and first.uncond is None
    assert torch.equal(first.cond[0], torch.full((4, 4, 2), 1.0))
    with pytest.raises(InputError, match="image 2"):
        store.maps(image=2)
    # bilinear (align_corners=False) upsampling of a 1x2 ramp to 1x4 is [0, 0.25, 0.75, 1]
    ramp = AttentionStore(kind="probs")
    ramp.add("s", "down", 2, (1, 2), torch.tensor([[[0.0], [1.0]]]), None)
    ramp.add("b", "down", 1, (1, 4), torch.zeros(1, 4, 1), None)
    assert torch.allclose(ramp.maps().cond[0, 0, :, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))


def test_store_errors_and_clear():
    store = AttentionStore()
    with pytest.raises(InputError, match="no cross-attention layer"):
        store.maps()
    with pytest.raises(InputError, match="grid"):
        store.add("a", "up", 4, (3, 3), torch.zeros(1, 8, 2))
    with pytest.raises(InputError, match="cond_or_uncond"):
        store.add("a", "up", 4, (2, 2), torch.zeros(3, 4, 2), [1, 0])
    store.add("a", "up", 4, (2, 2), torch.zeros(1, 4, 2), [1])
    with pytest.raises(InputError, match="conditional"):
        store.maps()
    store.next_step()
    store.clear()
    assert len(store) == 0 and store.step == 0
    with pytest.raises(InputError):
        AttentionStore(kind="attention")


def test_combined_by_kind_hand_computed():
    c = torch.tensor([1.0, 2.0, 4.0]).reshape(1, 1, 3, 1)
    u = torch.tensor([1.0, 1.0, 3.0]).reshape(1, 1, 3, 1)
    logits = CrossAttentionMaps(cond=c, uncond=u, layers=("step0/x",), kind="logits")
    # u + 9 (c - u): [1 + 0, 1 + 9, 3 + 9]
    assert torch.allclose(logits.combined(9.0).flatten(), torch.tensor([1.0, 10.0, 12.0]))
    assert torch.allclose(logits.combined(1.0), c)
    probs = CrossAttentionMaps(cond=c, uncond=u, layers=("step0/x",), kind="probs")
    assert torch.equal(probs.combined(9.0), c)  # the paper uses the conditional branch
    no_uncond = CrossAttentionMaps(cond=c, uncond=None, layers=("step0/x",), kind="logits")
    assert torch.equal(no_uncond.combined(9.0), c)
    with pytest.raises(InputError):
        combine_guidance(c, u[..., :0], "logits")


def test_token_map_per_layer_minmax_then_mean_hand_computed():
    # two layers, 2x2 grid, 3 tokens; token 1 planted
    maps = torch.zeros(2, 2, 2, 3)
    maps[0, :, :, 1] = torch.tensor([[0.0, 1.0], [2.0, 4.0]])  # min-max -> [0, .25, .5, 1]
    maps[1, :, :, 1] = torch.tensor([[10.0, 30.0], [10.0, 20.0]])  # min-max -> [0, 1, 0, .5]
    expected = torch.tensor([[0.0, 0.625], [0.25, 0.75]])
    assert torch.allclose(token_map(maps, 1), expected, atol=1e-6)
    assert torch.allclose(token_map(maps, [1]), expected, atol=1e-6)
    # several tokens: mean over tokens first (token 2 = token 1 + 2 on layer 0 -> same ordering, shifted)
    maps[..., 2] = maps[..., 1] * 3
    assert torch.allclose(token_map(maps, [1, 2]), expected, atol=1e-6)
    maps[0, :, :, 2] = torch.tensor([[4.0, 0.0], [0.0, 0.0]])
    # layer 0 mean of tokens 1,2: [[2, .5], [1, 2]] -> min-max [[1, 0], [1/3, 1]]; layer 1 as before
    mixed = (torch.tensor([[1.0, 0.0], [1 / 3, 1.0]]) + torch.tensor([[0.0, 1.0], [0.0, 0.5]])) / 2
    assert torch.allclose(token_map(maps, [1, 2]), mixed, atol=1e-6)
    # constant layer -> zeros thanks to eps, no NaN
    flat = torch.ones(1, 2, 2, 1)
    assert torch.equal(token_map(flat, 0), torch.zeros(2, 2))
    with pytest.raises(InputError):
        token_map(maps, 3)
    with pytest.raises(InputError):
        token_map(maps, [])
    with pytest.raises(InputError):
        token_map(maps[0], 0)


def test_all_token_maps_equals_token_map_per_token():
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(3, 4, 5, 6, generator=g)
    every = all_token_maps(maps)
    assert every.shape == (6, 4, 5)
    for t in range(6):
        assert torch.allclose(every[t], token_map(maps, t), atol=1e-6)
    assert every.min() >= 0 and every.max() <= 1


def test_split_branches_labels_and_keeps():
    x = torch.arange(6.0).reshape(6, 1)
    parts = split_branches(x, [1, 0])  # a diffusers CFG batch [uncond, cond]
    assert [label for label, _ in parts] == [1, 0]
    assert torch.equal(parts[0][1], x[:3]) and torch.equal(parts[1][1], x[3:])
    assert [(label, chunk.shape[0]) for label, chunk in split_branches(x, [1, 0], keep=(0,))] == [(0, 3)]
    assert [label for label, _ in split_branches(x, None)] == [0]  # None: one conditional chunk
    with pytest.raises(InputError, match="does not split"):
        split_branches(x, [1, 0, 1, 0])
    with pytest.raises(InputError, match="cond_or_uncond"):
        split_branches(x, [2])
    with pytest.raises(InputError, match="keep"):
        split_branches(x, [0], keep=())


def test_summing_store_means_over_steps_and_keeps_one_grid():
    store = FeatureStore()
    store.add("up_blocks.1", (1, 2), torch.tensor([[[[1.0, 3.0]]]]))
    store.add("up_blocks.1", (1, 2), torch.tensor([[[[3.0, 5.0]]]]))
    assert torch.equal(store.tensors()[0], torch.tensor([[[2.0, 4.0]]]))  # mean of the two steps
    with pytest.raises(InputError, match="grids"):
        store.add("up_blocks.1", (2, 1), torch.zeros(1, 1, 2, 1))
    with pytest.raises(InputError, match="unconditional"):
        store.features(label=1)

