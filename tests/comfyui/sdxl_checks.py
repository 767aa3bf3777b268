"""SDXL checks on ComfyUI's Python objects, run in a subprocess with ComfyUI's folder as working directory.

Usage: python sdxl_checks.py REPO_DIR   -> prints one JSON object on the last line.

The models are built in memory from ComfyUI's own classes, with random weights: a UNet ComfyUI detects as SDXL
(model_channels 320, transformer depths [0, 0, 2, 2, 10, 10], context 2048, added conditioning 2816; one width for
every level and fewer transformers in the up blocks: refdiff.testing.sd.COMFY_SDXL_UNET_CONFIG) loaded through
comfy.sd.load_diffusion_model_state_dict, and an SDXL CLIP (SDXLTokenizer, CLIP-L and CLIP-G of SDXL's widths with 2
layers) in a comfy.sd.CLIP. The checks:

- ``family``: the UNet is detected as SDXL and accepted; the refiner, Flux and SD3 are refused by name; an SD 1.x
  CONDITIONING on it is refused by the conditioning check.
- ``transparent``: a clone with capture patches on every cross-attention computes the unpatched output.
- ``same_as_library``: RefDiffCaptureAttention's maps equal refdiff.diffusion.run_capture's on the same weights
  (UNet converted to diffusers, text encoders to transformers), latent and seed.
- ``planted``: a capture patch on an SDXL layer key, fed queries aligned with the root token's key inside a
  square, gives that square as the thresholded generative map.
- ``segment``: RefDiffSegment (the all-in-one node, as the ref-diff-sdxl workflow wires it) runs on the SDXL
  MODEL and CLIP with a random SD VAE (ComfyUI's own class; SDXL's VAE has SD's architecture), a tiny SAM and a
  tiny CLIP scorer: a float32 [1, H, W] mask that is one of its proposals, a finite map c of the image's size.
- ``siblings``: the sibling methods on the SDXL MODEL as their workflows wire them: RefDiffCaptureAttention at
  every level with self-attention on, then RefDiffSelfAttentionRefine (DiffSegmenter), and
  RefDiffFeatureClusterProposals (FreeSeg-Diff) on the same latent: what each gives, or the message it stops with.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfy_helpers import library_on_path, load_pack  # noqa: E402

library_on_path()
from comfy.cli_args import args as _comfy_args  # noqa: E402

_comfy_args.cpu = True

import torch  # noqa: E402

REPO = sys.argv[1]
SDXL_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
                 channel_mult=[1, 1, 1], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2], transformer_depth_middle=10, num_heads=-1,
                 num_head_channels=64, use_spatial_transformer=True, use_linear_in_transformer=True, legacy=False,
                 adm_in_channels=2816, num_classes="sequential", context_dim=2048, use_checkpoint=False)




def init_random(module: torch.nn.Module, seed: int) -> None:
    from make_models import init_random as init

    init(module, seed)


def sdxl_model():
    import comfy.sd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**SDXL_UNET)
    init_random(unet, 11)
    return comfy.sd.load_diffusion_model_state_dict(unet.state_dict())


def sdxl_clip():
    import comfy.sd
    from comfy import sd1_clip, sdxl_clip

    from refdiff.testing.sd import COMFY_SDXL_TEXT_G_CONFIG, COMFY_SDXL_TEXT_L_CONFIG

    class SmallSDXLClipModel(sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                               layer_norm_hidden_state=False, model_options=model_options,
                                               textmodel_json_config=dict(COMFY_SDXL_TEXT_L_CONFIG))
            self.clip_g = sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                               textmodel_json_config=dict(COMFY_SDXL_TEXT_G_CONFIG),
                                               special_tokens={"start": 49406, "end": 49407, "pad": 0},
                                               layer_norm_hidden_state=False, return_projected_pooled=True,
                                               model_options={**model_options, "model_name": "clip_g"})
            self.dtypes = {dtype}

    target = types.SimpleNamespace(clip=SmallSDXLClipModel, tokenizer=sdxl_clip.SDXLTokenizer, params={})
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    init_random(clip.cond_stage_model, 12)
    return clip


def unet_x0(model, x, sigma, cond, pooled, transformer_options=None) -> torch.Tensor:
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    base = model.model
    y = base.encode_adm(pooled_output=pooled, width=x.shape[-1] * 8, height=x.shape[-2] * 8)
    with torch.no_grad():
        return base.apply_model(x, sigma, c_crossattn=cond, y=y.repeat(x.shape[0], 1) if y.shape[0] == 1 else y,
                                transformer_options=transformer_options or {}).float()


def check_family(nodes, model) -> dict:
    import comfy.supported_models as sm

    cs = importlib.import_module(nodes.__name__ + ".comfy_backend")
    out = {"detected": type(model.model.model_config).__name__, "base": type(model.model).__name__,
           "family": cs.model_family(model)}
    refused = {}
    for cls in (sm.SDXLRefiner, sm.Flux, sm.SD3):
        fake = types.SimpleNamespace(model=types.SimpleNamespace(model_config=cls.__new__(cls)))
        try:
            cs.model_family(fake)
            refused[cls.__name__] = "accepted"
        except Exception as exc:  # the message is what is checked
            refused[cls.__name__] = f"{type(exc).__name__}: {exc}"
    out["refused"] = refused
    sd1_cond = [[torch.zeros(1, 77, 768), {}]]
    no_pooled = [[torch.zeros(1, 77, 2048), {}]]
    out["sd1_conditioning"] = cs.conditioning_problem(model, sd1_cond, "positive")
    out["no_pooled"] = cs.conditioning_problem(model, no_pooled, "positive")
    out["layers"] = [[la.block, la.number, la.transformer_index, la.factor] for la in
                     cs.attn2_layers(model.model.diffusion_model)]
    return out


def check_transparent(nodes, model) -> dict:
    from refdiff.capture import LayerSelector
    from refdiff.stores import AttentionStore

    cs = importlib.import_module(nodes.__name__ + ".comfy_backend")
    layers = cs.select_layers(model, LayerSelector(None))
    store = AttentionStore("logits")
    clone = cs.patched_clone(model, layers, store, "logits")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    sigma = torch.tensor([0.5, 0.5])
    cond = torch.randn(2, 77, 2048, generator=gen)
    pooled = torch.randn(2, 1280, generator=gen)
    plain = unet_x0(model, x, sigma, cond, pooled)
    opts = dict(clone.model_options["transformer_options"])
    opts["cond_or_uncond"] = [1, 0]
    patched = unet_x0(clone, x, sigma, cond, pooled, opts)
    maps = store.maps()
    return {"max_diff": float((plain - patched).abs().max()), "scale": float(plain.abs().max()),
            "n_layers": len(layers), "maps_shape": list(maps.cond.shape), "uncond_shape": list(maps.uncond.shape)}


def diffusers_unet_from(model):
    import comfy.utils

    from refdiff.testing.sd import COMFY_SDXL_UNET_CONFIG, unet_from_config

    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    state = model.model.diffusion_model.state_dict()
    converted = {d: state[c] for d, c in mapping.items() if c in state}
    for d, c in (("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")):
        for p in ("weight", "bias"):
            converted[f"{d}.{p}"] = state[f"{c}.{p}"]
    unet = unet_from_config(COMFY_SDXL_UNET_CONFIG, "meta")
    missing, unexpected = unet.load_state_dict(converted, strict=False, assign=True)
    return unet.eval(), missing, unexpected


def text_encoders_from(clip):
    import comfy.model_management as mm

    from refdiff.testing.sd import (COMFY_SDXL_TEXT_G_CONFIG, COMFY_SDXL_TEXT_L_CONFIG,
                                    text_encoder_from_config, text_encoder_with_projection_from_config)

    mm.load_models_gpu([clip.patcher])
    full = clip.cond_stage_model.state_dict()
    out = []
    for name, make, config in (("clip_l", text_encoder_from_config, COMFY_SDXL_TEXT_L_CONFIG),
                               ("clip_g", text_encoder_with_projection_from_config, COMFY_SDXL_TEXT_G_CONFIG)):
        model = make(config, "meta")
        keys = model.state_dict()
        nested = any(k.startswith("text_model.") for k in keys)
        state = {}
        for k, v in full.items():
            if not k.startswith(f"{name}.transformer."):
                continue
            rest = k[len(f"{name}.transformer."):]
            if not nested:
                rest = rest.removeprefix("text_model.")
            state[rest] = v.float()
        if name == "clip_l":  # CLIP-L's projection is not used by SDXL (ComfyUI keeps one, transformers does not)
            state.pop("text_projection.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        for module in model.modules():  # non-persistent buffers (position_ids) are not in the state dict
            for buffer_name, buffer in list(module.named_buffers(recurse=False)):
                if buffer.is_meta and buffer_name == "position_ids":
                    module.register_buffer(buffer_name, torch.arange(buffer.shape[-1])[None], persistent=False)
        out.append((model.eval(), [m for m in missing if "position_ids" not in m], unexpected))
    return out


def check_same_as_library(nodes, model, clip) -> dict:
    from refdiff.diffusion import run_capture
    from refdiff.testing.sd import sdxl_components

    dn = importlib.import_module(nodes.__name__ + ".diffusion_nodes")
    tn = importlib.import_module(nodes.__name__ + ".text_nodes")
    latent = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))}
    parse, _ = tn.parse_texts("the black horse on the left", clip)
    comfy_maps = dn.capture_attention(model, dn.inject_noise(latent, 7, 0.1, 20), clip=clip, parse=parse,
                                      kind="logits", guidance_scale=9.0)[0].maps[0]
    unet, u_missing, u_unexpected = diffusers_unet_from(model)
    (text_l, l_missing, l_unexpected), (text_g, g_missing, g_unexpected) = text_encoders_from(clip)
    sd = sdxl_components(unet, None, text_l, text_g)
    lib_maps = run_capture(sd, latent["samples"] * 0.13025, parse.items[0].prompt, seed=7, capture_kind="logits",
                           guidance_scale=9.0, capture_factor=4)
    scale = float(lib_maps.cond.abs().max())
    return {"unet_missing": [k for k in u_missing if "downsamplers" not in k and "upsamplers" not in k],
            "unet_unexpected": u_unexpected, "text_missing": l_missing + g_missing,
            "text_unexpected": l_unexpected + g_unexpected,
            "root_position": parse.items[0].root_position,
            "comfy_shape": list(comfy_maps.cond.shape), "lib_shape": list(lib_maps.cond.shape),
            "finite": bool(torch.isfinite(comfy_maps.cond).all() and torch.isfinite(lib_maps.cond).all()),
            "cond_diff": float((comfy_maps.cond - lib_maps.cond).abs().max()) / scale,
            "uncond_diff": float((comfy_maps.uncond - lib_maps.uncond).abs().max()) / scale,
            "comfy_layers": [n.split("/")[1] for n in comfy_maps.layers[:3]],
            "lib_layers": [n.split("/")[1] for n in lib_maps.layers[:3]]}


def check_planted(nodes, model) -> dict:
    from refdiff.capture import LayerSelector
    from refdiff.capture import token_map
    from refdiff.stores import AttentionStore

    cs = importlib.import_module(nodes.__name__ + ".comfy_backend")
    layers = cs.select_layers(model, LayerSelector(4))
    store = AttentionStore("probs")
    heads, dim, grid, token = 5, 64, (4, 4), 3
    planted = torch.zeros(grid)
    planted[1:3, 0:2] = 1.0  # a 2 x 2 square on the left
    k = torch.zeros(1, 77, heads * dim)
    k[0, token, :] = 1.0
    q = planted.reshape(1, -1, 1).expand(1, 16, heads * dim) * 0.5
    for layer in layers:
        patch = cs.make_capture_patch(layer, store, "probs")
        patch(q, k, torch.randn(1, 77, heads * dim), {"n_heads": heads, "activations_shape": [1, 320, *grid],
                                                      "original_shape": [1, 4, 16, 16], "cond_or_uncond": [0]})
    maps = store.maps()
    c = token_map(maps.cond, token)
    c = (c - c.min()) / (c.max() - c.min())
    return {"layers": len(layers), "keys": sorted({(la.block, la.number) for la in layers}),
            "mask": (c > 0.5).int().tolist(), "planted": planted.int().tolist()}


def check_segment(nodes, model, clip) -> dict:
    import comfy.sd
    from make_models import vae_state

    from refdiff.testing.clip import tiny_clip
    from refdiff.testing.sam import tiny_sam
    from refdiff.sam2_models import sam_model_name

    sn = importlib.import_module(nodes.__name__ + ".segment_node")
    wt = importlib.import_module(nodes.__name__ + ".wire_types")
    sam_model = tiny_sam()
    sam = wt.SamHandle(model=sam_model, model_type=sam_model_name(sam_model), path="tiny-sam")
    scorer = wt.ClipHandle(scorer=tiny_clip(), path="tiny-clip")
    vae = comfy.sd.VAE(sd=vae_state(2))
    image = torch.rand(1, 96, 128, 3, generator=torch.Generator().manual_seed(0)) * 0.1
    image[:, 20:70, 10:60] = torch.tensor([0.8, 0.15, 0.15])  # a red box on the left
    out = sn.RefDiffSegment.execute(model=model, clip=clip, vae=vae, image=image, text="the red box on the left",
                                    variant="full", preset="official", seed=0, image_size=128, top_k=3,
                                    points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                    keep_largest=-1, min_area=0, sam=sam, clip_scorer=scorer).args
    mask, c, report = out[0], out[1], out[2]
    return {"mask_shape": list(mask.shape), "mask_dtype": str(mask.dtype), "mask_device": str(mask.device),
            "mask_values": sorted({float(v) for v in mask.unique()}), "mask_pixels": int(mask.sum()),
            "c_shape": list(c.shape), "c_finite": bool(torch.isfinite(c).all()), "c_range": float(c.max() - c.min()),
            "report": str(report)}


def check_siblings(nodes, model, clip) -> dict:
    import comfy.sd
    from make_models import vae_state

    dn = importlib.import_module(nodes.__name__ + ".diffusion_nodes")
    tn = importlib.import_module(nodes.__name__ + ".text_nodes")
    rn = importlib.import_module(nodes.__name__ + ".refine_nodes")
    cn = importlib.import_module(nodes.__name__ + ".cluster_nodes")
    vae = comfy.sd.VAE(sd=vae_state(2))
    image = torch.rand(1, 96, 128, 3, generator=torch.Generator().manual_seed(0)) * 0.1
    image[:, 20:70, 10:60] = torch.tensor([0.8, 0.15, 0.15])
    parse = tn.RefDiffParseText.execute(text="the red box on the left", preset="official", root_rule="preset",
                                        root_word="", clip=clip).args[0]
    square = dn.RefDiffPrepareImage.execute(image=image, size=128, resize_filter="lanczos").args[0]
    latent = {"samples": vae.encode(square[:, :, :, :3])}
    noised = dn.RefDiffNoiseInjection.execute(latent=latent, seed=0, schedule="preset", preset="official",
                                              strength=0.1, ddim_steps=20).args[0]
    out: dict = {}
    try:
        attention = dn.RefDiffCaptureAttention.execute(model=model, latent=noised, preset="official", kind="preset",
                                                       guidance=9.0, use_cfg=True, factor=0, blocks="down,mid,up",
                                                       steps=0, clip=clip, parse=parse, self_attention=True).args[0]
        refined = rn.RefDiffSelfAttentionRefine.execute(attention=attention, parse=parse, image=image,
                                                        preset="official", iterations=1,
                                                        factor_weights="8:0.3,4:0.5,2:0.1,1:0.1", eps=1e-8,
                                                        self_factor=0, resize="preset").args[0]
        out["refine"] = {"shape": list(refined.shape), "finite": bool(torch.isfinite(refined).all()),
                         "range": float(refined.max() - refined.min()),
                         "layers": len(attention.layers)}
    except Exception as exc:  # the message a user would see
        out["refine"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        proposals = cn.RefDiffFeatureClusterProposals.execute(model=model, latent=latent, image=image, clusters=4,
                                                              features="queries", feature_factor=4, cluster_factor=2,
                                                              timestep=0, normalize=True, split_components=True,
                                                              min_area=0, seed=0, clip=clip).args[0]
        masks = proposals.masks[0]
        out["clusters"] = {"n": int(masks.shape[0]), "hw": list(masks.shape[1:]),
                           "cover": float(masks.any(0).float().mean())}
    except Exception as exc:
        out["clusters"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


if __name__ == "__main__":
    pack = load_pack(REPO)
    sdxl = sdxl_model()
    result = {"family": check_family(pack, sdxl), "transparent": check_transparent(pack, sdxl),
              "planted": check_planted(pack, sdxl)}
    result["same_as_library"] = check_same_as_library(pack, sdxl, sdxl_clip())
    result["segment"] = check_segment(pack, sdxl, sdxl_clip())
    result["siblings"] = check_siblings(pack, sdxl, sdxl_clip())
    print(json.dumps(result))
