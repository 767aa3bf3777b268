"""Self-attention and block-feature capture on the tiny random UNet: exact, selective, restored."""
from __future__ import annotations

import math

import pytest
import torch

from refdiff.capture import COND, UNCOND, LayerSelector, finest_self_attention_factor, self_attention_bytes
from refdiff.diffusion import capture_block_features, capture_processors, capture_self_attention, self_attention_layers
from refdiff.errors import InputError
from refdiff.stores import AttentionStore, SelfAttentionStore
from refdiff.testing.sd import tiny_sd

# tiny_sd: latent 16x16; attn1 grids: factor 1 -> 16x16 (256 tokens), 2 -> 8x8, 4 -> 4x4, 8 (mid) -> 2x2
FINEST = [f"{block}.attentions.{i}.transformer_blocks.0.attn1"
          for block, i in (("down_blocks.0", 0), ("up_blocks.3", 0), ("up_blocks.3", 1))]


@pytest.fixture(scope="module")
def unet():
    return tiny_sd(seed=0).unet


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([51, 51]), torch.randn(2, 77, 32, generator=g)


def _run(unet, seed: int = 0) -> torch.Tensor:
    x, t, ctx = _inputs(seed)
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample


def _hook_counts(unet) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet.modules())


def test_capture_leaves_the_unet_output_unchanged(unet):
    plain = _run(unet)
    with capture_self_attention(unet, max_tokens=256, cond_or_uncond=[1, 0], keep=(COND, UNCOND)) as sa, \
            capture_block_features(unet, ("down_blocks.0", "mid_block", "up_blocks.1", "up_blocks.2"),
                                   cond_or_uncond=[1, 0]) as feats:
        captured = _run(unet)
    assert torch.allclose(captured, plain, atol=1e-5)
    assert len(sa) == len(self_attention_layers(unet)) == 10
    assert len(feats) == 4


def test_captured_rows_sum_to_one_and_equal_a_direct_softmax(unet):
    name = "up_blocks.2.attentions.1.transformer_blocks.0.attn1"
    layer = next(l for l in self_attention_layers(unet) if l.name == name)
    seen: dict[str, torch.Tensor] = {}
    hooks = [layer.module.to_q.register_forward_hook(lambda m, a, o: seen.__setitem__("q", o)),
             layer.module.to_k.register_forward_hook(lambda m, a, o: seen.__setitem__("k", o))]
    try:
        with capture_self_attention(unet, factor=2, blocks=("up",), cond_or_uncond=[1, 0],
                                    keep=(COND, UNCOND)) as store:
            _run(unet, seed=1)
    finally:
        for h in hooks:
            h.remove()
    # the module's own q/k projections (seen by the hooks, last call = the module's processor)
    heads = layer.module.heads
    q, k = seen["q"].double(), seen["k"].double()  # [2, 64, C]
    dh = q.shape[-1] // heads
    scores = torch.einsum("bqhd,bkhd->bhqk", q.view(2, 64, heads, dh), k.view(2, 64, heads, dh)) / math.sqrt(dh)
    ref = scores.softmax(-1).mean(1)  # [2, 64, 64]
    by_name = {a.name: a for a in store.affinities(COND)}
    assert set(by_name) == {"up_blocks.2.attentions.0.transformer_blocks.0.attn1", layer.name}
    cond = by_name[layer.name].affinity
    assert cond.shape == (64, 64) and cond.dtype == torch.float32 and by_name[layer.name].grid == (8, 8)
    assert torch.allclose(cond.sum(dim=1), torch.ones(64), atol=1e-5)
    assert torch.allclose(cond.double(), ref[1], atol=1e-5)  # batch item 1 is the cond chunk
    uncond = {a.name: a for a in store.affinities(UNCOND)}[layer.name].affinity
    assert torch.allclose(uncond.double(), ref[0], atol=1e-5)
    assert not torch.allclose(ref[0], ref[1], atol=1e-4)  # the two chunks differ: the split matters


def test_chunked_computation_matches_unchunked(unet):
    with capture_self_attention(unet, factor=1, chunk=4096) as whole:
        _run(unet)
    with capture_self_attention(unet, factor=1, chunk=7) as pieces:
        _run(unet)
    for a, b in zip(whole.affinities(), pieces.affinities()):
        assert torch.allclose(a.affinity, b.affinity, atol=1e-6)


def test_max_tokens_excludes_the_finest_level(unet):
    with capture_self_attention(unet, max_tokens=64) as store:
        _run(unet)
    names = store.names
    assert not set(FINEST) & set(names)
    assert {a.factor for a in store.affinities()} == {2, 4, 8}
    assert max(a.grid[0] * a.grid[1] for a in store.affinities()) == 64
    with capture_self_attention(unet, max_tokens=256) as store:
        _run(unet)
    assert set(FINEST) <= set(store.names)


def test_finest_factor_and_memory_cost():
    assert finest_self_attention_factor((64, 64), 4096) == 1  # S = 512
    assert finest_self_attention_factor((128, 128), 4096) == 2  # S = 1024: 128x128 is skipped
    assert finest_self_attention_factor((16, 16), 64) == 2
    assert self_attention_bytes(64) == 4096 * 4096 * 4 == 64 * 2 ** 20
    assert self_attention_bytes((128, 128)) == 2 ** 30
    assert self_attention_bytes(64, layers=5, chunks=2) == 10 * 64 * 2 ** 20
    assert self_attention_bytes(32, element_size=2) == 1024 * 1024 * 2
    with pytest.raises(InputError):
        finest_self_attention_factor((16, 16), 0)


def test_steps_are_averaged_and_levels_can_be_merged(unet):
    with capture_self_attention(unet, factor=4) as first:
        _run(unet, seed=1)
    with capture_self_attention(unet, factor=4) as second:
        _run(unet, seed=2)
    with capture_self_attention(unet, factor=4) as both:
        _run(unet, seed=1)
        _run(unet, seed=2)
    with capture_self_attention(unet, factor=4, per_layer=False) as merged:
        _run(unet, seed=1)
        _run(unet, seed=2)
    one = {a.name: a.affinity for a in first.affinities()}
    two = {a.name: a.affinity for a in second.affinities()}
    avg = {a.name: a.affinity for a in both.affinities()}
    assert set(one) == set(avg) and len(one) == 3  # down_blocks.2 and up_blocks.1 x2 at 4x4
    for name in one:
        assert torch.allclose(avg[name], (one[name] + two[name]) / 2, atol=1e-6)
    (level,) = merged.affinities()
    assert level.name == "level4" and len(level.layers) == 3 and level.grid == (4, 4)
    assert torch.allclose(level.affinity, torch.stack(list(avg.values())).mean(0), atol=1e-6)


def test_block_features_have_the_expected_shapes_and_values(unet):
    seen: dict[str, torch.Tensor] = {}
    blocks = ("down_blocks.0", "mid_block", "up_blocks.1", "up_blocks.2",
              "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q")
    modules = dict(unet.named_modules())
    hooks = [modules["up_blocks.1"].register_forward_hook(lambda m, a, o: seen.__setitem__("up1", o)),
             modules[blocks[-1]].register_forward_hook(lambda m, a, o: seen.__setitem__("q", o))]
    try:
        with capture_block_features(unet, blocks, cond_or_uncond=[1, 0], keep=(COND, UNCOND)) as store:
            _run(unet)
    finally:
        for h in hooks:
            h.remove()
    shapes = {f.name: tuple(f.features.shape) for f in store.features()}
    assert shapes == {"down_blocks.0": (32, 8, 8), "mid_block": (64, 2, 2), "up_blocks.1": (64, 8, 8),
                      "up_blocks.2": (32, 16, 16),
                      "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q": (64, 4, 4)}
    assert store.names[:3] == ("down_blocks.0", "mid_block", blocks[-1])  # forward order: to_q runs inside up_blocks.1
    cond = {f.name: f.features for f in store.features(COND)}
    uncond = {f.name: f.features for f in store.features(UNCOND)}
    assert torch.allclose(cond["up_blocks.1"], seen["up1"][1], atol=1e-6)  # batch [uncond, cond]
    assert torch.allclose(uncond["up_blocks.1"], seen["up1"][0], atol=1e-6)
    q = seen["q"][1]  # [16 tokens, 64]: token i = row i // 4, column i % 4
    assert torch.allclose(cond[blocks[-1]][:, 1, 2], q[1 * 4 + 2], atol=1e-6)
    assert torch.allclose(cond[blocks[-1]].flatten(1).T, q, atol=1e-6)
    with capture_block_features(unet) as default:
        _run(unet)
    assert default.names == ("up_blocks.1", "up_blocks.2")



def test_store_reports_a_missing_branch():
    store = SelfAttentionStore()
    store.add("layer", 1, (2, 2), torch.full((1, 4, 4), 0.25), label=UNCOND)
    assert torch.equal(store.affinities(UNCOND)[0].affinity, torch.full((4, 4), 0.25))
    with pytest.raises(InputError, match="holds no conditional branch"):
        store.affinities(COND)
    with pytest.raises(InputError, match="expected"):
        store.add("layer", 1, (2, 2), torch.ones(1, 3, 3))


def test_everything_is_restored_even_after_an_error(unet):
    before_hooks = _hook_counts(unet)
    processors = {name: m.processor for name, m in unet.named_modules() if hasattr(m, "processor")}
    with pytest.raises(RuntimeError, match="boom"):
        with capture_self_attention(unet), capture_block_features(unet):
            assert _hook_counts(unet) > before_hooks
            raise RuntimeError("boom")
    assert _hook_counts(unet) == before_hooks
    after = {name: m.processor for name, m in unet.named_modules() if hasattr(m, "processor")}
    assert all(after[n] is processors[n] for n in processors)


def test_composes_with_the_cross_attention_processors(unet):
    plain = _run(unet)
    cross = AttentionStore(kind="probs")
    with capture_processors(unet, LayerSelector(4), cross, cond_or_uncond=[1, 0]), \
            capture_self_attention(unet, factor=4, cond_or_uncond=[1, 0]) as sa:
        both = _run(unet)
    assert torch.allclose(both, plain, atol=1e-5)
    assert len(cross) == 3 and len(sa) == 3


def test_bad_inputs_raise_input_errors(unet):
    with pytest.raises(InputError, match="unknown UNet module"):
        with capture_block_features(unet, ("up_blocks.9",)):
            pass
    with pytest.raises(InputError, match="sequence of module names"):
        with capture_block_features(unet, "up_blocks.1"):
            pass
    with pytest.raises(InputError, match="does not split"):
        with capture_self_attention(unet, cond_or_uncond=[1, 0, 0]):
            _run(unet)
    with pytest.raises(InputError, match="keep"):
        with capture_self_attention(unet, keep=(2,)):
            pass
