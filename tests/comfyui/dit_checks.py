"""Checks of the Flux / SD 3 joint-attention capture on tiny random models built from ComfyUI's own classes, run
in a subprocess with ComfyUI's folder as working directory.

Usage: python dit_checks.py REPO_DIR CHECK   -> prints one JSON object on the last line.

Checks:
- ``flux_transparent`` / ``sd3_transparent``: the patched clone's x0 prediction equals the MODEL's, for both map
  kinds, and the MODEL's options are the same before and after.
- ``flux_by_hand`` / ``sd3_by_hand``: on a 2-block model, both map kinds recomputed in plain torch from the
  blocks' weights (q, k, v, RoPE, QK-norm, modulation, the concept stream) equal the backend's maps.
- ``positions``: a word cut into several T5 pieces maps to all of them, in Flux's and SD 3's contexts, checked
  against the ids ComfyUI's own tokenizers give.
- ``families``: SD 1.5, SDXL and Flux-inpaint configurations are refused with their name.
- ``flux_nodes`` / ``sd3_nodes``: the staged graph through the nodes' own execute methods (RefDiffPrepareImage,
  VAEEncode with a 16-channel VAE, RefDiffNoiseInjection, RefDiffParseText, RefDiffCaptureAttention,
  RefDiffGenerativeMap, threshold proposals, RefDiffGenerativeScore, RefDiffFuseSelect) and RefDiffSegment (variant
  G), on a tiny MODEL and a tiny CLIP of the family's real text-encoder classes and tokenizers (random weights):
  both map kinds, a batch of two images, the MODEL's output before and after, and the refusals of the nodes.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.getcwd())
from comfy_helpers import library_on_path, load_pack  # noqa: E402

library_on_path()
from comfy.cli_args import args as _comfy_args  # noqa: E402

_comfy_args.cpu = True

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO, CHECK = sys.argv[1], sys.argv[2]
FLUX_CONTEXT = 64  # the tiny Flux's T5 width (4096 in Flux.1)
LATENT_HW = (6, 8)  # a 3 x 4 token grid




def init_random(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim > 1 else 0.1) + (1.0 if p.ndim == 1 and
                                                                                          p.numel() <= 64 else 0.0))
        for b in module.buffers():  # SD 3's pos_embed is an uninitialised buffer
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)


def patcher(config_cls, unet_config: dict, seed: int = 0):
    import comfy.model_management as mm
    import comfy.model_patcher

    config = config_cls(unet_config)
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    init_random(base.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=torch.device("cpu"))


def tiny_flux(depth: int = 2, single: int = 1, guidance: bool = True, seed: int = 0):
    import comfy.supported_models as sm

    cfg = {"image_model": "flux", "guidance_embed": guidance, "in_channels": 16, "out_channels": 16,
           "vec_in_dim": 32, "context_in_dim": FLUX_CONTEXT, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2,
           "depth": depth, "depth_single_blocks": single, "axes_dim": [4, 14, 14], "theta": 10000,
           "patch_size": 2, "qkv_bias": True}
    return patcher(sm.Flux if guidance else sm.FluxSchnell, cfg, seed)


def tiny_sd3(depth: int = 2, seed: int = 0):
    import comfy.supported_models as sm

    cfg = {"in_channels": 16, "pos_embed_scaling_factor": None, "patch_size": 2, "out_channels": 16,
           "depth": depth, "input_size": None, "adm_in_channels": 32,
           "context_embedder_config": {"target": "torch.nn.Linear",
                                       "params": {"in_features": FLUX_CONTEXT, "out_features": 64 * depth}},
           "num_patches": 64, "pos_embed_max_size": 8, "qk_norm": "rms", "x_block_self_attn_layers": []}
    return patcher(sm.SD3, cfg, seed)


def conditioning(seed: int, tokens: int = 7, family: str = "Flux") -> list:
    gen = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, 32, generator=gen)}
    if family == "Flux":
        extra["guidance"] = 3.5
    return [[torch.randn(1, tokens, FLUX_CONTEXT, generator=gen), extra]]


def latent_and_noise(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, *LATENT_HW, generator=gen), torch.randn(1, 16, *LATENT_HW, generator=gen)


def x0_prediction(model, x: torch.Tensor, t: float, cond: list, family: str) -> torch.Tensor:
    """The MODEL's x0 prediction at sigma t through ComfyUI's model wrapper."""
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    base = model.model
    extra = cond[0][1]
    kwargs = {"c_crossattn": cond[0][0], "y": extra["pooled_output"]}
    if family == "Flux" and base.diffusion_model.params.guidance_embed:
        kwargs["guidance"] = torch.tensor([extra.get("guidance", 3.5)])
    with torch.no_grad():
        return base.apply_model(x, torch.tensor([t]), transformer_options=model.model_options.get(
            "transformer_options", {}), **kwargs).float()


def block_inputs(model, x: torch.Tensor, t: float, cond: list, family: str) -> list[dict]:
    """Every double block's inputs in one forward, taken by plain replace patches that run the block as is."""
    seen: list[dict] = []
    clone = model.clone()
    depth = len(clone.model.diffusion_model.double_blocks if family == "Flux" else
                clone.model.diffusion_model.joint_blocks)
    for i in range(depth):
        def keep(args, extra):
            seen.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in args.items()
                         if k in ("img", "txt", "vec", "pe")})
            return extra["original_block"](args)

        clone.set_model_patch_replace(keep, "dit", "double_block", i)
    x0_prediction(clone, x, t, cond, family)
    return seen


def init_small(module: torch.nn.Module, seed: int) -> None:
    """Random weights of a text encoder or VAE: N(0, 0.02) matrices, unit vectors (norm scales and biases)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02 if p.ndim > 1 else torch.ones(p.shape))


def tiny_clip(family: str, seed: int = 4):
    """A ComfyUI CLIP of the family's own text-encoder classes (Flux: CLIP-L + T5; SD 3: CLIP-L + CLIP-G + T5) and
    real tokenizers, shrunk through ComfyUI's *_model_config options. Flux's T5 is FLUX_CONTEXT wide; SD 3's is
    4096 wide, as SD 3 pads CLIP-L/G to 4096 beside it."""
    import comfy.sd
    import comfy.text_encoders.flux as flux_te
    import comfy.text_encoders.sd3_clip as sd3_te

    width = FLUX_CONTEXT if family == "Flux" else 4096
    small = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
             "projection_dim": 32}
    options = {"dtype": torch.float32, "clip_l_model_config": dict(small), "clip_g_model_config": dict(small),
               "t5xxl_model_config": {"d_model": width, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 1}}
    target = types.SimpleNamespace(params={})
    if family == "Flux":
        target.clip, target.tokenizer = flux_te.flux_clip(), flux_te.FluxTokenizer
    else:
        target.clip, target.tokenizer = sd3_te.sd3_clip(), sd3_te.SD3Tokenizer
    clip = comfy.sd.CLIP(target, model_options=options)
    init_small(clip.cond_stage_model, seed)
    return clip


def tiny_vae(seed: int = 5):
    """A ComfyUI VAE with Flux / SD 3's 16 latent channels, detected from its weights as ComfyUI loads ae.safetensors
    (its own AutoencodingEngine, random weights)."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    engine = AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
    init_small(engine, seed)
    return comfy.sd.VAE(sd=engine.state_dict())


def tiny_node_sd3(depth: int = 3, seed: int = 0):
    """An SD 3 MODEL whose text width (4096) and pooled width (64) are those of tiny_clip("SD3")."""
    import comfy.supported_models as sm

    cfg = {"in_channels": 16, "pos_embed_scaling_factor": None, "patch_size": 2, "out_channels": 16,
           "depth": depth, "input_size": None, "adm_in_channels": 64,
           "context_embedder_config": {"target": "torch.nn.Linear",
                                       "params": {"in_features": 4096, "out_features": 64 * depth}},
           "num_patches": 64, "pos_embed_max_size": 8, "qk_norm": "rms", "x_block_self_attn_layers": []}
    return patcher(sm.SD3, cfg, seed)


# ------------------------------------------------------------------------------------------- by hand
def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def heads(x: torch.Tensor, n: int) -> torch.Tensor:
    b, length, c = x.shape
    return x.reshape(b, length, n, c // n).transpose(1, 2)


def rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    xr = x.reshape(*x.shape[:-1], -1, 1, 2)
    return (pe[..., 0] * xr[..., 0] + pe[..., 1] * xr[..., 1]).reshape(*x.shape)


def flux_block_by_hand(block, img, txt, vec, pe, concepts):
    """Plain-torch Flux double block on (img, txt) plus a concept stream: returns (txt->img probs [N, T],
    image attention output [N, D], concept attention output [C, D], updated concepts)."""
    n = block.num_heads

    def mod(lin):
        return lin.lin(F.silu(vec))[:, None].chunk(6, dim=-1)

    def qkv(attn, x):
        q, k, v = attn.qkv(x).chunk(3, dim=-1)
        q, k, v = heads(q, n), heads(k, n), heads(v, n)
        return rms(q, attn.norm.query_norm.scale), rms(k, attn.norm.key_norm.scale), v

    ish, isc, ig, _, _, _ = mod(block.img_mod)
    tsh, tsc, tg, tsh2, tsc2, tg2 = mod(block.txt_mod)
    ln = lambda x: F.layer_norm(x, x.shape[-1:], eps=1e-6)  # noqa: E731
    iq, ik, iv = qkv(block.img_attn, ln(img) * (1 + isc) + ish)
    tq, tk, tv = qkv(block.txt_attn, ln(txt) * (1 + tsc) + tsh)
    q = rope(torch.cat((tq, iq), 2), pe)
    k = rope(torch.cat((tk, ik), 2), pe)
    v = torch.cat((tv, iv), 2)
    t_len = txt.shape[1]
    probs = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)  # [1, H, L, L]
    out = probs @ v
    img_out = out[:, :, t_len:].transpose(1, 2).flatten(2)[0]
    txt_probs = probs[0, :, t_len:, :t_len].mean(0)
    cq, ck, cv = qkv(block.txt_attn, ln(concepts) * (1 + tsc) + tsh)
    keys = torch.cat((ck, k[:, :, t_len:]), 2)
    vals = torch.cat((cv, v[:, :, t_len:]), 2)
    cout = ((cq @ keys.transpose(-1, -2)) * cq.shape[-1] ** -0.5).softmax(-1) @ vals
    cout = cout.transpose(1, 2).flatten(2)
    c2 = concepts + tg * block.txt_attn.proj(cout)
    c2 = c2 + tg2 * block.txt_mlp(ln(c2) * (1 + tsc2) + tsh2)
    return txt_probs, img_out, cout[0], c2


def sd3_block_by_hand(block, x, context, c_mod, concepts):
    """Plain-torch SD 3 joint block: the same four results as flux_block_by_hand."""
    n = block.x_block.attn.num_heads

    def pre(dm_block, h):
        chunks = dm_block.adaLN_modulation(c_mod).chunk(6 if not dm_block.pre_only else 2, dim=1)
        shift, scale = chunks[0], chunks[1]
        hn = F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        q, k, v = dm_block.attn.qkv(hn).chunk(3, dim=-1)
        q, k, v = heads(q, n), heads(k, n), heads(v, n)
        return rms(q, dm_block.attn.ln_q.weight), rms(k, dm_block.attn.ln_k.weight), v, chunks

    xq, xk, xv, _ = pre(block.x_block, x)
    cq_, ck_, cv_, _ = pre(block.context_block, context)
    q, k, v = torch.cat((cq_, xq), 2), torch.cat((ck_, xk), 2), torch.cat((cv_, xv), 2)
    t_len = context.shape[1]
    probs = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
    out = probs @ v
    img_out = out[:, :, t_len:].transpose(1, 2).flatten(2)[0]
    txt_probs = probs[0, :, t_len:, :t_len].mean(0)
    oq, ok, ov, chunks = pre(block.context_block, concepts)
    keys, vals = torch.cat((ok, xk), 2), torch.cat((ov, xv), 2)
    cout = (((oq @ keys.transpose(-1, -2)) * oq.shape[-1] ** -0.5).softmax(-1) @ vals).transpose(1, 2).flatten(2)
    c2 = concepts
    if not block.context_block.pre_only:
        _, _, gate, shift2, scale2, gate2 = chunks
        c2 = concepts + gate[:, None] * block.context_block.attn.proj(cout)
        hn = F.layer_norm(c2, c2.shape[-1:], eps=1e-6) * (1 + scale2[:, None]) + shift2[:, None]
        c2 = c2 + gate2[:, None] * block.context_block.mlp(hn)
    return txt_probs, img_out, cout[0], c2


# ------------------------------------------------------------------------------------------- checks
def check_transparent(family: str) -> dict:
    nodes = load_pack(REPO)
    dit = importlib.import_module(nodes.__name__ + ".dit_backend")
    from refdiff.stores import AttentionStore

    model = tiny_flux() if family == "Flux" else tiny_sd3()
    cond = conditioning(3, family=family)
    x, _ = latent_and_noise()
    before = repr(model.model_options)
    plain = x0_prediction(model, x, 0.3, cond, family)
    diffs = {}
    for kind in ("attention", "concept"):
        store = AttentionStore(kind="probs")
        capture = dit.JointCapture(family, [0, 1], kind, dit.latent_grid(LATENT_HW), store,
                                   torch.randn(1, 3, FLUX_CONTEXT), [[1, 2], [4], []])
        clone = dit.patched_clone(model, capture)
        patched = x0_prediction(clone, x, 0.3, cond, family)
        diffs[kind] = float((patched - plain).abs().max())
        diffs[kind + "_layers"] = list(store.maps().layers)
    after = repr(model.model_options)
    again = x0_prediction(model, x, 0.3, cond, family)
    return {"diffs": diffs, "options_equal": before == after, "again": float((again - plain).abs().max()),
            "scale": float(plain.abs().max())}


def check_by_hand(family: str) -> dict:
    nodes = load_pack(REPO)
    dit = importlib.import_module(nodes.__name__ + ".dit_backend")

    model = tiny_flux() if family == "Flux" else tiny_sd3()
    cond = conditioning(5, family=family)
    neg = conditioning(6, family=family)
    latent, noise = latent_and_noise(2)
    t = 0.3
    concepts_raw = torch.randn(1, 3, FLUX_CONTEXT, generator=torch.Generator().manual_seed(9))
    positions = [[1, 2], [5], []]
    use_cfg = family == "SD3"
    results = {}
    for kind in ("attention", "concept"):
        maps = dit.run_joint_capture(model, latent, noise, [t], cond, neg if use_cfg else None, 4.0, use_cfg, kind,
                                     [0, 1], concepts_raw, positions, seed=0)
        results[kind] = maps
    # by hand: the block inputs of the conditional branch at x_t = (1 - t) x0 + t noise (in the model's latent
    # scale), taken by plain replace patches
    base = model.model
    x0 = base.process_latent_in(latent)
    x_t = (1 - t) * x0 + t * noise
    inputs = block_inputs(model, x_t, t, cond, family)
    dm = base.diffusion_model
    blocks = dm.double_blocks if family == "Flux" else dm.joint_blocks
    grid = dit.latent_grid(LATENT_HW)
    with torch.no_grad():
        c = (dm.txt_in if family == "Flux" else dm.context_embedder)(concepts_raw)
        want_attn, want_concept = [], []
        for i, block in enumerate(blocks):
            a = inputs[i]
            if family == "Flux":
                probs, img_out, cout, c = flux_block_by_hand(block, a["img"], a["txt"], a["vec"], a["pe"], c)
            else:
                probs, img_out, cout, c = sd3_block_by_hand(block, a["img"], a["txt"], a["vec"], c)
            want_attn.append(probs.reshape(*grid, -1))
            cmap = (img_out @ cout.T).softmax(-1)  # [N, C]
            spread = torch.zeros(img_out.shape[0], a["txt"].shape[1])
            for j, pos in enumerate(positions):
                for p in pos:
                    spread[:, p] = cmap[:, j]
            want_concept.append(spread.reshape(*grid, -1))
    got_a, got_c = results["attention"], results["concept"]
    wrong = float("inf")
    if use_cfg:  # the same by hand on the unconditional branch's inputs: the capture must not match it
        neg_inputs = block_inputs(model, x_t, t, neg, family)
        with torch.no_grad():
            c = dm.context_embedder(concepts_raw)
            wrong_attn = [sd3_block_by_hand(b, a["img"], a["txt"], a["vec"], c)[0].reshape(*grid, -1)
                          for b, a in zip(blocks, neg_inputs)]
        wrong = float((got_a.cond - torch.stack(wrong_attn)).abs().max())
    soft = got_c.cond[..., [1, 5]]
    return {"uncond_branch_diff": wrong,
            "concept_soft_fraction": float(((soft > 0.01) & (soft < 0.99)).float().mean()),
            "attention_diff": float((got_a.cond - torch.stack(want_attn)).abs().max()),
            "concept_diff": float((got_c.cond - torch.stack(want_concept)).abs().max()),
            "attention_shape": list(got_a.cond.shape), "layers": list(got_a.layers),
            "uncond": got_a.uncond is not None,
            "row_sums_below_one": bool((got_a.cond.sum(-1) <= 1 + 1e-5).all()),
            "concept_rows": float(got_c.cond[..., [1, 5]].sum(-1).max())}


def check_positions() -> dict:
    nodes = load_pack(REPO)
    dit = importlib.import_module(nodes.__name__ + ".dit_backend")
    from comfy.text_encoders.flux import FluxTokenizer
    from comfy.text_encoders.sd3_clip import SD3Tokenizer

    text = "the snowboarder beside the xylophonist on the left"
    out = {}
    for name, tok in (("Flux", FluxTokenizer()), ("SD3", SD3Tokenizer())):
        clip = types.SimpleNamespace(tokenizer=tok)
        item = dit.dit_parse_item(text, clip)
        t5 = tok.t5xxl.tokenizer
        ids = [int(t[0]) for t in tok.t5xxl.tokenize_with_weights(item.prompt)[0]]  # ComfyUI's own T5 ids
        pieces = t5.convert_ids_to_tokens(ids)
        offset = dit.SD3_CLIP_TOKENS if name == "SD3" else 0
        words = {w: p for (w, _, _), p in zip(item.parsed.words, item.word_positions)}
        t5_of = {w: [q - offset for q in p if q >= offset] for w, p in words.items()}
        out[name] = {"root": item.parsed.root, "root_positions": item.root_positions,
                     "root_position": item.root_position,
                     "root_pieces": "".join(pieces[q] for q in t5_of[item.parsed.root]).replace("▁", ""),
                     "xylo_pieces": [pieces[q] for q in t5_of["xylophonist"]],
                     "clip_positions": [q for q in words["xylophonist"] if q < offset]}
        if name == "SD3":
            clip_ids = [int(t[0]) for t in tok.clip_l.tokenize_with_weights(item.prompt)[0]]
            clip_tok = tok.clip_l.tokenizer
            out[name]["clip_xylo"] = "".join(clip_tok.convert_ids_to_tokens([clip_ids[q] for q in
                                                                             out[name]["clip_positions"]]))
    return out


def check_families() -> dict:
    nodes = load_pack(REPO)
    dit = importlib.import_module(nodes.__name__ + ".dit_backend")
    import comfy.supported_models as sm
    from refdiff.errors import InputError

    out = {}
    for cls in (sm.SD15, sm.SDXL, sm.FluxInpaint):
        fake = types.SimpleNamespace(model=types.SimpleNamespace(model_config=cls({})))
        try:
            dit.check_dit_family(fake)
            out[cls.__name__] = "accepted"
        except InputError as exc:
            out[cls.__name__] = str(exc)
    dn = importlib.import_module(nodes.__name__ + ".diffusion_nodes")
    cb = importlib.import_module(nodes.__name__ + ".comfy_backend")
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    latent = dn.inject_noise(latent, 0, 0.1, 20)
    for cls in (sm.FluxInpaint, sm.AuraFlow):  # what the capture node answers for a family it does not read
        fake = types.SimpleNamespace(model=types.SimpleNamespace(model_config=cls({})))
        out["node_" + cls.__name__] = refusal(lambda: dn.capture_attention(fake, latent, text="a dog"))
    out["unet_only_flux"] = refusal(lambda: cb.model_family(tiny_flux()))  # e.g. the feature-cluster nodes
    out["flux"] = dit.check_dit_family(tiny_flux())
    out["schnell"] = dit.check_dit_family(tiny_flux(guidance=False))
    out["sd3"] = dit.check_dit_family(tiny_sd3())
    return out


def planted_images() -> torch.Tensor:
    """Two 64 x 48 images: a bright square on the left of the first, on the right of the second."""
    image = torch.full((2, 48, 64, 3), 0.2)
    image[0, 12:36, 4:28] = 0.9
    image[1, 12:36, 36:60] = 0.9
    return image


def refusal(fn) -> str:
    from refdiff.errors import InputError

    try:
        fn()
    except InputError as exc:
        return str(exc)
    return "accepted"


def check_nodes(family: str) -> dict:
    nodes = load_pack(REPO)
    mod = {n: importlib.import_module(f"{nodes.__name__}.{n}") for n in
           ("diffusion_nodes", "text_nodes", "map_nodes", "select_nodes", "segment_node", "attention_maps",
            "dit_options")}
    import nodes as comfy_nodes

    dn, tn, mn, sn, seg = (mod[n] for n in ("diffusion_nodes", "text_nodes", "map_nodes", "select_nodes",
                                             "segment_node"))
    model = tiny_flux(depth=3) if family == "Flux" else tiny_node_sd3(depth=3)
    clip, vae = tiny_clip(family), tiny_vae()
    image = planted_images()
    text = "the snowboarder beside a dog"
    probe_cond = conditioning(3, tokens=5, family=family) if family == "Flux" else \
        [[torch.randn(1, 5, 4096, generator=torch.Generator().manual_seed(3)), {"pooled_output": torch.zeros(1, 64)}]]
    probe_x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    before = x0_prediction(model, probe_x, 0.3, probe_cond, family)
    options_before = repr(model.model_options)

    square = dn.RefDiffPrepareImage.execute(image, 64, "lanczos").args[0]
    latent = comfy_nodes.VAEEncode().encode(vae, square)[0]
    noised = dn.RefDiffNoiseInjection.execute(latent, 7, "preset", "official", 0.1, 20).args[0]
    parse = tn.RefDiffParseText.execute(text, "official", "preset", "", clip=clip).args[0]
    out = {"parse_context": parse.context, "root": parse.items[0].parsed.root,
           "root_positions": parse.items[0].root_positions, "latent_shape": list(latent["samples"].shape)}
    common = dict(model=model, latent=noised, preset="official", kind="preset", guidance=4.0, use_cfg=True, factor=4,
                  blocks="down,mid,up", steps=0, clip=clip, parse=parse)
    for kind in ("attention", "concept"):
        attention, info = dn.RefDiffCaptureAttention.execute(**common, map_kind=kind, dit_blocks="last2",
                                                             flow_t=0.25, flow_steps=1).args
        c = mn.RefDiffGenerativeMap.execute(attention, parse, image, "official", "preset").args[0]
        proposals = mn.RefDiffThresholdProposals.execute(c, "", "official").args[0]
        scores = mn.RefDiffGenerativeScore.execute(c, proposals, "official").args[0]
        mask = sn.RefDiffFuseSelect.execute(proposals, "official", -1.0, -1.0, 3, -1, generative=scores,
                                            image=image).args[0]
        one, _ = dn.capture_attention(model, {**noised, "samples": noised["samples"][1:],
                                              dn.INJECTION_KEY: dataclasses_replace_noise(noised, 1)},
                                      clip=clip, parse=parse, kind="probs",
                                      dit=mod["dit_options"].DitOptions(map_kind=kind, blocks="last2"))
        c_one = mn.generative_maps(one, parse, image[1:])
        seg_out = seg.RefDiffSegment.execute(model, clip, vae, image, text, "G", "official", 7, 64, 0, 32, 0.88,
                                             0.95, map_kind=kind, dit_blocks="last2").args
        out[kind] = {"type": type(attention).__name__, "family": attention.model_family, "kind": attention.kind,
                     "layers": list(attention.maps[0].layers), "blocks": attention.blocks,
                     "grid": list(attention.maps[0].grid), "num_tokens": attention.maps[0].num_tokens,
                     "concepts": attention.concepts[0], "info": info,
                     "c_shape": list(c.shape), "c_dtype": str(c.dtype), "c_range": [float(c.min()), float(c.max())],
                     "images_differ": float((c[0] - c[1]).abs().max()),
                     "batch_of_one_diff": float((c_one[0] - c[1]).abs().max()),
                     "mask_shape": list(mask.shape), "mask_pixels": [float(m.sum()) for m in mask],
                     "segment_c_diff": float((seg_out[1] - c).abs().max()),
                     "segment_mask_diff": float((seg_out[0] - mask).abs().max()),
                     "segment_report_has_family": f"{family}:" in seg_out[2]}
    dit = importlib.import_module(f"{nodes.__name__}.dit_backend")
    emb = dit.concept_embeddings(clip, ["dog", "sky"], family)
    t5_alone = torch.stack([clip.cond_stage_model.t5xxl.encode_token_weights(clip.tokenize(w)["t5xxl"])[0][0, 0]
                            for w in ("dog", "sky")])[None].float()  # T5 by itself, first token of each word
    out["concept_embeddings"] = {"shape": list(emb.shape), "diff_to_t5": float((emb - t5_alone).abs().max()),
                                 "words_differ": float((emb[0, 0] - emb[0, 1]).abs().max())}
    out["model_unchanged"] = float((x0_prediction(model, probe_x, 0.3, probe_cond, family) - before).abs().max())
    out["options_unchanged"] = repr(model.model_options) == options_before
    sd_parse = tn.RefDiffParseText.execute(text, "official", "preset", "").args[0]  # SD 1.x positions
    out["refusals"] = {
        "sd_parse": refusal(lambda: dn.RefDiffCaptureAttention.execute(**{**common, "parse": sd_parse})),
        "logits": refusal(lambda: dn.RefDiffCaptureAttention.execute(**{**common, "kind": "logits"})),
        "self_attention": refusal(lambda: dn.RefDiffCaptureAttention.execute(**common, self_attention=True)),
        "blocks": refusal(lambda: dn.RefDiffCaptureAttention.execute(**common, dit_blocks="7")),
        "segment_factor": refusal(lambda: seg.RefDiffSegment.execute(model, clip, vae, image, text, "G", "official",
                                                                     7, 64, 0, 32, 0.88, 0.95, factor=4)),
        "refine": refusal(lambda: mod["attention_maps"].check_refinable(attention, {2: 1.0})),
        "map_of_sd_parse": refusal(lambda: mn.generative_maps(attention, sd_parse, image)),
    }
    return out


def in_executor(fn, *args):
    """``fn`` under torch.inference_mode, as ComfyUI's executor runs nodes."""
    with torch.inference_mode():
        return fn(*args)


def dataclasses_replace_noise(latent: dict, index: int):
    """The injection plan of ``latent`` cut to image ``index`` (a batch of one)."""
    import dataclasses

    plan = next(v for k, v in latent.items() if k != "samples")
    return dataclasses.replace(plan, noise=plan.noise[index:index + 1])


CHECKS = {
    "flux_nodes": lambda: in_executor(check_nodes, "Flux"),
    "sd3_nodes": lambda: in_executor(check_nodes, "SD3"),
    "positions": check_positions,
    "families": check_families,
    "flux_transparent": lambda: check_transparent("Flux"),
    "sd3_transparent": lambda: check_transparent("SD3"),
    "flux_by_hand": lambda: check_by_hand("Flux"),
    "sd3_by_hand": lambda: check_by_hand("SD3"),
}

if __name__ == "__main__":
    torch.manual_seed(0)
    print(json.dumps(CHECKS[CHECK]()))
