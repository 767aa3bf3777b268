"""SAM 2 / 2.1 backend: architecture read from the weights of every official config, strict safe loading,
clear errors across SAM v1 / SAM 2, automatic masks in the proposals' format, the predictor interface."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sam2")

from refdiff.errors import DependencyError, ModelLoadError  # noqa: E402
from refdiff.proposals import make_mask_generator, sam_post_filter, sam_proposals  # noqa: E402
from refdiff.sam import load_sam  # noqa: E402
from refdiff.sam2_models import (SAM2_TRUNKS, Sam2Arch, build_sam2_model, is_sam2_model, load_any_sam,  # noqa: E402
                                 load_sam2, make_sam2_predictor, sam2_arch_from_state_dict)
from refdiff.testing.sam import tiny_sam_state_dict  # noqa: E402
from refdiff.testing.sam2 import random_sam2, save_sam2_checkpoint, tiny_sam2  # noqa: E402

FAST = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rgb = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    rgb[20:60, 10:50] = (220, 30, 30)
    return rgb


@pytest.mark.parametrize("version", ["2", "2.1"])
@pytest.mark.parametrize("size", ["tiny", "small", "base_plus", "large"])
def test_architecture_is_read_back_from_each_shipped_config(version, size):
    """The package's own config of each size and version builds a model whose weights give that size back."""
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    suffix = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}[size]
    cfg = compose(config_name=f"configs/sam{version}/sam{version}_hiera_{suffix}.yaml")
    OmegaConf.resolve(cfg)
    state = instantiate(cfg.model, _recursive_=True).state_dict()
    assert sam2_arch_from_state_dict(state) == Sam2Arch(version, size)


def test_real_tiny_checkpoint_round_trip_as_pt_and_safetensors(tmp_path):
    model = random_sam2(Sam2Arch("2.1", "tiny"), seed=3)
    for name in ("sam2.1_hiera_tiny.pt", "sam2.1_hiera_tiny.safetensors"):
        loaded = load_any_sam(save_sam2_checkpoint(model, tmp_path / name))
        assert is_sam2_model(loaded) and loaded.refdiff_arch == Sam2Arch("2.1", "tiny")
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key


def test_tiny_custom_size_loads_from_its_metadata_and_not_without(tmp_path):
    path = save_sam2_checkpoint(tiny_sam2(1), tmp_path / "tiny.safetensors")
    assert load_sam2(path).refdiff_arch.size == "custom"
    bare = tmp_path / "bare.pt"
    torch.save(tiny_sam2(1).state_dict(), bare)
    with pytest.raises(ModelLoadError, match="none of the official sizes"):
        load_sam2(bare)


def test_strict_load_rejects_a_missing_weight(tmp_path):
    state = random_sam2(Sam2Arch("2.1", "tiny")).state_dict()
    del state["sam_mask_decoder.iou_token.weight"]
    torch.save({"model": state}, tmp_path / "cut.pt")
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_sam2(tmp_path / "cut.pt")


def test_sam1_and_sam2_files_given_to_the_wrong_loader_say_so(tmp_path):
    v1 = tmp_path / "sam_v1.pth"
    torch.save(tiny_sam_state_dict(0), v1)
    v2 = save_sam2_checkpoint(tiny_sam2(0), tmp_path / "sam2.safetensors")
    with pytest.raises(ModelLoadError, match="SAM \\(v1, segment-anything\\) checkpoint"):
        load_sam2(v1)
    with pytest.raises(ModelLoadError, match="this is a SAM 2 checkpoint"):
        load_sam(v2)
    assert not is_sam2_model(load_any_sam(v1)) and is_sam2_model(load_any_sam(v2))


def test_version_2_and_2_1_are_told_apart_by_their_keys():
    state = random_sam2(Sam2Arch("2.1", "tiny")).state_dict()
    older = {k: v for k, v in state.items() if k not in ("no_obj_embed_spatial", "obj_ptr_tpos_proj.weight",
                                                         "obj_ptr_tpos_proj.bias")}
    assert sam2_arch_from_state_dict(state).version == "2.1"
    assert sam2_arch_from_state_dict(older) == Sam2Arch("2", "tiny")


def test_automatic_masks_have_the_proposals_format_and_bounded_slices_change_nothing(image):
    model = tiny_sam2(0)
    masks = sam_proposals(make_mask_generator(model, **FAST), image)
    assert masks.dtype == torch.bool and masks.shape[1:] == image.shape[:2] and masks.shape[0] > 0
    sliced = sam_proposals(make_mask_generator(model, chunk_mb=0.05, **FAST), image)  # one point per slice
    assert torch.equal(masks, sliced)
    kept, _, _ = sam_post_filter(masks, keep_largest=2, min_area=0)
    assert kept.shape[0] == min(2, masks.shape[0])


def test_min_mask_region_area_without_the_compiled_extension_is_an_error_not_a_skip():
    try:
        from sam2 import _C  # noqa: F401
        pytest.skip("sam2 has its compiled extension here")
    except ImportError:
        pass
    with pytest.raises(DependencyError, match="sam_min_mask_region_area"):
        make_mask_generator(tiny_sam2(0), min_mask_region_area=100)


def test_predictor_interface_point_and_box(image):
    predictor = make_sam2_predictor(tiny_sam2(0))
    predictor.set_image(image)
    masks, iou, low = predictor.predict(point_coords=np.array([[30.0, 40.0]]), point_labels=np.array([1]),
                                        multimask_output=True)
    assert masks.shape == (3, *image.shape[:2]) and iou.shape == (3,)
    boxed, _, _ = predictor.predict(box=np.array([10, 20, 50, 60]), multimask_output=False)
    assert boxed.shape == (1, *image.shape[:2])


def test_refdiff_from_pretrained_runs_a_sam_variant_with_a_sam2_file(tmp_path, image, models):
    from refdiff import RefDiff
    from refdiff.pipeline import _Lazy

    sd, _, clip = models
    path = save_sam2_checkpoint(tiny_sam2(0), tmp_path / "sam2.safetensors")
    model = RefDiff.from_pretrained(sam=str(path), preset="official", sam_points_per_side=4,
                                    sam_pred_iou_thresh=0.0, sam_stability_score_thresh=0.0, sam_min_area=0)
    model._sd, model._clip = _Lazy(sd), _Lazy(clip)
    result = model(image, "the red box on the left", variant="DS")
    assert is_sam2_model(model.sam)
    assert result.proposals.shape[1:] == image.shape[:2] and result.proposals.shape[0] > 0
    assert result.mask.shape == image.shape[:2]
