"""The ComfyUI-free part of the sibling-method nodes (nodes/text_inputs.py, attention_maps.py, feature_clusters.py,
wire_types.py): the factor-weight parser, the DiffSegmenter refinement of a captured payload (planted maps and
affinities, hand-computed results) with its error messages, and the feature-cluster proposals of planted features."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from refdiff.capture import CrossAttentionMaps
from refdiff.errors import InputError
from refdiff.stores import CapturedAffinity
from refdiff.text import ParsedText
from pack_nodes import load_node_module as _load

attention_maps = _load("attention_maps")
feature_clusters = _load("feature_clusters")
text_inputs = _load("text_inputs")
wire_types = _load("wire_types")

DEFAULT = ((8, 0.3), (4, 0.5), (2, 0.1), (1, 0.1))


# ------------------------------------------------------------------------------------------ factor weights
def test_factor_weights_parse_the_widget_spelling():
    assert text_inputs.parse_factor_weights("8:0.3,4:0.5,2:0.1,1:0.1") == {8: 0.3, 4: 0.5, 2: 0.1, 1: 0.1}
    assert text_inputs.parse_factor_weights(" 4:1 ; 2:0.25  16:0 ") == {4: 1.0, 2: 0.25, 16: 0.0}
    assert text_inputs.parse_factor_weights("preset", DEFAULT) == {8: 0.3, 4: 0.5, 2: 0.1, 1: 0.1}
    assert text_inputs.parse_factor_weights("  ", {4: 1.0}) == {4: 1.0}
    example = text_inputs.FACTOR_WEIGHTS_EXAMPLE
    assert text_inputs.format_factor_weights(text_inputs.parse_factor_weights(example)) == example


@pytest.mark.parametrize("text, message", [
    ("4", "'4' is not a factor:weight pair"),
    ("4:0.5:1", "is not a factor:weight pair"),
    ("x:0.5", "must be an integer factor and a number"),
    ("4:much", "must be an integer factor and a number"),
    ("3:0.5", "factor 3 in '3:0.5' must be a power of two"),
    ("0:0.5", "must be a power of two"),
    ("4:-0.1", "weight -0.1 in '4:-0.1' must be a finite number >= 0"),
    ("4:nan", "must be a finite number"),
    ("4:0.5,4:0.1", "factor 4 is given twice"),
    ("4:0,8:0", "sum to 0"),
])
def test_bad_factor_weights_are_named(text, message):
    with pytest.raises(InputError, match="factor_weights") as info:
        text_inputs.parse_factor_weights(text, DEFAULT)
    assert message in str(info.value)


def test_empty_factor_weights_without_default_is_refused():
    with pytest.raises(InputError, match="factor_weights is empty"):
        text_inputs.parse_factor_weights("")


# ------------------------------------------------------------------------------------------ refinement
GRID = (2, 2)
TOKEN = 1


def _minmax(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min() + 1e-8)


def _item(text: str = "the dog") -> "wire_types.ParsedItem":
    parsed = ParsedText(text=text, root="dog", root_span=(4, 7), directions=(), words=())
    return wire_types.ParsedItem(parsed=parsed, prompt=text + ", ", root_positions=[TOKEN], root_position=TOKEN,
                                 tokens=["<s>", "dog</w>", ",</w>", "</s>"], root_rule="root_or_subj")


def _attention(factor_maps: dict[int, np.ndarray], affinity: np.ndarray | None, unet_factors=None,
               self_factor: int = 4) -> "wire_types.InternalsAttentionBatch":
    """One image's payload: per factor one layer whose token-1 map is planted (other tokens zero)."""
    names = [f"layer_f{f}" for f in factor_maps]
    cond = torch.zeros(len(factor_maps), *GRID, 4)
    for i, m in enumerate(factor_maps.values()):
        cond[i, ..., TOKEN] = torch.tensor(m, dtype=torch.float32)
    maps = CrossAttentionMaps(cond=cond, uncond=None, layers=tuple(f"step0/{n}" for n in names), kind="probs")
    self_attention = None
    if affinity is not None:
        self_attention = [[CapturedAffinity(f"level{self_factor}", self_factor, GRID, ("a", "b"),
                                            torch.tensor(affinity, dtype=torch.float32))]]
    return wire_types.InternalsAttentionBatch(
        maps=[maps], prompts=["the dog, "], tokens=[None], latent_hw=GRID, guidance_scale=9.0, kind="probs",
        model_family="SD1.x", layers=names, layer_factors={n: f for n, f in zip(names, factor_maps)},
        unet_factors=tuple(sorted(factor_maps)) if unet_factors is None else tuple(unet_factors),
        self_attention=self_attention, self_max_tokens=4096 if affinity is not None else 0)


# A planted 2 x 2 case: factor 4 sees the object at the top-left cell, factor 8 at the top row.
M4 = np.array([[4.0, 0.0], [0.0, 0.0]])
M8 = np.array([[2.0, 2.0], [1.0, 0.0]])
# Each cell gives half its attention to itself and half to its vertical neighbour (rows sum to 1).
A_VERTICAL = np.array([[0.5, 0.0, 0.5, 0.0], [0.0, 0.5, 0.0, 0.5], [0.5, 0.0, 0.5, 0.0], [0.0, 0.5, 0.0, 0.5]])


def test_refined_token_map_fuses_levels_then_propagates():
    attention = _attention({4: M4, 8: M8}, A_VERTICAL)
    weights = {8: 0.3, 4: 0.5, 2: 0.1, 1: 0.1}
    fused = (0.5 * _minmax(M4) + 0.3 * _minmax(M8)) / 0.8  # [[1, .375], [.1875, 0]]: weights of absent levels unused
    expected = _minmax((A_VERTICAL @ fused.reshape(-1)).reshape(GRID))
    got = attention_maps.refined_token_map(attention, 0, TOKEN, weights, iterations=1)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    # by hand: A fused = [[.59375, .1875], [.59375, .1875]] -> min-max [[1, 0], [1, 0]]
    np.testing.assert_allclose(got.numpy(), [[1.0, 0.0], [1.0, 0.0]], atol=1e-6)
    # no iteration: the fused map alone, min-max normalised
    np.testing.assert_allclose(attention_maps.refined_token_map(attention, 0, TOKEN, weights, iterations=0).numpy(),
                               _minmax(fused), atol=1e-6)


def _image(h: int = 16, w: int = 16) -> torch.Tensor:
    return torch.zeros(1, h, w, 3)


def test_refined_maps_give_a_mask_batch_at_the_image_size():
    attention = _attention({4: M4, 8: M8}, A_VERTICAL)
    parse = wire_types.ParsedBatch([_item()])
    c = attention_maps.refined_maps(attention, parse, _image(), {8: 0.3, 4: 0.5}, mode="bilinear")
    assert c.shape == (1, 16, 16) and c.dtype == torch.float32
    assert float(c.min()) == 0.0 and float(c.max()) == pytest.approx(1.0, abs=1e-6)
    # the refined 2 x 2 map is [[1, 0], [1, 0]]: the left column of the image is hot, the right one cold
    assert float(c[0, :, :4].mean()) > 0.9 and float(c[0, :, -4:].mean()) < 0.1


def test_refine_needs_self_attention():
    parse = wire_types.ParsedBatch([_item()])
    plain = wire_types.AttentionBatch(maps=_attention({4: M4}, None).maps, prompts=[None], tokens=[None],
                                      latent_hw=GRID, guidance_scale=9.0, kind="probs", model_family="SD1.x")
    for attention in (plain, _attention({4: M4}, None)):
        with pytest.raises(InputError, match="captured without self-attention; turn on self_attention"):
            attention_maps.refined_maps(attention, parse, _image(), {4: 1.0})


def test_refine_needs_every_weighted_level_the_unet_has():
    parse = wire_types.ParsedBatch([_item()])
    attention = _attention({4: M4}, A_VERTICAL, unet_factors=(1, 2, 4, 8))
    with pytest.raises(InputError, match=r"at factor\(s\) \[4\] only, but this UNet also has it at \[1, 2, 8\].*"
                                         r"set factor to 0 \(all\)"):
        attention_maps.refined_maps(attention, parse, _image(), {8: 0.3, 4: 0.5, 2: 0.1, 1: 0.1})
    # levels weighted 0 are not needed
    c = attention_maps.refined_maps(attention, parse, _image(), {8: 0.0, 4: 0.5, 2: 0.0, 1: 0.0})
    assert c.shape == (1, 16, 16)


def test_refine_names_an_unweighted_captured_level_and_a_missing_self_level():
    parse = wire_types.ParsedBatch([_item()])
    attention = _attention({4: M4, 2: M8}, A_VERTICAL)
    with pytest.raises(InputError, match=r"no weight for the captured factor\(s\) \[2\]"):
        attention_maps.refined_maps(attention, parse, _image(), {4: 1.0})
    with pytest.raises(InputError, match=r"self_factor: self-attention was captured at factor\(s\) \[4\], not 2"):
        attention_maps.refined_maps(attention, parse, _image(), {4: 1.0, 2: 1.0}, self_factor=2)
    with pytest.raises(InputError, match="iterations must be >= 0"):
        attention_maps.refined_maps(attention, parse, _image(), {4: 1.0, 2: 1.0}, iterations=-1)


def test_refine_checks_text_and_batch():
    attention = _attention({4: M4}, A_VERTICAL)
    with pytest.raises(InputError, match="captured for 'the dog, ' but the parse is of 'the cat, '"):
        attention_maps.refined_maps(attention, wire_types.ParsedBatch([_item("the cat")]), _image(), {4: 1.0})
    with pytest.raises(InputError, match=r"attention holds 1 image\(s\) but image holds 2"):
        attention_maps.refined_maps(attention, wire_types.ParsedBatch([_item()]), torch.zeros(2, 16, 16, 3), {4: 1.0})


def test_captured_factors_are_sorted_and_unique():
    attention = _attention({8: M8, 4: M4}, A_VERTICAL)
    attention.layer_factors["another_f4"] = 4
    assert attention.captured_factors == (4, 8)


# ------------------------------------------------------------------------------------------ clusters
def _two_kinds(columns: slice, grid: int = 8) -> torch.Tensor:
    """Features [2, grid, grid]: (0, 1) in the given columns, (1, 0) elsewhere."""
    f = torch.zeros(2, grid, grid)
    f[0] = 1.0
    f[0, :, columns] = 0.0
    f[1, :, columns] = 1.0
    return f


def test_clusters_of_planted_features_become_frame_masks():
    # left half / right half of the padded square; the image is the square itself (128 x 128, latent 16)
    masks = feature_clusters.cluster_image([_two_kinds(slice(4, 8))], (16, 16), 128, 128, n_clusters=2,
                                           cluster_factor=2)
    assert masks.dtype == torch.bool and masks.shape == (2, 128, 128)
    left = torch.zeros(128, 128, dtype=torch.bool)
    left[:, :64] = True
    assert torch.equal(masks[0], left) and torch.equal(masks[1], ~left)  # first appearance (top-left) first


def test_cluster_components_are_split_and_padding_is_dropped():
    # (1, 0) on the outer quarters, (0, 1) in the middle: two clusters, three connected pieces
    features = [_two_kinds(slice(2, 6))]
    split = feature_clusters.cluster_image(features, (16, 16), 128, 128, n_clusters=2, cluster_factor=2)
    whole = feature_clusters.cluster_image(features, (16, 16), 128, 128, n_clusters=2, cluster_factor=2,
                                           split_components=False)
    assert split.shape[0] == 3 and whole.shape[0] == 2
    assert [int(m.sum()) for m in split] == [128 * 32, 128 * 32, 128 * 64]
    # a 64 x 128 image sits in rows 32..95 of the 128 square: masks come out at its frame
    wide = feature_clusters.cluster_image(features, (16, 16), 64, 128, n_clusters=2, cluster_factor=2)
    assert wide.shape == (3, 64, 128) and [int(m.sum()) for m in wide] == [64 * 32, 64 * 32, 64 * 64]
    # min_area drops the two 32-column strips
    big = feature_clusters.cluster_image(features, (16, 16), 64, 128, n_clusters=2, cluster_factor=2,
                                         min_area=64 * 33)
    assert big.shape == (1, 64, 128) and bool(big[0, :, 32:96].all())


def test_cluster_batch_and_errors():
    done = []
    batch = feature_clusters.cluster_batch([[_two_kinds(slice(4, 8))], [_two_kinds(slice(2, 6))]], (16, 16), 128, 128,
                                           on_image=lambda: done.append(1), n_clusters=2, cluster_factor=2)
    assert isinstance(batch, wire_types.ProposalBatch) and batch.source == "cluster" and len(batch) == 2
    assert [m.shape[0] for m in batch.masks] == [2, 3]  # each image clustered on its own features
    assert len(done) == 2  # one progress step per image
    with pytest.raises(InputError, match="65 clusters for a 8x8 grid"):
        feature_clusters.cluster_image([_two_kinds(slice(4, 8))], (16, 16), 128, 128, n_clusters=65,
                                       cluster_factor=2)
    with pytest.raises(InputError, match="16x8 is not square"):
        feature_clusters.cluster_image([_two_kinds(slice(4, 8))], (16, 8), 128, 128, n_clusters=2)
