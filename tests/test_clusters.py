"""FreeSeg-Diff-style proposals: seeded k-means, feature clustering, masks at the image frame, end to end."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import refdiff.clusters as clusters
from refdiff.clusters import (cluster_features, cluster_proposals, feature_cluster_proposals, kmeans, labels_to_frame,
                              query_feature_modules, split_connected_components)
from refdiff.diffusion import encode_image
from refdiff.errors import InputError
from refdiff.image import PreparedImage, prepare_image
from refdiff.testing.sd import tiny_sd


def _prep(width: int, height: int) -> PreparedImage:
    side = max(width, height)
    return PreparedImage(pixels=torch.zeros(1, 3, 8, 8), size=8, side=side,
                         offset=((side - width) // 2, (side - height) // 2), width=width, height=height)


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two label maps are equal up to a renaming of labels (a bijection)."""
    pairs = torch.unique(torch.stack([a.reshape(-1), b.reshape(-1)]), dim=1)
    return pairs.shape[1] == torch.unique(a).numel() == torch.unique(b).numel()


def _planted_features(objects: torch.Tensor, channels: int, seed: int, noise: float = 0.05) -> torch.Tensor:
    """[C, h, w]: a random vector per object id, plus small noise."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(int(objects.max()) + 1, channels, generator=g)
    feats = prototypes[objects].permute(2, 0, 1)
    return feats + noise * torch.randn(feats.shape, generator=g)


# --- k-means ------------------------------------------------------------------------------------------------

def test_kmeans_finds_planted_blobs_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(50)
    x = centres[truth] + 0.5 * torch.randn(150, 2, generator=g)
    labels, found = kmeans(x, 3, seed=1)
    assert _same_partition(labels, truth)
    order = torch.stack([found[labels[truth == i][0]] for i in range(3)])
    assert torch.allclose(order, centres, atol=0.3)
    again, _ = kmeans(x, 3, seed=1)
    assert torch.equal(labels, again)


def test_kmeans_handles_duplicates_and_bad_inputs():
    x = torch.tensor([[0.0], [0.0], [0.0], [5.0]])
    labels, _ = kmeans(x, 3, seed=0)  # two distinct points, three clusters: no crash, both points separated
    assert labels[0] == labels[1] == labels[2] and labels[3] != labels[0]
    with pytest.raises(InputError, match="n_clusters"):
        kmeans(x, 5)
    with pytest.raises(InputError, match="NaN"):
        kmeans(torch.tensor([[float("nan")], [1.0]]), 1)


# --- clustering planted features -----------------------------------------------------------------------------

def test_constant_per_object_features_give_one_cluster_per_object():
    objects = torch.zeros(16, 16, dtype=torch.long)
    objects[2:8, 4:12] = 1  # borders on even rows/columns: the 8x8 block sees the same objects
    objects[10:14, 0:6] = 2
    objects[10:16, 8:16] = 3
    fine = _planted_features(objects, 8, seed=1)  # 16x16 block, 8 channels
    coarse = _planted_features(objects[::2, ::2], 16, seed=2)  # 8x8 block, 16 channels, scaled below
    labels = cluster_features([fine, coarse * 10], n_clusters=4, grid=16, seed=0)
    assert labels.shape == (16, 16) and labels.dtype == torch.long
    # the coarse block's bilinear upsampling blurs object borders; the fine block decides there
    inner = torch.ones(16, 16, dtype=torch.bool)
    for k in range(4):
        m = (objects == k).float()[None, None]
        eroded = -torch.nn.functional.max_pool2d(-m, 3, 1, 1)[0, 0] > 0
        inner &= eroded | (objects != k)
    assert _same_partition(labels[inner], objects[inner])
    assert torch.unique(labels).tolist() == [0, 1, 2, 3]
    assert labels[0, 0] == 0  # numbered by first appearance


def test_identical_blocks_give_the_exact_partition_and_no_normalisation_changes_nothing_here():
    objects = torch.zeros(8, 8, dtype=torch.long)
    objects[:, 4:] = 1
    objects[5:, :3] = 2
    feats = _planted_features(objects, 6, seed=3, noise=0.01)
    for normalize in (True, False):
        labels = cluster_features([feats], n_clusters=3, normalize=normalize)
        assert torch.equal(labels, objects)  # 0 first at (0, 0), 1 next at (0, 4), 2 at (5, 0)


def test_cluster_features_rejects_bad_inputs():
    with pytest.raises(InputError, match="no feature map"):
        cluster_features([])
    with pytest.raises(InputError, match=r"\[C, h, w\]"):
        cluster_features([torch.rand(4, 4)])


# --- proposals at the image frame ----------------------------------------------------------------------------

def test_labels_to_frame_hand_values():
    labels = torch.tensor([[0, 1], [2, 3]])
    prep = _prep(width=4, height=2)  # side 4, frame rows 1..2 of the square
    # square rows 1 -> cell 0, 2 -> cell 1; columns 0,1 -> cell 0, 2,3 -> cell 1
    assert torch.equal(labels_to_frame(labels, prep), torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]]))


def test_cluster_proposals_equal_the_objects_in_the_frame():
    # image 48 x 30 -> square side 48, offset (0, 9); a 16x16 grid has 3-pixel cells, the frame is cells 3..12
    prep = _prep(width=48, height=30)
    grid = torch.zeros(16, 16, dtype=torch.long)  # 0: in-frame background
    grid[:3] = 3
    grid[13:] = 3  # 3: the black padding (outside the frame)
    grid[4:8, 2:6] = 1
    grid[9:12, 8:15] = 2
    feats = _planted_features(grid, 8, seed=4)
    labels = cluster_features([feats], n_clusters=4, seed=0)
    masks = cluster_proposals(labels, prep)
    expected = torch.zeros(3, 30, 48, dtype=torch.bool)
    expected[0] = True
    expected[1, (4 - 3) * 3:(8 - 3) * 3, 2 * 3:6 * 3] = True
    expected[2, (9 - 3) * 3:(12 - 3) * 3, 8 * 3:15 * 3] = True
    expected[0] &= ~(expected[1] | expected[2])
    assert masks.dtype == torch.bool and masks.shape == (3, 30, 48)  # the padding cluster is dropped
    got = {m.numpy().tobytes() for m in masks}
    assert got == {m.numpy().tobytes() for m in expected}


def test_split_components_min_area_and_min_cells():
    prep = _prep(width=8, height=8)  # side 8, no padding; 4x4 grid -> 2x2-pixel cells
    labels = torch.zeros(4, 4, dtype=torch.long)
    labels[0, 0] = 1
    labels[3, 2:4] = 1  # cluster 1 in two pieces: 1 cell and 2 cells
    whole = cluster_proposals(labels, prep, split_components=False)
    assert whole.shape[0] == 2 and sorted(whole.flatten(1).sum(1).tolist()) == [12, 52]
    split = cluster_proposals(labels, prep)
    assert sorted(split.flatten(1).sum(1).tolist()) == [4, 8, 52]
    assert sorted(cluster_proposals(labels, prep, min_area=5).flatten(1).sum(1).tolist()) == [8, 52]
    assert sorted(cluster_proposals(labels, prep, min_cells=2).flatten(1).sum(1).tolist()) == [8, 52]
    pieces = split_connected_components(labels)
    assert torch.unique(pieces).numel() == 3


def test_without_scipy_components_are_not_split(monkeypatch):
    monkeypatch.setattr(clusters, "_scipy_label", lambda: None)
    labels = torch.tensor([[1, 0, 1]])
    with pytest.warns(UserWarning, match="scipy is not installed"):
        out = split_connected_components(labels)
    assert torch.equal(out, labels)


# --- end to end on the tiny UNet ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    sd = tiny_sd(seed=0)
    rgb = (np.random.RandomState(1).rand(40, 56, 3) * 255).astype(np.uint8)
    prep = prepare_image(rgb, size=128)
    return sd, prep, encode_image(sd, prep.pixels, seed=0)


def test_query_feature_modules_are_the_factor4_query_projections(tiny):
    sd, _, _ = tiny
    assert query_feature_modules(sd.unet) == (
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_q",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_q")
    with pytest.raises(InputError, match="factor 16"):
        query_feature_modules(sd.unet, 16)


def test_feature_cluster_proposals_end_to_end(tiny):
    sd, prep, latent = tiny
    masks = feature_cluster_proposals(sd, latent, "a cat", prep, split_components=False)
    assert masks.dtype == torch.bool and masks.shape[1:] == (40, 56) and 1 <= masks.shape[0] <= 4
    assert torch.equal(masks.sum(0), torch.ones(40, 56, dtype=torch.long))  # clusters partition the frame
    again = feature_cluster_proposals(sd, latent, "a cat", prep, split_components=False)
    assert torch.equal(masks, again)  # seeded noise and k-means
    split = feature_cluster_proposals(sd, latent, "a cat", prep, blocks=("up_blocks.1", "up_blocks.2"))
    assert split.shape[1:] == (40, 56) and bool(split.flatten(1).any(1).all())
    assert int(split.sum(0).max()) == 1  # components never overlap
    with pytest.raises(InputError, match="timestep"):
        feature_cluster_proposals(sd, latent, "a cat", prep, timestep=1000)
