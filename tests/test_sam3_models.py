"""SAM 3 image models: a tiny random build of sam3's real classes runs on the CPU, checkpoints load strictly
(safetensors, Meta's nested sam3.pt), SAM v1 / SAM 2 files are refused by name by the SAM 3 loader and a SAM 3
file by the SAM / SAM 2 loaders. The refusals need no sam3 package."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from refdiff.errors import ModelLoadError
from refdiff.sam import load_sam
from refdiff.sam3_models import SAM3_MARKER, concept_prompt, is_sam3_state_dict, sam3_config_from_state_dict
from refdiff.testing.sam import tiny_sam_state_dict


def _fake_sam3_file(tmp_path, nested: bool):
    """A file with a SAM 3 image model's key layout (a few tensors), as sam3.pt nests it or plain."""
    state = {SAM3_MARKER: torch.zeros(4, 3, 14, 14), "transformer.decoder.layers.0.norm1.weight": torch.ones(4)}
    if nested:
        state = {"model": {"detector." + k: v for k, v in state.items()}}
    path = tmp_path / ("sam3.pt" if nested else "sam3_plain.pt")
    torch.save(state, path)
    return path


@pytest.mark.parametrize("nested", [True, False])
def test_sam_loaders_refuse_a_sam3_file_by_name(tmp_path, nested):
    path = _fake_sam3_file(tmp_path, nested)
    with pytest.raises(ModelLoadError, match="is a SAM 3 checkpoint.*--sam3"):
        load_sam(path)
    from refdiff.sam2_models import sam2_arch_from_state_dict

    state = torch.load(path, weights_only=True)
    state = state.get("model", state)
    with pytest.raises(ModelLoadError, match="is a SAM 3 checkpoint"):
        sam2_arch_from_state_dict(state)


def test_sam3_config_reader_refuses_sam1_and_sam2_by_name():
    with pytest.raises(ModelLoadError, match=r"SAM \(v1, segment-anything\) checkpoint, not SAM 3"):
        sam3_config_from_state_dict(tiny_sam_state_dict())
    sam2_like = {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(1),
                 "sam_mask_decoder.iou_token.weight": torch.zeros(1)}
    with pytest.raises(ModelLoadError, match="is a SAM 2 checkpoint, not SAM 3"):
        sam3_config_from_state_dict(sam2_like)
    with pytest.raises(ModelLoadError, match="not a SAM 3 checkpoint"):
        sam3_config_from_state_dict({"foo": torch.zeros(1)})
    assert is_sam3_state_dict({"detector." + SAM3_MARKER: 0}) and is_sam3_state_dict({SAM3_MARKER: 0})


def test_concept_prompt_is_the_target_noun_or_its_phrase():
    from refdiff.expression import parse_expression

    expr = parse_expression("the second red car from the left", root_rule="root")
    assert concept_prompt(expr) == "car"
    assert concept_prompt(expr, "phrase") == "red car"
    assert concept_prompt(parse_expression("the one on the right", root_rule="root")) is None


# -- with the sam3 package ---------------------------------------------------------------------------------
sam3_needed = pytest.mark.skipif(__import__("importlib").util.find_spec("sam3") is None,
                                 reason="needs the sam3 package (pip install --no-deps sam3==0.1.4 einops psutil)")


@pytest.fixture(scope="module")
def tiny():
    from refdiff.testing.sam3 import tiny_sam3

    return tiny_sam3(seed=1)


@sam3_needed
def test_tiny_sam3_finds_instances_of_a_text_prompt_on_the_cpu(tiny):
    from refdiff.sam3_models import concept_instances, concept_processor, image_state

    rgb = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    proc = concept_processor(tiny)
    state = image_state(proc, rgb)
    found = concept_instances(proc, state, "car", threshold=0.0, max_instances=5)
    assert found.masks.dtype == torch.bool and found.masks.shape[1:] == (90, 120)
    assert 0 < found.masks.shape[0] <= 5 and found.found >= found.masks.shape[0]
    assert torch.all(found.scores[:-1] >= found.scores[1:]) and torch.isfinite(found.scores).all()
    assert found.masks.flatten(1).any(1).all()  # empty masks are left out
    none = concept_instances(proc, state, "car", threshold=0.99)
    assert none.masks.shape == (0, 90, 120)


@sam3_needed
@pytest.mark.parametrize("name,official", [("sam3.safetensors", False), ("sam3.pt", True)])
def test_sam3_checkpoint_round_trip_strict(tmp_path, tiny, name, official):
    from refdiff.sam3_models import load_sam3, sam3_config_from_state_dict
    from refdiff.testing.sam3 import TINY_SAM3, save_sam3_checkpoint

    path = save_sam3_checkpoint(tiny, tmp_path / name, official=official)
    if official:  # a .pt carries no sizes: the tiny model is refused as not the released one
        with pytest.raises(ModelLoadError, match="not the released image model"):
            load_sam3(path)
        return
    loaded = load_sam3(path)
    assert loaded.refdiff_config == TINY_SAM3
    for key, value in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert sam3_config_from_state_dict(tiny.state_dict(), {"refdiff.sam3_config": TINY_SAM3.to_json()}) == TINY_SAM3


@sam3_needed
def test_sam3_loader_refuses_sam2_and_sam1_files_by_name(tmp_path):
    from refdiff.sam3_models import load_sam3

    sam1 = tmp_path / "sam_vit_b.pth"
    torch.save(tiny_sam_state_dict(), sam1)
    with pytest.raises(ModelLoadError, match=r"SAM \(v1"):
        load_sam3(sam1)
    pytest.importorskip("sam2")
    from refdiff.testing.sam2 import save_sam2_checkpoint, tiny_sam2

    sam2 = save_sam2_checkpoint(tiny_sam2(), tmp_path / "sam2.1_hiera_tiny.safetensors")
    with pytest.raises(ModelLoadError, match="is a SAM 2 checkpoint, not SAM 3"):
        load_sam3(sam2)


@sam3_needed
def test_sam3_file_with_a_missing_weight_is_refused(tmp_path, tiny):
    from safetensors.torch import save_file

    from refdiff.sam3_models import METADATA_KEY, load_sam3
    from refdiff.testing.sam3 import TINY_SAM3

    state = {k: v.clone().contiguous() for k, v in tiny.state_dict().items()}
    state.pop(next(k for k in state if k.startswith("transformer.decoder.")))
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path), metadata={METADATA_KEY: TINY_SAM3.to_json()})
    with pytest.raises(ModelLoadError, match="do not fit the SAM 3 image architecture"):
        load_sam3(path)
