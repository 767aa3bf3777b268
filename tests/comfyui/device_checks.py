"""Checks of where the nodes put things and what they check first, on ComfyUI's Python objects, run in a subprocess
with ComfyUI's folder as working directory (as inprocess_checks.py).

Usage: python device_checks.py MODELS_DIR REPO_DIR   -> prints one JSON object on the last line.

- ``devices``: the node chain (RefDiffSegment's stage functions: SAM proposals, CLIP scores, the capture on the
  MODEL, the fusion) on ComfyUI's GPU when the machine has one (ComfyUI started without --cpu), else on the
  CPU; either way the compute device is asked of ComfyUI's model management (its get_torch_device is wrapped
  and counted, never replaced), every move of the pack's own models (SAM, CLIP) is recorded, and the outputs'
  devices and dtypes are reported.
- ``factor_first``: a factor the MODEL lacks is refused by RefDiffSegment before its VAE encodes anything (a
  VAE that fails when used is passed) and by the capture before any prompt is encoded (no CLIP is given).
"""
from __future__ import annotations

import functools
import json
import os
import sys

sys.path.insert(0, os.getcwd())
from comfy_helpers import library_on_path  # noqa: E402  (this script's folder is on the path)

library_on_path()
import torch  # noqa: E402
from comfy.cli_args import args as _comfy_args  # noqa: E402

MODELS, REPO = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[:1] + [MODELS, REPO, "device_checks"]  # inprocess_checks reads its own arguments
from inprocess_checks import load_pack, load_sd15  # noqa: E402

_comfy_args.cpu = not torch.cuda.is_available()  # (inprocess_checks sets it) before model_management loads

TEXT = "the horse on the left"
FAST_AMG = {"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


@functools.cache
def modules() -> dict:
    from importlib import import_module

    nodes = load_pack()
    return {name: import_module(f"{nodes.__name__}.{name}")
            for name in ("runtime", "sam_nodes", "clip_nodes", "segment_node", "select_nodes", "proposal_filter",
                         "diffusion_nodes")}


def pack_models(m: dict):
    import folder_paths

    folder_paths.add_model_folder_path("sams", os.path.join(MODELS, "sams"))
    folder_paths.add_model_folder_path("open_clip", os.path.join(MODELS, "open_clip"))
    return (m["sam_nodes"].load_sam_model("refdiff_test_sam.pth"),
            m["clip_nodes"].load_clip_model("refdiff_test_clip.safetensors"))


def placement(x: torch.Tensor) -> list[str]:
    return [str(x.device), str(x.dtype).replace("torch.", "")]


def model_device(module: torch.nn.Module) -> str:
    return str(next(module.parameters()).device)


def check_devices() -> dict:
    import comfy.model_management as mm
    from refdiff.config import get_preset

    m = modules()
    sam, clip_scorer = pack_models(m)
    asked = {"compute": 0}
    real_get = mm.get_torch_device

    def counted_get_torch_device(*a, **k):
        asked["compute"] += 1
        return real_get(*a, **k)

    mm.get_torch_device = counted_get_torch_device
    moves: dict[str, list[str]] = {"sam": [], "clip": []}
    for key, module in (("sam", sam.model), ("clip", clip_scorer.scorer.model)):
        real_to = module.to

        def recording_to(*a, _key=key, _to=real_to, **k):
            target = k.get("device", a[0] if a else None)
            moves[_key].append(str(torch.device(target)) if target is not None else "?")
            return _to(*a, **k)

        module.to = recording_to
    before = {"sam": model_device(sam.model), "clip": model_device(clip_scorer.scorer.model)}
    image = torch.rand(1, 53, 77, 3, generator=torch.Generator().manual_seed(0))
    p = get_preset("official").with_(image_size=128)
    sn = m["segment_node"]
    ds = sn.segment(None, None, None, image, TEXT, "DS", p, sam=sam, clip_scorer=clip_scorer, amg=FAST_AMG)
    model, clip, vae = load_sd15()
    gs = sn.segment(model, clip, vae, image, TEXT, "GS", p, sam=sam, amg=FAST_AMG)
    preview = m["select_nodes"].preview_selection(image, gs.selection.best)
    return {
        "compute_device": str(real_get()), "offload_device": str(mm.unet_offload_device()),
        "intermediate_device": str(mm.intermediate_device()), "asked_compute_device": asked["compute"],
        "before": before, "after": {"sam": model_device(sam.model), "clip": model_device(clip_scorer.scorer.model)},
        "moves": moves,
        "outputs": {"DS mask": placement(ds.selection.best), "DS top_k": placement(ds.selection.top_k),
                    "GS mask": placement(gs.selection.best), "GS c": placement(gs.c),
                    "GS preview": placement(preview)},
        "shapes": {"DS mask": list(ds.selection.best.shape), "GS c": list(gs.c.shape)},
    }


def check_factor_first() -> dict:
    from refdiff.config import get_preset

    m = modules()
    model, clip, _ = load_sd15()

    class VaeThatMustNotRun:
        def encode(self, pixels):
            raise AssertionError("the VAE encoded before the factor was checked")

    image = torch.rand(1, 53, 77, 3, generator=torch.Generator().manual_seed(0))
    out = {}
    try:
        m["segment_node"].segment(model, clip, VaeThatMustNotRun(), image, TEXT, "GS",
                                  get_preset("official").with_(image_size=128), sam=object(), factor=2)
        out["segment"] = "ran"
    except Exception as exc:  # the type and message are what is checked
        out["segment"] = f"{type(exc).__name__}: {exc}"
    dn = m["diffusion_nodes"]
    latent = dn.inject_noise({"samples": torch.zeros(1, 4, 16, 16)}, 0, 0.1, 20)
    try:
        dn.capture_attention(model, latent, clip=None, factor=2)
        out["capture"] = "ran"
    except Exception as exc:
        out["capture"] = f"{type(exc).__name__}: {exc}"
    return out


if __name__ == "__main__":
    print(json.dumps({"devices": check_devices(), "factor_first": check_factor_first()}))
