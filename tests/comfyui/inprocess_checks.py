"""Checks that need ComfyUI's Python objects, run in a subprocess with ComfyUI's folder as working directory.

Usage: python inprocess_checks.py MODELS_DIR REPO_DIR CHECK   -> prints one JSON object on the last line.

Checks:
- ``no_leak``: the MODEL given to the capture has the same model_options and gives the same UNet output
  before and after the capture ran (the patches live on a clone only), with self-attention captured too and
  after a feature-cluster pass.
- ``transparent``: a clone with capture patches on EVERY cross-attention computes the same UNet output as
  the unpatched model (capturing changes nothing).
- ``same_as_library`` / ``same_as_library_v``: the maps of the ComfyUI backend equal
  refdiff.diffusion.run_capture's on the same weights (the small SD 1.5 UNet converted to diffusers, the same
  text encoder), latent and seed; ``_v`` treats the UNet as a v-prediction model on both sides.
- ``transparent_internals``: a clone recording self-attention on every attn1, query features on every attn2
  and the outputs of every recordable block computes the unpatched model's output bit for bit.
- ``internals_same_as_library``: on the same weights (converted to diffusers as above), ComfyUI's
  self-attention, feature and block captures equal refdiff.diffusion's, the refined DiffSegmenter map equals
  refdiff.refine.diffsegmenter_map's and the feature-cluster proposals equal
  refdiff.clusters.feature_cluster_proposals'.
- ``sd2``: an SD 2.x UNet (linear projections, context 1024) is detected and captured from.
- ``families``: other model families are refused with a message naming them.
"""
from __future__ import annotations

import json
import os
import sys
import types

sys.path.insert(0, os.getcwd())
from comfy_helpers import library_on_path, load_pack as _load_pack  # noqa: E402  (this script's folder is on the path)

library_on_path()
from comfy.cli_args import args as _comfy_args  # noqa: E402

_comfy_args.cpu = True

import torch  # noqa: E402

MODELS, REPO, CHECK = sys.argv[1], sys.argv[2], sys.argv[3]
CKPT = os.path.join(MODELS, "checkpoints", "refdiff_test_sd15.safetensors")


def load_pack() -> types.ModuleType:
    """The pack's nodes package, imported the way ComfyUI does (comfy_helpers.load_pack)."""
    return _load_pack(REPO)


def load_sd15():
    import comfy.sd

    return comfy.sd.load_checkpoint_guess_config(CKPT, output_vae=True, output_clip=True)[:3]


def unet_x0(model, x, sigma, cond, transformer_options=None) -> torch.Tensor:
    """One x0 prediction of the MODEL's UNet through ComfyUI's model wrapper."""
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    base = model.model
    with torch.no_grad():
        return base.apply_model(x, sigma, c_crossattn=cond, transformer_options=transformer_options or {}).float()


def latent_batch(vae, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 128, 128, 3, generator=gen)
    return {"samples": vae.encode(image)}


def check_no_leak() -> dict:
    nodes = load_pack()
    from importlib import import_module

    dn = import_module(nodes.__name__ + ".diffusion_nodes")
    tn = import_module(nodes.__name__ + ".text_nodes")
    model, clip, vae = load_sd15()
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([1.0])
    cond = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(2))
    options_before = repr(model.model_options)
    patches_before = model.model_options.get("transformer_options", {}).get("patches_replace")
    before = unet_x0(model, x, sigma, cond, dict(model.model_options.get("transformer_options", {})))
    latent = dn.inject_noise(latent_batch(vae), 0, 0.1, 20)
    parse, _ = tn.parse_texts("the dog on the left", clip)
    attention, _ = dn.capture_attention(model, latent, clip=clip, parse=parse, factor=None, self_attention=True)
    cn = import_module(nodes.__name__ + ".cluster_nodes")
    proposals, _ = cn.cluster_proposal_batch(model, latent, torch.zeros(1, 53, 77, 3), clip=clip)
    after = unet_x0(model, x, sigma, cond, dict(model.model_options.get("transformer_options", {})))
    return {"options_equal": repr(model.model_options) == options_before,
            "patches_before": repr(patches_before),
            "patches_after": repr(model.model_options.get("transformer_options", {}).get("patches_replace")),
            "other_patches_after": repr(model.model_options.get("transformer_options", {}).get("patches")),
            "max_diff": float((before - after).abs().max()), "captured_layers": len(attention.layers),
            "self_levels": [[a.factor, list(a.grid), len(a.layers)] for a in attention.self_attention[0]],
            "cluster_proposals": list(proposals.masks[0].shape)}


def check_transparent() -> dict:
    nodes = load_pack()
    from importlib import import_module

    from refdiff.capture import LayerSelector
    from refdiff.stores import AttentionStore

    cs = import_module(nodes.__name__ + ".comfy_backend")
    model, _, _ = load_sd15()
    layers = cs.select_layers(model, LayerSelector(None))
    store = AttentionStore("logits")
    clone = cs.patched_clone(model, layers, store, "logits")
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.5, 0.5])
    cond = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(2))
    plain = unet_x0(model, x, sigma, cond)
    opts = dict(clone.model_options["transformer_options"])
    opts["cond_or_uncond"] = [1, 0]
    patched = unet_x0(clone, x, sigma, cond, opts)
    maps = store.maps()
    return {"max_diff": float((plain - patched).abs().max()), "scale": float(plain.abs().max()),
            "layers": [la.name for la in layers], "factors": [la.factor for la in layers],
            "maps_shape": list(maps.cond.shape), "uncond_shape": list(maps.uncond.shape)}


def _diffusers_unet_from(model):
    """The small ComfyUI UNet's weights in a diffusers UNet2DConditionModel of the same layout."""
    import comfy.utils
    from diffusers import UNet2DConditionModel

    unet_config = model.model.model_config.unet_config
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    state = model.model.diffusion_model.state_dict()
    converted = {d: state[c] for d, c in mapping.items() if c in state}
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 320, 320), layers_per_block=1, cross_attention_dim=768, attention_head_dim=8)
    missing, unexpected = unet.load_state_dict(converted, strict=False)
    return unet.eval(), missing, unexpected


def _text_encoder_from(clip):
    from transformers import CLIPTextConfig, CLIPTextModel

    import comfy.model_management as mm

    mm.load_models_gpu([clip.patcher])
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = CLIPTextModel(config)
    # transformers 4 names the parameters "text_model.*", transformers 5 drops that prefix
    prefix = "clip_l.transformer." if any(k.startswith("text_model.") for k in text.state_dict()) \
        else "clip_l.transformer.text_model."
    state = {k[len(prefix):]: v.float() for k, v in clip.cond_stage_model.state_dict().items()
             if k.startswith(prefix)}
    missing, unexpected = text.load_state_dict(state, strict=False)
    return text.eval(), missing, unexpected


def check_same_as_library(prediction: str = "epsilon") -> dict:
    nodes = load_pack()
    from importlib import import_module

    from refdiff.diffusion import SDComponents, run_capture
    from refdiff.schedule import scaled_linear_alphas_cumprod
    from refdiff.tokenizer import clip_tokenizer

    dn = import_module(nodes.__name__ + ".diffusion_nodes")
    tn = import_module(nodes.__name__ + ".text_nodes")
    model, clip, vae = load_sd15()
    latent = latent_batch(vae)
    if prediction == "v_prediction":  # what ComfyUI's ModelSamplingDiscrete node does for v-prediction models
        from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

        model = ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]
    parse, _ = tn.parse_texts("the black horse on the left", clip)
    comfy_maps = dn.capture_attention(model, dn.inject_noise(latent, 7, 0.1, 20), clip=clip, parse=parse,
                                      kind="logits", guidance_scale=9.0)[0].maps[0]
    unet, u_missing, u_unexpected = _diffusers_unet_from(model)
    text, t_missing, t_unexpected = _text_encoder_from(clip)
    sd = SDComponents(unet=unet, vae=None, text_encoder=text, tokenizer=clip_tokenizer(),
                      alphas_cumprod=scaled_linear_alphas_cumprod(), scaling_factor=0.18215,
                      prediction_type=prediction)
    lib_maps = run_capture(sd, latent["samples"] * 0.18215, parse.items[0].prompt, seed=7, capture_kind="logits",
                           guidance_scale=9.0, capture_factor=4)
    scale = float(lib_maps.cond.abs().max())
    return {"unet_missing": [k for k in u_missing if "downsamplers" not in k and "upsamplers" not in k],
            "unet_unexpected": u_unexpected, "text_missing": [k for k in t_missing if "position_ids" not in k],
            "text_unexpected": t_unexpected, "comfy_shape": list(comfy_maps.cond.shape),
            "lib_shape": list(lib_maps.cond.shape),
            "cond_diff": float((comfy_maps.cond - lib_maps.cond).abs().max()) / scale,
            "uncond_diff": float((comfy_maps.uncond - lib_maps.uncond).abs().max()) / scale,
            "comfy_layers": [n.split("/")[1] for n in comfy_maps.layers],
            "lib_layers": [n.split("/")[1] for n in lib_maps.layers]}


def check_transparent_internals() -> dict:
    nodes = load_pack()
    from importlib import import_module

    from refdiff.stores import FeatureStore, SelfAttentionStore

    cs = import_module(nodes.__name__ + ".comfy_backend")
    model, _, _ = load_sd15()
    dm = model.model.diffusion_model
    self_store, features = SelfAttentionStore(per_layer=True), FeatureStore()
    clone = cs.add_self_attention_patches(model.clone(), cs.attn1_layers(dm), self_store, keep=(0, 1), chunk=5)
    for layer in cs.attn2_layers(dm):
        clone.set_model_attn2_replace(cs.make_query_feature_patch(layer, features, (0, 1)), layer.block, layer.number,
                                      layer.transformer_index)
    cs.add_block_feature_patches(clone, cs.block_feature_names(dm), features, (0, 1))
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.5, 0.5])
    cond = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(2))
    plain = unet_x0(model, x, sigma, cond)
    opts = dict(clone.model_options["transformer_options"])
    opts["cond_or_uncond"] = [1, 0]
    patched = unet_x0(clone, x, sigma, cond, opts)
    probs = [a.affinity for a in self_store.affinities(0)] + [a.affinity for a in self_store.affinities(1)]
    return {"max_diff": float((plain - patched).abs().max()), "self_layers": list(self_store.names),
            "row_sums": [float(p.sum(-1).sub(1).abs().max()) for p in probs],
            "features": {f.name: list(f.features.shape) for f in features.features(0)},
            "feature_uncond": len(features.features(1))}


def check_internals_same_as_library() -> dict:
    nodes = load_pack()
    from importlib import import_module

    from refdiff.capture import COND
    from refdiff.clusters import feature_cluster_proposals, query_feature_modules
    from refdiff.diffusion import (SDComponents, capture_block_features, capture_self_attention, encode_prompts,
                                   run_capture)
    from refdiff.schedule import noise_latent, scaled_linear_alphas_cumprod
    from refdiff.refine import diffsegmenter_map
    from refdiff.tokenizer import clip_tokenizer

    dn = import_module(nodes.__name__ + ".diffusion_nodes")
    tn = import_module(nodes.__name__ + ".text_nodes")
    cn = import_module(nodes.__name__ + ".cluster_nodes")
    am = import_module(nodes.__name__ + ".attention_maps")
    tensors = import_module(nodes.__name__ + ".tensors")
    cs = import_module(nodes.__name__ + ".comfy_backend")
    model, clip, vae = load_sd15()
    latent = latent_batch(vae)
    parse, _ = tn.parse_texts("the black horse on the left", clip)
    item = parse.items[0]
    attention, _ = dn.capture_attention(model, dn.inject_noise(latent, 7, 0.1, 20), clip=clip, parse=parse,
                                        kind="logits", guidance_scale=9.0, factor=0, self_attention=True)
    weights = {8: 0.3, 4: 0.5, 2: 0.1, 1: 0.1}
    comfy_refined = am.refined_token_map(attention, 0, item.root_position, weights, iterations=1)

    unet, _, _ = _diffusers_unet_from(model)
    text, _, _ = _text_encoder_from(clip)
    sd = SDComponents(unet=unet, vae=None, text_encoder=text, tokenizer=clip_tokenizer(),
                      alphas_cumprod=scaled_linear_alphas_cumprod(), scaling_factor=0.18215, prediction_type="epsilon")
    scaled = latent["samples"] * 0.18215
    with capture_self_attention(unet, cond_or_uncond=[1, 0], keep=(COND,), per_layer=False) as store:
        run_capture(sd, scaled, item.prompt, seed=7, capture_kind="logits", guidance_scale=9.0, capture_factor=None)
    lib_self = store.affinities(COND)
    lib_refined = diffsegmenter_map(sd, scaled, item.prompt, item.root_position, seed=7, capture_kind="logits",
                                    guidance_scale=9.0, factor_weights=weights, self_factor=4)
    comfy_self = attention.self_attention[0]
    self_scale = float(lib_self[0].affinity.abs().max())

    # features of one pass at t = 0 on the empty prompt: queries at factor 4 and three block outputs
    noise = torch.randn(scaled.shape, generator=torch.Generator().manual_seed(0))
    x = noise_latent(scaled, float(sd.alphas_cumprod[0]), noise)
    names = {"output_blocks.1": "up_blocks.0", "input_blocks.2": "down_blocks.0", "middle_block": "mid_block"}
    queries = query_feature_modules(unet, 4)
    with torch.no_grad(), capture_block_features(unet, [*queries, *names.values()]) as lib_store:
        unet(x, torch.zeros(1, dtype=torch.long), encoder_hidden_states=encode_prompts(sd, "", use_cfg=False))
    lib_features = {f.name: f.features for f in lib_store.features(COND)}
    layers = [la for la in cs.attn2_layers(model.model.diffusion_model) if la.factor == 4]
    comfy_store = cs.run_features(model, latent["samples"], noise, 0, cs.encode_text(clip, ""), layers,
                                  list(names), seed=0)
    comfy_features = {f.name: f.features for f in comfy_store.features(COND)}
    pairs = [(cs.query_feature_name(la), q) for la, q in zip(layers, queries)] + list(names.items())
    feature_diffs = {c: float((comfy_features[c] - lib_features[d]).abs().max() / lib_features[d].abs().max())
                     for c, d in pairs}

    prep = tensors.frame_geometry(53, 77, 128)
    lib_masks = feature_cluster_proposals(sd, scaled, "", prep, seed=0)
    comfy_masks = cn.cluster_proposal_batch(model, latent, torch.zeros(1, 53, 77, 3), clip=clip, seed=0)[0].masks[0]
    same_masks = lib_masks.shape == comfy_masks.shape and bool((lib_masks == comfy_masks).all())
    return {"comfy_levels": [[a.factor, list(a.grid), len(a.layers)] for a in comfy_self],
            "lib_levels": [[a.factor, list(a.grid), len(a.layers)] for a in lib_self],
            "self_diff": float((comfy_self[0].affinity - lib_self[0].affinity).abs().max()) / self_scale,
            "refined_shape": list(comfy_refined.shape), "lib_refined_shape": list(lib_refined.shape),
            "refined_diff": float((comfy_refined - lib_refined).abs().max()),
            "refined_range": [float(comfy_refined.min()), float(comfy_refined.max())],
            "feature_diffs": feature_diffs, "feature_pairs": len(pairs),
            "cluster_shapes": [list(comfy_masks.shape), list(lib_masks.shape)], "same_masks": same_masks}


def check_sd2() -> dict:
    nodes = load_pack()
    from importlib import import_module

    import comfy.sd

    cs = import_module(nodes.__name__ + ".comfy_backend")
    dn = import_module(nodes.__name__ + ".diffusion_nodes")
    model = comfy.sd.load_diffusion_model(os.path.join(MODELS, "diffusion_models", "refdiff_test_sd2_unet.safetensors"))
    gen = torch.Generator().manual_seed(3)
    positive = [[torch.randn(1, 77, 1024, generator=gen), {"pooled_output": torch.randn(1, 1024, generator=gen)}]]
    negative = [[torch.randn(1, 77, 1024, generator=gen), {"pooled_output": torch.randn(1, 1024, generator=gen)}]]
    latent = dn.inject_noise({"samples": torch.randn(2, 4, 16, 16, generator=gen)}, 0, 0.1, 20)
    attention, info = dn.capture_attention(model, latent, positive=positive, negative=negative, kind="probs")
    return {"family": cs.model_family(model), "batch": len(attention), "shape": list(attention.maps[0].cond.shape),
            "uncond": attention.maps[0].uncond is not None, "info": info,
            "probs_sum": float(attention.maps[0].cond.sum(-1).mean())}


def check_families() -> dict:
    nodes = load_pack()
    from importlib import import_module

    import comfy.supported_models as sm

    cs = import_module(nodes.__name__ + ".comfy_backend")
    out = {}
    for cls in (sm.SDXLRefiner, sm.Flux, sm.SD3):
        fake = types.SimpleNamespace(model=types.SimpleNamespace(model_config=cls.__new__(cls)))
        try:
            cs.model_family(fake)
            out[cls.__name__] = "accepted"
        except Exception as exc:  # the message is what is checked
            out[cls.__name__] = f"{type(exc).__name__}: {exc}"
    return out


if __name__ == "__main__":
    result = {"no_leak": check_no_leak, "transparent": check_transparent, "same_as_library": check_same_as_library,
              "same_as_library_v": lambda: check_same_as_library("v_prediction"),
              "sd2": check_sd2, "families": check_families, "transparent_internals": check_transparent_internals,
              "internals_same_as_library": check_internals_same_as_library}[CHECK]()
    print(json.dumps(result))
