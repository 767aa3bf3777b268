"""RefDiff's per-image caches: bounded in entries (and the proposal cache in bytes), holding CPU tensors only,
and not growing when the same run repeats."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

import refdiff.pipeline as pipeline_module
from refdiff.pipeline import RefDiff

from tiny_runs import FAST as SETTINGS
VARIANTS = ("full", "G", "G-refine", "cluster", "sam-clip")
TEXT = "the red box on the left"


def images(count: int) -> list[np.ndarray]:
    """``count`` different images of one size (45 x 67): two boxes at image-dependent places, noise."""
    out = []
    for i in range(count):
        rng = np.random.default_rng(i)
        rgb = rng.integers(0, 30, (45, 67, 3), dtype=np.uint8)
        rgb[5 + i:30, 4:25 + i] = (200, 30, 30)
        rgb[10:40 - i, 40 - i:60] = (30, 30, 200)
        out.append(rgb)
    return out


def tensors_in(value: Any) -> list[torch.Tensor | np.ndarray]:
    """Every tensor and array inside a cached value (tuples, lists, dicts, dataclasses)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in tensors_in(getattr(value, f.name))]
    return []


def nbytes(t: torch.Tensor | np.ndarray) -> int:
    return int(t.nbytes) if isinstance(t, np.ndarray) else t.numel() * t.element_size()


def census(model: RefDiff) -> dict[str, tuple[int, int, int]]:
    """Per cache attribute: (entries, tensors, bytes); every cached tensor must be on the CPU."""
    out = {}
    for name, cache in vars(model).items():
        if not isinstance(cache, pipeline_module._LRU):
            continue
        found = [t for v in cache.data.values() for t in tensors_in(v)]
        devices = {t.device.type for t in found if isinstance(t, torch.Tensor)}
        assert devices <= {"cpu"}, (name, devices)
        assert len(cache.data) <= cache.size, name
        out[name] = (len(cache.data), len(found), sum(nbytes(t) for t in found))
    assert out, "RefDiff keeps its caches as _LRU attributes"
    return out


def run(model: RefDiff, rgb: np.ndarray) -> None:
    model.segment_variants(rgb, TEXT, VARIANTS, seed=0)
    generator = model._generator[1]
    assert generator.predictor.features is None  # the SAM image embedding is not kept between runs


def test_the_same_run_five_times_adds_nothing_to_the_caches(models):
    sd, sam, clip = models
    model = RefDiff(sd=sd, sam=sam, clip=clip, **SETTINGS)
    rgb = images(1)[0]
    run(model, rgb)
    first = census(model)
    # the prompted and concept proposal modes' caches: these variants run the automatic generator
    unused = {"_sam_embeddings", "_sam3_images", "_concepts"}
    assert all(entries > 0 for name, (entries, _, _) in first.items() if name not in unused), first
    for _ in range(4):
        run(model, rgb)
        assert census(model) == first


def test_five_images_fill_the_caches_up_to_their_bounds_and_no_further(models):
    sd, sam, clip = models
    model = RefDiff(sd=sd, sam=sam, clip=clip, cache_size=2, **SETTINGS)
    counts, largest = [], {}
    for rgb in images(5):
        run(model, rgb)
        now = census(model)
        counts.append({name: entries for name, (entries, _, _) in now.items()})
        for name, cache in vars(model).items():
            if isinstance(cache, pipeline_module._LRU):
                for v in cache.data.values():
                    largest[name] = max(largest.get(name, 0), sum(nbytes(t) for t in tensors_in(v)))
        # bytes never exceed (entries allowed) x (largest entry seen) per cache
        for name, (entries, _, size) in now.items():
            if name not in largest:  # a cache these variants never fill (the prompted mode's embeddings)
                assert entries == 0, name
                continue
            assert size <= vars(model)[name].size * largest[name], name
    # per image: 1 prepared square, 1 latent, 2 attention entries (plain, refined), 2 proposal sets (SAM, clusters),
    # 5 CLIP feature sets (crop and masked of both proposal sets, sam-clip's plain crops); the text features are shared
    per_image = {"_prepared": 1, "_latents": 1, "_attention": 2, "_sam_masks": 2, "_clip_image": 5, "_clip_text": 0}
    for i, count in enumerate(counts, start=1):
        for name, n in per_image.items():
            expected = min(i * n, vars(model)[name].size) if n else 1
            assert count[name] == expected, (i, name, count[name], expected)
    assert counts[-1] == counts[-2]  # full: a new image replaces the oldest


def test_proposal_cache_keeps_only_the_newest_entry_beyond_its_byte_bound(models, monkeypatch):
    sd, sam, clip = models
    monkeypatch.setattr(pipeline_module, "PROPOSAL_CACHE_BYTES", 1)
    model = RefDiff(sd=sd, sam=sam, clip=clip, **SETTINGS)
    for rgb in images(3):
        model(rgb, TEXT, variant="GS")
        assert len(model._sam_masks.data) == 1
    assert model._sam_masks.nbytes == sum(nbytes(t) for v in model._sam_masks.data.values() for t in tensors_in(v))
    # the newest entry is the one kept: the last image's masks come from the cache
    calls = []
    monkeypatch.setattr(model, "_mask_generator", lambda: calls.append(1))
    model(images(3)[-1], TEXT, variant="GS")
    assert not calls
