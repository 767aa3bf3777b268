"""Write random-weight model files for the ComfyUI tests (run with ComfyUI's folder as the working directory).

- checkpoints/refdiff_test_sd15.safetensors: an SD 1.5 checkpoint ComfyUI detects as SD15, built from
  ComfyUI's own classes. The UNet is shrunk (3 levels of 320 channels, one res block per level,
  cross-attention only at the deepest level, factor 4); the VAE and CLIP text model have SD 1.5's sizes
  because ComfyUI builds those from fixed configurations.
- diffusion_models/refdiff_test_sd2_unet.safetensors: the same small UNet with SD 2.x's layout
  (context 1024, linear projections), detected as SD20.
- sams/refdiff_test_sam.pth: refdiff.testing.sam's tiny SAM.
- sam2/refdiff_test_sam2.safetensors: refdiff.testing.sam2's tiny SAM 2.1 (skipped when the sam2 package is
  missing).
- sam3/refdiff_test_sam3.safetensors: refdiff.testing.sam3's tiny SAM 3 (224 px input, its sizes in the
  safetensors metadata; skipped when the sam3 package is missing).
- open_clip/refdiff_test_clip.safetensors + .json: refdiff.testing.clip's tiny CLIP and its architecture.

Usage: python make_models.py OUT_MODELS_DIR   (cwd: the ComfyUI folder; the refdiff library is found without
being installed: the repository root is put on the path as the pack does)
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from comfy_helpers import library_on_path  # noqa: E402  (this script's folder is on the path)

library_on_path()
from comfy.cli_args import args as _comfy_args  # noqa: E402

_comfy_args.cpu = True  # before comfy.model_management is imported: no GPU probing

SMALL_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1, 1],
                  channel_mult=[1, 1, 1], transformer_depth=[0, 0, 1], transformer_depth_output=[0, 0, 0, 0, 1, 1],
                  transformer_depth_middle=1, num_heads=8, num_head_channels=-1, use_spatial_transformer=True,
                  legacy=False, adm_in_channels=None, use_checkpoint=False)


def init_random(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter a value (ComfyUI's layers skip initialisation): N(0, 0.02) weights, zero biases,
    unit norm scales."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def unet_state(context_dim: int, linear: bool, seed: int) -> dict[str, torch.Tensor]:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**SMALL_UNET, context_dim=context_dim, use_linear_in_transformer=linear)
    init_random(unet, seed)
    return unet.state_dict()


def vae_state(seed: int) -> dict[str, torch.Tensor]:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    init_random(vae, seed)
    return vae.state_dict()


def clip_state(seed: int) -> dict[str, torch.Tensor]:
    from comfy.sd1_clip import SDClipModel

    clip = SDClipModel(device="cpu", dtype=torch.float32)
    init_random(clip, seed)
    state = clip.state_dict()
    ids = "transformer.text_model.embeddings.position_ids"
    if ids in state:
        state[ids] = torch.arange(77)[None]
    return state


def write_sd15(path: str) -> None:
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    for prefix, part in (("model.diffusion_model.", unet_state(768, False, 1)), ("first_stage_model.", vae_state(2)),
                         ("cond_stage_model.", clip_state(3))):
        state.update({prefix + k: v.to(torch.float16) if v.is_floating_point() else v for k, v in part.items()})
    save_file({k: v.contiguous() for k, v in state.items()}, path)


def write_sd2_unet(path: str) -> None:
    from safetensors.torch import save_file

    state = unet_state(1024, True, 4)
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, path)


def write_sam(path: str) -> None:
    from refdiff.testing.sam import tiny_sam_state_dict

    torch.save(tiny_sam_state_dict(0), path)


def write_sam2(path: str) -> None:
    from refdiff.testing.sam2 import save_sam2_checkpoint, tiny_sam2

    staged = save_sam2_checkpoint(tiny_sam2(0), path + ".safetensors")  # the suffix picks the format
    os.replace(staged, path)


def sam2_installed() -> bool:
    """Whether the sam2 package imports (its models are written and tested only then)."""
    try:
        import sam2  # noqa: F401
    except ImportError:
        return False
    return True


def write_sam3(path: str) -> None:
    from refdiff.testing.sam3 import save_sam3_checkpoint, tiny_sam3

    staged = save_sam3_checkpoint(tiny_sam3(0), path + ".safetensors")  # the suffix picks the format
    os.replace(staged, path)


def sam3_installed() -> bool:
    """Whether the sam3 package imports (its model is written and tested only then)."""
    try:
        import sam3  # noqa: F401
    except ImportError:
        return False
    return True


def write_clip(path: str) -> None:
    from safetensors.torch import save_file

    from refdiff.testing.clip import TINY_CLIP_BASE, TINY_CLIP_CONFIG, tiny_clip_model

    save_file({k: v.contiguous() for k, v in tiny_clip_model(0).state_dict().items()}, path)
    final = path[:-len(".tmp")] if path.endswith(".tmp") else path
    with open(os.path.splitext(final)[0] + ".json", "w", encoding="utf-8") as f:
        json.dump({"model_name": TINY_CLIP_BASE, "model_cfg": TINY_CLIP_CONFIG}, f, indent=1)


def main(out: str) -> None:
    torch.manual_seed(0)
    jobs = (("checkpoints", "refdiff_test_sd15.safetensors", write_sd15),
            ("diffusion_models", "refdiff_test_sd2_unet.safetensors", write_sd2_unet),
            ("sams", "refdiff_test_sam.pth", write_sam),
            ("open_clip", "refdiff_test_clip.safetensors", write_clip))
    if sam2_installed():
        jobs += (("sam2", "refdiff_test_sam2.safetensors", write_sam2),)
    if sam3_installed():
        jobs += (("sam3", "refdiff_test_sam3.safetensors", write_sam3),)
    for folder, name, write in jobs:
        os.makedirs(os.path.join(out, folder), exist_ok=True)
        path = os.path.join(out, folder, name)
        if not os.path.isfile(path):
            write(path + ".tmp")
            os.replace(path + ".tmp", path)
        print(path)


if __name__ == "__main__":
    main(sys.argv[1])
