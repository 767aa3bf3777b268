"""Offloading: models visit the compute device only for their stage, and results do not change."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import refdiff.offload as offload
from refdiff.errors import InputError
from refdiff.devices import module_device
from refdiff.offload import OnDemand, all_on_device, offload_sd, on_device, sd_on_device
from refdiff.pipeline import RefDiff

# As tests/test_pipeline.py: small settings so that random SAM proposes masks and a run takes about a second.
from tiny_runs import FAST, two_box_image
OTHER = torch.device("cpu", 1)  # a second "device" for recorded (not executed) moves


class Recording(torch.nn.Module):
    """A module whose .to records its targets instead of moving anything."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.moves: list[torch.device] = []

    def to(self, *args, **kwargs):  # type: ignore[override]
        self.moves.append(torch.device(kwargs.get("device", args[0] if args else None)))
        return self


# ------------------------------------------------------------------------------------------ helpers
def test_on_device_moves_for_the_block_and_back():
    m = Recording()
    with on_device(m, OTHER, "cpu") as device:
        assert device == OTHER and m.moves == [OTHER]
    assert m.moves == [OTHER, torch.device("cpu")]


def test_on_device_restores_when_the_block_raises():
    m = Recording()
    with pytest.raises(RuntimeError, match="boom"):
        with on_device(m, OTHER, "cpu"):
            raise RuntimeError("boom")
    assert m.moves == [OTHER, torch.device("cpu")]


def test_nothing_moves_when_compute_and_offload_devices_are_the_same():
    m = Recording()
    with on_device(m, "cpu", torch.device("cpu")):
        pass
    with all_on_device([m, Recording()], "cpu", "cpu"):
        pass
    assert m.moves == []


def test_clip_scorer_moves_through_its_own_to(monkeypatch):
    from refdiff.testing.clip import tiny_clip

    clip, targets = tiny_clip(), []
    monkeypatch.setattr(clip, "to", lambda device=None, dtype=None: targets.append((device, dtype)) or clip)
    with on_device(clip, OTHER, "cpu"):
        pass
    assert targets == [(OTHER, None), (torch.device("cpu"), None)]  # device only: the dtype is never touched
    assert module_device(clip) == clip.device == torch.device("cpu")
    assert module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")


def test_all_on_device_returns_in_reverse_order(monkeypatch):
    events = []
    monkeypatch.setattr(offload, "move_to", lambda m, d: events.append((m, d.index)))
    with all_on_device(["a", "b"], OTHER, "cpu"):
        events.append("block")
    assert events == [("a", 1), ("b", 1), "block", ("b", None), ("a", None)]


def test_on_demand_moves_once_and_only_when_needed():
    m = Recording()
    with OnDemand(m, OTHER, "cpu"):
        pass
    assert m.moves == []  # never needed: never moved
    with OnDemand(m, OTHER, "cpu") as need:
        need()
        need()
        assert m.moves == [OTHER]
    assert m.moves == [OTHER, torch.device("cpu")]
    with pytest.raises(InputError, match="outside"):
        need()


def test_offload_sd_keeps_the_compute_device_field_and_parks_the_parts(monkeypatch):
    from refdiff.testing.sd import tiny_sd

    sd = tiny_sd()
    events = []
    monkeypatch.setattr(offload, "move_to", lambda m, d: events.append((m, d)))
    parked = offload_sd(sd, OTHER, "cpu")
    assert parked.device == OTHER and sd.device == torch.device("cpu")  # a copy; the caller's object unchanged
    assert parked.unet is sd.unet and parked.dtype == sd.dtype
    assert events == [(sd.unet, torch.device("cpu")), (sd.vae, torch.device("cpu")),
                      (sd.text_encoder, torch.device("cpu"))]
    events.clear()
    with sd_on_device(parked, ("vae",), "cpu"):
        assert events == [(sd.vae, OTHER)]
    assert events[-1] == (sd.vae, torch.device("cpu"))
    with pytest.raises(InputError, match="scheduler"):
        with sd_on_device(parked, ("scheduler",), "cpu"):
            pass


def test_device_without_offload_is_an_error():
    with pytest.raises(InputError, match="offload=True"):
        RefDiff(device="cpu")
    assert RefDiff(offload=True, device="cpu").device == torch.device("cpu")


# ------------------------------------------------------------------------------------------ pipeline
@pytest.fixture(scope="module")
def image():
    return two_box_image(40, 56, blue=(10, 36, 34, 52))


VARIANTS = ["full", "G", "G-refine", "cluster", "sam-clip"]
TEXT = "the red box on the left"


def assert_same(a, b):
    assert a.index == b.index and a.top_k == b.top_k
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.proposals, b.proposals)
    for k in ("generative", "discriminative", "fused"):
        assert (a.scores[k] is None) == (b.scores[k] is None), k
        if a.scores[k] is not None:
            np.testing.assert_array_equal(a.scores[k], b.scores[k])
    if a.attention is not None:
        np.testing.assert_array_equal(a.attention, b.attention)


@pytest.fixture(scope="module")
def plain(models, image):
    sd, sam, clip = models
    return RefDiff(sd=sd, sam=sam, clip=clip, **FAST).segment_variants(image, TEXT, VARIANTS)


def test_offloaded_run_gives_identical_results(models, image, plain):
    sd, sam, clip = models
    model = RefDiff(sd=sd, sam=sam, clip=clip, offload=True, device="cpu", **FAST)
    results = model.segment_variants(image, TEXT, VARIANTS)
    assert len(results["full"].proposals) > 0
    for name in VARIANTS:
        assert_same(results[name], plain[name])
    assert model.sd.device == torch.device("cpu")


def test_each_model_visits_the_compute_device_only_for_its_stage(models, image, plain, monkeypatch):
    """Moves are recorded (not executed) with a distinct offload device; a UNet hook checks where SAM is."""
    sd, sam, clip = models
    names = {id(sd.unet): "unet", id(sd.vae): "vae", id(sd.text_encoder): "text", id(sam): "sam", id(clip): "clip"}
    where: dict[str, str] = {}
    events: list[tuple[str, str]] = []

    def record(model, device):
        name, place = names[id(model)], "gpu" if device == torch.device("cpu") else "cpu"
        where[name] = place
        events.append((name, place))

    seen_by_unet: list[dict[str, str]] = []
    hook = sd.unet.register_forward_pre_hook(lambda *a: seen_by_unet.append(dict(where)))
    monkeypatch.setattr(offload, "move_to", record)
    monkeypatch.setattr(offload, "OFFLOAD_DEVICE", OTHER)  # idle models "live" on a second device
    try:
        model = RefDiff(sd=sd, sam=sam, clip=clip, offload=True, device="cpu", **FAST)
        assert set(where.values()) == {"cpu"} and len(where) == 5, "models given ready are parked at once"
        results = model.segment_variants(image, TEXT, VARIANTS)
        first_run = list(events)
        events.clear()
        again = model.segment_variants(image, TEXT, VARIANTS)
    finally:
        hook.remove()
    for name in VARIANTS:
        assert_same(results[name], plain[name])
        assert_same(again[name], plain[name])
    assert events == [], "a fully cached run moves no model"

    # Every model starts parked and ends parked; each visit to the compute device is followed by a return.
    assert all(place == "cpu" for place in where.values()) and set(where) == set(names.values())
    for name in names.values():
        mine = [place for n, place in first_run if n == name]
        assert mine[0] == "cpu" and mine[-1] == "cpu"
        assert all(a != b for a, b in zip(mine[1:], mine[2:])), f"{name}: moved twice in a row: {mine}"
    visits = {n: sum(1 for m, p in first_run if m == n and p == "gpu") for n in names.values()}
    # SAM once; the VAE once (latent cached); UNet + text encoder for the map of full/G/cluster, for G-refine and
    # for cluster's features; CLIP for the discriminative branch of full, cluster and sam-clip (one visit each).
    assert len(results["cluster"].proposals) > 0
    assert visits == {"sam": 1, "vae": 1, "unet": 3, "text": 3, "clip": 3}

    # While the UNet runs, it and the text encoder are on the compute device, and nothing else is.
    assert seen_by_unet
    for snapshot in seen_by_unet:
        assert snapshot["unet"] == snapshot["text"] == "gpu"
        assert snapshot["sam"] == snapshot["vae"] == snapshot["clip"] == "cpu"


def test_from_pretrained_with_offload_loads_on_the_cpu_in_the_compute_dtype(models, monkeypatch):
    """With CUDA faked available: SD loads on the CPU in fp16 (CUDA's default), SDComponents.device is cuda."""
    import refdiff.clip
    import refdiff.sam
    import refdiff.sd

    calls = {}

    def loader(name, value):
        def load(source, **kwargs):
            calls[name] = kwargs
            return value
        return load

    for module, name, value in zip((refdiff.sd, refdiff.sam, refdiff.clip), ("sd", "sam", "clip"), models):
        monkeypatch.setattr(module, f"load_{name}", loader(name, value))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(offload, "release_cache", lambda device: None)  # no real CUDA to empty
    model = RefDiff.from_pretrained(device=None, offload=True)
    assert model.device == torch.device("cuda")
    parked = model.sd
    assert parked.device == torch.device("cuda") and module_device(parked.unet) == torch.device("cpu")
    model.sam, model.clip
    cpu = torch.device("cpu")
    assert calls["sd"] == dict(device=cpu, dtype=torch.float16, config=None, vae=None)
    assert calls["sam"] == dict(device=cpu) and calls["clip"] == dict(device=cpu, dtype=None)
    plain = RefDiff.from_pretrained(device="cuda")
    assert plain.device is None and not plain.offload


def test_cli_offload_flag_reaches_from_pretrained(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from refdiff import cli
    from refdiff.errors import RefDiffError

    seen = {}

    def fake_from_pretrained(cls, **kwargs):
        seen.update(kwargs)
        raise RefDiffError("stop after building")

    monkeypatch.setattr(RefDiff, "from_pretrained", classmethod(fake_from_pretrained))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device cuda is checked before loading
    img = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    args = ["segment", str(img), "the dog", "-o", str(tmp_path / "m.png"), "--device", "cuda"]
    assert cli.main(args + ["--offload"]) == 2 and seen["offload"] is True and seen["device"] == "cuda"
    assert cli.main(args) == 2 and seen["offload"] is False


def test_eval_offload_flag_reaches_from_pretrained(monkeypatch):
    import argparse

    from refdiff.cli import eval as eval_cli

    parser = argparse.ArgumentParser()
    eval_cli.add_eval_arguments(parser)
    seen = {}
    monkeypatch.setattr(RefDiff, "from_pretrained", classmethod(lambda cls, **kwargs: seen.update(kwargs)))
    for argv, expected in ((["--offload", "--device", "cpu"], True), ([], False)):
        seen.clear()
        args = parser.parse_known_args(argv)[0]
        eval_cli.load_model(args, {})
        assert seen["offload"] is expected
