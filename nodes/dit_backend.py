"""ComfyUI backend of the generative stage for diffusion transformers: Flux and SD 3 (MMDiT) MODELs.

Their text and image tokens meet in one joint attention per double block. A "dit" ``double_block`` replace
patch on a CLONE of the MODEL runs ComfyUI's own block with an ``optimized_attention_override`` added to
that block's transformer_options only: the override calls ComfyUI's attention function unchanged (or the
override another node set) and keeps its q, k, v and output, so the clone computes what the MODEL computes.
From them ``refdiff.joint_attention`` makes the map of every text token (``attention``: image-to-text
probabilities; ``concept``: ConceptAttention's output space, with concept tokens run through the block's text
weights beside the real tokens, never seen by them). The noise injection and the Euler steps are
``refdiff.flow``'s, run as a ComfyUI sampler function, so CONDITIONING (Flux's guidance embedding included),
CFG batching (SD 3), model patches and memory management behave as in KSampler.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

import comfy.model_management as mm
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.supported_models as supported_models

from refdiff.capture import COND, CrossAttentionMaps, downsampled_grid
from refdiff.errors import InputError
from refdiff.flow import flow_loop
from refdiff.joint_attention import (check_map_kind, concept_attention, joint_text_probs, merge_heads,
                                     output_space_map, spread_concepts)
from refdiff.stores import AttentionStore, split_branches

from .dit_options import SUPPORTED_MODELS

# Families whose joint attention the capture reads, by ComfyUI model-config class.
DIT_FAMILIES: dict[type, str] = {supported_models.Flux: "Flux", supported_models.FluxSchnell: "Flux",
                                 supported_models.SD3: "SD3"}
PATCH_FACTOR = 2  # both families embed 2 x 2 latent patches as one image token
SD3_CLIP_TOKENS = 77  # SD 3's context: CLIP-L/G's 77 positions, then T5's


# ---------------------------------------------------------------------------------------------- family
def dit_family(model: Any) -> str | None:
    """"Flux" or "SD3" for a MODEL of those families (exact config class), None for any other."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    return DIT_FAMILIES.get(type(config))


def check_dit_family(model: Any) -> str:
    """The family of a Flux / SD 3 MODEL; InputError naming the family of any other."""
    family = dit_family(model)
    if family is None:
        base = getattr(model, "model", None)
        config = getattr(base, "model_config", None)
        name = type(config).__name__ if config is not None else type(base).__name__
        raise InputError(f"model: the joint-attention capture runs on Flux.1 (dev / schnell) and SD 3 / 3.5 "
                         f"MODELs; this MODEL is {name}. The generative map runs on {SUPPORTED_MODELS}")
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, comfy.model_sampling.CONST):
        raise InputError(f"model: its sampling ({type(sampling).__name__}) is not flow matching (CONST); "
                         "remove the node that changed the model's sampling type")
    return family


def double_blocks(model: Any) -> list[torch.nn.Module]:
    """The double (joint) blocks of a Flux / SD 3 MODEL, in forward order."""
    dm = model.model.diffusion_model
    blocks = getattr(dm, "double_blocks", None)
    if blocks is None:
        blocks = getattr(dm, "joint_blocks", None)
    if blocks is None or len(blocks) == 0:
        raise InputError(f"model: {type(dm).__name__} has no double blocks to capture from")
    return list(blocks)


def latent_grid(latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The image-token grid of a latent: 2 x 2 patches, padded up as both models pad to the patch size."""
    return downsampled_grid(latent_hw, PATCH_FACTOR)


# ---------------------------------------------------------------------------------------------- text
def clip_family(clip: Any) -> str | None:
    """"Flux" (CLIP-L + T5) or "SD3" (CLIP-L/G + T5) for such a CLIP's tokenizer, None for any other."""
    tok = getattr(clip, "tokenizer", None)
    if tok is None or not hasattr(tok, "t5xxl"):
        return None
    return "SD3" if hasattr(tok, "clip_g") else "Flux"


def t5_tokenizer(clip: Any) -> Any:
    """The transformers T5 tokenizer (fast: offset mapping) of a Flux / SD 3 CLIP."""
    inner = getattr(getattr(clip, "tokenizer", None), "t5xxl", None)
    hf = getattr(inner, "tokenizer", None)
    if hf is None or not getattr(hf, "is_fast", False):
        raise InputError("clip: this CLIP has no T5 tokenizer with character offsets; connect the Flux / SD 3 "
                         "text encoders (DualCLIPLoader / TripleCLIPLoader or the checkpoint's CLIP)")
    return hf


def clip_l_tokenizer(clip: Any) -> Any:
    """The CLIP-L tokenizer wrapper (ComfyUI's SDTokenizer) of an SD 3 CLIP."""
    inner = getattr(getattr(clip, "tokenizer", None), "clip_l", None)
    if inner is None:
        raise InputError("clip: this SD 3 CLIP has no CLIP-L tokenizer")
    return inner


def sd3_positions(t5_positions: Sequence[int], clip_positions: Sequence[int]) -> list[int]:
    """A word's positions in SD 3's context: its CLIP-L pieces (start token 0), then its T5 pieces after the
    77 CLIP positions."""
    return [int(p) for p in clip_positions if 0 < int(p) < SD3_CLIP_TOKENS - 1] + \
        [SD3_CLIP_TOKENS + int(p) for p in t5_positions]


def dit_parse_item(line: str, clip: Any, root_rule: str = "root_or_subj", prompt_suffix: str = ", ",
                   root_word: str = "") -> Any:
    """One expression parsed and placed in the model's context by character offsets: T5 positions (no start
    token: the first piece is 0) for Flux; for SD 3 the CLIP-L pieces then 77 + the T5 pieces. A word cut into
    several pieces keeps all of them (``root_positions``, ``word_positions``); ``root_position`` is the last
    T5 piece (the last piece, as for SD)."""
    from . import token_positions

    family = clip_family(clip)
    t5 = t5_tokenizer(clip)
    item = token_positions.parse_item(line, t5, root_rule=root_rule, prompt_suffix=prompt_suffix,
                                      root_word=root_word, max_length=100000)
    if family != "SD3":
        return item
    clip_l = clip_l_tokenizer(clip)
    words = item.parsed.words
    clip_words = token_positions.word_positions(item.prompt, words, clip_l, SD3_CLIP_TOKENS)
    clip_root = token_positions.word_positions(item.prompt, [("", *item.parsed.root_span)], clip_l,
                                               SD3_CLIP_TOKENS)[0]
    clip_tokens = token_positions.token_strings(item.prompt, clip_l, SD3_CLIP_TOKENS)
    tokens = (clip_tokens + [""] * SD3_CLIP_TOKENS)[:SD3_CLIP_TOKENS] + list(item.tokens)
    return dataclasses.replace(item, root_positions=sd3_positions(item.root_positions, clip_root),
                               root_position=SD3_CLIP_TOKENS + item.root_position, tokens=tokens,
                               word_positions=[sd3_positions(t, c) for t, c in zip(item.word_positions,
                                                                                   clip_words)])


def concept_embeddings(clip: Any, concepts: Sequence[str], family: str) -> torch.Tensor:
    """Each concept encoded alone by the CLIP's T5 and its first token kept (ConceptAttention's encoding):
    [1, C, 4096]. SD 3 without T5 keeps CLIP's first word token instead."""
    rows = []
    for word in concepts:
        tokens = clip.tokenize(word)
        cond = clip.encode_from_tokens(tokens)
        index = 0
        if family == "SD3":
            clip_len = SD3_CLIP_TOKENS * max(1, len(tokens.get("l", tokens.get("g", [[]]))))
            index = clip_len if cond.shape[1] > clip_len else 1
        rows.append(cond[0, index])
    return torch.stack(rows)[None].float()


# ---------------------------------------------------------------------------------------------- capture
@dataclasses.dataclass
class JointCall:
    """What the override saw of a block's joint attention: q, k, v as [B, heads, L, dh], its output
    [B, L, heads*dh] and mask."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    mask: torch.Tensor | None


def _joint_call(args: tuple, kwargs: dict, out: torch.Tensor) -> JointCall:
    """Normalise the arguments of ComfyUI's optimized_attention (Flux: [B, H, L, D] with skip_reshape; SD 3:
    [B, L, H*D], v possibly [B, L, H, D]) to [B, H, L, D]."""
    q, k, v = args[:3]
    heads = int(args[3] if len(args) > 3 else kwargs["heads"])
    if not kwargs.get("skip_reshape", False):
        b, n = q.shape[:2]
        dh = q.shape[-1] // heads
        q, k, v = (t.reshape(b, -1, heads, dh).transpose(1, 2) for t in (q, k, v))
    if kwargs.get("skip_output_reshape", False):
        out = merge_heads(out)
    return JointCall(q, k, v, out, kwargs.get("mask"))


def _cond_rows(batch: int, cond_or_uncond: Sequence[int] | None) -> torch.Tensor:
    """The batch rows of the conditional branch (ComfyUI's cond_or_uncond chunk order)."""
    index = torch.arange(batch)
    return torch.cat([chunk for _, chunk in split_branches(index, cond_or_uncond, keep=(COND,))])


def flux_concept_step(block: torch.nn.Module, c: torch.Tensor, vec: torch.Tensor, img_k: torch.Tensor,
                      img_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One Flux double block on the concept tokens c [B, C, hidden] with the block's TEXT weights (as its text
    tokens are processed), attending to [concepts; image]: (updated c, concept attention output [B, C, H*D]).
    Concepts sit at RoPE position 0, an identity rotation, as the text tokens do."""
    from comfy.ldm.flux.layers import apply_mod

    mod1, mod2 = block.txt_mod(vec)
    x = apply_mod(block.txt_norm1(c), 1 + mod1.scale, mod1.shift)
    qkv = block.txt_attn.qkv(x)
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = block.txt_attn.norm(q, k, v)
    out = merge_heads(concept_attention(q, k, v, img_k, img_v)).to(c.dtype)
    c = c + apply_mod(block.txt_attn.proj(out), mod1.gate)
    c = c + apply_mod(block.txt_mlp(apply_mod(block.txt_norm2(c), 1 + mod2.scale, mod2.shift)), mod2.gate)
    return c, out


def sd3_concept_step(block: torch.nn.Module, c: torch.Tensor, vec: torch.Tensor, img_k: torch.Tensor,
                     img_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One SD 3 joint block on the concept tokens with its context block's weights (pre_attention, attention
    on [concepts; image], post_attention unless the block is pre-only)."""
    ctx = block.context_block
    qkv, intermediates = ctx.pre_attention(c, vec)
    heads = block.x_block.attn.num_heads
    b, n = qkv[0].shape[:2]
    dh = qkv[0].shape[-1] // heads
    q, k, v = (t.reshape(b, n, heads, dh).transpose(1, 2) for t in qkv)
    out = merge_heads(concept_attention(q, k, v, img_k, img_v)).to(c.dtype)
    if not ctx.pre_only:
        c = ctx.post_attention(out, *intermediates)
    return c, out


@dataclasses.dataclass
class JointCapture:
    """The state of one capture: which blocks record, the map kind, the concepts and where they sit."""

    family: str
    blocks: list[int]
    kind: str
    grid: tuple[int, int]
    store: AttentionStore
    concepts: torch.Tensor | None = None  # raw [1, C, 4096] embeddings for "concept"
    concept_positions: list[list[int]] = dataclasses.field(default_factory=list)
    stream: torch.Tensor | None = None  # the concept tokens' hidden states in the current evaluation

    def embed_concepts(self, model: Any, like: torch.Tensor) -> torch.Tensor:
        dm = model.model.diffusion_model
        embed = dm.txt_in if self.family == "Flux" else dm.context_embedder
        return embed(self.concepts.to(device=like.device, dtype=like.dtype))

    def record(self, i: int, call: JointCall, txt_len: int, txt_first: bool, rows: torch.Tensor) -> None:
        q, k = call.q[rows], call.k[rows]
        n_grid = self.grid[0] * self.grid[1]
        img_len = q.shape[2] - txt_len
        if self.kind == "attention":
            mask = call.mask[rows] if call.mask is not None and call.mask.shape[0] == call.q.shape[0] else call.mask
            probs = joint_text_probs(q, k, txt_len, img_len, txt_first, mask=mask)[:, :n_grid]
            self.store.add(f"double_blocks.{i}", "mid", PATCH_FACTOR, self.grid, probs, [COND] * len(rows))


def make_block_patch(model: Any, i: int, block: torch.nn.Module, capture: JointCapture,
                     previous: Callable | None = None) -> Callable:
    """A "dit" double_block replace patch: the block runs as usual (or as the previous patch runs it) with an
    attention override on its own transformer_options that keeps the joint attention's q, k, v and output;
    the maps (and the concept stream) are computed from them beside the block."""
    last = max(capture.blocks)
    txt_first = not getattr(block, "flipped_img_txt", False)

    def patch(args: dict, extra: dict) -> dict:
        options = dict(args.get("transformer_options") or {})
        earlier = options.get("optimized_attention_override")
        seen: list[JointCall] = []
        txt_len = int(args["txt"].shape[1])
        img_len = int(args["img"].shape[1])

        def override(func: Callable, *a: Any, **kw: Any) -> torch.Tensor:
            out = earlier(func, *a, **kw) if earlier is not None else func(*a, **kw)
            if not seen and a[0].shape[-2 if kw.get("skip_reshape", False) else 1] == txt_len + img_len:
                seen.append(_joint_call(a, kw, out))
            return out

        options["optimized_attention_override"] = override
        patched = {**args, "transformer_options": options}
        out = previous(patched, extra) if previous is not None else extra["original_block"](patched)
        if i > last:
            return out
        if not seen:
            raise InputError(f"double block {i}: its joint attention was not seen through ComfyUI's attention "
                             "override; this ComfyUI version or another node bypasses it")
        call = seen[0]
        rows = _cond_rows(int(call.q.shape[0]), options.get("cond_or_uncond"))
        if capture.kind == "attention":
            if i in capture.blocks:
                capture.record(i, call, txt_len, txt_first, rows)
            return out
        i_slice = slice(txt_len, txt_len + img_len) if txt_first else slice(0, img_len)
        img_k, img_v = call.k[rows][:, :, i_slice], call.v[rows][:, :, i_slice]
        vec = args["vec"][rows]
        if capture.stream is None or i == 0:
            capture.stream = capture.embed_concepts(model, args["img"]).expand(len(rows), -1, -1)
        step = flux_concept_step if capture.family == "Flux" else sd3_concept_step
        with torch.no_grad():
            capture.stream, concept_out = step(block, capture.stream, vec, img_k, img_v)
        if i in capture.blocks:
            n_grid = capture.grid[0] * capture.grid[1]
            img_out = call.out[rows][:, i_slice][:, :n_grid]
            cmap = output_space_map(img_out, concept_out)
            spread = spread_concepts(cmap, capture.concept_positions, txt_len)
            capture.store.add(f"double_blocks.{i}", "mid", PATCH_FACTOR, capture.grid, spread, [COND] * len(rows))
        if i == last:
            capture.stream = None
        return out

    return patch


def patched_clone(model: Any, capture: JointCapture) -> Any:
    """A clone of ``model`` with block patches on the blocks the capture needs (for "concept" every block up to
    the last recorded one, which carry the concept stream); the MODEL passed in is left untouched."""
    clone = model.clone()
    blocks = double_blocks(clone)
    upto = max(capture.blocks) if capture.kind == "concept" else None
    table = clone.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for i, block in enumerate(blocks):
        if (upto is not None and i <= upto) or i in capture.blocks:
            previous = table.get(("double_block", i))
            clone.set_model_patch_replace(make_block_patch(clone, i, block, capture, previous), "dit",
                                          "double_block", i)
    return clone


def _flow_sampler(ts: Sequence[float], store: AttentionStore, on_step: Callable[[], None]) -> Callable:
    """A ComfyUI sampler function running refdiff.flow.flow_loop; the x0 prediction is the guided model's at
    sigma = t (CONST: the model's input is x_t itself)."""

    def sample(model: Any, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
               callback: Callable | None = None, disable: bool | None = None) -> torch.Tensor:
        extra_args = extra_args or {}

        def denoise(x_t: torch.Tensor, t: float, _i: int) -> torch.Tensor:
            return model(x_t, t * x_t.new_ones([x_t.shape[0]]), **extra_args)

        def before(i: int) -> None:
            mm.throw_exception_if_processing_interrupted()
            store.step = i
            if i:
                on_step()

        pred = flow_loop(model.latent_image, model.noise.to(model.latent_image), list(ts), denoise,
                         before_step=before)
        on_step()
        return pred

    return sample


def run_joint_capture(model: Any, latent: torch.Tensor, noise: torch.Tensor, ts: Sequence[float], positive: list,
                      negative: list | None, guidance_scale: float, use_cfg: bool, kind: str, blocks: Sequence[int],
                      concepts: torch.Tensor | None = None, concept_positions: Sequence[Sequence[int]] = (),
                      seed: int = 0, on_step: Callable[[], None] = lambda: None) -> CrossAttentionMaps:
    """Noise one image's latent [1, C, h, w] (unscaled, as VAEEncode gives it) to ts[0] with ``noise`` and run
    the flow steps ``ts`` on a patched clone of ``model``; returns the conditional maps [L, h', w', T] of every
    recorded block and step over the T text positions of the model's context.

    ``use_cfg`` runs SD 3's unconditional branch with ``negative`` at ``guidance_scale``; without it the
    conditional branch runs alone (Flux: its guidance embedding comes from the CONDITIONING, e.g. FluxGuidance).
    """
    family = check_dit_family(model)
    check_map_kind(kind)
    if latent.ndim != 4 or latent.shape[0] != 1 or noise.shape != latent.shape:
        raise InputError(f"latent must hold one image [1, C, h, w] with noise of its shape, got "
                         f"{tuple(latent.shape)} and {tuple(noise.shape)}")
    depth = len(double_blocks(model))
    if not blocks or any(not 0 <= int(b) < depth for b in blocks):
        raise InputError(f"blocks {list(blocks)}: this MODEL has double blocks 0..{depth - 1}")
    if kind == "concept" and (concepts is None or len(concept_positions) != concepts.shape[1]):
        raise InputError("concepts: the concept map needs the concept embeddings and each concept's positions")
    store = AttentionStore(kind="probs")
    grid = latent_grid((int(latent.shape[-2]), int(latent.shape[-1])))
    capture = JointCapture(family, sorted(int(b) for b in blocks), kind, grid, store, concepts,
                           [list(p) for p in concept_positions])
    clone = patched_clone(model, capture)
    if use_cfg and negative is None:
        raise InputError("negative: classifier-free guidance needs the unconditional CONDITIONING; connect one, or "
                         "turn use_cfg off")
    cfg = float(guidance_scale) if use_cfg else 1.0
    if use_cfg and math.isclose(cfg, 1.0):
        clone.model_options["disable_cfg1_optimization"] = True
    sigmas = torch.tensor(list(ts) + [0.0], dtype=torch.float32)
    sampler = comfy.samplers.KSAMPLER(_flow_sampler(ts, store, on_step))
    comfy.sample.sample_custom(clone, noise.to(latent.dtype), cfg, sampler, sigmas, positive,
                               negative if negative is not None else positive, latent, disable_pbar=True,
                               seed=int(seed))
    return store.maps()


__all__ = ["DIT_FAMILIES", "PATCH_FACTOR", "SD3_CLIP_TOKENS", "dit_family", "check_dit_family", "double_blocks",
           "latent_grid", "clip_family", "t5_tokenizer", "clip_l_tokenizer", "sd3_positions", "dit_parse_item",
           "concept_embeddings", "JointCall", "flux_concept_step", "sd3_concept_step", "JointCapture",
           "make_block_patch", "patched_clone", "run_joint_capture"]
